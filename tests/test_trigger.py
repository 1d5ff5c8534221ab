import math

import pytest

from dtsync.trigger import Decision, Evaluation, Trigger, TriggerRule


def point(**kwargs: object) -> TriggerRule:
    """A rule on the point mismatch (the figure rules predate the evidence default and are kept for users)."""
    return TriggerRule(**{"act_on": "point", **kwargs})  # type: ignore[arg-type]


def ev(
    t: float,
    mismatch: float,
    *,
    lower: float | None = None,
    upper: float | None = None,
    floor: float = 0.0,
    samples: int = 1000,
    coverage: float = 1.0,
) -> Evaluation:
    return Evaluation(
        t=t,
        mismatch=mismatch,
        mismatch_lower=mismatch if lower is None else lower,
        mismatch_upper=mismatch if upper is None else upper,
        noise_floor=floor,
        samples_real=samples,
        samples_twin=samples,
        coverage=coverage,
    )


def run(trigger: Trigger, values: list[float], dt: float = 1.0) -> list[Decision]:
    return [trigger.update(ev(i * dt, v)) for i, v in enumerate(values)]


def test_one_event_per_upward_crossing() -> None:
    trig = Trigger(point(threshold=0.5, rearm_below=0.3))
    decisions = run(trig, [0.1, 0.6, 0.7, 0.9, 0.6, 0.2, 0.1, 0.8, 0.9])
    assert [d.fired for d in decisions] == [False, True, False, False, False, False, False, True, False]
    assert [d.state for d in decisions] == ["ok", "drifted", "drifted", "drifted", "drifted", "ok", "ok",
                                            "drifted", "drifted"]
    assert trig.last_fired_t == 7.0


def test_hysteresis_band_prevents_refire_on_wobble() -> None:
    trig = Trigger(point(threshold=0.5, rearm_below=0.3))
    decisions = run(trig, [0.6, 0.45, 0.55, 0.4, 0.52, 0.35, 0.5])
    assert sum(d.fired for d in decisions) == 1
    # Between threshold and re-arm level the twin stays drifted until it re-arms.
    assert all(d.state == "drifted" for d in decisions)


def test_without_band_rearms_just_below_threshold() -> None:
    trig = Trigger(point(threshold=0.5))
    decisions = run(trig, [0.6, 0.45, 0.55, 0.49, 0.5])
    assert [d.fired for d in decisions] == [True, False, True, False, True]
    assert [d.state for d in decisions] == ["drifted", "ok", "drifted", "ok", "drifted"]


def test_cooldown_suppresses_then_deferred_crossing_fires() -> None:
    trig = Trigger(point(threshold=0.5, cooldown_seconds=10.0))
    first = trig.update(ev(0.0, 0.9))
    assert first.fired
    assert not trig.update(ev(2.0, 0.1)).fired  # re-armed
    suppressed = trig.update(ev(4.0, 0.9))
    assert not suppressed.fired
    assert suppressed.state == "drifted"
    assert "cooldown until t=10" in suppressed.reason
    assert not trig.update(ev(9.9, 0.9)).fired
    late = trig.update(ev(10.0, 0.9))  # still drifted after the cooldown: the crossing is reported once
    assert late.fired
    assert not trig.update(ev(11.0, 0.9)).fired
    assert trig.last_fired_t == 10.0


def test_cooldown_drops_crossing_that_recovers_within_it() -> None:
    trig = Trigger(point(threshold=0.5, cooldown_seconds=10.0))
    assert trig.update(ev(0.0, 0.9)).fired
    assert trig.update(ev(1.0, 0.1)).state == "ok"
    assert not trig.update(ev(2.0, 0.9)).fired
    assert trig.update(ev(3.0, 0.1)).state == "ok"
    assert not trig.update(ev(12.0, 0.1)).fired
    assert trig.last_fired_t == 0.0


def test_warming_on_samples_never_fires_and_keeps_armed_state() -> None:
    trig = Trigger(point(threshold=0.5, min_samples=500))
    d = trig.update(Evaluation(0.0, 0.9, 0.9, 0.9, 0.0, samples_real=120, samples_twin=800, coverage=1.0))
    assert (d.fired, d.state) == (False, "warming")
    assert d.reason == "warming: 120 < 500 samples"
    assert trig.armed and trig.last_fired_t is None
    assert trig.update(ev(1.0, 0.9, samples=500)).fired
    # Warming after a fire must not re-arm it, even if the value looks low.
    assert trig.update(ev(2.0, 0.1, samples=10)).state == "warming"
    assert not trig.armed
    assert not trig.update(ev(3.0, 0.9)).fired


def test_warming_on_coverage() -> None:
    trig = Trigger(point(threshold=0.5, min_coverage=0.8))
    d = trig.update(ev(0.0, 0.9, coverage=0.5))
    assert (d.fired, d.state) == (False, "warming")
    assert "coverage" in d.reason
    assert trig.update(ev(1.0, 0.9, coverage=0.8)).fired


def test_undefined_value_is_warming() -> None:
    trig = Trigger(point(threshold=0.5))
    d = trig.update(ev(0.0, math.nan))
    assert (d.fired, d.state) == (False, "warming")
    assert trig.armed


@pytest.mark.parametrize(
    ("act_on", "expected"),
    [("point", 0.5), ("lower", 0.2), ("upper", 0.9), ("excess", 0.5 - 0.15)],
)
def test_act_on_selects_figure(act_on: str, expected: float) -> None:
    trig = Trigger(point(threshold=0.4, act_on=act_on))  # type: ignore[arg-type]
    d = trig.update(ev(0.0, 0.5, lower=0.2, upper=0.9, floor=0.15))
    assert d.value == pytest.approx(expected)
    assert d.fired == (expected >= 0.4)
    expected_reason = f"({act_on})" if d.fired else "< threshold"
    assert expected_reason in d.reason


def test_excess_is_clipped_at_zero() -> None:
    trig = Trigger(point(threshold=0.0, act_on="excess"))
    d = trig.update(ev(0.0, 0.1, floor=0.3))
    assert d.value == 0.0
    assert d.fired  # threshold 0 fires on any evaluation at or above it


def test_fired_reason_explains() -> None:
    d = Trigger(point(threshold=0.3)).update(ev(0.0, 0.42))
    assert d.fired
    assert d.reason == "mismatch 0.42 >= threshold 0.3 (point)"


def test_set_rule_keeps_armed_and_cooldown_state() -> None:
    trig = Trigger(point(threshold=0.5, cooldown_seconds=10.0))
    assert trig.update(ev(0.0, 0.9)).fired
    trig.set_rule(point(threshold=0.6, cooldown_seconds=10.0))
    assert trig.rule.threshold == 0.6
    assert not trig.update(ev(1.0, 0.9)).fired  # still disarmed after the reload
    assert not trig.armed and trig.last_fired_t == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": -0.1}, "threshold must be"),
        ({"threshold": math.inf}, "threshold must be"),
        ({"threshold": 0.5, "rearm_below": 0.6}, "rearm_below (0.6) must be <= threshold (0.5)"),
        ({"threshold": 0.5, "rearm_below": -1.0}, "rearm_below must be"),
        ({"threshold": 0.5, "cooldown_seconds": -1.0}, "cooldown_seconds must be"),
        ({"threshold": 0.5, "min_samples": -1}, "min_samples must be"),
        ({"threshold": 0.5, "min_samples": 1.5}, "min_samples must be"),
        ({"threshold": 0.5, "min_coverage": 1.5}, "min_coverage must be in [0, 1]"),
        ({"threshold": 0.5, "act_on": "median"}, "act_on must be one of"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        TriggerRule(**kwargs)  # type: ignore[arg-type]
    assert message in str(excinfo.value)


def test_rearm_level_defaults_to_threshold() -> None:
    assert TriggerRule(threshold=0.5).rearm_level == 0.5
    assert TriggerRule(threshold=0.5, rearm_below=0.2).rearm_level == 0.2


def evidence_ev(t: float, low: float | None, p: float | None, *, mismatch: float = 2.0, **kw: object) -> Evaluation:
    return Evaluation(t, mismatch, mismatch, mismatch, 0.0, samples_real=kw.get("samples_real", 1000),  # type: ignore[arg-type]
                      samples_twin=kw.get("samples_twin", 1000), coverage=1.0, p_value=p,  # type: ignore[arg-type]
                      interval_low=low, shared=kw.get("shared", True))  # type: ignore[arg-type]


def test_evidence_is_the_default_rule() -> None:
    assert TriggerRule(threshold=0.5).act_on == "evidence"
    assert TriggerRule(threshold=0.5).alpha == 0.01
    assert TriggerRule(threshold=0.5).interval_level == pytest.approx(0.98)


def test_evidence_rule_needs_both_the_lower_end_and_significance() -> None:
    trig = Trigger(TriggerRule(threshold=0.5))
    # A large point mismatch alone (identical twins on finite windows) is not evidence.
    d = trig.update(evidence_ev(0.0, None, 0.4, mismatch=3.0))
    assert (d.fired, d.state) == (False, "ok")
    # Significant, but the interval's lower end is below the threshold: different, not by enough.
    d = trig.update(evidence_ev(1.0, 0.3, 0.005))
    assert (d.fired, d.state) == (False, "ok") and "< threshold" in d.reason
    # Lower end above the threshold but the test does not reject: not distinguishable from noise.
    d = trig.update(evidence_ev(2.0, 0.7, 0.02))
    assert (d.fired, d.state) == (False, "ok") and "not distinguishable from noise" in d.reason
    d = trig.update(evidence_ev(3.0, 0.7, 0.01))
    assert (d.fired, d.state) == (True, "drifted")
    assert d.reason.startswith("interval lower end 0.7 (98% interval), p-value 0.01 >= threshold 0.5")


def test_evidence_rule_rearms_once_the_evidence_is_gone() -> None:
    trig = Trigger(TriggerRule(threshold=0.5, rearm_below=0.3))
    assert trig.update(evidence_ev(0.0, 0.9, 0.005)).fired
    assert trig.update(evidence_ev(1.0, 0.4, 0.005)).state == "drifted"  # still above the re-arm level
    assert not trig.armed
    assert trig.update(evidence_ev(2.0, None, 0.3)).state == "ok"  # test no longer significant: re-armed
    assert trig.armed
    assert trig.update(evidence_ev(3.0, 0.8, 0.005)).fired


def test_empty_or_disjoint_windows_are_warming_never_ok() -> None:
    trig = Trigger(TriggerRule(threshold=0.5))
    d = trig.update(evidence_ev(0.0, None, None, mismatch=0.0, samples_twin=0))
    assert (d.fired, d.state, d.reason) == (False, "warming", "warming: the twin window is empty")
    d = trig.update(evidence_ev(1.0, None, None, mismatch=0.0, samples_real=0))
    assert d.state == "warming" and "real window is empty" in d.reason
    d = trig.update(evidence_ev(2.0, None, None, mismatch=0.0, shared=False))
    assert d.state == "warming" and "both windows" in d.reason
    # The figure rules too: an empty twin window reads mismatch 0, which is not "ok".
    assert Trigger(point(threshold=0.5)).update(evidence_ev(0.0, None, None, mismatch=0.0, samples_twin=0)).state == (
        "warming"
    )


@pytest.mark.parametrize("alpha", [0.0, 0.5, -0.1, 1.0])
def test_alpha_must_be_a_small_probability(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        TriggerRule(threshold=0.5, alpha=alpha)
