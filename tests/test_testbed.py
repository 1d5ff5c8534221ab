"""The reference testbed: exact MDP vs simulator, twins vs real through the DT-BSM, switch, record, config."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, islice
from pathlib import Path

import numpy as np
import pytest
import yaml
from mqtt_harness import Mosquitto
from typer.testing import CliRunner

from dtsync import dtbsm
from dtsync.cli import app
from dtsync.config import ConfigError
from dtsync.contract import Transition, read_jsonl
from dtsync.testbed import PRESETS, Switch, exact_mdp, load_params, parse_params, preset, state_labels, transitions
from dtsync.window import EmpiricalMDP

runner = CliRunner()
REAL = preset("real")
LABELS = state_labels(REAL)
INDEX = {label: i for i, label in enumerate(LABELS)}
ACTIONS = {name: a for a, name in enumerate(REAL.actions)}


def empirical(trs: Iterable[Transition]) -> EmpiricalMDP:
    rows = ((INDEX[t.s], ACTIONS[t.a], t.r, INDEX[t.s_next]) for t in trs)
    return EmpiricalMDP.from_transitions(rows, len(LABELS), len(ACTIONS))


def weighted_tv(emp: EmpiricalMDP, P: np.ndarray) -> float:
    """Mean over samples of TV(P_hat(.|s,a), P(.|s,a)): the distance of the sample from the model."""
    tv = 0.5 * np.abs(emp.P - P).sum(axis=2)
    return float((emp.N * tv).sum() / emp.N.sum())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_mdp_in_one_label_space(name: str) -> None:
    params = preset(name)
    mdp = exact_mdp(params)
    assert params.label_space() == REAL.label_space()
    assert mdp.labels == LABELS and mdp.actions == REAL.actions
    assert mdp.P.shape == (72, 6, 72) and np.allclose(mdp.P.sum(axis=2), 1.0) and mdp.P.min() >= 0
    assert mdp.R.min() >= 0 and mdp.R.max() <= 1.5  # [0, 1] while rates <= 1 chunk/RB; optimistic twins overshoot


@pytest.mark.parametrize("name", ["real", "coarse-buffers", "noisy"])
def test_simulator_frequencies_converge_to_the_exact_mdp(name: str) -> None:
    params = preset(name)
    mdp = exact_mdp(params)
    trace = list(transitions(params, steps=120_000, seed=3))
    early, full = empirical(trace[:12_000]), empirical(trace)
    assert weighted_tv(full, mdp.P) < 0.08
    assert weighted_tv(full, mdp.P) < 0.5 * weighted_tv(early, mdp.P)  # shrinks like 1/sqrt(n): 10x data ~ 0.32
    known = full.N > 0
    assert known.mean() > 0.95
    tol = 0.0 if name != "coarse-buffers" else 0.02  # coarse models draw the served level: rewards are random
    assert np.max(np.abs(full.R - mdp.R)[known & (full.N >= 100)]) <= tol + 1e-6


def test_faithful_twin_is_near_the_noise_level_and_a_stale_channel_twin_is_not() -> None:
    # Twins are run 8 times (a frozen channel keeps one run in one channel combination; 8 runs cover several).
    runs, steps, warm = 8, 30_000, 5_000
    real = empirical(transitions(REAL, steps=runs * steps, seed=1))
    faithful = empirical(
        chain.from_iterable(transitions(preset("faithful"), steps=steps, seed=10 + i) for i in range(runs))
    )
    stale_runs = (
        islice(
            transitions(REAL, steps=warm + steps, seed=20 + i, switch=Switch(warm, preset("frozen-channel"))),
            warm,
            None,
        )
        for i in range(runs)
    )
    stale = empirical(chain.from_iterable(stale_runs))
    noise = dtbsm(real.R, real.P, faithful.R, faithful.P, 0.9).mismatch
    mismatch = dtbsm(real.R, real.P, stale.R, stale.P, 0.9)
    m_real, m_stale = exact_mdp(REAL), exact_mdp(preset("frozen-channel"))
    exact = dtbsm(m_real.R, m_real.P, m_stale.R, m_stale.P, 0.9).mismatch
    assert noise < 0.8
    assert mismatch.mismatch > 1.4 * noise
    assert exact > 1.4 * noise  # the difference is real, not an artefact of the sample
    assert mismatch.mismatch_upper > mismatch.mismatch  # channel combinations a frozen run never left are unknown


def test_switch_changes_only_the_second_half() -> None:
    k = 5_000
    plain = list(transitions(REAL, steps=2 * k, seed=9))
    switched = list(transitions(REAL, steps=2 * k, seed=9, switch=Switch(k, preset("frozen-channel"))))
    assert plain[:k] == switched[:k]
    assert plain[k:] != switched[k:]

    def channels(label: str) -> list[str]:
        return [part.split("c")[-1] for part in label.split()]

    moves = [channels(t.s) != channels(t.s_next) for t in switched]
    assert any(moves[:k]) and not any(moves[k:])
    assert [t.seq for t in switched] == list(range(2 * k))


def test_switch_to_another_label_space_is_refused() -> None:
    data = REAL.model_dump(mode="json")
    data["ues"][1]["buffer_levels"] = 2
    data["ues"][1]["traffic"]["sizes"] = [1.0]
    other = parse_params(data)
    with pytest.raises(ValueError, match="label space"):
        next(transitions(REAL, steps=10, seed=0, switch=Switch(5, other)))


def test_behaviour_policy_is_followed() -> None:
    policy = np.arange(len(LABELS)) % len(ACTIONS)
    for t in transitions(REAL, steps=2_000, seed=5, behaviour=policy):
        assert ACTIONS[t.a] == policy[INDEX[t.s]]
    with pytest.raises(ValueError, match="behaviour"):
        next(transitions(REAL, steps=1, seed=5, behaviour=np.ones((3, 3))))


def test_record_writes_contract_lines(tmp_path: Path) -> None:
    out = tmp_path / "stale.jsonl"
    result = runner.invoke(app, ["testbed", "record", "--preset", "real", "--steps", "3000", "--seed", "2",
                                 "--out", str(out), "--switch-at", "1500", "--switch-to", "frozen-channel",
                                 "--step-seconds", "0.02", "--start-time", "100"])  # fmt: skip
    assert result.exit_code == 0, result.output
    items = list(read_jsonl(out))
    assert len(items) == 3000 and all(isinstance(t, Transition) for t in items)
    trs = [t for t in items if isinstance(t, Transition)]
    assert [t.seq for t in trs] == list(range(3000))
    assert np.allclose([t.t for t in trs], 100 + 0.02 * np.arange(3000))
    assert {t.s for t in trs} | {t.s_next for t in trs} <= set(LABELS)
    assert {t.a for t in trs} <= set(ACTIONS)
    assert all(trs[i].s_next == trs[i + 1].s for i in range(len(trs) - 1))
    expected = list(transitions(REAL, steps=3000, seed=2, start_time=100, step_seconds=0.02,
                                switch=Switch(1500, preset("frozen-channel"))))  # fmt: skip
    assert trs == expected


def test_record_from_a_yaml_config_equals_the_preset(tmp_path: Path) -> None:
    config = tmp_path / "twin.yaml"
    show = runner.invoke(app, ["testbed", "show", "poisson-traffic"])
    assert show.exit_code == 0, show.output
    config.write_text(show.output)
    assert load_params(config) == preset("poisson-traffic")
    out = tmp_path / "twin.jsonl"
    result = runner.invoke(app, ["testbed", "record", "--config", str(config), "--steps", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [t for t in read_jsonl(out)] == list(transitions(preset("poisson-traffic"), steps=50, seed=0))


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    data = REAL.model_dump(mode="json")
    data["ues"][1]["channel"]["transition"][0] = [0.5, 0.4]
    data["ues"][2]["traffic"]["rate"] = 1.5
    data["ues"][0]["chanel"] = {}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_params(config)
    message = str(err.value)
    assert "ues.1.channel.transition: row 0 must sum to 1" in message
    assert "ues.2.traffic.rate:" in message
    assert "ues.0.chanel: Extra inputs are not permitted" in message
    assert str(config) in message
    result = runner.invoke(app, ["testbed", "record", "--config", str(config), "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "ues.1.channel.transition" in result.output


def test_cross_field_rules_are_checked() -> None:
    data = REAL.model_dump(mode="json")
    data["ues"][2]["channel"]["update"] = 0.9
    with pytest.raises(ConfigError, match="sum to .* per step, more than 1"):
        parse_params(data)
    data = REAL.model_dump(mode="json")
    data["schemes"]["equal"] = [3, 3, 3]
    with pytest.raises(ConfigError, match="scheme 'equal' uses 9 RBs"):
        parse_params(data)
    data = REAL.model_dump(mode="json")
    data["ues"][0]["buffer_levels"] = 2
    with pytest.raises(ConfigError, match="ues.0: .*buffer_levels must be 1 exactly when traffic is full"):
        parse_params(data)


def test_record_refuses_bad_arguments(tmp_path: Path) -> None:
    out = str(tmp_path / "x.jsonl")
    cases = [
        (["--out", out], "exactly one of --preset"),
        (["--preset", "real", "--out", out, "--switch-at", "5"], "go together"),
        (["--preset", "nope", "--out", out], "neither a preset"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["testbed", "record", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_publish_sends_the_testbed_live_in_the_telemetry_contract(broker: Mosquitto) -> None:
    import subprocess
    import sys
    import time

    from mqtt_harness import Subscriber, wait_for

    from dtsync.contract import decode_payload

    sub = Subscriber(broker.port, ["dtsync/cell-9/#"])
    started = time.time()
    try:
        cmd = [sys.executable, "-m", "dtsync.cli", "testbed", "publish", "--preset", "real", "--cell", "cell-9",
               "--stream", "stale", "--steps", "600", "--rate", "3000", "--batch", "50", "--qos", "1",
               "--switch-at", "300", "--switch-to", "frozen-channel", "--host", "127.0.0.1", "--port", str(broker.port)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "published 600 transitions to cell-9/stale in 12 messages" in out.stdout
        wait_for(lambda: len(sub.on("/twin/stale")) == 12, 10, "12 batches")
        got = [tr for m in sub.on("/twin/stale") for tr in decode_payload(m.payload)[0]]
        assert [tr.seq for tr in got] == list(range(600))
        assert all(started - 1 <= tr.t <= time.time() + 1 for tr in got)  # live: wall-clock times
        assert {tr.a for tr in got} <= set(preset("real").actions)
    finally:
        sub.close()
