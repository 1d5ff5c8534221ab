"""Pre-filtering candidate twins by DT-BSM before training (Tao, Xu, You, arXiv 2511.19961, Fig. 5b).

A pool of candidate twins of the reference testbed differ in their model choices (traffic, channel, buffer
resolution, noise on probabilities) and in how much measurement they were fitted on. For each twin:

1. sample the real testbed and the twin under the same uniform behaviour policy and build empirical MDPs on
   the real network's state labels; DT-BSM ``dtbsm(...).mismatch`` and its TV bound from those;
2. train a policy in the twin to convergence (value iteration on the twin's exact MDP);
3. deploy it on the real testbed: exact policy evaluation on the real MDP. Deployed performance is the mean
   over states of V^pi, i.e. the expected return from a uniformly random start state;
4. check the regret bound max_s (V* - V^pi) <= 2/(1-gamma) DT-BSM + (1+gamma)/(1-gamma) eps', eps' the
   policy's optimality gap in the twin (~0 after value iteration), with the empirical DT-BSM (what one can
   measure) and with the DT-BSM between the exact MDPs (what the theorem is about: it must always hold).

Then three rules select a share of the pool for training and testing: evaluation-based (lowest mismatch
first), reward-based (highest return inside the agent's own twin first) and random. Training cost is the
number of twins trained; testing cost is the sum, over the tested policies, of their gap to the best deployed
policy of the whole pool (what testing them on the live network costs).

Sampling draws from the exact MDPs (vectorised: many short episodes from uniformly random start states, so
every state is covered), which the tests check against the step-by-step simulator. For a model with coarse
buffers the reward of a sample is its expectation over the levels of the group.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any

import numba
import numpy as np

from dtsync.metric import dtbsm, dtbsm_tv, regret_bound, value_iteration
from dtsync.metric.bounds import policy_value
from dtsync.testbed.model import TestbedMDP, exact_mdp
from dtsync.testbed.params import TestbedParams
from dtsync.testbed.presets import preset
from dtsync.testbed.variants import coarse_buffers, fitted, perturbed
from dtsync.window import EmpiricalMDP

__all__ = [
    "RANDOM_DRAWS",
    "RATIOS",
    "SAMPLES",
    "SelectionRow",
    "StudyResult",
    "TwinResult",
    "TwinSpec",
    "build_twin",
    "candidate_pool",
    "correlations",
    "empirical_mdp",
    "plot_study",
    "run_study",
    "selection_table",
]

RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
RANDOM_DRAWS = 1000  # the random rule's figures are means over this many draws
SAMPLES = 400_000  # transitions per model; the empirical DT-BSM's sampling noise shrinks like 1/sqrt(samples)
TRAFFIC = ("batch", "poisson")
CHANNEL = ("markov", "iid", "optimistic", "frozen")
CHANNEL_WEIGHTS = (0.55, 0.15, 0.15, 0.15)
NOISE = (0.0, 0.1, 0.3, 0.6)
FIT_SAMPLES = (30, 300, 3000, 30000)


@dataclass(frozen=True)
class TwinSpec:
    """How one candidate twin was built: model choices, measurement size and the seed of its estimates."""

    name: str
    traffic: str  # batch (fitted batch sizes) | poisson (single chunks at the fitted rate)
    channel: str  # markov | iid (memoryless) | optimistic (rates x1.5) | frozen (stale)
    buckets: str  # fine | coarse (buffers modelled as empty / non-empty)
    noise: float  # sigma of the log-normal noise on every probability
    fit_samples: int  # measured steps the twin was estimated from
    seed: int


@dataclass(frozen=True)
class TwinResult:
    """One twin's figures (values are discounted returns; deployed = mean over states of V^pi in the real MDP)."""

    spec: TwinSpec
    mismatch: float  # empirical DT-BSM, max_s d(s, s): what a monitor measures, used for ranking
    tv_bound: float  # empirical max_s d_TV(s) / (1 - gamma) >= mismatch
    mismatch_exact: float  # DT-BSM between the exact MDPs: the quantity the regret theorem is about
    training_return: float  # mean over states of V'^pi inside the twin
    training_gap: float  # eps' = max_s (V'* - V'^pi) inside the twin
    deployed_return: float
    regret: float  # max_s (V* - V^pi) in the real MDP
    bound: float  # regret_bound(mismatch, gamma, eps')
    bound_held: bool
    bound_held_exact: bool  # the same with mismatch_exact: guaranteed by the theorem, so a check of the code

    def record(self) -> dict[str, Any]:
        """JSON-ready: the spec's fields flattened beside the figures."""
        out = asdict(self.spec)
        out.update({k: v for k, v in asdict(self).items() if k != "spec"})
        return out


@dataclass(frozen=True)
class SelectionRow:
    """One rule at one selection ratio (random: means over draws)."""

    ratio: float
    rule: str
    selected: int
    best_deployed: float
    optimal_kept: float  # 1/0, or the share of random draws that kept a best policy of the pool
    testing_cost: float
    training_reduction: float  # 1 - selected / pool
    testing_reduction: float  # 1 - testing_cost / testing cost at 100 %


@dataclass(frozen=True)
class StudyResult:
    """Everything ``dtsync study prefilter`` prints and writes."""

    twins: list[TwinResult]
    table: list[SelectionRow]
    pearson: float
    spearman: float
    noise_floor: float  # DT-BSM between two independent samples of the real testbed
    optimal_return: float  # mean over states of V* in the real MDP
    gamma: float
    samples: int
    seconds: float

    def record(self) -> dict[str, Any]:
        """JSON-ready: summary figures, the selection table and one record per twin."""
        summary = {k: v for k, v in asdict(self).items() if k not in ("twins", "table")}
        summary["bound_held"] = sum(t.bound_held for t in self.twins)
        summary["bound_held_exact"] = sum(t.bound_held_exact for t in self.twins)
        summary["pool"] = len(self.twins)
        summary["deployed_return"] = "mean over states of V^pi in the exact real MDP (uniform start state)"
        return {
            "summary": summary,
            "selection": [asdict(row) for row in self.table],
            "twins": [t.record() for t in self.twins],
        }


def candidate_pool(size: int, seed: int) -> list[TwinSpec]:
    """``size`` twins with model choices drawn at random (seeded): a mix from faithful to badly wrong."""
    if size < 1:
        raise ValueError("pool size must be >= 1")
    rng = np.random.default_rng(seed)
    return [
        TwinSpec(
            name=f"twin{i:03d}",
            traffic=str(rng.choice(TRAFFIC, p=(0.6, 0.4))),
            channel=str(rng.choice(CHANNEL, p=CHANNEL_WEIGHTS)),
            buckets="coarse" if rng.random() < 0.25 else "fine",
            noise=float(rng.choice(NOISE)),
            fit_samples=int(rng.choice(FIT_SAMPLES)),
            seed=int(rng.integers(2**31)),
        )
        for i in range(size)
    ]


def build_twin(real: TestbedParams, spec: TwinSpec) -> TestbedParams:
    """Fit the twin on ``spec.fit_samples`` measured steps, then add its noise and coarsening."""
    rng = np.random.default_rng(spec.seed)
    twin = fitted(real, spec.fit_samples, rng, traffic=spec.traffic, channel=spec.channel)
    if spec.noise > 0:
        twin = perturbed(twin, spec.noise, rng)
    return coarse_buffers(twin) if spec.buckets == "coarse" else twin


def empirical_mdp(mdp: TestbedMDP, samples: int, rng: np.random.Generator, horizon: int = 50) -> EmpiricalMDP:
    """Empirical MDP from ``samples`` transitions: episodes of ``horizon`` steps from uniform random starts,
    uniform random actions. Vectorised over episodes: one step of all of them is one comparison with the
    cumulative rows of P."""
    S, A = mdp.R.shape
    chains = math.ceil(samples / horizon)
    cum = np.cumsum(mdp.P, axis=2)
    cum[..., -1] = 1.0  # guard against round-off: a uniform draw always lands in some state
    s = rng.integers(S, size=chains)
    cols: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for _ in range(horizon):
        a = rng.integers(A, size=chains)
        s_next = (rng.random(chains)[:, None] >= cum[s, a]).sum(axis=1)
        cols.append((s, a, s_next))
        s = s_next
    s_all, a_all, sn_all = (np.concatenate(col)[:samples] for col in zip(*cols, strict=True))
    return _count(s_all, a_all, mdp.R[s_all, a_all], sn_all, S, A)


def _count(s: np.ndarray, a: np.ndarray, r: np.ndarray, s_next: np.ndarray, S: int, A: int) -> EmpiricalMDP:
    """The counting of ``EmpiricalMDP.from_transitions`` (P_hat = N(s,a,x) / N(s,a), R_hat = mean reward) with
    bincount on whole columns instead of a Python loop over tuples."""
    sa = s * A + a
    N = np.bincount(sa, minlength=S * A).reshape(S, A)
    counts = np.bincount(sa * S + s_next, minlength=S * A * S).reshape(S, A, S)
    sums = np.bincount(sa, weights=r, minlength=S * A).reshape(S, A)
    with np.errstate(invalid="ignore", divide="ignore"):
        P = np.where(N[..., None] > 0, counts / N[..., None], 0.0)
        R = np.where(N > 0, sums / N, 0.0)
    return EmpiricalMDP(R=R, P=P, N=N, samples=len(s), reward_min=float(r.min()), reward_max=float(r.max()))


@dataclass(frozen=True)
class _Context:
    """What every twin's evaluation shares: the real network, exact and sampled."""

    real: TestbedMDP
    real_sample: EmpiricalMDP
    v_star: np.ndarray
    gamma: float
    samples: int
    params: TestbedParams


_CONTEXT: _Context | None = None


def _init_worker(context: _Context) -> None:
    """Worker start-up: one numba thread per process (the processes already fill the cores)."""
    global _CONTEXT
    numba.set_num_threads(1)
    _CONTEXT = context


def _evaluate_in_worker(spec: TwinSpec) -> TwinResult:
    assert _CONTEXT is not None, "worker not initialised"
    return _evaluate(_CONTEXT, spec)


def _evaluate(ctx: _Context, spec: TwinSpec) -> TwinResult:
    """Steps 1-4 of the module docstring for one twin."""
    twin = exact_mdp(build_twin(ctx.params, spec))
    sample = empirical_mdp(twin, ctx.samples, np.random.default_rng(spec.seed + 1))
    real = ctx.real_sample
    mismatch = dtbsm(real.R, real.P, sample.R, sample.P, ctx.gamma).mismatch
    tv = dtbsm_tv(real.R, real.P, sample.R, sample.P, ctx.gamma).mismatch_bound
    v_twin, policy = value_iteration(twin.R, twin.P, ctx.gamma)
    v_pi_twin = policy_value(twin.R, twin.P, policy, ctx.gamma)
    gap = max(0.0, float(np.max(v_twin - v_pi_twin)))
    v_pi = policy_value(ctx.real.R, ctx.real.P, policy, ctx.gamma)
    regret = max(0.0, float(np.max(ctx.v_star - v_pi)))
    bound = regret_bound(mismatch, ctx.gamma, gap)
    exact = dtbsm(ctx.real.R, ctx.real.P, twin.R, twin.P, ctx.gamma).mismatch
    return TwinResult(
        spec=spec, mismatch=mismatch, tv_bound=tv, mismatch_exact=exact, training_return=float(v_pi_twin.mean()),
        training_gap=gap, deployed_return=float(v_pi.mean()), regret=regret, bound=bound,
        bound_held=regret <= bound + 1e-9, bound_held_exact=regret <= regret_bound(exact, ctx.gamma, gap) + 1e-9,
    )  # fmt: skip


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson r, Spearman rho = Pearson r of the ranks); nan when either side is constant."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)

    def pearson(u: np.ndarray, v: np.ndarray) -> float:
        if len(u) < 2 or np.std(u) == 0 or np.std(v) == 0:
            return math.nan
        return float(np.corrcoef(u, v)[0, 1])

    return pearson(xa, ya), pearson(_ranks(xa), _ranks(ya))


def selection_table(
    twins: Sequence[TwinResult], ratios: Sequence[float] = RATIOS, draws: int = RANDOM_DRAWS, seed: int = 0
) -> list[SelectionRow]:
    """Fig. 5b: per ratio and rule, the best deployed return among the selected twins and the testing cost."""
    n = len(twins)
    deployed = np.array([t.deployed_return for t in twins])
    best = float(deployed.max())
    gaps = best - deployed
    optimal = gaps <= 1e-9
    full_cost = float(gaps.sum())
    orders = {
        "evaluation": np.lexsort((np.arange(n), np.array([t.mismatch for t in twins]))),
        "reward": np.lexsort((np.arange(n), np.array([-t.training_return for t in twins]))),
    }
    rng = np.random.default_rng(seed)
    rows = []
    for ratio in ratios:
        k = max(1, math.ceil(ratio * n - 1e-9))
        picks = {rule: [order[:k]] for rule, order in orders.items()}
        picks["random"] = [rng.choice(n, size=k, replace=False) for _ in range(draws)]
        for rule, selections in picks.items():
            best_found = float(np.mean([deployed[sel].max() for sel in selections]))
            kept = float(np.mean([optimal[sel].any() for sel in selections]))
            cost = float(np.mean([gaps[sel].sum() for sel in selections]))
            rows.append(SelectionRow(
                ratio=ratio, rule=rule, selected=k, best_deployed=best_found, optimal_kept=kept, testing_cost=cost,
                training_reduction=1.0 - k / n, testing_reduction=1.0 - cost / full_cost if full_cost > 0 else 0.0,
            ))  # fmt: skip
    return rows


def run_study(
    pool: int = 100,
    seed: int = 0,
    *,
    gamma: float = 0.9,
    samples: int = SAMPLES,
    workers: int | None = None,
    real: TestbedParams | None = None,
    progress: Callable[[], None] | None = None,
) -> StudyResult:
    """Build the pool, evaluate every twin on ``workers`` processes (default: all cores) and tabulate.

    ``samples``: transitions drawn from the real testbed and from each twin for the empirical DT-BSM.
    ``progress`` is called once per finished twin.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError("gamma must lie in (0, 1)")
    if samples < 1:
        raise ValueError("samples must be >= 1")
    start = time.perf_counter()
    params = real if real is not None else preset("real")
    mdp = exact_mdp(params)
    rng = np.random.default_rng(seed)
    real_sample = empirical_mdp(mdp, samples, rng)
    again = empirical_mdp(mdp, samples, rng)
    noise_floor = dtbsm(real_sample.R, real_sample.P, again.R, again.P, gamma).mismatch
    v_star, _ = value_iteration(mdp.R, mdp.P, gamma)
    context = _Context(mdp, real_sample, v_star, gamma, samples, params)
    specs = candidate_pool(pool, seed)
    workers = workers or os.cpu_count() or 1
    results: dict[str, TwinResult] = {}
    if workers == 1:
        for spec in specs:
            results[spec.name] = _evaluate(context, spec)
            if progress:
                progress()
    else:
        spawn = multiprocessing.get_context("spawn")  # fork after numba threads started is not safe
        with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=(context,)) as ex:
            for future in as_completed([ex.submit(_evaluate_in_worker, spec) for spec in specs]):
                result = future.result()
                results[result.spec.name] = result
                if progress:
                    progress()
    twins = [results[spec.name] for spec in specs]
    pearson, spearman = correlations([t.mismatch for t in twins], [t.deployed_return for t in twins])
    return StudyResult(
        twins=twins, table=selection_table(twins, seed=seed), pearson=pearson, spearman=spearman,
        noise_floor=noise_floor, optimal_return=float(v_star.mean()), gamma=gamma, samples=samples,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def plot_study(result: StudyResult, path: str | os.PathLike[str], ratio: float = 0.05) -> bool:
    """Scatter of mismatch vs deployed return, the twins each rule selects at ``ratio`` marked; False (nothing
    written) when matplotlib, an optional extra, is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    twins = result.twins
    k = max(1, math.ceil(ratio * len(twins) - 1e-9))
    x = np.array([t.mismatch for t in twins])
    y = np.array([t.deployed_return for t in twins])
    by_mismatch = np.lexsort((np.arange(len(twins)), x))[:k]
    by_reward = np.lexsort((np.arange(len(twins)), np.array([-t.training_return for t in twins])))[:k]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.scatter(x, y, s=18, c="0.6", label="candidate twins")
    ax.scatter(
        x[by_mismatch],
        y[by_mismatch],
        s=70,
        facecolors="none",
        edgecolors="tab:red",
        label=f"lowest mismatch ({_percent(ratio)})",
    )
    ax.scatter(x[by_reward], y[by_reward], s=50, marker="x", c="tab:blue",
               label=f"highest reward in twin ({_percent(ratio)})")  # fmt: skip
    ax.axhline(result.optimal_return, color="k", lw=0.8, ls="--", label="optimal (V* mean)")
    ax.axvline(result.noise_floor, color="tab:green", lw=0.8, ls=":", label="noise floor")
    ax.set_xlabel("DT-BSM mismatch (empirical)")
    ax.set_ylabel("deployed return (mean over states of V^pi)")
    ax.set_title(f"{len(twins)} twins: Pearson {result.pearson:.2f}, Spearman {result.spearman:.2f}")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _percent(ratio: float) -> str:
    return f"top {100 * ratio:g}%"
