from pathlib import Path
from typing import Any

import pytest

from dtsync.config import (
    Config,
    ConfigError,
    WindowSettings,
    default_config,
    load_config,
    parse_config,
)
from dtsync.trigger import TriggerRule

SHIPPED = Path(__file__).resolve().parents[1] / "config.yaml"

GOOD = """
gamma: 0.9
tolerance: 1.0e-8
reward_range: null
window: {count: 5000, seconds: null}
schedule: {every_seconds: 5.0, every_transitions: 500}
noise_floor: true
top_states: 5
trigger: {threshold: 0.5, rearm_below: 0.4, cooldown_seconds: 60, min_samples: 500, min_coverage: 0.0,
          act_on: point}
encoder: {bins: [[0, 10, 20], [0.5, 1.0]]}
max_states: 4096
cells:
  cell-1:
    twins:
      twin-a: {}
      twin-b: {gamma: 0.95, trigger: {threshold: 0.8}, window: {count: 2000}, reward_range: [-1, 1]}
  cell-2:
    twins:
      twin-a:
      twin-c: {window: {seconds: 30}, trigger: {act_on: upper, rearm_below: 0.1}}
mqtt: {protocol: 3.1.1, port: 8883, tls: {ca_file: /etc/ca.pem}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dtsync.yaml"
    path.write_text(text)
    return path


def problems(data: Any) -> str:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    return str(excinfo.value)


def test_good_file_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.pairs() == [
        ("cell-1", "twin-a"), ("cell-1", "twin-b"), ("cell-2", "twin-a"), ("cell-2", "twin-c")
    ]
    a = cfg.twin_settings("cell-1", "twin-a")
    assert a.gamma == 0.9 and a.tolerance == 1e-8 and a.reward_range is None
    assert a.window == WindowSettings(count=5000)
    assert a.trigger == TriggerRule(threshold=0.5, rearm_below=0.4, cooldown_seconds=60, min_samples=500,
                                    act_on="point")
    assert a.bins == ((0.0, 10.0, 20.0), (0.5, 1.0))
    assert a.noise_floor is True and a.top_states == 5
    assert cfg.schedule.every_seconds == 5.0 and cfg.schedule.every_transitions == 500
    assert cfg.mqtt.protocol == "3.1.1" and cfg.mqtt.port == 8883
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == Path("/etc/ca.pem")


def test_twin_overrides_merge_partially(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    b = cfg.twin_settings("cell-1", "twin-b")
    assert b.gamma == 0.95
    assert b.reward_range == (-1.0, 1.0)
    # trigger: only threshold replaced; the rest is inherited.
    assert b.trigger == TriggerRule(threshold=0.8, rearm_below=0.4, cooldown_seconds=60, min_samples=500,
                                    act_on="point")
    assert b.window == WindowSettings(count=2000)
    # The real window of the cell stays the top-level one.
    assert b.real_window == WindowSettings(count=5000)
    c = cfg.twin_settings("cell-2", "twin-c")
    assert c.window == WindowSettings(count=5000, seconds=30)  # key-by-key merge keeps the inherited count
    assert (c.trigger.act_on, c.trigger.rearm_below, c.trigger.threshold) == ("upper", 0.1, 0.5)
    # A bare "twin-a:" inherits everything, like "{}".
    assert cfg.twin_settings("cell-2", "twin-a").trigger == cfg.twin_settings("cell-1", "twin-a").trigger


def test_unknown_pair_is_key_error() -> None:
    cfg = parse_config({"cells": {"c": {"twins": {"t": {}}}}})
    with pytest.raises(KeyError):
        cfg.twin_settings("c", "nope")
    with pytest.raises(KeyError):
        cfg.twin_settings("nope", "t")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"gama": 0.9}, "gama: Extra inputs are not permitted"),
        ({"trigger": {"threshold": 0.5, "treshold": 0.5}}, "trigger.treshold: Extra inputs are not"),
        (
            {"cells": {"cell-1": {"twins": {"twin-b": {"gamma": 1.2}}}}},
            "cells.cell-1.twins.twin-b.gamma: Input should be less than 1",
        ),
        (
            {"cells": {"cell-1": {"twins": {"twin-b": {"tolerance": 1e-6}}}}},
            "cells.cell-1.twins.twin-b.tolerance: Extra inputs are not permitted",
        ),
        (
            {"cells": {"cell-1": {"twins": {"twin-b": {"trigger": {"treshold": 0.8}}}}}},
            "cells.cell-1.twins.twin-b.trigger.treshold: Extra inputs are not permitted",
        ),
        ({"gamma": 1.0}, "gamma: Input should be less than 1"),
        ({"gamma": 0}, "gamma: Input should be greater than 0"),
        ({"window": {"count": None, "seconds": None}}, "window: window needs count, seconds or both"),
        ({"window": {"count": 0}}, "window.count: Input should be greater than or equal to 1"),
        (
            {"window": {"seconds": 60}, "cells": {"c": {"twins": {"t": {"window": {"seconds": None}}}}}},
            "cells.c.twins.t.window: window needs count, seconds or both",
        ),
        ({"schedule": {}}, "schedule: schedule needs every_seconds, every_transitions or both"),
        ({"trigger": {"threshold": 0.5, "act_on": "median"}}, "trigger.act_on: Input should be 'evidence'"),
        ({"trigger": {"rearm_below": 0.1}}, "trigger.threshold: Field required"),
        (
            {"trigger": {"threshold": 0.5, "rearm_below": 0.6}},
            "trigger: rearm_below (0.6) must be <= threshold (0.5)",
        ),
        (
            # The inherited rearm_below 0.4 is above this twin's threshold.
            {"trigger": {"threshold": 0.5, "rearm_below": 0.4},
             "cells": {"c": {"twins": {"t": {"trigger": {"threshold": 0.3}}}}}},
            "cells.c.twins.t.trigger: rearm_below (0.4) must be <= threshold (0.3)",
        ),
        ({"trigger": {"threshold": 0.5, "min_coverage": 2}}, "trigger.min_coverage: Input should be less"),
        ({"reward_range": [1, 0]}, "reward_range: reward_range must be [min, max] with min < max"),
        ({"tolerance": float("nan")}, "tolerance: Input should be a finite number"),
        ({"encoder": {"bins": [[0, 2, 1]]}}, "encoder.bins: bin edges of feature 0 must be strictly"),
        ({"cells": {"c": {"twins": {}}}}, "cells.c.twins: Dictionary should have at least 1 item"),
        ({"cells": {"a/b": {"twins": {"t": {}}}}}, "cells.a/b: invalid name 'a/b'"),
        ({"mqtt": {"protocol": "4"}}, "mqtt.protocol: Input should be '5' or '3.1.1'"),
        ({"mqtt": {"password_file": "/p", "password_env": "P"}}, "mqtt: give password_file or password_env"),
        ({"mqtt": {"tls": {"cert_file": "/c.pem"}}}, "mqtt.tls: cert_file and key_file go together"),
        ({"mqtt": {"topic_prefix": "a/#"}}, "mqtt.topic_prefix: topic_prefix must be non-empty, without"),
        ({"metrics": {"listen": "9108"}}, "metrics.listen: listen must be host:port"),
        ([1, 2], "(top level): Input should be a valid dictionary"),
    ],
)
def test_errors_name_their_key(data: Any, expected: str) -> None:
    assert expected in problems(data)


def test_every_problem_is_listed_on_its_own_line() -> None:
    message = problems({"gamma": 2, "top_states": -1, "window": {"count": 0}})
    lines = message.splitlines()
    assert lines[0] == "invalid configuration:"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["gamma", "top_states", "window.count"]
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"gamma": 2, "top_states": -1})
    assert len(excinfo.value.problems) == 2


def test_invalid_file_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "gamma: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(excinfo.value).startswith(f"{path}: invalid configuration")
    assert "gamma: Input should be less than 1" in str(excinfo.value)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "gamma: 0.9\nwindow: {count: 5\ntrigger: [\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: invalid YAML: line ")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "gamma: 0.9\ntop_states: 3\ngamma: 0.95\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert "duplicate key 'gamma' (line 3)" in str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(excinfo.value) == f"{path}: no such file"


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path)
    assert str(excinfo.value).startswith(f"{tmp_path}: cannot read")


def test_empty_file_is_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing yet\n")) == default_config()


def test_default_config() -> None:
    cfg = default_config()
    assert cfg.cells == {} and cfg.pairs() == []
    assert cfg.gamma == 0.9
    assert cfg.window == WindowSettings(count=5000)
    assert cfg.trigger.to_rule() == TriggerRule(threshold=0.5)
    assert cfg.mqtt.host == "localhost" and cfg.mqtt.port == 1883 and cfg.mqtt.protocol == "5"
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9108)
    assert cfg.daemon.instance == "default"


def test_section_keys_left_out_are_unbounded() -> None:
    cfg = parse_config({"window": {"seconds": 60}, "schedule": {"every_transitions": 100}})
    assert cfg.window == WindowSettings(seconds=60)
    assert cfg.schedule.every_seconds is None


def test_mqtt_protocol_written_as_number() -> None:
    assert parse_config({"mqtt": {"protocol": 5}}).mqtt.protocol == "5"


def test_ipv6_metrics_listen() -> None:
    metrics = parse_config({"metrics": {"listen": "[::1]:9200"}}).metrics
    assert (metrics.host, metrics.port) == ("::1", 9200)


def test_twin_reward_range_null_means_observed() -> None:
    twins = {"t": {"reward_range": None}, "u": {}}
    cfg = parse_config({"reward_range": [0, 1], "cells": {"c": {"twins": twins}}})
    assert cfg.twin_settings("c", "t").reward_range is None
    assert cfg.twin_settings("c", "u").reward_range == (0.0, 1.0)


def test_cli_overrides_win_everywhere(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD)).with_overrides(gamma=0.5, window_count=100, threshold=0.3)
    assert cfg.gamma == 0.5
    assert cfg.window == WindowSettings(count=100)
    for cell, twin in cfg.pairs():
        s = cfg.twin_settings(cell, twin)
        assert s.gamma == 0.5
        assert s.window == WindowSettings(count=100)  # seconds dropped too (twin-c had seconds: 30)
        assert s.real_window == WindowSettings(count=100)
        assert s.trigger.threshold == 0.3
    # Re-arm levels above the new threshold are lowered to it; those below are kept.
    assert cfg.twin_settings("cell-1", "twin-a").trigger.rearm_below == 0.3
    assert cfg.twin_settings("cell-2", "twin-c").trigger.rearm_below == 0.1
    # Untouched settings survive.
    assert cfg.twin_settings("cell-1", "twin-b").reward_range == (-1.0, 1.0)
    assert cfg.twin_settings("cell-2", "twin-c").trigger.act_on == "upper"
    assert cfg.mqtt.protocol == "3.1.1"


def test_cli_overrides_none_change_nothing(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.with_overrides() == cfg


def test_cli_threshold_on_default_config() -> None:
    cfg = default_config().with_overrides(threshold=0.2)
    assert cfg.trigger.to_rule() == TriggerRule(threshold=0.2)


def test_cli_override_is_validated() -> None:
    with pytest.raises(ConfigError) as excinfo:
        default_config().with_overrides(gamma=1.5)
    assert "gamma: Input should be less than 1" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        default_config().with_overrides(window_count=0)
    assert "window.count: Input should be greater than or equal to 1" in str(excinfo.value)


def test_for_replay_builds_one_cell(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD)).for_replay(["twin-b", "twin-c", "twin-new", "twin-b"])
    assert cfg.pairs() == [("replay", "twin-b"), ("replay", "twin-c"), ("replay", "twin-new")]
    assert cfg.twin_settings("replay", "twin-b").gamma == 0.95
    assert cfg.twin_settings("replay", "twin-c").window == WindowSettings(count=5000, seconds=30)
    assert cfg.twin_settings("replay", "twin-new").trigger.threshold == 0.5
    assert cfg.twin_settings("replay", "twin-new").bins == ((0.0, 10.0, 20.0), (0.5, 1.0))


def test_for_replay_uses_first_declaring_cell() -> None:
    cells = {"a": {"twins": {"t": {"gamma": 0.5}}}, "b": {"twins": {"t": {"gamma": 0.7}}}}
    cfg = parse_config({"cells": cells})
    assert cfg.for_replay(["t"]).twin_settings("replay", "t").gamma == 0.5


def test_for_replay_on_default_config_and_then_cli_flags() -> None:
    cfg = default_config().for_replay(["sim"]).with_overrides(gamma=0.8)
    assert cfg.twin_settings("replay", "sim").gamma == 0.8


def test_for_replay_errors() -> None:
    with pytest.raises(ConfigError, match="at least one twin"):
        default_config().for_replay([])
    with pytest.raises(ConfigError, match=r"cells\.replay\.twins\.a b: invalid name"):
        default_config().for_replay(["a b"])


def test_config_is_immutable() -> None:
    cfg = default_config()
    with pytest.raises(ValueError):
        cfg.gamma = 0.5  # type: ignore[misc]


def test_shipped_config_loads() -> None:
    cfg = load_config(SHIPPED)
    assert isinstance(cfg, Config)
    assert cfg.pairs() == [("cell-1", "twin-a"), ("cell-1", "twin-b")]
    b = cfg.twin_settings("cell-1", "twin-b")
    assert b.gamma == 0.95 and b.trigger.threshold == 0.8 and b.trigger.rearm_below == 0.3
    assert b.window == WindowSettings(count=2000)


def test_twin_may_not_be_called_real() -> None:
    with pytest.raises(ConfigError, match="cells.c.twins: 'real' is reserved"):
        parse_config({"cells": {"c": {"twins": {"real": {}}}}})


def test_password_from_file_with_systemd_credentials_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = parse_config({"mqtt": {"username": "dtsync", "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password"}})
    assert cfg.mqtt.password() == "s3cret"


def test_password_problems_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DTSYNC_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="mqtt.password_env: environment variable DTSYNC_TEST_PW is not set"):
        parse_config({"mqtt": {"password_env": "DTSYNC_TEST_PW"}}).mqtt.password()
    monkeypatch.setenv("DTSYNC_TEST_PW", "pw")
    assert parse_config({"mqtt": {"password_env": "DTSYNC_TEST_PW"}}).mqtt.password() == "pw"
    with pytest.raises(ConfigError, match="mqtt.password_file: cannot read"):
        parse_config({"mqtt": {"password_file": str(tmp_path / "missing")}}).mqtt.password()
    assert parse_config({}).mqtt.password() is None


def test_outbox_goes_to_the_systemd_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert parse_config({"daemon": {"instance": "a"}}).daemon.outbox_file() == tmp_path / "dtsync-outbox-a.sqlite"
    explicit = parse_config({"daemon": {"outbox_path": "/x/o.sqlite"}}).daemon.outbox_file()
    assert explicit == Path("/x/o.sqlite")


def test_reconnect_bounds_are_ordered() -> None:
    with pytest.raises(ConfigError, match="reconnect_max_seconds must be >= reconnect_min_seconds"):
        parse_config({"mqtt": {"reconnect_min_seconds": 5, "reconnect_max_seconds": 1}})


def test_reliability_defaults_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    config = parse_config({})
    d = config.daemon
    assert (config.max_states, config.max_actions) == (256, 16)
    assert d.max_clock_skew_seconds == 300 and d.snapshot_seconds == 30 and d.workers is None
    assert d.worker_count() == len(os.sched_getaffinity(0))
    assert config.mqtt.reconnect_max_seconds == 2.0 and config.mqtt.liveness_seconds == 30
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert d.state_file() == tmp_path / "dtsync-state-default.snapshot"
    assert d.outbox_file().parent == d.state_file().parent
    custom = parse_config({"daemon": {"workers": 3, "max_clock_skew_seconds": None, "outbox_path": "/x/o.sqlite"}})
    assert custom.daemon.worker_count() == 3 and custom.daemon.max_clock_skew_seconds is None
    assert custom.daemon.state_file() == Path("/x/dtsync-state-default.snapshot")
    with pytest.raises(ConfigError, match="max_actions"):
        parse_config({"max_actions": 0})
