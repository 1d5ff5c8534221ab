"""What the person running `dtsync demo` sees: a live table on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from dtsync.demo.run import DemoResult


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def _interval(s: dict[str, Any]) -> str:
    """The mismatch interval, or '-' where the daemon did not need it (the test found nothing to explain)."""
    if s.get("interval_low") is None:
        return "-"
    return f"[{_num(s['interval_low'])}, {_num(s['interval_high'])}]"


def _p(s: dict[str, Any]) -> str:
    return "-" if s.get("p_value") is None else f"{s['p_value']:.3g}"


def _resync(view: Any, event: dict[str, Any]) -> str:
    """What became of an event: acknowledged after how long, and the mismatch before and after the resync."""
    r = view.resyncs.get(event["event_id"])
    if r is None:
        return "resyncing" if view.status.get("state") == "resyncing" else "not resynchronised yet"
    return (f"acked after {r['latency_seconds']:.2f} s (version {r['version']}); mismatch "
            f"{_num(r['mismatch_before'])} -> {_num(r['mismatch_after'])}")  # fmt: skip


def table(result: DemoResult) -> Table:
    now = time.time()
    elapsed = now - result.started
    phase = "stale twin switched" if now >= result.switch_at else f"switch in {result.switch_at - now:.0f} s"
    t = Table(title=f"dtsync demo — {elapsed:.0f} s ({phase})", caption=f"metrics: {result.metrics_url}")
    for col in ("twin", "state", "mismatch", "98% interval", "p-value", "threshold (on the lower end)", "samples r/t",
                "events", "version"):  # fmt: skip
        t.add_column(col)
    for name, view in result.twins.items():
        s = view.status
        state = s.get("state", "waiting")
        style = {"drifted": "bold red", "ok": "green", "resyncing": "cyan"}.get(state, "yellow")
        t.add_row(
            name, f"[{style}]{state}[/]", _num(s.get("mismatch")), _interval(s), _p(s), _num(s.get("threshold")),
            f"{s.get('samples_real', 0)}/{s.get('samples_twin', 0)}", str(len(view.events)), s.get("version") or "-",
        )  # fmt: skip
    for name, view in result.twins.items():
        for e in view.events:
            t.add_row("", f"[bold red]RESYNC[/] {name} at {e['time'] - result.started:.0f} s", _num(e["mismatch"]),
                      _interval(e), _p(e), _resync(view, e), "", "", "")  # fmt: skip
    return t


class View:
    """Live table when stdout is a terminal; else one plain line per evaluation and per event."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(soft_wrap=True)
        self.live: Live | None = None

    def start(self, result: DemoResult, line: str) -> None:
        self.console.print(line, highlight=False)
        if self.console.is_terminal:
            self.live = Live(table(result), console=self.console, refresh_per_second=4,
                             get_renderable=lambda: table(result))  # fmt: skip
            self.live.start()

    def update(self, result: DemoResult, twin: str, what: str) -> None:
        if self.live is not None:
            return  # the live table redraws itself
        at = time.time() - result.started
        view = result.twins[twin]
        if what == "state" and len(view.states) > 1:
            self.console.print(f"{at:5.1f} s  {twin}: {view.states[-2][1]} -> {view.states[-1][1]}", highlight=False)
        elif what == "event":
            e = view.events[-1]
            text = (f"{at:5.1f} s  RESYNC {twin}: mismatch {e['mismatch']:.3f}, interval {_interval(e)}, "
                    f"p-value {_p(e)}; {e['reason']} (event {e['event_id']})")  # fmt: skip
            self.console.print(text, highlight=False)
        elif what == "status" and view.status.get("mismatch") is not None:
            s = view.status
            self.console.print(f"{at:5.1f} s  {twin}: {s['state']}, mismatch {s['mismatch']:.3f}, interval "
                               f"{_interval(s)}, p-value {_p(s)}, samples {s['samples_real']}/{s['samples_twin']}",
                               highlight=False)  # fmt: skip

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def summary(result: DemoResult) -> list[str]:
    """Events fired per twin, when and why."""
    who = "the example controller resynchronises it" if result.controller else "no controller resynchronises it"
    lines = [f"demo over: broker {result.broker}; the stale twin's channel model changed at "
             f"{result.switch_at - result.started:.0f} s; {who}"]  # fmt: skip
    for name, view in result.twins.items():
        last = view.status
        path = " -> ".join(f"{state} ({at - result.started:.1f} s)" for at, state in view.states)
        lines.append(f"  {name}: {len(view.events)} resync event(s); last state {last.get('state', 'none')}, "
                     f"mismatch {_num(last.get('mismatch'))}; states {path or 'none'}")  # fmt: skip
        for e in view.events:
            top = ", ".join(f"{s['state']} (n {s['n_real']}/{s['n_twin']})" for s in e["top_states"][:2])
            lines.append(f"    at {e['time'] - result.started:.1f} s: {e['reason']}; top states {top}")
            lines.append(f"      {_resync(view, e)}")
    return lines
