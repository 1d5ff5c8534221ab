"""Resync trigger: turns a stream of mismatch evaluations into at most one event per drift episode.

The rule is a threshold with hysteresis and a cooldown, in the style of a drift detector (River's
``update`` + flag): the caller feeds one :class:`Evaluation` per metric computation and gets a
:class:`Decision` back. Time is part of the evaluation, never read from a clock, so a replay of recorded
telemetry fires exactly as the live daemon did.

The default rule, ``act_on: evidence``, fires on evidence rather than on a figure: the *lower end* of the
mismatch's bootstrap interval must reach ``threshold`` **and** the permutation test must reject "the twin is
exchangeable with the real network" at level ``alpha`` (default 0.01; see :mod:`dtsync.metric.evidence`). The
lower end of a two-sided interval at level 1 - 2 alpha is nominally a one-sided 1 - alpha confidence bound (its
measured coverage is in the README, "Noise floor"), and the test's level is exact, so a twin alike the real
network fires only when both err at once. Re-arming needs the evidence gone: the lower end below
``rearm_below``, or the test no longer significant. The other ``act_on`` choices (``point``, ``lower``,
``upper``, ``excess``) compare one figure with the threshold, as before.

Semantics
---------
* The trigger starts *armed*. An armed trigger fires when the acted-on value reaches ``threshold``; it then
  disarms, so a twin that stays drifted produces one event, not one per evaluation.
* It re-arms only once the value drops strictly below ``rearm_below`` (default: ``threshold``). A band
  ``rearm_below < threshold`` keeps a value wobbling around the threshold from firing again and again.
* No event is emitted within ``cooldown_seconds`` (evaluation time) of the previous one. A crossing that
  happens during the cooldown is deferred, not dropped: the trigger stays armed and fires on the first
  evaluation after the cooldown if the value is still at or above the threshold.
* While either window is empty or holds fewer than ``min_samples`` transitions, no state-action has data in
  both windows, coverage is below ``min_coverage``, or (evidence rule) no state is supported (below), the
  twin is "warming" (too thin to judge, never "ok"): nothing fires and the armed state is left untouched.
* A state is *thin* when one of its actions has fewer than ``min_state_samples`` transitions in either window.
  Thin states are reported apart and left out of the interval the evidence rule reads: a state seen a handful
  of times cannot decide an alarm.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

ActOn = Literal["evidence", "point", "lower", "upper", "excess"]
State = Literal["warming", "ok", "drifted"]  # the monitor adds "resyncing" (dtsync.resync)

ACT_ON_CHOICES: tuple[ActOn, ...] = ("evidence", "point", "lower", "upper", "excess")

_FIGURE_NAMES: dict[ActOn, str] = {
    "evidence": "interval lower end",
    "point": "mismatch",
    "lower": "mismatch lower bound",
    "upper": "mismatch upper bound",
    "excess": "mismatch excess over noise floor",
}


@dataclass(frozen=True)
class TriggerRule:
    """When a twin's mismatch counts as drift; see the module docstring for the exact semantics."""

    threshold: float
    rearm_below: float | None = None
    cooldown_seconds: float = 0.0
    min_samples: int = 0
    min_coverage: float = 0.0
    act_on: ActOn = "evidence"
    alpha: float = 0.01
    min_state_samples: int = 50

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold}")
        if self.rearm_below is not None:
            if not (math.isfinite(self.rearm_below) and self.rearm_below >= 0):
                raise ValueError(f"rearm_below must be a finite number >= 0, got {self.rearm_below}")
            if self.rearm_below > self.threshold:
                raise ValueError(
                    f"rearm_below ({self.rearm_below}) must be <= threshold ({self.threshold}), "
                    "otherwise the trigger would re-arm while still drifted"
                )
        if not (math.isfinite(self.cooldown_seconds) and self.cooldown_seconds >= 0):
            raise ValueError(f"cooldown_seconds must be a finite number >= 0, got {self.cooldown_seconds}")
        integral = isinstance(self.min_samples, numbers.Integral) and not isinstance(self.min_samples, bool)
        if not integral or self.min_samples < 0:
            raise ValueError(f"min_samples must be an integer >= 0, got {self.min_samples!r}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in [0, 1], got {self.min_coverage}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        integral = isinstance(self.min_state_samples, numbers.Integral) and not isinstance(self.min_state_samples, bool)
        if not integral or self.min_state_samples < 1:
            raise ValueError(f"min_state_samples must be an integer >= 1, got {self.min_state_samples!r}")
        if self.act_on not in ACT_ON_CHOICES:
            raise ValueError(f"act_on must be one of {', '.join(ACT_ON_CHOICES)}; got {self.act_on!r}")

    @property
    def rearm_level(self) -> float:
        """The value the acted-on figure must drop below to re-arm (``rearm_below`` or the threshold)."""
        return self.threshold if self.rearm_below is None else self.rearm_below

    @property
    def interval_level(self) -> float:
        """Two-sided level of the interval whose lower end the evidence rule reads: 1 - 2 alpha."""
        return 1.0 - 2.0 * self.alpha


@dataclass(frozen=True)
class Evaluation:
    """One metric computation for a (cell, twin) pair at evaluation time ``t`` (seconds)."""

    t: float
    mismatch: float
    mismatch_lower: float
    mismatch_upper: float
    noise_floor: float
    samples_real: int
    samples_twin: int
    coverage: float
    p_value: float | None = None  # permutation test; None: not computed (it could not change the decision)
    interval_low: float | None = None  # lower end of the mismatch interval; None: not computed
    shared: bool = True  # some state-action has data in both windows
    supported_states: int | None = None  # states with min_state_samples transitions in both (None: not counted)


@dataclass(frozen=True)
class Decision:
    """What the trigger made of one evaluation; ``reason`` is a short sentence for logs and events."""

    fired: bool
    state: State
    value: float
    reason: str


def acted_on_value(rule: TriggerRule, ev: Evaluation) -> float:
    """The figure the threshold applies to: the interval's lower end (evidence), point, optimistic/pessimistic
    bound, or excess over the floor. For the evidence rule, an interval not computed counts as 0: it is computed
    whenever the point estimate reaches the re-arm level and the test is significant, so otherwise there is no
    evidence to act on."""
    if rule.act_on == "evidence":
        return 0.0 if ev.interval_low is None else ev.interval_low
    if rule.act_on == "point":
        return ev.mismatch
    if rule.act_on == "lower":
        return ev.mismatch_lower
    if rule.act_on == "upper":
        return ev.mismatch_upper
    return max(0.0, ev.mismatch - ev.noise_floor)


class Trigger:
    """Stateful threshold/hysteresis/cooldown rule for one (cell, twin) pair."""

    def __init__(self, rule: TriggerRule) -> None:
        self.rule = rule
        self.armed = True
        self.last_fired_t: float | None = None

    def set_rule(self, rule: TriggerRule) -> None:
        """Swap the rule (config reload) keeping the armed and cooldown state, so a reload never re-fires."""
        self.rule = rule

    def update(self, ev: Evaluation) -> Decision:
        """Feed one evaluation; returns whether it fires and the state of the twin."""
        rule = self.rule
        value = acted_on_value(rule, ev)
        label = f"{_FIGURE_NAMES[rule.act_on]} {value:.4g}"

        fewest = min(ev.samples_real, ev.samples_twin)
        if fewest == 0:
            empty = "twin" if ev.samples_twin == 0 else "real"
            return Decision(False, "warming", value, f"warming: the {empty} window is empty")
        if fewest < rule.min_samples:
            return Decision(False, "warming", value, f"warming: {fewest} < {rule.min_samples} samples")
        if not ev.shared:
            return Decision(False, "warming", value, "warming: no state-action seen in both windows yet")
        if rule.act_on == "evidence" and ev.supported_states == 0:
            reason = f"warming: no state has {rule.min_state_samples} transitions per action in both windows yet"
            return Decision(False, "warming", value, reason)
        if ev.coverage < rule.min_coverage:
            return Decision(
                False, "warming", value, f"warming: coverage {ev.coverage:.3g} < {rule.min_coverage:.3g}"
            )
        if math.isnan(value):
            return Decision(False, "warming", value, f"warming: {_FIGURE_NAMES[rule.act_on]} is undefined")

        evidence = rule.act_on == "evidence"
        significant = ev.p_value is not None and ev.p_value <= rule.alpha
        if evidence:
            p = "not computed" if ev.p_value is None else f"{ev.p_value:.3g}"
            label = f"{label} ({rule.interval_level:.0%} interval), p-value {p}"
        if not self.armed:
            if value < rule.rearm_level or (evidence and not significant):
                self.armed = True
            else:
                return Decision(
                    False, "drifted", value, f"{label} not yet below re-arm level {rule.rearm_level:.4g}"
                )

        if value < rule.threshold:
            return Decision(False, "ok", value, f"{label} < threshold {rule.threshold:.4g}")
        if evidence and not significant:
            return Decision(False, "ok", value, f"{label} > alpha {rule.alpha:g}: not distinguishable from noise")

        if self.last_fired_t is not None and ev.t - self.last_fired_t < rule.cooldown_seconds:
            until = self.last_fired_t + rule.cooldown_seconds
            reason = f"{label} >= threshold {rule.threshold:.4g}; in cooldown until t={until:g}"
            return Decision(False, "drifted", value, reason)

        self.armed = False
        self.last_fired_t = ev.t
        return Decision(True, "drifted", value, f"{label} >= threshold {rule.threshold:.4g} ({rule.act_on})")

    def rearm(self) -> None:
        """The twin was re-synchronised (dtsync.resync): armed again and out of cooldown, so the next event is
        about the new model alone, judged on its own fresh window."""
        self.armed = True
        self.last_fired_t = None

    def state(self) -> tuple[bool, float | None]:
        """(armed, last_fired_t): what a restart must restore so that a twin still drifted does not fire again."""
        return self.armed, self.last_fired_t

    def restore(self, armed: bool, last_fired_t: float | None) -> None:
        """Set the state saved by :meth:`state` (the rule stays the current one)."""
        self.armed = bool(armed)
        self.last_fired_t = None if last_fired_t is None else float(last_fired_t)
