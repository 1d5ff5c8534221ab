"""The pre-filtering study: its sampler, its statistics, and a small pool run end to end through the CLI."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from dtsync import dtbsm
from dtsync.cli import app
from dtsync.testbed import exact_mdp, preset
from dtsync.testbed.study import (
    TwinResult,
    TwinSpec,
    build_twin,
    candidate_pool,
    correlations,
    empirical_mdp,
    plot_study,
    run_study,
    selection_table,
)
from dtsync.testbed.variants import fitted

runner = CliRunner()


def test_sampler_converges_to_the_exact_mdp() -> None:
    mdp = exact_mdp(preset("coarse-buffers"))
    rng = np.random.default_rng(0)
    small, large = empirical_mdp(mdp, 20_000, rng), empirical_mdp(mdp, 400_000, rng)

    def error(emp: Any) -> float:
        return float((emp.N * 0.5 * np.abs(emp.P - mdp.P).sum(axis=2)).sum() / emp.N.sum())

    assert large.samples == 400_000 and large.N.min() > 0
    assert error(large) < 0.45 * error(small)  # ~ 1/sqrt(20) = 0.22 expected
    assert np.allclose(large.R, mdp.R)


def test_pool_is_diverse_and_reproducible() -> None:
    pool = candidate_pool(100, seed=3)
    assert pool == candidate_pool(100, seed=3) and pool != candidate_pool(100, seed=4)
    assert len({s.name for s in pool}) == 100
    for field in ("traffic", "channel", "buckets", "noise", "fit_samples"):
        assert len({getattr(s, field) for s in pool}) > 1, field
    real = preset("real")
    spec = pool[0]
    assert build_twin(real, spec) == build_twin(real, spec)
    assert build_twin(real, spec).label_space() == real.label_space()


def test_a_twin_fitted_on_more_measurements_is_closer_to_the_real_network() -> None:
    real = exact_mdp(preset("real"))

    def exact_mismatch(samples: int, seed: int) -> float:
        twin = exact_mdp(fitted(preset("real"), samples, np.random.default_rng(seed)))
        return dtbsm(real.R, real.P, twin.R, twin.P, 0.9).mismatch

    few, many = [exact_mismatch(30, s) for s in range(2)], [exact_mismatch(300_000, s) for s in range(2)]
    assert max(many) < 0.05 < 0.5 < min(few)


def test_correlations_match_textbook_values() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert correlations(x, [2.0, 4.0, 6.0, 8.0, 10.0]) == pytest.approx((1.0, 1.0))
    assert correlations(x, [5.0, 6.0, 7.0, 8.0, 100.0])[1] == pytest.approx(1.0)  # monotone: rho = 1, r < 1
    assert correlations(x, [5.0, 6.0, 7.0, 8.0, 100.0])[0] < 0.9
    # Ties take their average rank: ranks of y are (1.5, 1.5, 3, 4, 5) -> rho = r(ranks).
    rho = correlations(x, [1.0, 1.0, 2.0, 3.0, 4.0])[1]
    ranks = np.array([1.5, 1.5, 3, 4, 5])
    assert rho == pytest.approx(np.corrcoef(np.arange(1, 6), ranks)[0, 1])
    assert math.isnan(correlations(x, [1.0] * 5)[0])


def _twin(name: str, mismatch: float, train: float, deployed: float) -> TwinResult:
    spec = TwinSpec(name, "batch", "markov", "fine", 0.0, 30, 0)
    return TwinResult(spec, mismatch, 10 * mismatch, mismatch, train, 0.0, deployed, 0.0, 1.0, True, True)


def test_selection_table_by_hand() -> None:
    # Best deployed is 10 (twin a). Gaps: a 0, b 1, c 4, d 5 -> full testing cost 10.
    twins = [
        _twin("a", 0.1, 1.0, 10.0),
        _twin("b", 0.2, 3.0, 9.0),
        _twin("c", 0.3, 9.0, 6.0),
        _twin("d", 0.4, 8.0, 5.0),
    ]
    rows = {(r.ratio, r.rule): r for r in selection_table(twins, ratios=(1.0, 0.5, 0.25), draws=2000, seed=1)}
    assert rows[(1.0, "evaluation")].testing_cost == pytest.approx(10.0)
    evaluation, reward = rows[(0.5, "evaluation")], rows[(0.5, "reward")]
    assert (evaluation.selected, evaluation.best_deployed, evaluation.optimal_kept) == (2, 10.0, 1.0)
    assert evaluation.testing_cost == pytest.approx(1.0) and evaluation.testing_reduction == pytest.approx(0.9)
    assert evaluation.training_reduction == pytest.approx(0.5)
    assert (reward.best_deployed, reward.optimal_kept, reward.testing_cost) == (6.0, 0.0, pytest.approx(9.0))
    rnd = rows[(0.25, "random")]  # one twin: kept with probability 1/4, mean cost 10/4
    assert rnd.optimal_kept == pytest.approx(0.25, abs=0.04)
    assert rnd.testing_cost == pytest.approx(2.5, abs=0.3)
    assert rnd.best_deployed == pytest.approx(7.5, abs=0.3)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("prefilter")
    result = runner.invoke(app, ["study", "prefilter", "--pool", "12", "--seed", "0", "--samples", "100000",
                                 "--workers", "2", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output, out


def test_small_study_writes_json_and_the_bound_holds(study_out: tuple[str, Path]) -> None:
    output, out = study_out
    data = json.loads((out / "prefilter.json").read_text())
    twins = data["twins"]
    assert len(twins) == 12 and data["summary"]["pool"] == 12
    keys = {"name", "traffic", "channel", "buckets", "noise", "fit_samples", "mismatch", "tv_bound",
            "training_return", "deployed_return", "bound_held", "regret", "bound"}  # fmt: skip
    assert all(keys <= t.keys() for t in twins)
    assert all(t["bound_held"] and t["bound_held_exact"] for t in twins)
    assert all(t["mismatch"] <= t["tv_bound"] + 1e-9 for t in twins)  # max d(s,s) <= max d_TV / (1 - gamma)
    optimal = data["summary"]["optimal_return"]
    assert all(t["deployed_return"] <= optimal + 1e-9 for t in twins)
    assert all(t["training_gap"] < 1e-6 for t in twins)  # value iteration converged in every twin
    assert data["summary"]["spearman"] < 0  # more mismatch, worse deployment
    assert len(data["selection"]) == 15
    assert "regret bound held for 12/12 twins" in output and "Spearman" in output
    assert ("prefilter.png" in output) == (out / "prefilter.png").exists()


def test_one_process_gives_the_same_figures_as_the_pool_of_processes(study_out: tuple[str, Path]) -> None:
    _, out = study_out
    twins = json.loads((out / "prefilter.json").read_text())["twins"]
    serial = run_study(pool=12, seed=0, samples=100_000, workers=1)
    assert [t.record() for t in serial.twins] == twins


def test_plot_is_skipped_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = run_study(pool=2, seed=1, samples=5_000, workers=1)
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_study(result, tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()


def test_plot_is_written_with_matplotlib(tmp_path: Path) -> None:
    result = run_study(pool=4, seed=1, samples=5_000, workers=1)
    assert plot_study(result, tmp_path / "p.png") is True
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
