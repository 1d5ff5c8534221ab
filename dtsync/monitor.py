"""One cell's monitor: shared encoding, the real window, and per twin a window, a metric solver and a trigger.

No I/O and no clock: time comes with the transitions (or from the caller). The offline `replay` and the live
daemon both drive this class, so a recorded trace and the same trace received live give the same timeline.

An evaluation has three steps so that the daemon can run the heavy one off its event loop:
`snapshot` (copies the windows into arrays; cheap, on the caller's thread), `compute` (the metric, its
noise floor, evidence and bounds; pure, may run in a worker process, never two at once for one twin), and
`decide` (the trigger rule; on the caller's thread). `evaluate` chains them for offline use.

The evaluation record is defined once, here (:class:`Figures` and :meth:`Report.record`): the replay timeline,
resync events, status messages and Prometheus gauges all read it.

What is compared: the labels *present in the windows now* (a state seen as s or s' in either window). A label
seen once long ago and gone from both windows carries no data; leaving it in would pin the pessimistic bound
at Rbar/(1-gamma) for ever. Labels that no window of the cell holds any more are freed from its encoder
(`free_labels`) at the first snapshot after the windows have turned over, and when a full table refuses a
label, so the caps bound the labels live now and an evaluation's dense arrays follow them, not the history.
"""

from __future__ import annotations

import math
import time
import uuid
import zlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dtsync.config import Config, TwinSettings, WindowSettings
from dtsync.contract import Transition
from dtsync.encoding import CapacityError, CellEncoding, EncodingError, StateEncoder
from dtsync.episodes import TERMINAL, absorb, absorb_arrays
from dtsync.metric import DTBSMSolver, dtbsm, dtbsm_tv, regret_bound, regret_estimate
from dtsync.metric.evidence import WindowStats, bootstrap_interval, permutation_test
from dtsync.resync import RESYNCING, Cause, Resync, TwinSync
from dtsync.trigger import Evaluation, Trigger
from dtsync.window import EmpiricalMDP, SlidingWindow

REAL = "real"
PERMUTATIONS = 199  # resamples of the permutation test: p-values down to 0.005, below the default alpha 0.01
BOOTSTRAPS = 20  # resamples of the interval (52 solves with its calibration), only when the test is significant
_RESAMPLE_TOLERANCE = 1e-4  # a resample's mismatch needs no more accuracy than this (noise is far larger)
_EVENT_NAMESPACE = uuid.UUID("5f1d7c1e-4b0a-4d55-9a53-0d6a4e2b7c11")


def _window(settings: WindowSettings) -> SlidingWindow:
    return SlidingWindow(max_count=settings.count, max_seconds=settings.seconds)


@dataclass(frozen=True)
class Snapshot:
    """The two windows of one (cell, twin) pair at time t, as empirical MDPs over the cell's state space."""

    t: float
    real: EmpiricalMDP
    twin: EmpiricalMDP
    real_halves: tuple[EmpiricalMDP, EmpiricalMDP] | None
    labels: list[Hashable]
    real_reward_var: np.ndarray | None = None  # (S, A) reward variance per state-action (for the evidence)
    twin_reward_var: np.ndarray | None = None
    terminal: int | None = None  # the cell's absorbing state (episodes), kept absorbing in every resample


@dataclass(frozen=True)
class TopState:
    """One of the worst-matching states, with the evidence behind it: its transitions in each window.

    ``supported`` is False for a thin state: one of its actions (seen in either window) has fewer than
    ``trigger.min_state_samples`` transitions in one of the windows. Its d(s, s) is reported, but it is mostly
    sampling noise there (d(s, s) is a max over actions), so it stays out of the evidence."""

    state: Any
    d: float
    n_real: int
    n_twin: int
    supported: bool


@dataclass(frozen=True)
class Figures:
    """What one metric computation found (everything but the trigger decision)."""

    mismatch: float
    mismatch_lower: float
    mismatch_upper: float
    noise_floor: float
    tv_bound: float
    regret_bound: float
    regret_estimate: float
    coverage: float
    samples_real: int
    samples_twin: int
    rbar: float
    top_states: list[TopState]
    compute_seconds: float
    iterations: int
    mismatch_supported: float  # max of d(s, s) over supported states only (0 if none is)
    p_value: float | None  # permutation test; None: not computed, the point was below the re-arm level
    # Bootstrap interval for the mismatch with thin state-actions pooled (evidence.pool_thin); None: not computed
    # (the test was not significant, or no state is supported yet)
    interval_low: float | None
    interval_high: float | None
    supported_states: int  # states with min_state_samples transitions in both windows
    interval_level: float  # its nominal two-sided coverage
    evidence_seconds: float  # part of compute_seconds spent on the test and the interval


@dataclass(frozen=True)
class Report:
    """One evaluation of one twin: figures, decision, and the event it raised (if any).

    `record()` is the schema shared by `dtsync replay --timeline`, resync events and status messages.
    """

    t: float
    cell: str
    twin: str
    threshold: float
    figures: Figures
    fired: bool
    state: str
    reason: str
    event_id: str | None
    version: str | None = None  # the twin's version (telemetry ``v`` or an acknowledgement), if stated
    resync: Resync | None = None  # the twin's latest resync (dtsync.resync), under way or completed
    resynced: bool = False  # this evaluation is the first judgement on fresh data: it completes `resync`

    def record(self) -> dict[str, Any]:
        """Every figure, the decision and the event id: the one schema of timeline rows and events."""
        figures = asdict(self.figures)
        for row in figures["top_states"]:
            row["state"] = _jsonable(row["state"])
        return {
            "t": self.t,
            "cell": self.cell,
            "twin": self.twin,
            **figures,
            "threshold": self.threshold,
            "state": self.state,
            "fired": self.fired,
            "event_id": self.event_id,
            "reason": self.reason,
            **self._sync(),
        }

    def _sync(self) -> dict[str, Any]:
        """The twin's version and its latest resync (event, latency, mismatch before and after)."""
        return {"version": self.version, "resync": None if self.resync is None else asdict(self.resync),
                "resynced": self.resynced}  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The part of the record a twin's retained status carries: the decision and the headline figures with
        their evidence (test, interval, supported max), without the per-state detail."""
        f = self.figures
        return {
            "cell": self.cell, "twin": self.twin, "state": self.state, "t": self.t,
            "mismatch": f.mismatch, "mismatch_lower": f.mismatch_lower, "mismatch_upper": f.mismatch_upper,
            "noise_floor": f.noise_floor, "threshold": self.threshold, "samples_real": f.samples_real,
            "samples_twin": f.samples_twin, "coverage": f.coverage, "reason": self.reason,
            "p_value": f.p_value, "interval_low": f.interval_low, "interval_high": f.interval_high,
            "interval_level": f.interval_level, "mismatch_supported": f.mismatch_supported,
            "supported_states": f.supported_states, **self._sync(),
        }  # fmt: skip


def _jsonable(label: Hashable) -> Any:
    return list(label) if isinstance(label, tuple) else label


def _noise_scale(n_real: int, n_twin: int) -> float:
    """Rescale the halves' mismatch to the pair's sample sizes, assuming the 1/sqrt(n) law of empirical W1.

    Two halves of n_r/2 samples each carry noise ~ sqrt(4/n_r); real vs twin carries ~ sqrt(1/n_r + 1/n_t).
    """
    return math.sqrt((1.0 + n_real / n_twin) / 4.0) if n_twin > 0 else 1.0


@dataclass
class MetricComputer:
    """The heavy, pure part of an evaluation for one (cell, twin): settings and warm-started solvers.

    It lives wherever the computation runs: in-process for replay and rank, in a worker process for the daemon
    (which keeps one per twin there, so warm starts survive between evaluations).
    """

    settings: TwinSettings
    solver: DTBSMSolver = field(default_factory=DTBSMSolver)
    noise_solver: DTBSMSolver = field(default_factory=DTBSMSolver)
    always_evidence: bool = False  # test and interval on every evaluation (rank), not only when they can matter

    def compute(self, snap: Snapshot) -> Figures:
        """The metric, its noise floor, evidence and bounds for one snapshot, over the labels present now."""
        started = time.perf_counter()
        st = self.settings
        # Episodes: the terminal state is absorbing in every MDP of the pair (applied here, in the worker, so that
        # the snapshot still travels as transitions).
        real, twin = absorb(snap.real, snap.terminal), absorb(snap.twin, snap.terminal)
        keep = _present(real, twin)
        real, twin = _restrict(real, keep), _restrict(twin, keep)
        labels = [snap.labels[int(i)] for i in keep]
        end = None if snap.terminal is None else _position(keep, snap.terminal)
        reward_range = st.reward_range or _observed_range(real, twin)
        res = self.solver.solve(real.R, real.P, twin.R, twin.P, st.gamma, st.tolerance, reward_range=reward_range)
        floor = 0.0
        if snap.real_halves is not None:
            a, b = (_restrict(absorb(h, snap.terminal), keep) for h in snap.real_halves)
            if a.samples and b.samples:
                half = self.noise_solver.solve(a.R, a.P, b.R, b.P, st.gamma, st.tolerance, reward_range=reward_range)
                floor = half.mismatch * _noise_scale(real.samples, twin.samples)
        tv = dtbsm_tv(real.R, real.P, twin.R, twin.P, st.gamma, rbar=max(res.rbar, _span(reward_range)))
        n_real, n_twin = real.N.sum(axis=1), twin.N.sum(axis=1)
        rule = st.trigger
        diag = np.diagonal(res.d).copy() if len(keep) else np.zeros(0)
        # Thin states (an action with fewer than min_state_samples transitions in either window) are reported
        # apart, and in the interval their thin state-actions are pooled (assumed to agree): see pool_thin.
        seen = (real.N > 0) | (twin.N > 0)
        never = np.iinfo(np.int64).max
        fewest = np.where(seen, np.minimum(real.N, twin.N), never).min(axis=1, initial=never)
        supported = seen.any(axis=1) & (fewest >= rule.min_state_samples)
        sup_idx = np.flatnonzero(supported)
        order = np.argsort(-diag, kind="stable")[: st.top_states]
        top = [TopState(labels[i], float(diag[i]), int(n_real[i]), int(n_twin[i]), bool(supported[i])) for i in order]

        evidence_started = time.perf_counter()
        p_value = low = high = None
        if len(keep) and (self.always_evidence or res.mismatch >= rule.rearm_level):  # else no decision hinges on it
            rng = np.random.default_rng(zlib.crc32(f"{st.cell}/{st.twin}/{snap.t!r}/{real.samples}".encode()))
            w1 = WindowStats.from_arrays(real.P, real.N, real.R, _restrict_var(snap.real_reward_var, keep))
            w2 = WindowStats.from_arrays(twin.P, twin.N, twin.R, _restrict_var(snap.twin_reward_var, keep))
            p_value = permutation_test(w1, w2, resamples=PERMUTATIONS, rng=rng).p_value
            if sup_idx.size and (self.always_evidence or p_value <= rule.alpha):  # else the interval cannot matter

                def mismatch(R1: np.ndarray, P1: np.ndarray, R2: np.ndarray, P2: np.ndarray) -> float:
                    tol = max(st.tolerance, _RESAMPLE_TOLERANCE)
                    (R1, P1), (R2, P2) = absorb_arrays(R1, P1, end), absorb_arrays(R2, P2, end)  # resampled too
                    # Cold and point only: warm starts from another resample were measured slower than cold here.
                    return dtbsm(R1, P1, R2, P2, st.gamma, tol, reward_range=reward_range, point_only=True).mismatch

                iv = bootstrap_interval(w1, w2, mismatch, level=rule.interval_level, resamples=BOOTSTRAPS,
                                        thin_below=rule.min_state_samples, rng=rng)  # fmt: skip
                low, high = iv.low, iv.high
        now = time.perf_counter()
        return Figures(
            mismatch=res.mismatch,
            mismatch_lower=res.mismatch_lower,
            mismatch_upper=res.mismatch_upper,
            noise_floor=floor,
            tv_bound=tv.mismatch_bound,
            regret_bound=regret_bound(res.mismatch, st.gamma),
            regret_estimate=regret_estimate(real.R, real.P, twin.R, twin.P, st.gamma),
            coverage=res.coverage,
            samples_real=real.samples,
            samples_twin=twin.samples,
            rbar=res.rbar,
            top_states=top,
            compute_seconds=now - started,
            iterations=res.iterations,
            mismatch_supported=float(diag[supported].max(initial=0.0)),
            p_value=p_value,
            interval_low=low,
            interval_high=high,
            interval_level=rule.interval_level,
            supported_states=int(sup_idx.size),
            evidence_seconds=now - evidence_started,
        )


def evaluation(t: float, figures: Figures) -> Evaluation:
    """What the trigger reads of computed figures (one definition, for the monitor and the benchmarks)."""
    return Evaluation(
        t=t,
        mismatch=figures.mismatch,
        mismatch_lower=figures.mismatch_lower,
        mismatch_upper=figures.mismatch_upper,
        noise_floor=figures.noise_floor,
        samples_real=figures.samples_real,
        samples_twin=figures.samples_twin,
        coverage=figures.coverage,
        p_value=figures.p_value,
        interval_low=figures.interval_low,
        shared=figures.coverage > 0,
        supported_states=figures.supported_states,
    )


def _present(real: EmpiricalMDP, twin: EmpiricalMDP) -> np.ndarray:
    """Indices of the states present in either window now: seen as a state or as a next state."""
    mask = np.zeros(real.N.shape[0], dtype=bool)
    for w in (real, twin):
        mask |= w.N.sum(axis=1) > 0
        mask |= (w.P > 0).any(axis=(0, 1))
    return np.flatnonzero(mask)


def _restrict(m: EmpiricalMDP, keep: np.ndarray) -> EmpiricalMDP:
    """The empirical MDP on the states `keep` (no observed transition leaves that set, so no mass is lost)."""
    if len(keep) == m.N.shape[0]:
        return m
    P = m.P[keep][:, :, keep]
    return EmpiricalMDP(m.R[keep], P, m.N[keep], m.samples, m.reward_min, m.reward_max)


def _position(keep: np.ndarray, index: int) -> int | None:
    """Where state `index` sits among the states `keep` (None if absent)."""
    at = int(np.searchsorted(keep, index))
    return at if at < len(keep) and keep[at] == index else None


def _restrict_var(var: np.ndarray | None, keep: np.ndarray) -> np.ndarray | None:
    return None if var is None else var[keep]


@dataclass
class TwinMonitor:
    """Per-twin state: its window, trigger, schedule bookkeeping and (for in-process use) its computer."""

    settings: TwinSettings
    window: SlidingWindow
    trigger: Trigger
    computer: MetricComputer
    new_transitions: int = 0
    last_eval_t: float | None = None
    evaluations: int = 0
    episodes: int = 0  # drift episodes fired so far (persisted): names the next event
    busy: bool = False  # a computation is in flight (daemon): not due again until it lands
    sync: TwinSync = field(default_factory=TwinSync)  # version and resyncs (dtsync.resync)

    @classmethod
    def create(cls, settings: TwinSettings) -> TwinMonitor:
        return cls(settings, _window(settings.window), Trigger(settings.trigger), MetricComputer(settings))

    def reconfigure(self, settings: TwinSettings) -> None:
        """New settings in place: the window is resized, the trigger keeps its state, solvers stay warm."""
        self.settings = self.computer.settings = settings
        self.trigger.set_rule(settings.trigger)
        self.window.resize(settings.window.count, settings.window.seconds)


def _observed_range(real: EmpiricalMDP, twin: EmpiricalMDP) -> tuple[float, float] | None:
    lows = [x for x in (real.reward_min, twin.reward_min) if not math.isnan(x)]
    highs = [x for x in (real.reward_max, twin.reward_max) if not math.isnan(x)]
    return (min(lows), max(highs)) if lows else None


def _span(reward_range: tuple[float, float] | None) -> float:
    return reward_range[1] - reward_range[0] if reward_range else 0.0


class CellMonitor:
    """The real stream of one cell against each of its twins.

    Event ids are uuid5(event_namespace, cell/twin/episode number): reproducible for a replay with the default
    namespace; the daemon draws a namespace once and keeps it in its snapshots, so ids never repeat across runs,
    and an instance that takes a cell over (and its episode count) raises a duplicate under the same id.
    """

    def __init__(self, cell: str, config: Config, event_namespace: uuid.UUID = _EVENT_NAMESPACE) -> None:
        self.cell = cell
        self.config = config
        self.event_namespace = event_namespace
        twins = list(config.cells[cell].twins)
        first = config.twin_settings(cell, twins[0])
        self.encoding = CellEncoding(
            StateEncoder(first.bins), max_states=config.max_states, max_actions=config.max_actions
        )
        self.real = _window(first.real_window)
        self.twins: dict[str, TwinMonitor] = {}
        for name in twins:
            st = config.twin_settings(cell, name)
            self.twins[name] = TwinMonitor.create(st)
        self._added, self._quiet_adds, self._quiet_until = 0, 0.0, -math.inf  # see due()
        self._freed_at: int | None = None  # evictions counted at the last free_labels (see _free_if_evicted)
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # batches ingest() is adding

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config (SIGHUP) without dropping data: windows are resized in place, triggers keep
        their armed/cooldown state, new twins start empty, removed twins go. The state encoder cannot change
        (indices already in the windows would change meaning): ValueError, and nothing is applied."""
        names = list(config.cells[self.cell].twins)
        settings = {name: config.twin_settings(self.cell, name) for name in names}
        if settings[names[0]].bins != self.encoder_bins():
            raise ValueError(f"cell {self.cell}: encoder.bins cannot change on reload (restart to change it)")
        real = settings[names[0]].real_window
        self.real.resize(real.count, real.seconds)
        for name in [n for n in self.twins if n not in settings]:
            del self.twins[name]
        for name, st in settings.items():
            if name in self.twins:
                self.twins[name].reconfigure(st)
            else:
                self.twins[name] = TwinMonitor.create(st)
        self.config = config
        self._quiet_adds, self._quiet_until = 0.0, -math.inf  # the schedule may have changed: scan again
        self._freed_at = None  # a removed twin's labels may be free now

    def encoder_bins(self) -> tuple[tuple[float, ...], ...] | None:
        """The encoder's bin edges, in the config's form (for reload comparisons)."""
        bins = self.encoding.state_encoder.bins
        return None if bins is None else tuple(tuple(edges) for edges in bins)

    def add(self, stream: str, tr: Transition, now: float) -> str | None:
        """Add one transition to the real window or a twin's; returns a rejection reason, or None if kept.

        The transition's own `t` is its time when given, else `now` (the receive time).
        """
        if stream != REAL:
            reason = self._version(stream, tr.v, now if tr.t is None else tr.t)
            if reason is not None:
                return reason
        window = self.real if stream == REAL else self.twins[stream].window
        try:
            try:
                s, a, s_next = self.encoding.encode(tr)
            except CapacityError:
                if not self._free_if_evicted():
                    raise
                s, a, s_next = self.encoding.encode(tr)
        except EncodingError as e:
            return e.reason
        except CapacityError:
            return "too_many_labels"
        window.add(s, a, tr.r, s_next, now if tr.t is None else tr.t)
        self._added += 1
        if stream == REAL:
            for tm in self.twins.values():
                tm.new_transitions += 1
        else:
            self.twins[stream].new_transitions += 1
        return None

    def ingest(
        self, stream: str, transitions: Sequence[Transition], now: float, rejected: list[tuple[int, str]]
    ) -> Iterator[tuple[float, list[str]]]:
        """Add a batch; yields (t, twins due) at each point where one-by-one `add` + `due` would find some due.

        The caller evaluates (snapshots) the yielded twins before resuming, exactly as after a single add, so
        a batch gives the same timeline as its transitions one by one, at a fraction of the cost: between
        the points where `due` could fire, transitions go into the window in one `extend`. Rejected items are
        appended to `rejected` as (position, reason).
        """
        if stream != REAL and len(transitions) > 1 and any(tr.v is not None for tr in transitions):
            yield from self._ingest_versions(stream, transitions, now, rejected)
        else:
            yield from self._ingest(stream, transitions, now, rejected)

    def _ingest(
        self, stream: str, transitions: Sequence[Transition], now: float, rejected: list[tuple[int, str]]
    ) -> Iterator[tuple[float, list[str]]]:
        if len(transitions) == 1:  # one transition a message is common: the plain path is cheapest
            tr = transitions[0]
            reason = self.add(stream, tr, now)
            if reason is not None:
                rejected.append((0, reason))
                return
            t1 = now if tr.t is None else tr.t
            names = self.due(t1)
            if names:
                yield t1, names
            return
        window = self.real if stream == REAL else self.twins[stream].window
        affected = list(self.twins.values()) if stream == REAL else [self.twins[stream]]
        ss, aa, nn, kept, bad = self.encoding.encode_many(transitions)
        if any(reason == "too_many_labels" for _, reason in bad) and self._free_if_evicted():
            ss, aa, nn, kept, bad = self.encoding.encode_many(transitions)  # nothing of the batch was added yet
        rejected.extend(bad)
        # The batch's indices, not yet all in the window while the caller snapshots at a yield: free_labels
        # keeps their labels and rewrites them in place with the windows'.
        s, a, sn = (np.asarray(col, dtype=np.int64) for col in (ss, aa, nn))
        self._pending[id(s)] = (s, a, sn)
        r = [transitions[i].r for i in kept]
        t = [now if (ti := transitions[i].t) is None else ti for i in kept]
        i, n = 0, len(kept)
        try:
            while i < n:
                # Transitions up to the first one that could make a twin due, by count or by time.
                room = self._quiet_adds - self._added  # inf: no count schedule, or every twin is busy
                j = n if room >= n - i else i + max(1, math.ceil(room))
                j = next((k + 1 for k in range(i, j) if t[k] >= self._quiet_until), j)
                window.extend(s[i:j], a[i:j], r[i:j], sn[i:j], t[i:j])
                self._added += j - i
                for tm in affected:
                    tm.new_transitions += j - i
                names = self.due(t[j - 1])
                if names:
                    yield t[j - 1], names
                i = j
        finally:
            del self._pending[id(s)]

    def _ingest_versions(
        self, stream: str, transitions: Sequence[Transition], now: float, rejected: list[tuple[int, str]]
    ) -> Iterator[tuple[float, list[str]]]:
        """A twin's batch that states versions: each run of one version goes in after its version is applied
        (a change starts a fresh window; a superseded version's transitions are refused)."""
        start = 0
        for i in range(1, len(transitions) + 1):
            if i < len(transitions) and transitions[i].v == transitions[start].v:
                continue
            first = transitions[start]
            reason = self._version(stream, first.v, now if first.t is None else first.t)
            if reason is not None:
                rejected.extend((k, reason) for k in range(start, i))
            else:
                rest: list[tuple[int, str]] = []
                yield from self._ingest(stream, transitions[start:i], now, rest)
                rejected.extend((start + k, why) for k, why in rest)
            start = i

    def _version(self, twin: str, version: str | None, t: float) -> str | None:
        """Apply a twin transition's version: a new one starts a fresh window; a superseded one is refused."""
        if version is None:
            return None
        sync = self.twins[twin].sync
        if sync.superseded(version):
            return "stale_version"
        if sync.changes(version, len(self.twins[twin].window) == 0):
            self.resynced(twin, t, cause="version", version=version)
        else:
            sync.first_version(version)
        return None

    def resynced(self, twin: str, t: float, *, cause: Cause, version: str | None, event_id: str | None = None,
                 event_t: float = -math.inf, latency: float | None = None) -> bool:  # fmt: skip
        """The twin was re-synchronised at stream time `t`: drop its window, re-arm its trigger, and judge it
        `resyncing` until the fresh window can be judged. An acknowledgement of a resync whose new version's
        telemetry already started a fresh window after the event keeps that window. True if it was dropped."""
        tm = self.twins[twin]
        if event_id is not None and tm.sync.attach(event_id, latency, version, event_t):
            return False
        tm.window = _window(tm.settings.window)
        tm.trigger.rearm()
        tm.sync.start(Resync(cause, t, version if version is not None else tm.sync.version, event_id, latency))
        tm.new_transitions = 0
        self._quiet_adds, self._quiet_until = 0.0, -math.inf
        return True

    def version(self, twin: str) -> str | None:
        """The twin's current version (None: never stated)."""
        return self.twins[twin].sync.version

    def due(self, now: float) -> list[str]:
        """Twins whose schedule says evaluate now: every T seconds or every M new transitions, first wins.

        Called after every transition, so it first asks a cheap question: could anything be due yet? Each full
        scan records how many more transitions and until what time nothing can be (conservative bounds: a
        snapshot only pushes both further away), and calls before then return at once.
        """
        if self._added < self._quiet_adds and now < self._quiet_until:
            return []
        sched = self.config.schedule
        names = []
        quiet_adds, quiet_until = math.inf, math.inf
        for name, tm in self.twins.items():
            if tm.busy:
                continue
            if sched.every_transitions is not None:
                quiet_adds = min(quiet_adds, sched.every_transitions - tm.new_transitions)
            if sched.every_seconds is not None:
                last = -math.inf if tm.last_eval_t is None else tm.last_eval_t
                quiet_until = min(quiet_until, last + sched.every_seconds)
            if tm.new_transitions == 0:
                continue
            by_count = sched.every_transitions is not None and tm.new_transitions >= sched.every_transitions
            by_time = sched.every_seconds is not None and (
                tm.last_eval_t is None or now - tm.last_eval_t >= sched.every_seconds
            )
            if by_count or by_time:
                names.append(name)
        self._added, self._quiet_adds, self._quiet_until = 0, quiet_adds, quiet_until
        return names

    def hold(self, twin: str) -> None:
        """Mark `twin`'s computation as in flight: `due` leaves it out (and out of its quiet bounds)."""
        self.twins[twin].busy = True

    def release(self, twin: str) -> None:
        """Its computation landed: `due` considers it again from the next call."""
        if twin in self.twins:
            self.twins[twin].busy = False
        self._quiet_adds, self._quiet_until = 0.0, -math.inf

    def retry(self, twin: str) -> None:
        """Its computation failed (a worker died): due again at once, with the transitions it had."""
        tm = self.twins[twin]
        tm.new_transitions = max(tm.new_transitions, len(self.real) + len(tm.window), 1)
        tm.last_eval_t = None
        self._quiet_adds, self._quiet_until = 0.0, -math.inf

    def free_labels(self) -> int:
        """Forget the state and action labels no window of the cell holds, renumbering the rest (first-seen
        order) in every window at once; returns how many were freed. Safe between any two calls on the
        monitor: a snapshot already taken carries its own copies of indices and labels."""
        windows = [self.real, *(tm.window for tm in self.twins.values())]
        self._freed_at = self._evictions()
        used_s = np.zeros(len(self.encoding.states), dtype=bool)
        used_a = np.zeros(len(self.encoding.actions), dtype=bool)
        for window in windows:
            window.mark_used(used_s, used_a)
        for s, a, sn in self._pending.values():
            used_s[s] = used_s[sn] = used_a[a] = True
        maps = self.encoding.free(used_s, used_a)
        if maps is None:
            return 0
        for window in windows:
            window.relabel(*maps)
        state_map, action_map = maps
        for s, a, sn in self._pending.values():
            s[:], a[:], sn[:] = state_map[s], action_map[a], state_map[sn]
        return int(used_s.size - used_s.sum() + used_a.size - used_a.sum())

    def _evictions(self) -> int:
        """Samples evicted from the cell's windows so far: unchanged, no label can have become free."""
        return self.real.arrivals + sum(tm.window.arrivals for tm in self.twins.values())

    def _turned_over(self) -> bool:
        """Have the cell's windows evicted as many samples as they hold since the last free_labels? Freeing at
        the snapshots where they have keeps its scan at O(1) per transition; a label is freed within about one
        turnover of the windows after it left them."""
        if self._freed_at is None:
            return True
        held = len(self.real) + sum(len(tm.window) for tm in self.twins.values())
        return not 0 <= self._evictions() - self._freed_at < max(held, 1)

    def _free_if_evicted(self) -> bool:
        """A table is full: free labels if anything left a window since the last try (so a flood of labels
        that stay live costs one scan per eviction, not one per rejected transition); True if any was freed."""
        if self._freed_at == self._evictions():
            return False
        return self.free_labels() > 0

    def snapshot(self, twin: str, now: float) -> Snapshot:
        """Freeze both windows of `twin` at time `now` (time windows evict up to `now` first, then labels no
        window holds are freed, if the windows have turned over since the last time)."""
        tm = self.twins[twin]
        for window in (self.real, tm.window):
            if len(window) and window.max_seconds is not None:
                window.advance(now)
        if self._turned_over():
            self.free_labels()
        S, A = len(self.encoding.states), len(self.encoding.actions)
        tm.new_transitions = 0
        tm.last_eval_t = now
        tm.sync.computing = tm.sync.generation
        halves = self.real.halves(S, A) if tm.settings.noise_floor and len(self.real) >= 2 else None
        return Snapshot(now, self.real.to_mdp(S, A), tm.window.to_mdp(S, A), halves, list(self.encoding.states.labels),
                        self.real.reward_variance(S, A), tm.window.reward_variance(S, A),
                        self.encoding.states.get(TERMINAL))  # fmt: skip

    def decide(self, twin: str, t: float, figures: Figures) -> Report:
        """Apply the trigger rule to a computed evaluation; a fired event gets an id stable for its episode."""
        tm = self.twins[twin]
        tm.evaluations += 1
        sync = tm.sync
        if sync.computing != sync.generation:  # computed on the window a resync has dropped since: not a judgement
            return Report(t, self.cell, twin, tm.trigger.rule.threshold, figures, False, RESYNCING,
                          "resyncing: this evaluation saw the window from before the resync", None, sync.version,
                          sync.resync)  # fmt: skip
        decision = tm.trigger.update(evaluation(t, figures))
        event_id = None
        if decision.fired:
            tm.episodes += 1
            event_id = str(uuid.uuid5(self.event_namespace, f"{self.cell}/{twin}/episode/{tm.episodes}"))
        state, completes = sync.judged(decision.state, figures.mismatch, t)
        reason = f"resyncing: {decision.reason}" if state == RESYNCING else decision.reason
        return Report(
            t=t,
            cell=self.cell,
            twin=twin,
            threshold=tm.trigger.rule.threshold,
            figures=figures,
            fired=decision.fired,
            state=state,
            reason=reason,
            event_id=event_id,
            version=sync.version,
            resync=sync.resync,
            resynced=completes,
        )

    def evaluate(self, twin: str, now: float) -> Report:
        """Snapshot, compute and decide in one call (offline use)."""
        snap = self.snapshot(twin, now)
        return self.decide(twin, snap.t, self.twins[twin].computer.compute(snap))
