"""One cell's monitor: shared encoding, the real window, and per twin a window, a metric solver and a trigger.

No I/O and no clock: time comes with the transitions (or from the caller). The offline `replay` and the live
daemon both drive this class, so a recorded trace and the same trace received live give the same timeline.

An evaluation has three steps so that the daemon can run the heavy one off its event loop:
`snapshot` (copies the windows into arrays; cheap, on the caller's thread), `compute` (the metric, its
noise floor and bounds; pure, may run in a worker thread, never two at once for one twin), and `decide`
(the trigger rule; on the caller's thread). `evaluate` chains them for offline use.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dtsync.config import Config, TwinSettings, WindowSettings
from dtsync.contract import Transition
from dtsync.encoding import CapacityError, CellEncoding, EncodingError, StateEncoder
from dtsync.episodes import TERMINAL, absorb
from dtsync.metric import DTBSMSolver, dtbsm_tv, regret_bound, regret_estimate
from dtsync.trigger import Evaluation, Trigger
from dtsync.window import EmpiricalMDP, SlidingWindow

REAL = "real"
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
    top_states: list[tuple[Any, float]]
    compute_seconds: float
    iterations: int


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

    def record(self) -> dict[str, Any]:
        figures = asdict(self.figures)
        figures["top_states"] = [{"state": _jsonable(s), "d": v} for s, v in self.figures.top_states]
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
        }


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

    def compute(self, snap: Snapshot) -> Figures:
        """The metric, its interval, noise floor and bounds for one snapshot."""
        started = time.perf_counter()
        st = self.settings
        real, twin = snap.real, snap.twin
        reward_range = st.reward_range or _observed_range(real, twin)
        res = self.solver.solve(real.R, real.P, twin.R, twin.P, st.gamma, st.tolerance, reward_range=reward_range)
        floor = 0.0
        if snap.real_halves is not None:
            a, b = snap.real_halves
            if a.samples and b.samples:
                half = self.noise_solver.solve(a.R, a.P, b.R, b.P, st.gamma, st.tolerance, reward_range=reward_range)
                floor = half.mismatch * _noise_scale(real.samples, twin.samples)
        tv = dtbsm_tv(real.R, real.P, twin.R, twin.P, st.gamma, rbar=max(res.rbar, _span(reward_range)))
        labelled = [(snap.labels[int(s)], v) for s, v in res.top_states(st.top_states)]
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
            top_states=labelled,
            compute_seconds=time.perf_counter() - started,
            iterations=res.iterations,
        )


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
    busy: bool = False  # a computation is in flight (daemon): not due again until it lands

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

    Event ids are uuid5(event_namespace, cell/twin/t/evaluation number): reproducible for a replay with the
    default namespace; the daemon passes a fresh namespace per start so that ids never repeat across runs.
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

    def encoder_bins(self) -> tuple[tuple[float, ...], ...] | None:
        """The encoder's bin edges, in the config's form (for reload comparisons)."""
        bins = self.encoding.state_encoder.bins
        return None if bins is None else tuple(tuple(edges) for edges in bins)

    def add(self, stream: str, tr: Transition, now: float) -> str | None:
        """Add one transition to the real window or a twin's; returns a rejection reason, or None if kept.

        The transition's own `t` is its time when given, else `now` (the receive time).
        """
        window = self.real if stream == REAL else self.twins[stream].window
        try:
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
        s, a, sn, kept, bad = self.encoding.encode_many(transitions)
        rejected.extend(bad)
        r = [transitions[i].r for i in kept]
        t = [now if transitions[i].t is None else transitions[i].t for i in kept]
        i, n = 0, len(kept)
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

    def snapshot(self, twin: str, now: float) -> Snapshot:
        """Freeze both windows of `twin` at time `now` (time windows evict up to `now` first)."""
        tm = self.twins[twin]
        for window in (self.real, tm.window):
            if len(window) and window.max_seconds is not None:
                window.advance(now)
        S, A = len(self.encoding.states), len(self.encoding.actions)
        tm.new_transitions = 0
        tm.last_eval_t = now
        halves = self.real.halves(S, A) if tm.settings.noise_floor and len(self.real) >= 2 else None
        end = self.encoding.states.get(TERMINAL)  # episodes: absorbing in every MDP of the pair
        halves = None if halves is None else (absorb(halves[0], end), absorb(halves[1], end))
        real, twin = absorb(self.real.to_mdp(S, A), end), absorb(tm.window.to_mdp(S, A), end)
        return Snapshot(now, real, twin, halves, list(self.encoding.states.labels))

    def decide(self, twin: str, t: float, figures: Figures) -> Report:
        """Apply the trigger rule to a computed evaluation; a fired event gets a unique, reproducible id."""
        tm = self.twins[twin]
        ev = Evaluation(
            t=t,
            mismatch=figures.mismatch,
            mismatch_lower=figures.mismatch_lower,
            mismatch_upper=figures.mismatch_upper,
            noise_floor=figures.noise_floor,
            samples_real=figures.samples_real,
            samples_twin=figures.samples_twin,
            coverage=figures.coverage,
        )
        decision = tm.trigger.update(ev)
        tm.evaluations += 1
        event_id = None
        if decision.fired:
            event_id = str(uuid.uuid5(self.event_namespace, f"{self.cell}/{twin}/{t!r}/{tm.evaluations}"))
        return Report(
            t=t,
            cell=self.cell,
            twin=twin,
            threshold=tm.trigger.rule.threshold,
            figures=figures,
            fired=decision.fired,
            state=decision.state,
            reason=decision.reason,
            event_id=event_id,
        )

    def evaluate(self, twin: str, now: float) -> Report:
        """Snapshot, compute and decide in one call (offline use)."""
        snap = self.snapshot(twin, now)
        return self.decide(twin, snap.t, self.twins[twin].computer.compute(snap))
