"""The `dtsync` command: offline replay and ranking of recorded traces, and sample traces to try them on."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from dtsync.config import Config, ConfigError, MqttSettings, broker_settings, default_config, load_config
from dtsync.monitor import Figures, Report
from dtsync.progress import progress

app = typer.Typer(
    help="DT-BSM monitoring: is the digital twin still behaving like the real network?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration (see config.yaml).")]
RealOpt = Annotated[Path, typer.Option("--real", help="JSONL trace of the real network.")]
TwinOpt = Annotated[list[str], typer.Option("--twin", help="NAME=FILE: a twin's JSONL trace (repeatable).")]
GammaOpt = Annotated[float | None, typer.Option("--gamma", help="Discount factor (overrides the config).")]
WindowOpt = Annotated[int | None, typer.Option("--window", help="Count window: the last N transitions per stream.")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="Resync threshold (overrides the config).")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Also draw it as a PNG here (needs dtsync[plot]).")]


def _fail(message: str) -> NoReturn:
    typer.echo(f"dtsync: error: {message}", err=True)
    raise typer.Exit(2)


def _config(path: Path | None, gamma: float | None, window: int | None, threshold: float | None) -> Config:
    try:
        config = load_config(path) if path is not None else default_config()
        return config.with_overrides(gamma=gamma, window_count=window, threshold=threshold)
    except ConfigError as e:
        _fail(str(e))


def _twins(specs: list[str], real: Path) -> dict[str, Path]:
    if not specs:
        _fail("give at least one --twin NAME=FILE")
    twins = _twin_files(specs)
    if not real.is_file():
        _fail(f"{real}: no such file")
    return twins


def _twin_files(specs: list[str]) -> dict[str, Path]:
    """NAME=FILE options: names unique and not the reserved 'real', files present."""
    twins: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            _fail(f"--twin takes NAME=FILE, got {spec!r}")
        if name in twins or name == "real":
            _fail(f"twin name {name!r} is used twice (or is the reserved name 'real')")
        twins[name] = Path(file)
    for path in twins.values():
        if not path.is_file():
            _fail(f"{path}: no such file")
    return twins


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@app.command()
def sample(
    out: Annotated[Path, typer.Option("--out", help="Directory for real/faithful/drifting .jsonl")] = Path("samples"),
    steps: Annotated[int, typer.Option(help="Transitions per trace.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
) -> None:
    """Write sample traces: a real network, a faithful twin, and a twin whose dynamics drift at the midpoint."""
    from dtsync.offline.sample import write_samples

    paths = write_samples(out, steps=steps, seed=seed)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({steps} transitions each)")


@app.command()
def replay(
    real: RealOpt,
    twin: TwinOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    config: ConfigOpt = None,
    gamma: GammaOpt = None,
    window: WindowOpt = None,
    threshold: ThresholdOpt = None,
    timeline: Annotated[Path | None, typer.Option(help="Write one JSON object per evaluation here.")] = None,
    plot: PlotOpt = None,
) -> None:
    """Replay recorded traces through the monitor in time order; report the mismatch timeline and events."""
    from dtsync.offline.replay import count_lines
    from dtsync.offline.replay import replay as run_replay

    twins = _twins(twin, real)
    _check_plot_target(plot)
    cfg = _config(config, gamma, window, threshold)
    out = timeline.open("w", encoding="utf-8") if timeline else None
    events: list[Report] = []

    def on_report(report: Report) -> None:
        if out:
            out.write(json.dumps(report.record()) + "\n")
        if report.fired:
            events.append(report)

    try:
        with progress(count_lines({"real": real, **twins}), "replaying") as advance:
            result = run_replay(cfg, real, twins, on_report=on_report, on_item=advance)
    except ConfigError as e:
        _fail(str(e))
    finally:
        if out:
            out.close()
    _print_replay(result.reports, events, result.transitions, result.rejected, timeline)
    if plot is not None:
        from dtsync.plot import plot_timeline

        _draw(lambda: plot_timeline([r.record() for r in result.reports], plot, title=f"dtsync replay {real.name}"))
        typer.echo(f"plot: {plot}")


def _check_plot_target(plot: Path | None) -> None:
    """Fail before the work, not after it: matplotlib present and the PNG's directory there."""
    if plot is None:
        return
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        _fail("--plot needs matplotlib: pip install 'dtsync[plot]'")
    if not plot.parent.is_dir():
        _fail(f"--plot: {plot.parent} is not a directory")


def _draw(draw: Callable[[], object]) -> None:
    from dtsync.plot import PlotUnavailable

    try:
        draw()
    except (PlotUnavailable, ValueError, OSError) as e:
        _fail(f"plot: {e}")


def _print_replay(
    reports: list[Report], events: list[Report], transitions: Any, rejected: Any, timeline: Path | None
) -> None:
    read = ", ".join(f"{k} {v}" for k, v in transitions.items())
    typer.echo(f"replayed {sum(transitions.values())} transitions ({read}); rejected {sum(rejected.values())}")
    for (stream, reason), n in sorted(rejected.items()):
        typer.echo(f"  rejected {n} from {stream}: {reason}")
    by_twin: dict[str, list[Report]] = {}
    for r in reports:
        by_twin.setdefault(r.twin, []).append(r)
    rows = [("twin", "evals", "events", "max mismatch", "last mismatch", "interval", "p-value", "[lower, upper]",
             "state")]  # fmt: skip
    for name, rs in by_twin.items():
        last = rs[-1].figures
        rows.append((
            name, str(len(rs)), str(sum(r.fired for r in rs)), _fmt(max(r.figures.mismatch for r in rs)),
            _fmt(last.mismatch), _interval(last), _p(last.p_value),
            f"[{_fmt(last.mismatch_lower)}, {_fmt(last.mismatch_upper)}]", rs[-1].state,
        ))  # fmt: skip
    _table(rows)
    typer.echo(f"resync events: {len(events)}")
    for e in events:
        f = e.figures
        top = ", ".join(f"{s.state} (d {_fmt(s.d)}, n {s.n_real}/{s.n_twin})" for s in f.top_states[:3])
        typer.echo(f"  t={e.t:g} {e.twin}: {e.reason}; mismatch {_fmt(f.mismatch)} {_interval(f)}, "
                   f"regret bound {_fmt(f.regret_bound)} (estimate {_fmt(f.regret_estimate)}), "
                   f"top states {top}")  # fmt: skip
    if timeline:
        typer.echo(f"timeline: {timeline} ({len(reports)} evaluations)")


def _interval(f: Figures) -> str:
    """The mismatch interval with its level, or '-' where it was not computed (no decision hinged on it)."""
    if f.interval_low is None or f.interval_high is None:
        return "-"
    return f"[{_fmt(f.interval_low)}, {_fmt(f.interval_high)}] {f.interval_level:.0%}"


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


@app.command()
def rank(
    real: RealOpt,
    twin: TwinOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    config: ConfigOpt = None,
    gamma: GammaOpt = None,
    window: Annotated[int | None, typer.Option("--window", help="Use the last N transitions of each trace.")] = None,
    top: Annotated[int, typer.Option(help="Keep the best N twins (0 = all).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: PlotOpt = None,
) -> None:
    """Rank candidate twins by mismatch with the real trace, lowest first (pre-filtering before training)."""
    from dtsync.offline.rank import rank as run_rank
    from dtsync.offline.replay import count_lines

    twins = _twins(twin, real)
    _check_plot_target(plot)
    whole = max(count_lines({"x": p}) for p in (real, *twins.values()))
    cfg = _config(config, gamma, window or max(whole, 1), None)
    try:
        ranked = run_rank(cfg, real, twins)
    except ConfigError as e:
        _fail(str(e))
    if top:
        ranked = ranked[:top]
    if plot is not None:
        from dtsync.plot import plot_ranking

        _draw(lambda: plot_ranking([r.record() for r in ranked], plot, title=f"dtsync rank against {real.name}"))
        if not as_json:
            typer.echo(f"plot: {plot}")
    if as_json:
        typer.echo(json.dumps([r.record() for r in ranked], indent=2))
        return
    rows = [("rank", "twin", "mismatch", "interval", "p-value", "[lower, upper]", "TV bound", "regret bound",
             "regret est.", "coverage", "samples r/t", "min N(s,a)", "top states (n real/twin)")]  # fmt: skip
    for i, r in enumerate(ranked, start=1):
        f = r.report.figures
        rows.append((
            str(i), r.report.twin, _fmt(f.mismatch), _interval(f), _p(f.p_value),
            f"[{_fmt(f.mismatch_lower)}, {_fmt(f.mismatch_upper)}]", _fmt(f.tv_bound), _fmt(f.regret_bound),
            _fmt(f.regret_estimate), f"{f.coverage:.0%}", f"{f.samples_real}/{f.samples_twin}",
            f"{r.min_count} (need {r.samples_needed:.2g})",
            ", ".join(f"{s.state} ({s.n_real}/{s.n_twin}{'' if s.supported else ', thin'})" for s in f.top_states[:3]),
        ))  # fmt: skip
    _table(rows)


@app.command("plot")
def plot_command(
    timeline: Annotated[Path, typer.Argument(help="A timeline (JSONL) from `dtsync replay --timeline`.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    twin: Annotated[list[str], typer.Option("--twin", help="Only this twin (repeatable).")] = [],  # noqa: B006
) -> None:
    """Draw a timeline: per twin, the mismatch over time with its interval, threshold, noise floor and events."""
    from dtsync.plot import plot_timeline, read_timeline

    if not timeline.is_file():
        _fail(f"{timeline}: no such file")
    _check_plot_target(out)
    try:
        records = read_timeline(timeline)
    except (ValueError, UnicodeDecodeError) as e:
        _fail(str(e))
    if twin:
        records = [r for r in records if r.get("twin") in twin]
    _draw(lambda: plot_timeline(records, out, title=timeline.name))
    typer.echo(f"wrote {out} ({len(records)} evaluations)")


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds to run before the summary.")] = 90.0,
    rate: Annotated[float, typer.Option(help="Transitions per second per stream.")] = 3000.0,
    embedded_broker: Annotated[bool, typer.Option(help="Use the embedded amqtt broker even if mosquitto is here.")]
    = False,
) -> None:
    """The whole loop on this machine: a broker, the testbed as a real network and two twins (one faithful, one
    whose channel model goes stale halfway), the real daemon, the example controller that refits the stale twin
    when it is flagged, and a live view of the daemon's decisions."""
    import asyncio

    from dtsync.demo.run import run_demo
    from dtsync.demo.view import View, summary

    if duration < 10 or rate < 100:
        _fail("--duration must be >= 10 s and --rate >= 100 transitions/s (the windows need data)")
    view = View()
    try:
        result = asyncio.run(run_demo(duration, rate, embedded=embedded_broker, on_start=view.start,
                                      render=view.update))  # fmt: skip
    finally:
        view.stop()
    for line in summary(result):
        typer.echo(line)
    if result.daemon_exit != 0:
        _fail(f"the daemon exited with {result.daemon_exit} (its log is above)")


RequiredConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration (see config.yaml).")]


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        _fail(str(e))


@app.command()
def run(config: RequiredConfigOpt) -> None:
    """Run the monitoring daemon: MQTT telemetry in, DT-BSM per twin, resync events and metrics out."""
    import asyncio

    from dtsync.daemon.service import Daemon
    from dtsync.logs import configure_logging

    cfg = _load(config)
    if not cfg.cells:
        _fail(f"{config}: no cells configured: nothing to monitor")
    configure_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    try:
        cfg.mqtt.password()
        daemon = Daemon(cfg, config)
    except ConfigError as e:
        _fail(str(e))
    except OSError as e:  # outbox directory not writable, ...
        _fail(f"cannot start: {e}")
    try:
        asyncio.run(daemon.run())
    except OSError as e:  # metrics address in use, ...
        _fail(f"cannot serve metrics on {cfg.metrics.listen}: {e}")


@app.command("check-config")
def check_config(config: RequiredConfigOpt) -> None:
    """Validate a configuration file and print what it monitors (exit 2 with the offending keys if invalid)."""
    cfg = _load(config)
    try:
        cfg.mqtt.password()
    except ConfigError as e:
        _fail(str(e))
    typer.echo(f"{config}: ok")
    m = cfg.mqtt
    typer.echo(f"  broker {m.host}:{m.port} (MQTT {m.protocol}, TLS {'on' if m.tls else 'off'}), topics under "
               f"{m.topic_prefix}/, instance {cfg.daemon.instance}, metrics {cfg.metrics.listen}")  # fmt: skip
    rows = [("cell", "twin", "gamma", "threshold", "act on", "window", "real window")]
    for cell, twin in cfg.pairs():
        st = cfg.twin_settings(cell, twin)
        rows.append((cell, twin, f"{st.gamma:g}", f"{st.trigger.threshold:g}", st.trigger.act_on,
                     _window_text(st.window), _window_text(st.real_window)))  # fmt: skip
    if len(rows) > 1:
        _table(rows)
    else:
        typer.echo("  no cells configured (dtsync run needs at least one)")


def _window_text(w: Any) -> str:
    parts = ([f"last {w.count}"] if w.count else []) + ([f"{w.seconds:g} s"] if w.seconds else [])
    return " / ".join(parts)


@app.command()
def publish(
    cell: Annotated[str, typer.Option(help="Cell whose topics receive the traces.")],
    real: Annotated[Path | None, typer.Option("--real", help="JSONL trace to publish as the real network.")] = None,
    twin: TwinOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Broker host (overrides the config).")] = None,
    port: Annotated[int | None, typer.Option(help="Broker port (overrides the config).")] = None,
    rate: Annotated[float, typer.Option(help="Transitions per second over all streams; 0 = as fast as possible.")] = 0,
    batch: Annotated[int, typer.Option(help="Transitions per message (JSON array when > 1).")] = 1,
    qos: Annotated[int, typer.Option(help="MQTT QoS of the telemetry messages.")] = 0,
    keep_time: Annotated[bool, typer.Option("--keep-time", help="Send the recorded t instead of the time of "
                                            "sending (the daemon then needs max_clock_skew_seconds: null).")] = False,
) -> None:
    """Publish recorded JSONL traces as live telemetry (a load generator; a way to feed recorded data)."""
    import asyncio

    import aiomqtt

    from dtsync.daemon.publish import publish_traces

    streams = {"real": real} if real is not None else {}
    streams.update(_twin_files(twin))
    if not streams:
        _fail("give --real FILE and/or --twin NAME=FILE")
    if real is not None and not real.is_file():
        _fail(f"{real}: no such file")
    if batch < 1 or qos not in (0, 1, 2) or rate < 0:
        _fail("--batch must be >= 1, --qos 0, 1 or 2, --rate >= 0")
    settings = _mqtt_settings(config, host, port)
    try:
        result = asyncio.run(publish_traces(settings, cell, streams, rate=rate, batch=batch, qos=qos,
                                            keep_time=keep_time))
    except aiomqtt.MqttError as e:
        _fail(f"broker {settings.host}:{settings.port}: {e}")
    total = sum(result.transitions.values())
    typer.echo(f"published {total} transitions in {result.messages} messages in {result.seconds:.2f} s "
               f"({total / max(result.seconds, 1e-9):,.0f}/s); skipped {result.skipped} invalid lines")  # fmt: skip


def _mqtt_settings(config: Path | None, host: str | None, port: int | None) -> MqttSettings:
    try:
        return broker_settings(config, host, port)
    except ConfigError as e:
        _fail(str(e))


@app.command()
def watch(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Broker host (overrides the config).")] = None,
    port: Annotated[int | None, typer.Option(help="Broker port (overrides the config).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each message as one JSON line.")] = False,
    events: Annotated[int, typer.Option(help="Exit after this many resync events (0 = never).")] = 0,
) -> None:
    """Print resync events, twin status and daemon liveness as they arrive (for a person at a terminal)."""
    import asyncio

    import aiomqtt

    from dtsync.daemon.watch import watch as run_watch

    settings = _mqtt_settings(config, host, port)
    try:
        asyncio.run(run_watch(settings, typer.echo, as_json=as_json, max_events=events))
    except aiomqtt.MqttError as e:
        _fail(f"broker {settings.host}:{settings.port}: {e}")
    except KeyboardInterrupt:
        pass


from dtsync.testbed.cli import study_app, testbed_app  # noqa: E402  (sub-command groups)

app.add_typer(testbed_app, name="testbed")
app.add_typer(study_app, name="study")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
