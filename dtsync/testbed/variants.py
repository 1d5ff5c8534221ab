"""Twin constructors: the real parameters with one model choice changed, or re-estimated from measurements.

Each function returns new, validated :class:`TestbedParams` in the same label space, so a twin built here
emits states the real network's monitor can compare one to one.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any

import numpy as np

from dtsync.testbed.model import events
from dtsync.testbed.params import UE, PoissonTraffic, TestbedParams

__all__ = [
    "coarse_buffers",
    "fitted",
    "frozen_channel",
    "iid_channel",
    "optimistic_channel",
    "perturbed",
    "poisson_traffic",
]


def _rebuild(params: TestbedParams, ues: list[dict[str, Any]]) -> TestbedParams:
    """Validate again: a changed UE can break a cross-field rule (e.g. event probabilities summing past 1)."""
    return TestbedParams.model_validate({**params.model_dump(), "ues": ues})


def _map_ues(params: TestbedParams, change: Callable[[UE, dict[str, Any]], None]) -> TestbedParams:
    """Apply ``change(ue, data)`` to a mutable dump of every UE, then re-validate the whole."""
    ues = []
    for ue in params.ues:
        data = ue.model_dump()
        change(ue, data)
        ues.append(data)
    return _rebuild(params, ues)


def _stationary(T: np.ndarray) -> np.ndarray:
    """Stationary distribution of a channel matrix (left eigenvector for eigenvalue 1)."""
    w, v = np.linalg.eig(T.T)
    pi = np.abs(np.real(v[:, np.argmin(np.abs(w - 1.0))]))
    return pi / pi.sum()


def _rows(T: np.ndarray) -> list[list[float]]:
    return (T / T.sum(axis=1, keepdims=True)).tolist()


def poisson_traffic(params: TestbedParams) -> TestbedParams:
    """Bursty and variable traffic replaced by single chunks at the same mean rate (Poisson in the slot model)."""

    def change(ue: UE, data: dict[str, Any]) -> None:
        if not ue.full:
            data["traffic"] = {"kind": "poisson", "rate": min(1.0, ue.traffic.mean_rate())}

    return _map_ues(params, change)


def frozen_channel(params: TestbedParams) -> TestbedParams:
    """Channels never change level: a stale channel model (identity transition matrix)."""

    def change(ue: UE, data: dict[str, Any]) -> None:
        data["channel"]["transition"] = np.eye(ue.channel_levels).tolist()

    return _map_ues(params, change)


def iid_channel(params: TestbedParams) -> TestbedParams:
    """Memoryless channel updates: the new level is drawn from the stationary distribution, whatever the old."""

    def change(ue: UE, data: dict[str, Any]) -> None:
        pi = _stationary(np.asarray(ue.channel.transition, dtype=float))
        data["channel"]["transition"] = _rows(np.tile(pi, (ue.channel_levels, 1)))

    return _map_ues(params, change)


def optimistic_channel(params: TestbedParams, factor: float = 1.5) -> TestbedParams:
    """A mis-estimated channel: every rate (chunks per RB) believed ``factor`` times what it is (a link model
    calibrated where coverage is better): the twin expects more throughput than the network delivers."""
    if not factor > 0:
        raise ValueError("factor must be > 0")

    def change(ue: UE, data: dict[str, Any]) -> None:
        data["channel"]["rates"] = [factor * r for r in ue.channel.rates]

    return _map_ues(params, change)


def coarse_buffers(params: TestbedParams) -> TestbedParams:
    """A model that only tells an empty buffer from a non-empty one (UEs with 3+ levels): groups {0}, {1..L-1}."""

    def change(ue: UE, data: dict[str, Any]) -> None:
        if ue.buffer_levels >= 3:
            data["buckets"] = [[0], list(range(1, ue.buffer_levels))]

    return _map_ues(params, change)


def _set_events(params: TestbedParams, probs: np.ndarray) -> list[dict[str, Any]]:
    """UE dumps whose traffic rates/sizes and channel updates give the event probabilities ``probs``
    (ordered as :func:`events`)."""
    ues = [ue.model_dump() for ue in params.ues]
    batches: dict[int, dict[int, float]] = {}
    for e, p in zip(events(params), probs, strict=True):
        if e.size == 0:
            ues[e.ue]["channel"]["update"] = float(p)
        else:
            batches.setdefault(e.ue, {})[e.size] = float(p)
    for i, sizes in batches.items():
        rate = sum(sizes.values())
        if isinstance(params.ues[i].traffic, PoissonTraffic):
            ues[i]["traffic"] = {"kind": "poisson", "rate": rate}
        else:
            pmf = [sizes.get(k, 0.0) / rate for k in range(1, max(sizes) + 1)]  # rate > 0: only events with p > 0
            ues[i]["traffic"] = {"kind": "batch", "rate": rate, "sizes": pmf}
    return ues


def _noisy(p: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """p * exp(sigma * N(0, 1)) renormalised: zeros stay zero, so what can happen stays what can happen."""
    q = p * np.exp(sigma * rng.standard_normal(p.shape))
    return q / q.sum(axis=-1, keepdims=True)


def perturbed(params: TestbedParams, sigma: float, rng: np.random.Generator) -> TestbedParams:
    """Log-normal noise of scale ``sigma`` on every probability of a step: the event distribution (no event,
    each arrival batch, each channel update) and every channel transition row."""
    evs = events(params)
    probs = np.array([1.0 - sum(e.prob for e in evs), *(e.prob for e in evs)])
    ues = _set_events(params, _noisy(probs, sigma, rng)[1:])
    for data, ue in zip(ues, params.ues, strict=True):
        data["channel"]["transition"] = _noisy(np.asarray(ue.channel.transition, dtype=float), sigma, rng).tolist()
    return _rebuild(params, ues)


def fitted(
    params: TestbedParams,
    samples: int,
    rng: np.random.Generator,
    *,
    traffic: str = "batch",
    channel: str = "markov",
) -> TestbedParams:
    """A twin estimated from ``samples`` measured steps of the real testbed ``params``.

    Measured: every arrival batch (UE, size) and every channel report (UE, level before, level after) in
    ``samples`` steps, and ``samples`` throughput measurements per channel level. Frequencies are add-1/2
    (Krichevsky-Trofimov) estimates, so nothing gets probability 0 for want of data. Traffic model ``batch``:
    batch rate and size histogram; ``poisson``: single chunks at the measured chunk rate. Channel model
    ``markov``: report rate and transition counts; ``iid``: level frequencies, memoryless; ``frozen``: identity
    (stale); ``optimistic``: as markov, rates believed 1.5 times higher (see :func:`optimistic_channel`).
    A rate is the mean of ``samples`` per-RB throughputs of coefficient of variation 1 (fast fading), i.e.
    rate * Gamma(samples, 1/samples). Weights and schemes are configuration, not estimated.
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    if traffic not in ("batch", "poisson"):
        raise ValueError(f"unknown traffic model {traffic!r} (batch, poisson)")
    if channel not in ("markov", "iid", "optimistic", "frozen"):
        raise ValueError(f"unknown channel model {channel!r} (markov, iid, optimistic, frozen)")
    evs = events(params)
    counts = rng.multinomial(samples, [1.0 - sum(e.prob for e in evs), *(e.prob for e in evs)])[1:]
    ues = []
    for i, ue in enumerate(params.ues):
        data = ue.model_dump()
        mine = [(e.size, int(n)) for e, n in zip(evs, counts, strict=True) if e.ue == i]
        if not ue.full:
            batches = np.full(ue.buffer_levels - 1, 0.5)  # sizes 1..L-1; a bigger batch overflows the same
            for size, n in mine:
                if size:
                    batches[min(size, ue.buffer_levels - 1) - 1] += n
            probs = batches / (samples + 1.0)
            if traffic == "poisson":
                data["traffic"] = {"kind": "poisson", "rate": float(np.dot(np.arange(1, len(probs) + 1), probs))}
            else:
                data["traffic"] = {"kind": "batch", "rate": float(probs.sum()), "sizes": (probs / probs.sum()).tolist()}
        reports = sum(n for size, n in mine if size == 0)
        data["channel"]["update"] = (reports + 0.5) / (samples + 1.0)
        data["channel"]["transition"] = _fit_channel(ue, reports, rng, channel).tolist()
        gain = 1.5 if channel == "optimistic" else 1.0
        data["channel"]["rates"] = [gain * r * rng.gamma(samples, 1.0 / samples) for r in ue.channel.rates]
        ues.append(data)
    total = sum(d["traffic"].get("rate", 0.0) + d["channel"]["update"] for d in ues)
    if total > 1.0:  # a short measurement can overshoot: scale the event probabilities back into one slot
        for d in ues:
            d["channel"]["update"] /= total
            if "rate" in d["traffic"]:
                d["traffic"]["rate"] /= total
    return _rebuild(params, ues)


def _fit_channel(ue: UE, reports: int, rng: np.random.Generator, model: str) -> np.ndarray:
    """Transition matrix estimated from ``reports`` channel reports of the real chain."""
    T = np.asarray(ue.channel.transition, dtype=float)
    C = len(T)
    if model == "frozen":
        return np.eye(C)
    cum = np.cumsum(T, axis=1).tolist()
    levels = [int(rng.choice(C, p=_stationary(T)))]
    for u in rng.random(reports).tolist():
        levels.append(min(bisect_right(cum[levels[-1]], u), C - 1))
    pairs = np.full((C, C), 0.5)
    np.add.at(pairs, (levels[:-1], levels[1:]), 1.0)
    if model == "iid":
        return np.tile(np.bincount(levels, minlength=C) + 0.5, (C, 1)) / (len(levels) + 0.5 * C)
    return pairs / pairs.sum(axis=1, keepdims=True)
