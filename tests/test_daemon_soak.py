"""Soaks in the suite (benchmarks/soak.py --check, short): broker restarts, and daemon SIGKILLs; no lost event.

The long runs are `make soak` (600 s). The broker-restart soak once lost 1 of 11 events in CI: its broker,
started as root, dropped to user "mosquitto", could not write its persistence file in the 0700 work directory
and came back from every restart without the subscriber's session, so an event published before the
subscriber had re-subscribed reached nobody. The soak now runs the broker as the invoking user and fails on a
restart that lost the session; here the subscriber stays away 2-4 s after each restart, so every restart
exercises delivery through its persistent session (with the persistence broken, 40 s runs like this one lost
4-5 of 8-9 events each; README, Reliability).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def soak(*args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), *args, "--check"],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_broker_restarts_lose_no_event_with_a_late_persistent_subscriber() -> None:
    """A broker restart every 8 s for 30 s, the subscriber back only 2-4 s after each: 0 events lost, every session
    restored. (30 s cannot measure an RSS slope; --max-rss-slope is loose here, `make soak` judges growth.)"""
    out = soak("--seconds", "30", "--restart-every", "8", "--sink-delay", "4", "--max-rss-slope", "30")
    restarts = int(re.search(r"(\d+) broker restarts", out).group(1))  # type: ignore[union-attr]
    assert "lost 0" in out and restarts >= 2
    assert f"subscriber reconnects {restarts}, session restored by the broker on {restarts}" in out


def test_daemon_sigkilled_at_random_moments_loses_no_event() -> None:
    """SIGKILLs of the daemon (restarted on its outbox and state) while events are raised: 0 lost. (RSS is
    measured from each restart, so the last seconds can be a new daemon warming up: the slope is not judged
    here, it once read 28.7 MiB/min; `make soak` judges growth.)"""
    out = soak("--seconds", "50", "--kill-every", "12", "--max-rss-slope", "inf")
    assert "lost 0" in out and "daemon SIGKILLs" in out and " 0 daemon SIGKILLs" not in out
