import numpy as np
import pytest

from dtsync.contract import Transition, decode_payload
from dtsync.encoding import (
    ENCODING_REASONS,
    CapacityError,
    CellEncoding,
    EncodingError,
    Indexer,
    StateEncoder,
)


def test_indexer_first_seen_order_and_get_does_not_add() -> None:
    ix = Indexer()
    assert [ix.index(x) for x in ["b", "a", "b", 3, "3", (1, 2)]] == [0, 1, 0, 2, 3, 4]
    assert ix.labels == ["b", "a", 3, "3", (1, 2)]
    assert len(ix) == 5
    assert ix.get("zzz") is None and len(ix) == 5 and "zzz" not in ix
    assert ix.get("3") == 3 and ix.get(3) == 2 and "a" in ix


def test_indexer_capacity_refuses_new_labels_only() -> None:
    ix = Indexer(max_size=2)
    ix.index("a")
    ix.index("b")
    with pytest.raises(CapacityError):
        ix.index("c")
    assert ix.index("a") == 0 and ix.index("b") == 1  # known labels still resolve
    assert len(ix) == 2 and ix.labels == ["a", "b"] and ix.get("c") is None
    with pytest.raises(CapacityError):
        Indexer(max_size=0).index("x")
    with pytest.raises(ValueError):
        Indexer(max_size=-1)


def test_indexer_compact_keeps_order_and_returns_the_map() -> None:
    ix = Indexer(max_size=4)
    for x in "abcd":
        ix.index(x)
    mapping = ix.compact(np.array([False, True, False, True]))
    assert mapping.tolist() == [-1, 0, -1, 1]
    assert ix.labels == ["b", "d"] and ix.get("b") == 0 and ix.get("d") == 1 and "a" not in ix and len(ix) == 2
    assert ix.index("e") == 2 and ix.index("a") == 3  # room again; a freed label comes back as a new one
    with pytest.raises(CapacityError):
        ix.index("f")
    with pytest.raises(ValueError):
        ix.compact(np.array([True]))


def test_cell_encoding_free_renumbers_states_and_actions_or_changes_nothing() -> None:
    cell = CellEncoding(max_states=3, max_actions=2)
    cell.encode(Transition("x", "u", 0.0, "y"))
    cell.encode(Transition("y", "v", 0.0, "z"))
    assert cell.free(np.ones(3, dtype=bool), np.ones(2, dtype=bool)) is None
    assert cell.states.labels == ["x", "y", "z"] and cell.actions.labels == ["u", "v"]
    maps = cell.free(np.array([False, True, True]), np.array([False, True]))
    assert maps is not None and maps[0].tolist() == [-1, 0, 1] and maps[1].tolist() == [-1, 0]
    assert cell.encode(Transition("y", "v", 0.0, "z")) == (0, 0, 1)
    assert cell.encode(Transition("x", "u", 0.0, "z")) == (2, 1, 1)  # fits again: the cap counts live labels


def test_state_encoder_passes_labels_through() -> None:
    enc = StateEncoder(bins=[[0.0]])
    assert enc.encode(3) == 3 and enc.encode("3") == "3"
    assert enc.encode(3) != enc.encode("3")


def test_state_encoder_bins_use_searchsorted_right() -> None:
    enc = StateEncoder(bins=[[0.0, 1.0, 2.0], [10.0]])
    assert enc.encode((-5.0, 9.9)) == (0, 0)
    assert enc.encode((0.0, 10.0)) == (1, 1)  # a value equal to an edge goes to the bin above
    assert enc.encode((1.5, 11.0)) == (2, 1)
    assert enc.encode((2.0, -1.0)) == (3, 0)
    assert enc.encode((1e300, 1e300)) == (3, 1)
    rng = np.random.default_rng(0)
    edges = [np.sort(rng.normal(size=5)).tolist(), [-1.0, 0.0, 1.0]]
    enc = StateEncoder(bins=edges)
    for x in rng.normal(size=(200, 2)).round(1):
        expected = tuple(int(np.searchsorted(e, v, side="right")) for e, v in zip(edges, x, strict=True))
        assert enc.encode(tuple(x.tolist())) == expected


def test_state_encoder_feature_without_edges_has_one_bin() -> None:
    assert StateEncoder(bins=[[], [0.0]]).encode((123.0, 1.0)) == (0, 1)


@pytest.mark.parametrize(
    ("encoder", "state", "reason"),
    [
        (StateEncoder(), (1.0,), "no_encoder"),
        (StateEncoder(bins=[[0.0], [0.0]]), (1.0,), "wrong_dimension"),
        (StateEncoder(bins=[[0.0]]), (1.0, 2.0), "wrong_dimension"),
    ],
)
def test_state_encoder_errors_have_fixed_reasons(encoder: StateEncoder, state: tuple, reason: str) -> None:
    with pytest.raises(EncodingError) as info:
        encoder.encode(state)
    assert info.value.reason == reason and reason in ENCODING_REASONS


@pytest.mark.parametrize(
    "edges", [[1.0, 0.0], [0.0, 0.0], [0.0, float("nan")], [float("nan")], [float("inf")]]
)
def test_state_encoder_rejects_bad_edges(edges: list[float]) -> None:
    with pytest.raises(ValueError):
        StateEncoder(bins=[edges])


def test_cell_encoding_is_shared_and_grows() -> None:
    cell = CellEncoding(StateEncoder(bins=[[0.5], [0.5]]))
    (real, twin), _ = decode_payload(
        b'[{"s": [0.1, 0.9], "a": "up", "r": 1, "s_next": "idle"},'
        b' {"s": "idle", "a": "down", "r": 0, "s_next": [0.7, 0.2]}]'
    )
    assert cell.encode(real) == (0, 0, 1)
    assert cell.encode(twin) == (1, 1, 2)
    assert cell.states.labels == [(0, 1), "idle", (1, 0)]
    assert cell.actions.labels == ["up", "down"]
    # a twin reporting the same labels gets the same indices
    assert cell.encode(Transition((0.2, 0.6), "up", 5.0, "idle")) == (0, 0, 1)


def test_cell_encoding_error_registers_nothing() -> None:
    cell = CellEncoding()
    with pytest.raises(EncodingError):
        cell.encode(Transition("new", 0, 1.0, (1.0,)))
    assert len(cell.states) == 0 and len(cell.actions) == 0


def test_cell_encoding_capacity() -> None:
    cell = CellEncoding(max_states=2, max_actions=1)
    assert cell.encode(Transition(1, 0, 0.0, 2)) == (0, 0, 1)
    with pytest.raises(CapacityError):
        cell.encode(Transition(1, 0, 0.0, 3))
    with pytest.raises(CapacityError):
        cell.encode(Transition(1, 9, 0.0, 2))
    assert len(cell.states) == 2 and len(cell.actions) == 1


def test_action_labels_are_capped_per_cell() -> None:
    """`max_actions` bounds a cell's action labels: a new one beyond it is refused as too_many_labels."""
    from dtsync.config import parse_config
    from dtsync.contract import Transition
    from dtsync.monitor import CellMonitor

    config = parse_config({"max_actions": 2, "max_states": 3, "cells": {"c": {"twins": {"t": {}}}}})
    monitor = CellMonitor("c", config)
    results = [monitor.add("real", Transition(s=0, a=a, r=0.0, s_next=1), float(i)) for i, a in enumerate("xyzx")]
    assert results == [None, None, "too_many_labels", None]
    assert monitor.add("real", Transition(s=2, a="x", r=0.0, s_next=3), 5.0) == "too_many_labels"  # 4th state
    assert len(monitor.real) == 3
