"""deploy/measure_sizing.py, the script behind deploy/README.md's sizing figures, run small."""

from __future__ import annotations

import re
import subprocess
import sys

from test_deploy_prometheus import DEPLOY


def test_sizing_script_measures_a_real_daemon() -> None:
    args = "--twins 1 2 --window 500 --transitions 2000".split()
    cmd = [sys.executable, str(DEPLOY / "measure_sizing.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if re.match(r"\| \d", line)]
    assert [int(r[0]) for r in rows] == [1, 2]
    for row, transitions in zip(rows, (4000, 6000), strict=True):
        rss_main, rss_workers, rss_total = (float(c.split()[0]) for c in row[1:4])
        assert rss_main > 30 and rss_workers > 30 and abs(rss_total - rss_main - rss_workers) <= 1  # MiB, rounded
        assert int(row[4].replace(",", "")) == transitions
        assert float(row[5].replace(",", "")) > 0 and float(row[6].replace(",", "")) > 0
        assert int(row[7]) >= 1 and float(row[8].split()[0]) > 0  # evaluations and their worker CPU
