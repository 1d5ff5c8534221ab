"""Telemetry wire format: the one place that knows what a transition message looks like.

One transition is a JSON object::

    {"s": STATE, "a": ACTION, "r": NUMBER, "s_next": STATE, "t": UNIX_SECONDS?, "seq": INT?, "done": BOOL?,
     "v": STRING?}

STATE is an integer id, a string label or a non-empty array of numbers; ACTION is an integer id or a string
label. A payload is one such object or a JSON array of them (a batch); offline traces are JSON Lines files,
one object per line. Unknown keys are ignored so publishers can add fields without breaking old monitors.

``done`` (default false) says the episode *terminated* with this transition: ``s_next`` is a terminal state. A
time-limit truncation is not a termination and must not set it. Downstream, the next state of a ``done``
transition is the cell's absorbing state (reward 0, a self-loop under every action; see dtsync.episodes).

``v`` (optional, on twin transitions) is the twin's version: a controller that resynchronises a twin sends its
new telemetry under a new version, and a change of version starts the twin's window afresh (dtsync.monitor), so
the old model's behaviour never mixes with the new one's. A string of 1 to 64 characters; ignored on the real
stream.

Decoding is strict: booleans are not numbers (nor numbers booleans: ``done`` is ``true``, ``false`` or absent),
``t`` and ``seq`` may be ``null`` or absent. Every problem is
reported as a :class:`Rejection` whose ``reason`` is one of :data:`REJECT_REASONS` (a fixed set, because it
becomes a Prometheus label):

``oversized``        payload (or JSONL line) longer than ``max_bytes``; nothing is decoded.
``invalid_json``     not parseable: syntax errors, and also nesting deeper than the decoder's recursion limit.
                     The literals ``NaN``/``Infinity`` are not JSON, so they land here too.
``not_object``       the top-level value, a batch item or a JSONL line is not a JSON object.
``missing_field``    one of ``s``, ``a``, ``r``, ``s_next`` is absent.
``wrong_type``       a field has the wrong JSON type: booleans, empty or nested state arrays, non-numbers in a
                     state vector, a non-integer ``seq``...
``non_finite``       a number overflows a float (``1e999``, or an integer literal beyond ~1.8e308) in ``r``,
                     ``t`` or a state-vector component.
``empty_batch``      the payload is ``[]``.
``batch_too_large``  the batch has more than ``max_batch`` items; nothing is decoded.

Speed: the whole payload is first decoded by one typed msgspec decoder (C speed, millions of transitions per
second). Only if that fails are items decoded one by one, and only a failed item is decoded a second time,
untyped, to name its reason — so a bad item never poisons a batch and good batches pay nothing for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Annotated, Any, NamedTuple

import msgspec

__all__ = [
    "REJECT_REASONS",
    "Action",
    "Rejection",
    "State",
    "Transition",
    "decode_payload",
    "encode_batch",
    "encode_transition",
    "read_jsonl",
]

REJECT_REASONS: tuple[str, ...] = (
    "oversized",
    "invalid_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "non_finite",
    "empty_batch",
    "batch_too_large",
)

# A vector state is stored as a tuple so that it is hashable (it becomes a dictionary key downstream).
Vector = Annotated[tuple[float, ...], msgspec.Meta(min_length=1)]
State = int | str | Vector
Action = int | str

Version = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # bounded: it becomes a metric label

_REQUIRED = ("s", "a", "r", "s_next")


class Transition(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One observed transition (s, a, r, s_next), optionally stamped with time ``t`` and sequence ``seq``,
    ``done`` when the episode terminated with it (``s_next`` terminal; not set for a time-limit truncation), and
    the twin's version ``v``.

    Constraints (non-empty vectors, finite floats, no booleans) are enforced when decoding, not when a
    Transition is built directly in Python. ``gc=False``: instances hold no containers that could form
    cycles, and skipping GC tracking makes decoding large batches markedly cheaper.
    """

    s: State
    a: Action
    r: float
    s_next: State
    t: float | None = None
    seq: int | None = None
    done: bool = False
    v: Version | None = None


class Rejection(NamedTuple):
    """Why (``reason``, one of REJECT_REASONS) and where (``index``: batch item or 1-based JSONL line) input
    was refused; ``detail`` is free text for logs only."""

    reason: str
    detail: str
    index: int | None = None  # type: ignore[assignment]  # shadows tuple.index on purpose (the brief's name)


_FAST = msgspec.json.Decoder(Transition | list[Transition])
_ONE = msgspec.json.Decoder(Transition)
_RAW_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])
# Untyped decoder used only to name the reason of a failure; float_hook=float keeps 1e999 as inf (msgspec
# would otherwise refuse it) so that overflow can be told apart from syntax errors.
_UNTYPED = msgspec.json.Decoder(float_hook=float)
_ENCODER = msgspec.json.Encoder()
_JSON_WS = b" \t\r\n"
_PARSE_ERRORS = (msgspec.DecodeError, RecursionError)


def decode_payload(
    payload: bytes, *, max_bytes: int = 1_048_576, max_batch: int = 100_000
) -> tuple[list[Transition], list[Rejection]]:
    """Decode one message (an object or an array batch) into transitions and rejections; never raises.

    Batch rejections carry the 0-based item index; whole-payload rejections carry ``index=None``.
    """
    if len(payload) > max_bytes:
        return [], [Rejection("oversized", f"{len(payload)} bytes > max_bytes={max_bytes}")]
    try:
        value = _FAST.decode(payload)
    except msgspec.ValidationError:
        return _decode_slow(payload, max_batch)
    except _PARSE_ERRORS as exc:
        return [], [Rejection("invalid_json", _describe(exc))]
    if isinstance(value, Transition):
        return [value], []
    if not value:
        return [], [Rejection("empty_batch", "batch has no items")]
    if len(value) > max_batch:
        return [], [_too_large(len(value), max_batch)]
    return value, []


def read_jsonl(
    path: str | os.PathLike[str], *, max_bytes: int = 1_048_576
) -> Iterator[Transition | Rejection]:
    """Stream a JSON Lines trace: one Transition or Rejection per non-blank line (index = 1-based line)."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if len(line) > max_bytes:
                yield Rejection("oversized", f"{len(line)} bytes > max_bytes={max_bytes}", lineno)
            else:
                yield _decode_item(line, lineno)


def encode_transition(tr: Transition) -> bytes:
    """Serialise one transition (``t``/``seq`` omitted when None, ``done`` when false)."""
    return _ENCODER.encode(tr)


def encode_batch(transitions: list[Transition]) -> bytes:
    """Serialise a batch as a JSON array."""
    return _ENCODER.encode(transitions)


def _decode_slow(payload: bytes, max_batch: int) -> tuple[list[Transition], list[Rejection]]:
    """Per-item path, taken only when the typed whole-payload decode failed validation."""
    first = payload.lstrip(_JSON_WS)[:1]
    if first == b"{":
        item = _decode_item(payload, None)
        return ([], [item]) if isinstance(item, Rejection) else ([item], [])
    if first != b"[":
        try:
            _UNTYPED.decode(payload)
        except _PARSE_ERRORS as exc:
            return [], [Rejection("invalid_json", _describe(exc))]
        return [], [Rejection("not_object", "top-level value is neither an object nor an array")]
    try:
        raws = _RAW_ITEMS.decode(payload)
    except _PARSE_ERRORS as exc:
        return [], [Rejection("invalid_json", _describe(exc))]
    if len(raws) > max_batch:
        return [], [_too_large(len(raws), max_batch)]
    good: list[Transition] = []
    bad: list[Rejection] = []
    for i, raw in enumerate(raws):
        item = _decode_item(raw, i)
        if isinstance(item, Rejection):
            bad.append(item)
        else:
            good.append(item)
    return good, bad


def _decode_item(data: bytes | msgspec.Raw, index: int | None) -> Transition | Rejection:
    """Decode one object; on failure name the reason from the untyped value."""
    try:
        return _ONE.decode(data)
    except msgspec.ValidationError as exc:
        error: Exception = exc
    except _PARSE_ERRORS as exc:
        return Rejection("invalid_json", _describe(exc), index)
    try:
        value = _UNTYPED.decode(data)
    except _PARSE_ERRORS as exc:
        return Rejection("invalid_json", _describe(exc), index)
    # The typed decoder is the authority on acceptance; _classify only names why. If it cannot tell,
    # "wrong_type" is the honest catch-all for a schema violation.
    return Rejection(_classify(value) or "wrong_type", _describe(error), index)


def _classify(value: Any) -> str | None:
    """Name an untyped item's problem; precedence: not_object, missing_field, wrong_type, non_finite."""
    if not isinstance(value, dict):
        return "not_object"
    if any(k not in value for k in _REQUIRED):
        return "missing_field"
    checks = (
        _check_state(value["s"]),
        _check_label(value["a"]),
        _check_number(value["r"]),
        _check_state(value["s_next"]),
        None if value.get("t") is None else _check_number(value["t"]),
        None if value.get("seq") is None else _check_int(value["seq"]),
        None if "done" not in value else _check_bool(value["done"]),
        None if value.get("v") is None else _check_version(value["v"]),
    )
    for reason in ("wrong_type", "non_finite"):
        if reason in checks:
            return reason
    return None


def _check_bool(x: Any) -> str | None:
    return None if isinstance(x, bool) else "wrong_type"


def _check_version(x: Any) -> str | None:
    return None if isinstance(x, str) and 1 <= len(x) <= 64 else "wrong_type"


def _check_int(x: Any) -> str | None:
    return None if isinstance(x, int) and not isinstance(x, bool) else "wrong_type"


def _check_label(x: Any) -> str | None:
    return None if isinstance(x, str) else _check_int(x)


def _check_number(x: Any) -> str | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return "wrong_type"
    try:
        return None if math.isfinite(x) else "non_finite"
    except OverflowError:  # integer literal too large for a float
        return "non_finite"


def _check_state(x: Any) -> str | None:
    if not isinstance(x, list):
        return _check_label(x)
    if not x:
        return "wrong_type"
    reasons = {_check_number(v) for v in x}
    return "wrong_type" if "wrong_type" in reasons else ("non_finite" if "non_finite" in reasons else None)


def _too_large(n: int, max_batch: int) -> Rejection:
    return Rejection("batch_too_large", f"{n} items > max_batch={max_batch}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return str(exc)
