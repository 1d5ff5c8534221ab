"""The 60 s soak (benchmarks/soak.py --check): 5,000 transitions/s, broker restarts, no lost event, no growth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sixty_second_soak_loses_no_event_and_does_not_grow() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--seconds", "60", "--check"],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "lost 0" in out.stdout and "broker restarts" in out.stdout


def test_daemon_sigkilled_at_random_moments_loses_no_event() -> None:
    """Three SIGKILLs of the daemon (restarted on its outbox and state) while events are raised: 0 lost."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--seconds", "50",
                          "--kill-every", "12", "--check"], capture_output=True, text=True, timeout=240)  # fmt: skip
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "lost 0" in out.stdout and "daemon SIGKILLs" in out.stdout and " 0 daemon SIGKILLs" not in out.stdout
