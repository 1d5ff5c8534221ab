"""deploy/README.md's install recipes, run: the template unit for several instances on one host, and the
`check-config` invocation with the credentials directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from test_deploy_prometheus import DEPLOY

UNIT = DEPLOY.parent / "systemd" / "dtsync.service"
README = DEPLOY / "README.md"


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        raise AssertionError("systemd-analyze is not installed: apt-get install systemd (.ci/run does this)")
    return found


def template_command() -> str:
    """The README's `sed ... > /etc/systemd/system/dtsync@.service` command, continuation lines joined."""
    text = README.read_text()
    m = re.search(r"^ {4}(sed -e .*?> /etc/systemd/system/dtsync@\.service)$", text, re.M | re.S)
    assert m, "the template recipe is not in deploy/README.md"
    return m.group(1).replace("\\\n", " ")


def test_template_unit_recipe_gives_a_valid_unit_per_instance(tmp_path: Path) -> None:
    target = tmp_path / "dtsync@.service"
    command = template_command().replace("systemd/dtsync.service", str(UNIT))
    command = command.replace("/etc/systemd/system/dtsync@.service", str(target))
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    unit = target.read_text()
    for line in (
        "ExecStart=/opt/dtsync/venv/bin/dtsync run --config /etc/dtsync/%i.yaml",
        "StateDirectory=dtsync/%i",
        "CacheDirectory=dtsync/%i",
        "Environment=NUMBA_CACHE_DIR=/var/cache/dtsync/%i/numba",
    ):
        assert line in unit.splitlines(), f"{line!r} missing: did the shipped unit change?"
    assert unit.count("%i") == 4
    # verify an instance of it; ExecStart= must exist to pass, as in tests/test_systemd_unit.py
    instance = tmp_path / "dtsync@site-a.service"
    instance.write_text(unit.replace("ExecStart=/opt/dtsync/venv/bin/dtsync ", "ExecStart=/bin/true "))
    run = subprocess.run([analyze(), "verify", str(instance)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert not [ln for ln in run.stderr.splitlines() if "dtsync@" in ln or "ignoring" in ln], run.stderr


def test_check_config_reads_the_password_credential_when_told_where(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cells": {"cell-1": {"twins": {"twin-a": {}}}},
                "mqtt": {
                    "host": "broker.example.net",
                    "port": 8883,
                    "username": "dtsync",
                    "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password",
                    "tls": {"ca_file": "/etc/dtsync/ca.crt"},
                },
            }
        )
    )
    (tmp_path / "mqtt-password").write_text("secret\n")
    cmd = [sys.executable, "-m", "dtsync.cli", "check-config", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    without = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert without.returncode == 2 and "mqtt.password_file" in without.stderr + without.stdout
    with_dir = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert with_dir.returncode == 0, with_dir.stderr
    assert "TLS on" in with_dir.stdout and "broker broker.example.net:8883" in with_dir.stdout
