"""Testbed parameters: one gNB, N uplink resource blocks (RBs), a few UEs with their own traffic and channel.

Modelled on the case study of Tao, Xu, You (arXiv 2502.17983, 2511.19961): a surveillance camera (steady
video), a gaming laptop (bursty, on/off) and a livestreaming phone (variable bitrate) share the RBs of one cell;
each step the scheduler picks one allocation scheme. A *twin* is the same simulator with other parameters
(simplified traffic, a frozen or mis-estimated channel, a coarser buffer model, noisy probabilities), so every
model choice is a field here and the YAML form of a twin is just another parameter file.

Per UE the state is (buffer level b in 0..L-1 chunks, channel level c in 0..C-1); a ``full`` (always
backlogged) UE has no buffer, L = 1. One step, a short slot:

1. service: UE i with ``rb`` RBs sends served_i = min(b_i, floor(rb * rates[c_i])) chunks (a full UE sends
   the whole capacity); reward = sum_i weight_i * served_i / sum_i weight_i * (L_i - 1, or for a full UE
   its largest RB share), in [0, 1] while rates are at most 1 chunk per RB;
2. then *one* event at most (the slot is short: a uniformised continuous-time model, Lippman 1975): an
   arrival batch of k chunks at UE i with probability rate_i * sizes_i[k-1] (overflow beyond L-1 is dropped),
   or a channel update of UE i with probability ``update_i`` (new level ~ transition[c_i]), or nothing.

One event per slot keeps each (s, a) row down to a handful of next states, which is what keeps the exact
DT-BSM fast (one transport problem per state pair and action, of the size of those supports).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtsync.config import ConfigError

__all__ = [
    "MAX_STATES",
    "BatchTraffic",
    "Channel",
    "FullTraffic",
    "PoissonTraffic",
    "TestbedParams",
    "Traffic",
    "UE",
    "load_params",
    "parse_params",
]

MAX_STATES = 1024  # the exact MDP is dense (S * A * S floats): keep it small enough to build and solve
_PROB_TOL = 1e-6
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _check_name(name: str) -> str:
    """UE and scheme names end up in state and action labels: keep them plain (no spaces or ':')."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid name {name!r}: use letters, digits, '.', '_', '+' and '-'")
    return name


Name = Annotated[str, AfterValidator(_check_name)]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_distribution(p: Sequence[float], what: str) -> None:
    if abs(sum(p) - 1.0) > _PROB_TOL:
        raise ValueError(f"{what} must sum to 1, sums to {sum(p):.6g}")


class FullTraffic(_Model):
    """Always backlogged (e.g. steady video at a bitrate above its share): no buffer state, L = 1."""

    kind: Literal["full"] = "full"

    def batches(self) -> np.ndarray:
        """P(a batch of k chunks arrives in a step), k = 1, 2, ...: none for a full buffer."""
        return np.zeros(0)

    def mean_rate(self) -> float:
        """Mean chunks arriving per step (infinite demand)."""
        return math.inf


class BatchTraffic(_Model):
    """Batches arrive at ``rate`` per step; ``sizes[k-1]`` = P(a batch has k chunks).

    One fixed size is an on/off source (bursts, silence between them); several sizes a variable bitrate.
    """

    kind: Literal["batch"] = "batch"
    rate: Prob
    sizes: tuple[Prob, ...] = Field(min_length=1)

    @field_validator("sizes")
    @classmethod
    def _sums_to_one(cls, sizes: tuple[float, ...]) -> tuple[float, ...]:
        _check_distribution(sizes, "sizes")
        return sizes

    def batches(self) -> np.ndarray:
        """P(a batch of k chunks arrives in a step), k = 1..len(sizes)."""
        return self.rate * np.asarray(self.sizes, dtype=float)

    def mean_rate(self) -> float:
        """Mean chunks arriving per step."""
        return self.rate * float(np.dot(np.arange(1, len(self.sizes) + 1), self.sizes))


class PoissonTraffic(_Model):
    """Single chunks arriving as a Poisson stream of ``rate`` per step: the textbook simplification."""

    kind: Literal["poisson"] = "poisson"
    rate: Prob

    def batches(self) -> np.ndarray:
        """P(a batch of k chunks arrives in a step): only k = 1."""
        return np.array([self.rate])

    def mean_rate(self) -> float:
        """Mean chunks arriving per step."""
        return self.rate


Traffic = Annotated[FullTraffic | BatchTraffic | PoissonTraffic, Field(discriminator="kind")]


class Channel(_Model):
    """Markov channel: ``rates[c]`` chunks per RB at quality level c; with probability ``update`` a step,
    the level moves by ``transition[c][c']``. A frozen (stale) model is the identity matrix; a memoryless one
    has every row equal."""

    rates: tuple[Annotated[float, Field(ge=0.0)], ...] = Field(min_length=1)
    transition: tuple[tuple[Prob, ...], ...]
    update: Prob

    @field_validator("transition")
    @classmethod
    def _stochastic(cls, transition: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        for c, row in enumerate(transition):
            _check_distribution(row, f"row {c}")
        return transition

    @model_validator(mode="after")
    def _square(self) -> Channel:
        n = len(self.rates)
        if len(self.transition) != n or any(len(row) != n for row in self.transition):
            raise ValueError(f"transition must be {n} x {n} (one row and column per rate level)")
        return self


class UE(_Model):
    """One UE: priority ``weight`` in the reward, its buffer, traffic and channel.

    ``buckets`` (a partition of 0..L-1 into consecutive groups) makes the *model* coarser than the labels it
    reports: it only tracks the group of the buffer level; each step it takes the level to be uniform within
    the group (for service) and reports a level drawn uniformly within the next group. ``null``: every level
    is its own group (the real network).
    """

    name: Name
    weight: float = Field(gt=0.0)
    buffer_levels: int = Field(ge=1, le=16)
    buckets: tuple[tuple[int, ...], ...] | None = None
    traffic: Traffic
    channel: Channel

    @model_validator(mode="after")
    def _consistent(self) -> UE:
        full = isinstance(self.traffic, FullTraffic)
        if full != (self.buffer_levels == 1):
            raise ValueError("buffer_levels must be 1 exactly when traffic is full (always backlogged)")
        if self.buckets is not None:
            flat = [b for group in self.buckets for b in group]
            if any(not g for g in self.buckets) or flat != list(range(self.buffer_levels)):
                raise ValueError(
                    f"buckets must split the levels 0..{self.buffer_levels - 1} into consecutive non-empty groups"
                )
        return self

    @property
    def channel_levels(self) -> int:
        """Number of channel quality levels C."""
        return len(self.channel.rates)

    @property
    def n_local(self) -> int:
        """Local states of this UE: L * C (buffer-major: x = b * C + c)."""
        return self.buffer_levels * self.channel_levels

    @property
    def full(self) -> bool:
        """Always backlogged: serves its whole capacity, has no buffer state."""
        return self.buffer_levels == 1


class TestbedParams(_Model):
    """The whole testbed: RBs, allocation schemes (the actions), and the UEs (their order is the label order).

    ``schemes`` maps an action name to the RBs given to each UE; a scheme may leave RBs unused. The event
    probabilities of a step (every traffic ``rate`` and channel ``update``) must sum to at most 1.
    """

    rbs: int = Field(ge=1)
    schemes: dict[Name, tuple[Annotated[int, Field(ge=0)], ...]] = Field(min_length=1)
    ues: tuple[UE, ...]

    @model_validator(mode="after")
    def _consistent(self) -> TestbedParams:
        if not self.ues:
            raise ValueError("ues: give at least one UE")
        names = [ue.name for ue in self.ues]
        if len(set(names)) != len(names):
            raise ValueError(f"UE names must be unique, got {names}")
        for name, rbs in self.schemes.items():
            if len(rbs) != len(self.ues):
                raise ValueError(f"scheme {name!r} gives RBs to {len(rbs)} UEs, there are {len(self.ues)}")
            if sum(rbs) > self.rbs:
                raise ValueError(f"scheme {name!r} uses {sum(rbs)} RBs, only rbs={self.rbs} exist")
        events = sum(float(ue.traffic.batches().sum()) + ue.channel.update for ue in self.ues)
        if events > 1.0 + _PROB_TOL:
            raise ValueError(f"traffic rates and channel updates sum to {events:.6g} per step, more than 1")
        if self.n_states > MAX_STATES:
            raise ValueError(f"{self.n_states} states (product of buffer_levels * channel levels) > {MAX_STATES}")
        return self

    @property
    def n_states(self) -> int:
        """S = product over UEs of L_i * C_i."""
        return math.prod(ue.n_local for ue in self.ues)

    @property
    def actions(self) -> list[str]:
        """Action labels: the scheme names, in index order."""
        return list(self.schemes)

    def label_space(self) -> tuple[Any, ...]:
        """What two parameter sets must share for their traces to be compared state by state."""
        return (
            tuple((ue.name, ue.buffer_levels, ue.channel_levels) for ue in self.ues),
            tuple(self.schemes),
        )

    def to_yaml(self) -> str:
        """YAML text that :func:`load_params` reads back to equal parameters."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


_KINDS = ("full", "batch", "poisson")


def _format_errors(error: ValidationError) -> list[str]:
    """``key.path: message`` per pydantic error (discriminator tags dropped so the path is the YAML path)."""
    problems = []
    for err in error.errors():
        loc = err["loc"]
        keep = [str(p) for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "traffic" and p in _KINDS)]
        path = ".".join(keep) or "(top level)"
        problems.append(f"{path}: {err['msg'].removeprefix('Value error, ')}")
    return problems


def parse_params(data: Mapping[str, Any] | Any, source: str | None = None) -> TestbedParams:
    """Validate a parsed mapping; every problem is reported as ``key.path: message`` in a ConfigError."""
    try:
        return TestbedParams.model_validate(data)
    except ValidationError as e:
        raise ConfigError.from_problems(_format_errors(e), source) from None


def load_params(path: str | os.PathLike[str]) -> TestbedParams:
    """Read testbed parameters from YAML (the shape ``dtsync testbed show`` prints); ConfigError on failure."""
    name = os.fspath(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML: {e}") from None
    return parse_params({} if data is None else data, source=name)
