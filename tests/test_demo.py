"""`dtsync demo` end to end, with the embedded broker (what a machine without mosquitto gets)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_flags_the_stale_twin_and_not_the_faithful_one() -> None:
    cmd = [sys.executable, "-m", "dtsync.cli", "demo", "--duration", "40", "--embedded-broker"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "embedded amqtt" in text and re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", text)
    assert "faithful: 0 resync event(s)" in text, text[-3000:]
    stale = re.search(r"stale: (\d+) resync event\(s\); last state (\w+)", text)
    assert stale is not None and int(stale.group(1)) >= 1 and stale.group(2) == "drifted", text[-3000:]
    # Plain lines, not a live table, when stdout is not a terminal; the event is reported after the switch.
    fired = re.search(r"\n\s*([\d.]+) s  RESYNC stale:", text)
    assert fired is not None and float(fired.group(1)) > 20.0
    assert "\x1b[" not in text
