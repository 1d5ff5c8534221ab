"""`dtsync demo` end to end, with the embedded broker (what a machine without mosquitto gets): the whole loop."""

from __future__ import annotations

import re
import subprocess
import sys

DURATION = 90  # the default length; the stale twin's channel model changes at half of it
WINDOW_SECONDS = 15  # the demo's window: 15 s of traffic


def test_demo_flags_the_stale_twin_the_controller_resyncs_it_and_the_faithful_one_is_never_touched() -> None:
    cmd = [sys.executable, "-m", "dtsync.cli", "demo", "--duration", str(DURATION), "--embedded-broker"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "embedded amqtt" in text and re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", text)
    assert "the example controller resynchronises it" in text, text[-3000:]
    faithful = re.search(r"faithful: 0 resync event\(s\); last state ok, .*; states (.*)", text)
    assert faithful is not None and set(re.findall(r"(\w+) \(", faithful.group(1))) == {"warming", "ok"}, text[-3000:]
    stale = re.search(r"stale: (\d+) resync event\(s\); last state (\w+), .*; states (.*)", text)
    assert stale is not None and int(stale.group(1)) >= 1 and stale.group(2) == "ok", text[-3000:]
    # Plain lines, not a live table, when stdout is not a terminal; the event comes after the switch, on evidence
    # (the interval's lower end and the test), at the paper's gamma 0.9, within one window length of it plus the
    # time one evaluation cycle takes: an event is stamped when the evaluation that saw the evidence finishes, and
    # on a loaded 2-core machine a cycle takes ~5 s (CI once printed 45.2 s against a bare 45 s bound).
    fired = re.search(r"\n\s*([\d.]+) s  RESYNC stale: .*\(evidence\)", text)
    assert fired is not None, text[-3000:]
    judged = [t for t in map(float, re.findall(r"\n\s*([\d.]+) s  stale: ", text)) if t > DURATION / 2]
    cycle = max(b - a for a, b in zip(judged, judged[1:], strict=False))
    assert DURATION / 2 < float(fired.group(1)) <= DURATION / 2 + WINDOW_SECONDS + cycle, text[-3000:]
    # The loop: drifted -> resyncing -> ok, back within a window (and one evaluation cycle) of the event.
    loop = re.search(r"drifted \(([\d.]+) s\) -> resyncing \(([\d.]+) s\) -> ok \(([\d.]+) s\)", stale.group(3))
    assert loop is not None, stale.group(0)
    drifted, resyncing, ok = (float(x) for x in loop.groups())
    assert drifted <= resyncing <= ok <= drifted + WINDOW_SECONDS + cycle, stale.group(0)
    # The summary shows the event's ack latency and the mismatch before and after the resync.
    acked = re.search(r"acked after ([\d.]+) s \(version v1\); mismatch ([\d.]+) -> ([\d.]+)", text)
    assert acked is not None, text[-3000:]
    # Both mismatches are point figures, and the one after is taken on a fresh window, at the point estimate's
    # noise floor (the faithful twin read 1.2-3.9 there): a lower figure after is not what the metric promises, and
    # CI once printed 1.914 -> 3.994. What the loop promises is the judgement, ok on fresh data (asserted above).
    assert float(acked.group(1)) < WINDOW_SECONDS and float(acked.group(2)) > 0 and float(acked.group(3)) >= 0
    assert "\x1b[" not in text
