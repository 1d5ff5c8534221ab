"""`dtsync study sync`: triggered resyncs against fixed schedules, scored on the exact DT-BSM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dtsync.cli import app
from dtsync.metric import dtbsm
from dtsync.testbed import exact_mdp
from dtsync.testbed.sync_study import (
    PolicyResult,
    SyncSetup,
    SyncStudyResult,
    pooled,
    refit,
    regime,
    regimes,
    run_sync_study,
    study_cell,
)

SHORT = SyncSetup(steps=60_000, window=10_000, eval_every=2_500, periods_windows=(1.0, 2.0), seed=3)
CHANGE_AT = 15_000


@pytest.fixture(scope="module")
def one_change() -> SyncStudyResult:
    """A real network whose channel rates halve at step 15,000 (exact mismatch 3.19 against the old fit)."""
    return run_sync_study(SHORT, changes=[regime(study_cell(), CHANGE_AT, channel=0.5)])


def test_triggered_sync_resyncs_after_the_change_and_the_refit_is_faithful(one_change: SyncStudyResult) -> None:
    trig = one_change.triggered
    assert trig.resyncs and trig.resyncs[0] > CHANGE_AT, trig.resyncs
    assert one_change.false_resyncs == 0 and len(trig.resyncs) == 1, trig.resyncs
    before, after = trig.timeline[1][1], trig.timeline[-1][1]  # from the change on, and from the resync on
    assert before > 4 * SHORT.threshold and after < SHORT.threshold / 4, trig.timeline


def test_policies_are_scored_by_integrating_the_exact_mismatch(one_change: SyncStudyResult) -> None:
    """Time average and time above threshold, recomputed from each policy's own piecewise-constant timeline,
    and the periodic schedules resync exactly every period."""
    for p in (one_change.triggered, *one_change.periodic):
        starts = [s for s, _ in p.timeline] + [SHORT.steps]
        lengths = np.diff(starts)
        values = np.array([m for _, m in p.timeline])
        assert p.mean_mismatch == pytest.approx(float(values @ lengths) / SHORT.steps)
        assert p.time_above == pytest.approx(float(lengths[values > SHORT.threshold].sum()) / SHORT.steps)
    for p, period in zip(one_change.periodic, (10_000, 20_000), strict=True):
        assert p.period_steps == period and p.resyncs == list(range(period, SHORT.steps, period))


def test_the_scored_mismatch_is_the_exact_dtbsm_of_regime_and_fit(one_change: SyncStudyResult) -> None:
    """Before any resync both policies hold the first fit: against the base regime it reads the exact DT-BSM
    of the base testbed and that fit, small (a fit from 30,000 steps), and far above it after the change."""
    base = exact_mdp(study_cell())
    changed = exact_mdp(one_change.regimes[1].params)
    assert one_change.triggered.timeline[0][1] < 0.2
    for p in (one_change.triggered, *one_change.periodic):
        assert p.timeline[0] == one_change.triggered.timeline[0]
    drifted = dtbsm(base.R, base.P, changed.R, changed.P, SHORT.gamma).mismatch
    assert abs(one_change.triggered.timeline[1][1] - drifted) < 0.5


def test_every_scored_segment_is_solved_for_its_own_regime_and_fit(one_change: SyncStudyResult) -> None:
    """Recomputed from scratch per segment: a cache keyed by object id once returned the mismatch of a fit
    that had been freed (its id reused), so periodic schedules scored worse the more often they resynced."""
    for p in one_change.periodic:
        for start, m in p.timeline[1:]:
            regime_now = next(r for r in reversed(one_change.regimes) if r.start <= start)
            last = max((s for s in p.resyncs if s <= start), default=0)
            fit = exact_mdp(refit(next(r for r in reversed(one_change.regimes) if r.start <= last), SHORT, last))
            real = exact_mdp(regime_now.params)
            assert m == pytest.approx(dtbsm(real.R, real.P, fit.R, fit.P, SHORT.gamma).mismatch, abs=1e-9)


def test_regimes_change_at_random_within_the_factor_ranges() -> None:
    setup = SyncSetup(steps=5_000_000, window=10_000, regime_windows=5.0)
    regs = regimes(study_cell(), setup, np.random.default_rng(1))
    gaps = np.diff([r.start for r in regs])
    assert 50 < len(regs) < 200 and gaps.min() > 0  # mean gap 50,000 steps: ~100 changes
    assert {r.kind for r in regs[1:]} == {"channel", "traffic"}
    for prev, r in zip(regs, regs[1:], strict=False):  # one of the two factors is redrawn each time
        assert (r.channel == prev.channel) != (r.traffic == prev.traffic)
        assert 0.5 <= r.channel <= 1.5 and 0.4 <= r.traffic <= 1.6


def _policy(name: str, resyncs: int, mean: float) -> PolicyResult:
    return PolicyResult(name, 1, list(range(resyncs)), mean, 0.0, [])


def test_the_best_periodic_schedule_is_the_cheapest_one_at_equal_or_better_fidelity() -> None:
    periodic = [_policy("p1", 40, 0.05), _policy("p2", 20, 0.10), _policy("p4", 10, 0.30)]
    result = SyncStudyResult(SHORT, [], _policy("trig", 4, 0.12), periodic, 0, 0.0)
    assert result.best_periodic() is periodic[1] and result.ratio() == 5.0
    trig, rows, ratio = pooled([result, result])
    assert trig.resyncs == 8 and [r.resyncs for r in rows] == [80, 40, 20] and ratio == 5.0
    worse = SyncStudyResult(SHORT, [], _policy("trig", 4, 0.01), periodic, 0, 0.0)
    assert worse.best_periodic() is None and worse.ratio() is None and pooled([worse])[2] is None


def test_setup_is_validated() -> None:
    with pytest.raises(ValueError, match="window"):
        SyncSetup(steps=1_000, window=10_000)
    with pytest.raises(ValueError, match="periods"):
        SyncSetup(periods_windows=(0.0,))


def test_cli_prints_the_comparison_and_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "sync"
    result = CliRunner().invoke(app, ["study", "sync", "--steps", "20000", "--window", "5000", "--eval-every",
                                      "2500", "--seeds", "1", "--workers", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "triggered (dtsync)" in result.output and "every 50 s" in result.output
    data = json.loads((out / "sync.json").read_text())
    assert data["seeds"][0]["setup"]["steps"] == 20_000 and len(data["pooled"]["periodic"]) == 6
    with Image.open(out / "sync.png") as img:
        assert img.format == "PNG" and img.size[0] > 600
        px = np.asarray(img.convert("RGB")).astype(int)
    assert 0.01 < (px < 240).any(axis=-1).mean() < 0.6  # not blank


def test_cli_rejects_a_bad_setup() -> None:
    result = CliRunner().invoke(app, ["study", "sync", "--steps", "2000", "--window", "5000"])
    assert result.exit_code != 0 and "window" in result.output
