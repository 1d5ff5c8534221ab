"""Plots of a timeline and of a ranking, for people who would rather look than read a table
(``pip install 'dtsync[plot]'``: matplotlib).

`plot_timeline` draws, per (cell, twin), the mismatch over time with its interval, the threshold, the noise
floor, and each resync event as a red marker and line. `plot_ranking` draws the candidates of `dtsync rank` as
bars with their intervals. Both read records defensively: a key missing from an older (or newer) timeline is
simply not drawn. The interval drawn is the statistical one (``interval_low``/``interval_high``) when
the records have it, else the missing-data interval (``mismatch_lower``/``mismatch_upper``); the legend says
which. Under ``act_on: excess`` the firing line is drawn at noise floor + threshold, where the mismatch must
reach for an event. Uses matplotlib's object-oriented API (no pyplot, no global backend state), so it is safe
in a daemon or a notebook alike.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PlotUnavailable", "plot_ranking", "plot_timeline", "read_timeline"]

EVENT_COLOR = "#d62728"  # resync events, in both plots' legends
_INTERVALS = (("interval_low", "interval_high", "interval"), ("mismatch_lower", "mismatch_upper",
              "missing-data interval"))  # fmt: skip
_EPOCH_FROM = 1e8  # a `t` beyond this is Unix time (live); below, trace time (line numbers or a trace's own clock)


class PlotUnavailable(RuntimeError):
    """matplotlib (the ``plot`` extra) is not installed."""


def read_timeline(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``--timeline`` JSON Lines file (blank lines skipped; ValueError naming a bad line)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                if not isinstance(value, dict):
                    raise ValueError(f"{path}:{lineno}: not a JSON object")
                records.append(value)
    return records


def plot_timeline(records: Iterable[Mapping[str, Any]], out: str | os.PathLike[str], *, title: str | None = None,
                  dpi: int = 110) -> Path:  # fmt: skip
    """One panel per (cell, twin): mismatch, interval, threshold, noise floor and resync events over time."""
    Figure = _figure_class()
    series: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        if _num(r.get("mismatch")) is not None and _num(r.get("t")) is not None:
            series.setdefault((str(r.get("cell", "")), str(r.get("twin", "?"))), []).append(r)
    if not series:
        raise ValueError("no evaluation with a time and a mismatch to plot")
    t0 = min(float(r["t"]) for rs in series.values() for r in rs)
    epoch = t0 > _EPOCH_FROM
    fig = Figure(figsize=(9, 2.6 * len(series) + 0.6))
    axes = fig.subplots(len(series), 1, squeeze=False, sharex=True)[:, 0]
    for ax, ((cell, twin), rs) in zip(axes, sorted(series.items()), strict=True):
        rs = sorted(rs, key=lambda r: float(r["t"]))
        x = [float(r["t"]) - t0 if epoch else float(r["t"]) for r in rs]
        y = [float(r["mismatch"]) for r in rs]
        tops = list(y)
        band = _interval(rs, y)
        if band is not None:
            lo, hi, label = band
            ax.fill_between(x, lo, hi, color="tab:blue", alpha=0.2, lw=0, step="post", label=label)
            tops += [h for h, m in zip(hi, y, strict=True) if h <= 3 * max(m, 1e-12)]  # a pinned bound: clip
        ax.plot(x, y, color="tab:blue", lw=1.4, drawstyle="steps-post", label="mismatch")
        floor, threshold = _column(rs, "noise_floor"), _column(rs, "threshold")
        if _acts_on_excess(rs):  # the rule compares mismatch - noise floor with the threshold: draw where that is
            threshold = [None if t is None or f is None else t + f for t, f in zip(threshold, floor, strict=True)]
        for col, style, label in ((threshold, dict(color="k", ls="--"), _threshold_label(rs)),
                                  (floor, dict(color="tab:green", ls=":"), "noise floor")):  # fmt: skip
            if any(v is not None for v in col):
                ax.plot(x, [math.nan if v is None else v for v in col], lw=1.1, drawstyle="steps-post", label=label,
                        **style)  # fmt: skip
                tops += [v for v in col if v is not None]
        fired = [(xi, yi) for xi, yi, r in zip(x, y, rs, strict=True) if r.get("fired")]
        for xi, _ in fired:
            ax.axvline(xi, color=EVENT_COLOR, lw=1.0)
        if fired:
            ax.scatter([p[0] for p in fired], [p[1] for p in fired], color=EVENT_COLOR, zorder=3, s=30,
                       label=f"resync event ({len(fired)})")  # fmt: skip
        finite = [v for v in tops if math.isfinite(v)]
        ax.set_ylim(0.0, 1.1 * max(finite) if finite and max(finite) > 0 else 1.0)
        ax.set_title(f"{cell + ' / ' if cell else ''}{twin}", fontsize=10, loc="left")
        ax.set_ylabel("DT-BSM")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=3)
    when = dt.datetime.fromtimestamp(t0, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    axes[-1].set_xlabel(f"seconds since {when}" if epoch else "trace time")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out, dpi)


def plot_ranking(records: Sequence[Mapping[str, Any]], out: str | os.PathLike[str], *, title: str | None = None,
                 dpi: int = 110) -> Path:  # fmt: skip
    """Candidates as bars (in the given order: best first), with interval, noise floor and threshold."""
    Figure = _figure_class()
    rs = [r for r in records if _num(r.get("mismatch")) is not None]
    if not rs:
        raise ValueError("no candidate with a mismatch to plot")
    names = [str(r.get("twin", i + 1)) for i, r in enumerate(rs)]
    y = [float(r["mismatch"]) for r in rs]
    fig = Figure(figsize=(max(5.0, 0.9 * len(rs) + 2.5), 4.2))
    ax = fig.subplots()
    pos = list(range(len(rs)))
    ax.bar(pos, y, color="tab:blue", alpha=0.75, label="mismatch")
    tops = list(y)
    band = _interval(rs, y)
    if band is not None:
        # Drawn from its own ends, not as error bars around the bar: a bias-corrected interval may lie wholly
        # below the (upward-biased) point figure.
        lo, hi, label = band
        ax.vlines(pos, lo, hi, color="k", lw=1.2, label=label)
        ax.scatter(pos + pos, lo + hi, marker="_", s=120, color="k", zorder=3)
        tops += [h for m, h in zip(y, hi, strict=True) if h <= 3 * max(m, 1e-12)]
    floor = _column(rs, "noise_floor")
    if any(v is not None for v in floor):
        ax.scatter(pos, [math.nan if v is None else v for v in floor], marker="_", s=400, color="tab:green",
                   zorder=3, label="noise floor")  # fmt: skip
        tops += [v for v in floor if v is not None]
    thresholds = {v for v in _column(rs, "threshold") if v is not None}
    if len(thresholds) == 1:
        (threshold,) = thresholds
        ax.axhline(threshold, color="k", ls="--", lw=1, label="threshold")
        tops.append(threshold)
    finite = [v for v in tops if math.isfinite(v)]
    ax.set_ylim(0.0, 1.15 * max(finite) if finite and max(finite) > 0 else 1.0)
    ax.set_xticks(pos, names, rotation=30 if len(rs) > 6 else 0, ha="right" if len(rs) > 6 else "center")
    ax.set_ylabel("DT-BSM mismatch")
    ax.set_title(title or "candidate twins, best first", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, dpi)


def _interval(rs: Sequence[Mapping[str, Any]], y: list[float]) -> tuple[list[float], list[float], str] | None:
    """(low, high, legend) of the first interval the records carry (missing ends fall back on the point)."""
    for low_key, high_key, label in _INTERVALS:
        low, high = _column(rs, low_key), _column(rs, high_key)
        if any(v is not None for v in low) and any(v is not None for v in high):
            lo = [v if v is not None else m for v, m in zip(low, y, strict=True)]
            hi = [v if v is not None else m for v, m in zip(high, y, strict=True)]
            return lo, hi, label
    return None


def _acts_on_excess(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the trigger acted on the excess over the noise floor: the record's ``act_on`` when it has one,
    else what its reason says (timelines written before ``act_on`` was recorded)."""
    last = records[-1]
    if "act_on" in last:
        return last["act_on"] == "excess"
    return any("excess over noise floor" in str(r.get("reason", "")) for r in records)


def _threshold_label(records: Sequence[Mapping[str, Any]]) -> str:
    return "noise floor + threshold" if _acts_on_excess(records) else "threshold"


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("plots need matplotlib: pip install 'dtsync[plot]'") from None
    return Figure


def _save(fig: Any, out: str | os.PathLike[str], dpi: int) -> Path:
    path = Path(out)
    fig.savefig(path, dpi=dpi)
    return path


def _num(value: Any) -> float | None:
    """A finite number, or None (absent, null, a string, a boolean, nan)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _column(records: Sequence[Mapping[str, Any]], key: str) -> list[float | None]:
    return [_num(r.get(key)) for r in records]
