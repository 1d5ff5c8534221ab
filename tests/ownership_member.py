"""One ownership member in its own process (for kill -9): prints its owned cells as a JSON line on every change."""

from __future__ import annotations

import json
import sys
import threading

from dtsync.daemon.ownership import CellOwnership, ZooKeeperSettings


def main() -> None:
    hosts, path, identifier, n_cells, session = sys.argv[1:6]
    settings = ZooKeeperSettings(hosts=hosts, path=path, session_timeout=float(session), time_boundary=0.5)

    def show(cells: frozenset[str]) -> None:
        print("OWNED", json.dumps(sorted(cells)), flush=True)

    member = CellOwnership(
        settings, [f"cell-{i:02d}" for i in range(int(n_cells))], identifier, on_acquire=show,
        on_release=lambda cells: show(frozenset()),
    )  # fmt: skip
    member.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
