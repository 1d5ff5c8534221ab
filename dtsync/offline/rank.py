"""`dtsync rank`: order candidate twins by their mismatch with the real network (pre-filtering).

Only the best-matching twins need to be trained and tested: the regret bound says a policy trained in a twin
loses at most 2/(1-gamma) * DT-BSM in the real network (plus its training gap). The same command compares two
real cells: pass the other cell's trace as a twin to see whether a twin built for one transfers to the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtsync.config import Config
from dtsync.contract import Rejection, read_jsonl
from dtsync.metric import sample_size
from dtsync.monitor import REAL, CellMonitor, Report
from dtsync.offline.replay import CELL

SUFFICIENCY_DELTA = 0.05  # confidence 1 - delta of the paper's per-(s, a) sample-size figure


@dataclass(frozen=True)
class Ranked:
    """One candidate's figures, with the data it rests on."""

    report: Report
    rejected: int
    min_count: int  # fewest samples of any state-action seen in both windows
    samples_needed: int  # paper's Hoeffding figure for accuracy = the twin's threshold, confidence 95 %

    def record(self) -> dict[str, Any]:
        rec = self.report.record()
        for key in ("fired", "event_id", "state", "reason", "t", "cell"):
            rec.pop(key)
        return {**rec, "rejected": self.rejected, "min_count": self.min_count, "samples_needed": self.samples_needed,
                "sufficient": self.min_count >= self.samples_needed}  # fmt: skip


def rank(config: Config, real: Path, twins: dict[str, Path]) -> list[Ranked]:
    """Each twin's whole trace against the whole real trace (or the last N with a count window), best first."""
    monitor = CellMonitor(CELL, config.for_replay(twins))
    rejected = dict.fromkeys(twins, 0)
    last_t = 0.0
    for stream, path in {REAL: real, **twins}.items():
        for line, item in enumerate(read_jsonl(path), start=1):
            if isinstance(item, Rejection) or monitor.add(stream, item, float(line)) is not None:
                rejected[stream] = rejected.get(stream, 0) + 1
            elif item.t is not None:
                last_t = max(last_t, item.t)
    out = []
    for name, tm in monitor.twins.items():
        tm.computer.always_evidence = True  # a ranking is read once: show the interval and p-value of every twin
        snap = monitor.snapshot(name, last_t)
        report = monitor.decide(name, snap.t, tm.computer.compute(snap))
        both = snap.real.known & snap.twin.known
        min_count = int(np.minimum(snap.real.N, snap.twin.N)[both].min()) if both.any() else 0
        st = tm.settings
        rbar = max(report.figures.rbar, 1e-12)
        needed = sample_size(st.gamma, rbar, len(snap.labels), st.trigger.threshold or 1e-3, SUFFICIENCY_DELTA)
        out.append(Ranked(report, rejected[name], min_count, needed))
    out.sort(key=lambda r: (r.report.figures.mismatch, r.report.twin))
    return out
