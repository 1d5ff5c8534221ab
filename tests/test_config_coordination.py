"""The `coordination:` section and `daemon.state_dir`: validated up front, errors naming their key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dtsync.config import ConfigError, parse_config

SHARED = {"daemon": {"state_dir": "/srv/dtsync-state"}}


def _zk(**zookeeper: Any) -> dict[str, Any]:
    return {"coordination": {"zookeeper": zookeeper}, **SHARED}


def test_without_the_section_there_is_no_coordination() -> None:
    config = parse_config({})
    assert config.coordination is None and config.daemon.state_directory() is None


def test_a_full_section_is_read_with_defaults() -> None:
    zk = parse_config(_zk(hosts="zk1:2181,zk2:2181,[::1]:2181")).coordination
    assert zk is not None
    assert (zk.zookeeper.hosts, zk.zookeeper.path, zk.zookeeper.session_timeout) == (
        "zk1:2181,zk2:2181,[::1]:2181", "/dtsync", 10.0)  # fmt: skip
    z2 = parse_config(_zk(hosts="zk", path="/fleet/a", session_timeout=4)).coordination
    assert z2 is not None and (z2.zookeeper.path, z2.zookeeper.session_timeout) == ("/fleet/a", 4.0)


def test_state_dir_expands_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DTSYNC_SHARED", str(tmp_path))
    d = parse_config({"daemon": {"state_dir": "$DTSYNC_SHARED/cells"}}).daemon
    assert d.state_directory() == tmp_path / "cells"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"coordination": {"zookeeper": {"hosts": "zk:2181"}}}, "coordination: needs daemon.state_dir"),
        ({"coordination": {}, **SHARED}, "coordination.zookeeper: Field required"),
        (_zk(path="/d"), "coordination.zookeeper.hosts: Field required"),
        (_zk(hosts=""), "coordination.zookeeper.hosts: hosts must be host[:port]"),
        (_zk(hosts="zk1:2181,,zk2"), "coordination.zookeeper.hosts: hosts must be host[:port]"),
        (_zk(hosts="zk1:70000"), "coordination.zookeeper.hosts: hosts must be host[:port]"),
        (_zk(hosts="zk1:2181/chroot"), "coordination.zookeeper.hosts: hosts must be host[:port]"),
        (_zk(hosts="zk", path="dtsync"), "coordination.zookeeper.path: path must be an absolute znode path"),
        (_zk(hosts="zk", path="/dtsync/"), "coordination.zookeeper.path: path must be an absolute znode path"),
        (_zk(hosts="zk", path="/"), "coordination.zookeeper.path: path must be an absolute znode path"),
        (_zk(hosts="zk", session_timeout=0), "coordination.zookeeper.session_timeout: Input should be greater"),
        (_zk(hosts="zk", session_timeout="soon"), "coordination.zookeeper.session_timeout: Input should be a"),
        (_zk(hosts="zk", sesion_timeout=3), "coordination.zookeeper.sesion_timeout: Extra inputs are not"),
    ],
)
def test_bad_values_name_their_key(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    assert any(p.startswith(expected) for p in excinfo.value.problems), excinfo.value.problems
