"""``dtsync testbed ...`` (record traces, show parameters) and ``dtsync study ...`` (pre-filtering, sync)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer

from dtsync.config import ConfigError
from dtsync.contract import encode_transition
from dtsync.progress import progress
from dtsync.testbed.params import TestbedParams, load_params
from dtsync.testbed.presets import PRESETS, preset
from dtsync.testbed.simulate import Switch, transitions
from dtsync.testbed.study import RANDOM_DRAWS, SAMPLES, StudyResult, plot_study, run_study
from dtsync.testbed.sync_study import PooledRow, SyncSetup, SyncStudyResult, plot_sync_study, pooled, run_seeds

testbed_app = typer.Typer(
    help="Reference testbed: one gNB sharing uplink RBs among a camera, a gaming laptop and a phone.",
    no_args_is_help=True,
)
study_app = typer.Typer(help="Studies on the reference testbed.", no_args_is_help=True)


def _fail(message: str) -> NoReturn:
    typer.echo(f"dtsync: error: {message}", err=True)
    raise typer.Exit(2)


def _params(name_or_file: str) -> TestbedParams:
    """A preset name, or else a YAML file of parameters."""
    if name_or_file in PRESETS:
        return preset(name_or_file)
    if not Path(name_or_file).is_file():
        _fail(f"{name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        return load_params(name_or_file)
    except ConfigError as e:
        _fail(str(e))


def _source(
    preset_name: str | None, config: Path | None, switch_at: int | None, switch_to: str | None
) -> tuple[TestbedParams, Switch | None]:
    """The parameters (and optional switch) named by the --preset/--config/--switch-at/--switch-to options."""
    if (preset_name is None) == (config is None):
        _fail("give exactly one of --preset NAME and --config FILE")
    if (switch_at is None) != (switch_to is None):
        _fail("--switch-at and --switch-to go together")
    params = _params(preset_name) if preset_name is not None else _params(str(config))
    if switch_at is None or switch_to is None:
        return params, None
    switch = Switch(switch_at, _params(switch_to))
    if switch.params.label_space() != params.label_space():
        _fail(f"{switch_to!r} has other UEs, levels or schemes than the recorded parameters")
    return params, switch


PresetOpt = Annotated[str | None, typer.Option("--preset", help=f"One of: {', '.join(PRESETS)}.")]
ParamsFileOpt = Annotated[Path | None, typer.Option("--config", help="YAML parameters instead of a preset.")]
SwitchAtOpt = Annotated[int | None, typer.Option(min=0, help="Step from which --switch-to applies.")]
SwitchToOpt = Annotated[str | None, typer.Option(help="Preset name or YAML file used from --switch-at on.")]


@testbed_app.command()
def publish(
    cell: Annotated[str, typer.Option(help="Cell whose topics receive the transitions.")],
    stream: Annotated[str, typer.Option(help="'real', or the twin's name.")] = "real",
    preset_name: PresetOpt = None,
    config: ParamsFileOpt = None,
    steps: Annotated[int, typer.Option(min=1, help="Transitions to publish.")] = 60_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    switch_at: SwitchAtOpt = None,
    switch_to: SwitchToOpt = None,
    rate: Annotated[float, typer.Option(min=1.0, help="Transitions per second.")] = 1000.0,
    batch: Annotated[int, typer.Option(min=1, help="Transitions per message (JSON array when > 1).")] = 1,
    qos: Annotated[int, typer.Option(min=0, max=2, help="MQTT QoS.")] = 0,
    mqtt_config: Annotated[Path | None, typer.Option("--mqtt-config", help="dtsync config for the broker.")] = None,
    host: Annotated[str | None, typer.Option(help="Broker host (overrides the config).")] = None,
    port: Annotated[int | None, typer.Option(help="Broker port (overrides the config).")] = None,
) -> None:
    """Run the testbed live: publish its transitions over MQTT in the telemetry contract at `--rate`.

    Transition times are wall-clock (one every 1/rate seconds from now), as a live network's would be.
    """
    import asyncio
    import time

    import aiomqtt

    from dtsync.config import broker_settings
    from dtsync.daemon.publish import publish_items

    params, switch = _source(preset_name, config, switch_at, switch_to)
    try:
        settings = broker_settings(mqtt_config, host, port)
    except ConfigError as e:
        _fail(str(e))
    source = transitions(params, steps=steps, seed=seed, start_time=time.time(), step_seconds=1.0 / rate,
                         switch=switch)  # fmt: skip
    try:
        result = asyncio.run(publish_items(settings, cell, ((stream, tr) for tr in source), rate=rate, batch=batch,
                                           qos=qos))  # fmt: skip
    except aiomqtt.MqttError as e:
        _fail(f"broker {settings.host}:{settings.port}: {e}")
    typer.echo(f"published {steps} transitions to {cell}/{stream} in {result.messages} messages, "
               f"{result.seconds:.1f} s")  # fmt: skip


@testbed_app.command()
def record(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write (telemetry contract, one line each).")],
    preset_name: PresetOpt = None,
    config: ParamsFileOpt = None,
    steps: Annotated[int, typer.Option(min=0, help="Transitions to write.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    switch_at: SwitchAtOpt = None,
    switch_to: SwitchToOpt = None,
    step_seconds: Annotated[float, typer.Option(min=0.0, help="Trace time between transitions.")] = 0.01,
    start_time: Annotated[float, typer.Option(help="Trace time of the first transition.")] = 0.0,
) -> None:
    """Run the testbed under the uniform random scheduler and write its transitions as JSON Lines."""
    params, switch = _source(preset_name, config, switch_at, switch_to)
    with out.open("wb") as fh:
        for tr in transitions(
            params, steps=steps, seed=seed, start_time=start_time, step_seconds=step_seconds, switch=switch
        ):
            fh.write(encode_transition(tr) + b"\n")
    what = preset_name if preset_name is not None else str(config)
    extra = f", switching to {switch_to} at step {switch_at}" if switch else ""
    typer.echo(f"wrote {steps} transitions of {what} (seed {seed}{extra}) to {out}")


@testbed_app.command()
def show(name: Annotated[str | None, typer.Argument(help="Preset to print as YAML; none: list them.")] = None) -> None:
    """Print a preset's parameters as YAML (a template for --config), or list the presets."""
    if name is None:
        typer.echo("\n".join(PRESETS))
        return
    if name not in PRESETS:
        _fail(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    typer.echo(preset(name).to_yaml(), nl=False)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _cut(x: float) -> str:
    """A cost reduction as a signed percentage ("-95%"); round-off around 0 prints as "0%"."""
    return f"-{100 * x:.0f}%" if round(100 * x) != 0 else "0%"


def _report(result: StudyResult, workers: int) -> list[str]:
    """The printed summary: (a) correlation and regret bound, (b) the Fig. 5b selection table."""
    twins = result.twins
    n = len(twins)
    deployed = [t.deployed_return for t in twins]
    mismatch = [t.mismatch for t in twins]
    held = sum(t.bound_held for t in twins)
    held_exact = sum(t.bound_held_exact for t in twins)
    tight = max(twins, key=lambda t: t.regret / t.bound if t.bound > 0 else math.inf)
    lines = [
        f"pool: {n} twins, {result.samples} samples per model, gamma {result.gamma}; "
        f"{result.seconds:.1f} s on {workers} process(es)",
        f"deployed return (mean over states of V^pi in the real testbed): best {max(deployed):.4f}, "
        f"worst {min(deployed):.4f}; optimal {result.optimal_return:.4f}",
        f"DT-BSM noise floor (two samples of the real testbed): {result.noise_floor:.3f}; "
        f"twins' mismatch {min(mismatch):.3f} .. {max(mismatch):.3f}",
        f"(a) mismatch vs deployed return: Pearson {result.pearson:.3f}, Spearman {result.spearman:.3f}",
        f"    regret bound held for {held}/{n} twins with the empirical DT-BSM, {held_exact}/{n} with the exact one",
        f"    (tightest: {tight.spec.name}, regret {tight.regret:.3f}, bound {tight.bound:.3f})",
        "(b) selection before training (Fig. 5b); testing cost = sum over tested policies of their gap to the "
        "best deployed return of the pool",
    ]
    rows = [
        ("ratio", "rule", "twins", "best deployed", "optimal kept", "testing cost", "training cost", "testing cost"),
        ("", "", "", "", "", "", "reduction", "reduction"),
    ]
    for r in result.table:
        kept = _pct(r.optimal_kept) if r.rule == "random" else ("yes" if r.optimal_kept else "no")
        rows.append((
            _pct(r.ratio), r.rule, str(r.selected), f"{r.best_deployed:.4f}", kept, f"{r.testing_cost:.3f}",
            _cut(r.training_reduction), _cut(r.testing_reduction),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"random: mean over {RANDOM_DRAWS} draws (optimal kept: share of draws)")
    return lines


@study_app.command()
def prefilter(
    pool: Annotated[int, typer.Option(min=1, help="Candidate twins in the pool.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the pool and of all sampling.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Directory for prefilter.json (and prefilter.png).")] = None,
    gamma: Annotated[float, typer.Option(min=0.0, max=1.0, help="Discount factor.")] = 0.9,
    samples: Annotated[
        int, typer.Option(min=1, help="Transitions sampled from the real network and each twin.")
    ] = SAMPLES,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes (default: all cores).")] = None,
) -> None:
    """Rank candidate twins by DT-BSM before training and compare with reward-based and random selection."""
    if not 0.0 < gamma < 1.0:
        _fail("--gamma must lie in (0, 1)")
    workers = workers or os.cpu_count() or 1
    with progress(pool, "twins") as advance:
        result = run_study(pool, seed, gamma=gamma, samples=samples, workers=workers, progress=advance)
    for line in _report(result, workers):
        typer.echo(line)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "prefilter.json"
        path.write_text(json.dumps(result.record(), indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {path}")
        png = out / "prefilter.png"
        if plot_study(result, png):
            typer.echo(f"wrote {png}")
        else:
            typer.echo("note: matplotlib is not installed, no plot (pip install 'dtsync[plot]')")


def _sync_report(results: list[SyncStudyResult], workers: int) -> list[str]:
    """The printed summary: the setup, the regimes and resyncs per seed, and the pooled comparison."""
    setup = results[0].setup
    hours = setup.steps * setup.step_seconds / 3600
    changes = sum(len(r.regimes) - 1 for r in results)
    lines = [
        f"{len(results)} seed(s) ({', '.join(str(r.setup.seed) for r in results)}) x {setup.steps} steps "
        f"({hours:.1f} h at {setup.step_seconds:g} s a step); window {setup.window}, evaluation every "
        f"{setup.eval_every} steps, threshold {setup.threshold:g}, gamma {setup.gamma:g}, refits from "
        f"{setup.fit_samples} measured steps; {sum(r.seconds for r in results):.0f} s of work on {workers} "
        "process(es)",
        f"real network: {changes} regime change(s), mean gap {setup.regime_windows:g} windows",
    ]
    for r in results:
        fired = r.triggered.resyncs
        delays = [min((s - c.start for s in fired if s > c.start), default=None) for c in r.regimes[1:]]
        seen = [d for d in delays if d is not None]
        lines.append(
            f"  seed {r.setup.seed}: {len(r.regimes) - 1} change(s), {len(fired)} triggered resync(s) "
            f"({r.false_resyncs} with no change before it); first resync after a change: "
            + (f"median {np.median(seen) / setup.window:.1f} windows" if seen else "none")
        )
    trig, periodic, ratio = pooled(results)
    rows = [("policy", "resyncs", "mean exact mismatch", "time above threshold")]
    for row in (trig, *periodic):
        rows.append((row.policy, str(row.resyncs), f"{row.mean_mismatch:.4f}", f"{100 * row.time_above:.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(_sync_verdict(trig, periodic, ratio))
    return lines


def _sync_verdict(trig: PooledRow, periodic: list[PooledRow], ratio: float | None) -> str:
    if ratio is None:
        closest = min(periodic, key=lambda p: p.mean_mismatch)
        return (f"no periodic schedule was as faithful as triggered sync (best: {closest.policy}, mean "
                f"{closest.mean_mismatch:.4f} with {closest.resyncs} resyncs)")  # fmt: skip
    good = [p for p in periodic if p.mean_mismatch <= trig.mean_mismatch]
    best = min(good, key=lambda p: p.resyncs)
    verdict = "meets" if ratio >= 5 else "misses"
    return (f"best periodic schedule at equal or better fidelity: {best.policy}, {best.resyncs} resyncs: triggered "
            f"sync needs {ratio:.1f}x fewer ({verdict} the 5x goal)")  # fmt: skip


@study_app.command()
def sync(
    steps: Annotated[int, typer.Option(min=1000, help="Telemetry steps per seed.")] = SyncSetup.steps,
    window: Annotated[int, typer.Option(min=100, help="Monitor window (transitions).")] = SyncSetup.window,
    regime_windows: Annotated[
        float, typer.Option(min=0.01, help="Mean time between regime changes, in windows.")
    ] = SyncSetup.regime_windows,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between evaluations.")] = SyncSetup.eval_every,
    threshold: Annotated[float, typer.Option(min=0.0, help="The trigger's threshold.")] = SyncSetup.threshold,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds (independent draws of regimes and telemetry).")] = 2,
    out: Annotated[Path | None, typer.Option(help="Directory for sync.json (and sync.png).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes (default: all cores).")] = None,
) -> None:
    """Triggered resyncs (dtsync fires) against fixed resync schedules, on a real network that changes regime."""
    try:
        setup = SyncSetup(steps=steps, window=window, regime_windows=regime_windows, eval_every=eval_every,
                          threshold=threshold, seed=seed)  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    workers = workers or os.cpu_count() or 1
    with progress(seeds, "seeds") as advance:
        results = run_seeds(setup, list(range(seed, seed + seeds)), workers, advance)
    for line in _sync_report(results, workers):
        typer.echo(line)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "sync.json"
        trig, periodic, ratio = pooled(results)
        record = {"seeds": [r.record() for r in results], "pooled": {
            "triggered": asdict(trig), "periodic": [asdict(p) for p in periodic], "resync_ratio": ratio}}
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {path}")
        png = out / "sync.png"
        if plot_sync_study(results[0], png):
            typer.echo(f"wrote {png} (seed {results[0].setup.seed})")
        else:
            typer.echo("note: matplotlib is not installed, no plot (pip install 'dtsync[plot]')")
