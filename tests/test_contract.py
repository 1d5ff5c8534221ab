import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtsync.contract import (
    REJECT_REASONS,
    Rejection,
    Transition,
    decode_payload,
    encode_batch,
    encode_transition,
    read_jsonl,
)

GOOD = {"s": 1, "a": 0, "r": 0.5, "s_next": 2}


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


def with_fields(**fields: object) -> dict:
    return {**GOOD, **fields}


def test_single_object_decodes_with_optional_fields_absent_or_null() -> None:
    good, bad = decode_payload(dumps(GOOD))
    assert good == [Transition(1, 0, 0.5, 2)] and bad == []
    good, bad = decode_payload(dumps(with_fields(t=None, seq=None)))
    assert good == [Transition(1, 0, 0.5, 2)] and bad == []


def test_labels_vectors_and_extra_keys() -> None:
    item = {
        "s": [1, 2.5],
        "a": "up",
        "r": 3,
        "s_next": "cell-7",
        "t": 1700000000,
        "seq": 9,
        "future": {"x": 1},
    }
    (tr,), bad = decode_payload(dumps(item))
    assert bad == []
    assert tr.s == (1.0, 2.5) and all(isinstance(x, float) for x in tr.s)
    assert tr.a == "up" and tr.s_next == "cell-7"
    assert tr.r == 3.0 and isinstance(tr.r, float)
    assert tr.t == 1700000000.0 and tr.seq == 9
    assert hash(tr) == hash(Transition((1.0, 2.5), "up", 3.0, "cell-7", 1700000000.0, 9))


def test_batch_and_roundtrip() -> None:
    batch = [Transition(i, i % 3, i / 7, i + 1, 1.5 * i, i) for i in range(50)] + [
        Transition((0.5,), "a", -1.0, "z")
    ]
    good, bad = decode_payload(encode_batch(batch))
    assert good == batch and bad == []
    assert decode_payload(encode_transition(batch[-1])) == ([batch[-1]], [])
    assert b"seq" not in encode_transition(batch[-1])  # None fields are omitted


def test_done_flag_decodes_defaults_to_false_and_is_omitted_when_false() -> None:
    (tr,), bad = decode_payload(dumps(with_fields(done=True)))
    assert bad == [] and tr.done is True and tr == Transition(1, 0, 0.5, 2, done=True)
    (tr,), _ = decode_payload(dumps(with_fields(done=False)))
    assert tr.done is False and tr == Transition(1, 0, 0.5, 2)
    assert decode_payload(dumps(GOOD))[0][0].done is False
    assert b"done" not in encode_transition(Transition(1, 0, 0.5, 2))
    assert encode_transition(Transition(1, 0, 0.5, 2, done=True)).endswith(b',"done":true}')
    batch = [Transition(i, 0, 0.0, i + 1, done=i % 2 == 0) for i in range(6)]
    assert decode_payload(encode_batch(batch)) == (batch, [])


def reason_of(payload: bytes, **kw: int) -> str:
    good, bad = decode_payload(payload, **kw)
    assert good == [] and len(bad) == 1
    return bad[0].reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b'{"s": 1, "a": 0, "r": NaN, "s_next": 2}', "invalid_json"),  # NaN is not JSON
        (b'{"s": 1, "a": 0, "r": Infinity, "s_next": 2}', "invalid_json"),
        (b'[{"s": true}, garbage', "invalid_json"),  # bad item *and* broken JSON: the payload is unreadable
        (b"[" * 50_000, "invalid_json"),
        (b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid_json"),  # nesting beyond the limit
        (b"3", "not_object"),
        (b' "hello" ', "not_object"),
        (b"null", "not_object"),
        (b"3 4", "invalid_json"),
        (b'{"s": 1, "a": 0, "r": 1}', "missing_field"),
        (b"{}", "missing_field"),
        (dumps(with_fields(s=True)), "wrong_type"),
        (dumps(with_fields(a=False)), "wrong_type"),
        (dumps(with_fields(a=1.5)), "wrong_type"),
        (dumps(with_fields(r=True)), "wrong_type"),
        (dumps(with_fields(r="1")), "wrong_type"),
        (dumps(with_fields(s=[])), "wrong_type"),
        (dumps(with_fields(s=[[1.0]])), "wrong_type"),
        (dumps(with_fields(s_next=[1.0, "x"])), "wrong_type"),
        (dumps(with_fields(s_next=[1.0, True])), "wrong_type"),
        (dumps(with_fields(s={"x": 1})), "wrong_type"),
        (dumps(with_fields(seq=1.0)), "wrong_type"),
        (dumps(with_fields(seq=True)), "wrong_type"),
        (dumps(with_fields(t="now")), "wrong_type"),
        (dumps(with_fields(done=1)), "wrong_type"),  # a flag is a JSON boolean, not a number
        (dumps(with_fields(done="true")), "wrong_type"),
        (dumps(with_fields(done=None)), "wrong_type"),  # unlike t and seq: absent means false, null is not a flag
        (b'{"s": 1, "a": 0, "r": 1e999, "s_next": 2}', "non_finite"),
        (b'{"s": 1, "a": 0, "r": 1, "s_next": 2, "t": -1e999}', "non_finite"),
        (b'{"s": [0.5, 1e999], "a": 0, "r": 1, "s_next": 2}', "non_finite"),
        (b'{"s": 1, "a": 0, "r": 1' + b"0" * 400 + b', "s_next": 2}', "non_finite"),  # int beyond float
        (b"[]", "empty_batch"),
        (b" [ ] ", "empty_batch"),
    ],
)
def test_each_rejection_reason(payload: bytes, reason: str) -> None:
    assert reason in REJECT_REASONS
    assert reason_of(payload) == reason


def test_wrong_type_wins_over_non_finite() -> None:
    assert reason_of(b'{"s": true, "a": 0, "r": 1e999, "s_next": 2}') == "wrong_type"


def test_oversized_decodes_nothing() -> None:
    payload = encode_batch([Transition(1, 0, 0.5, 2)] * 10)
    _, (rej,) = decode_payload(payload, max_bytes=len(payload) - 1)
    assert rej.reason == "oversized" and rej.index is None
    assert decode_payload(payload, max_bytes=len(payload))[0] == [Transition(1, 0, 0.5, 2)] * 10


@pytest.mark.parametrize("with_bad_item", [False, True])
def test_batch_too_large_on_fast_and_slow_path(with_bad_item: bool) -> None:
    items = [GOOD] * 4 + ([{"s": True}] if with_bad_item else [GOOD])
    assert reason_of(dumps(items), max_batch=4) == "batch_too_large"
    good, bad = decode_payload(dumps(items), max_batch=5)
    assert len(good) == 4 + (not with_bad_item) and len(bad) == with_bad_item


def test_mixed_batch_keeps_good_items_and_indexes_bad_ones() -> None:
    items = [
        GOOD,
        3,
        with_fields(s=True),
        {"s": 1},
        with_fields(s=[2, 3], r=2),
        with_fields(seq=1.5),
        [GOOD],
        with_fields(a="x"),
    ]
    payload = dumps(items).replace(b'"r": 2', b'"r": 1e999')
    good, bad = decode_payload(payload)
    assert good == [Transition(1, 0, 0.5, 2), Transition(1, "x", 0.5, 2)]
    assert [(r.reason, r.index) for r in bad] == [
        ("not_object", 1),
        ("wrong_type", 2),
        ("missing_field", 3),
        ("non_finite", 4),
        ("wrong_type", 5),
        ("not_object", 6),
    ]
    assert all(isinstance(r.detail, str) and r.detail for r in bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(payload: bytes) -> None:
    good, bad = decode_payload(payload)
    assert all(isinstance(t, Transition) for t in good)
    assert all(r.reason in REJECT_REASONS for r in bad)
    assert good or bad


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["s", "a", "r", "s_next", "t", "seq", "done", "x"]), children, max_size=8)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_item_verdict_is_the_same_alone_and_inside_a_batch(item: object) -> None:
    """The fast whole-batch path and the per-item path must accept and reject the same items."""
    alone = decode_payload(dumps(item))
    good, bad = decode_payload(dumps([GOOD, item]))
    assert good[0] == Transition(1, 0, 0.5, 2)
    if isinstance(item, list):  # a bare array is a batch on its own, an item inside one is not_object
        assert [r.reason for r in bad] == ["not_object"]
    elif alone[0]:
        assert good[1:] == alone[0] and bad == []
    else:
        assert [r.reason for r in bad] == [r.reason for r in alone[1]] and bad[0].index == 1


def test_read_jsonl(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    lines = [
        dumps(GOOD),
        b"",
        b"   ",
        dumps(with_fields(r=True)),
        b"[1]",
        b"{oops",
        dumps(with_fields(s=[1, 2])),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = list(read_jsonl(path))
    assert out[0] == Transition(1, 0, 0.5, 2)
    assert [(r.reason, r.index) for r in out[1:4]] == [
        ("wrong_type", 4),
        ("not_object", 5),
        ("invalid_json", 6),
    ]
    assert all(isinstance(r, Rejection) for r in out[1:4])
    assert out[4] == Transition((1.0, 2.0), 0, 0.5, 2)
    assert len(out) == 5


def test_read_jsonl_oversized_line(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_bytes(dumps(GOOD) + b"\n" + dumps(with_fields(a="x" * 100)) + b"\n")
    out = list(read_jsonl(path, max_bytes=60))
    assert out[0] == Transition(1, 0, 0.5, 2)
    assert isinstance(out[1], Rejection) and (out[1].reason, out[1].index) == ("oversized", 2)
