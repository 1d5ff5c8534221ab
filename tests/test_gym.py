"""dtsync.gym: Gymnasium environments recorded as telemetry, to JSONL and live over MQTT.

The reference pair is Gymnasium's FrozenLake 4x4, slippery (the "real network") against not slippery (the
twin); its exact mismatch, with terminal states absorbing at reward 0, is computed from the environment's own
transition table (``env.unwrapped.P``) by dtsync.dtbsm.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from mqtt_harness import DaemonProcess, Mosquitto, Subscriber, daemon_config, free_port, wait_for

import dtsync
from dtsync.config import default_config, parse_config
from dtsync.contract import Rejection, Transition, read_jsonl
from dtsync.gym import JsonlSink, MqttSink, RecordTransitions, label_function, rollout
from dtsync.offline.rank import rank

GAMMA = 0.9


def frozen_lake(slippery: bool, **kwargs: Any) -> gym.Env[Any, Any]:
    return gym.make("FrozenLake-v1", is_slippery=slippery, **kwargs)


def exact_mdp(env: gym.Env[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
    """R, P from the environment's table; terminated outcomes go to one absorbing state (index S)."""
    table = env.unwrapped.P  # type: ignore[attr-defined]
    S, A = len(table), len(table[0])
    R, P = np.zeros((S + 1, A)), np.zeros((S + 1, A, S + 1))
    for s in range(S):
        for a in range(A):
            for p, x, r, terminated in table[s][a]:
                R[s, a] += p * r
                P[s, a, S if terminated else x] += p
    P[S, :, S] = 1.0
    return R, P


class ListSink:
    def __init__(self) -> None:
        self.items: list[Transition] = []
        self.closed = False

    def write(self, transition: Transition) -> None:
        self.items.append(transition)

    def close(self) -> None:
        self.closed = True


def record(path: Path, slippery: bool, steps: int, seed: int) -> None:
    env = RecordTransitions(frozen_lake(slippery), JsonlSink(path), clock=None)
    rollout(env, steps, seed=seed)
    env.close()


def test_frozen_lake_pair_recorded_to_jsonl_ranks_at_its_exact_mismatch(tmp_path: Path) -> None:
    exact = dtsync.dtbsm(*exact_mdp(frozen_lake(True)), *exact_mdp(frozen_lake(False)), gamma=GAMMA).mismatch
    assert exact == pytest.approx(1.4962, abs=1e-4)
    steps = 100_000
    record(tmp_path / "real.jsonl", True, steps, seed=1)
    record(tmp_path / "twin.jsonl", False, steps, seed=2)
    config = default_config().with_overrides(gamma=GAMMA, window_count=steps)
    (ranked,) = rank(config, tmp_path / "real.jsonl", {"not-slippery": tmp_path / "twin.jsonl"})
    f = ranked.report.figures
    assert ranked.rejected == 0 and f.samples_real == f.samples_twin == steps
    assert abs(f.mismatch - exact) < 0.08, (f.mismatch, exact)
    assert f.coverage == 1.0 and f.mismatch_upper == pytest.approx(f.mismatch, abs=1e-6)  # terminals are not holes


def test_steps_become_transitions_terminated_is_done_truncated_is_not() -> None:
    sink = ListSink()
    env = RecordTransitions(frozen_lake(False, max_episode_steps=3), sink, clock=lambda: 42.0)
    env.reset(seed=0)
    env.step(0)  # left at the corner: stays in state 0
    env.step(1)  # down: state 4
    env.step(0)  # left: state 4 again; the time limit truncates here
    env.reset()
    env.step(1)  # down: 4
    env.step(1)  # down: 8
    env.step(2)  # right: 9, truncated again
    got = [(tr.s, tr.a, tr.r, tr.s_next, tr.done) for tr in sink.items]
    assert got[:3] == [(0, 0, 0.0, 0, False), (0, 1, 0.0, 4, False), (4, 0, 0.0, 4, False)]  # truncated: no done
    assert got[3:] == [(0, 1, 0.0, 4, False), (4, 1, 0.0, 8, False), (8, 2, 0.0, 9, False)]  # from the reset state
    assert [tr.seq for tr in sink.items] == list(range(len(sink.items))) and sink.items[0].t == 42.0
    env.close()
    assert sink.closed
    sink = ListSink()
    env = RecordTransitions(frozen_lake(False), sink)
    env.reset(seed=0)
    env.step(2)  # right: 1
    env.step(1)  # down: 5, a hole: terminated
    assert [(tr.s, tr.s_next, tr.done) for tr in sink.items] == [(0, 1, False), (1, 5, True)]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)  # the episode is over: its next state is terminal


def test_label_rules_for_each_space() -> None:
    assert label_function(spaces.Discrete(3, start=2))(np.int64(4)) == 4
    md = label_function(spaces.MultiDiscrete([3, 2]))(np.array([2, 1]))
    assert md == "2,1"
    box = label_function(spaces.Box(-1.0, 1.0, shape=(2,)))(np.array([0.25, -0.5], dtype=np.float32))
    assert box == (0.25, -0.5) and all(type(x) is float for x in box)
    with pytest.raises(TypeError, match="action=a function"):
        label_function(spaces.Box(-1.0, 1.0, shape=(1,)), "action")
    with pytest.raises(TypeError, match="observation=a function"):
        label_function(spaces.Dict({"x": spaces.Discrete(2)}))


def test_box_observations_are_binned_by_the_cells_encoder(tmp_path: Path) -> None:
    # CartPole: Box(4) observations, sent as vectors; the cell's encoder.bins turn them into tuple labels.
    path = tmp_path / "cartpole.jsonl"
    env = RecordTransitions(gym.make("CartPole-v1"), JsonlSink(path), clock=None)
    rollout(env, 2000, seed=3)
    env.close()
    items = list(read_jsonl(path))
    assert not any(isinstance(i, Rejection) for i in items) and len(items) == 2000
    assert all(isinstance(tr.s, tuple) and len(tr.s) == 4 for tr in items)  # type: ignore[union-attr]
    assert sum(tr.done for tr in items) >= 10  # type: ignore[union-attr]  # the pole falls: terminated
    bins = [[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [-0.1, 0.0, 0.1], [-1.0, 0.0, 1.0]]
    config = parse_config({"gamma": GAMMA, "window": {"count": 2000}, "encoder": {"bins": bins}})
    (ranked,) = rank(config, path, {"same": path})
    assert ranked.rejected == 0 and ranked.report.figures.mismatch == pytest.approx(0.0, abs=1e-9)
    assert any(isinstance(top.state, tuple) for top in ranked.report.figures.top_states)


def test_a_user_function_labels_what_has_no_rule() -> None:
    sink = ListSink()
    env = RecordTransitions(gym.make("CartPole-v1"), sink, observation=lambda o: "up" if abs(o[2]) < 0.05 else "tilted",
                            action=lambda a: ["left", "right"][int(a)])  # fmt: skip
    rollout(env, 50, seed=0)
    assert {tr.s for tr in sink.items} <= {"up", "tilted"} and {tr.a for tr in sink.items} <= {"left", "right"}


def test_step_never_waits_for_an_absent_broker_and_drops_are_counted() -> None:
    port = free_port()  # nothing listens: the publisher keeps reconnecting in the background
    sink = MqttSink("cell-1", host="127.0.0.1", port=port, queue_size=1000)
    env = RecordTransitions(frozen_lake(True), sink)
    env.reset(seed=0)
    slowest, began = 0.0, time.perf_counter()
    for _ in range(5000):
        started = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        slowest = max(slowest, time.perf_counter() - started)
        if terminated or truncated:
            env.reset()
    # Far below any network wait (a connect attempt times out after 10 s); the margin is for a loaded machine.
    assert slowest < 0.5 and time.perf_counter() - began < 5.0, slowest
    assert sink.stats.dropped == 4000 and sink.publisher.queued == 1000
    sink.close_timeout = 0.2
    env.close()
    assert sink.stats.abandoned == 1000


def test_frozen_lake_monitored_live_by_the_daemon(broker: Mosquitto, tmp_path: Path) -> None:
    config = daemon_config(broker.port, tmp_path, gamma=GAMMA, window={"count": 20_000},
                           schedule={"every_transitions": 10_000, "every_seconds": 2.0},
                           cells={"frozen-lake": {"twins": {"not-slippery": {}}}})  # fmt: skip
    daemon = DaemonProcess(tmp_path, config)
    sub = Subscriber(broker.port, ["dtsync/frozen-lake/twin/+/status"])
    try:
        daemon.wait_connected()
        for stream, slippery in (("real", True), ("not-slippery", False)):
            env = RecordTransitions(frozen_lake(slippery), MqttSink("frozen-lake", stream, host="127.0.0.1",
                                                                     port=broker.port, qos=1))  # fmt: skip
            rollout(env, 20_000, seed=7 if slippery else 8)
            env.close()
            assert env.sink.stats.sent[stream] == 20_000 and env.sink.stats.dropped == 0  # type: ignore[attr-defined]

        def judged() -> dict[str, Any] | None:
            full = [s for s in sub.statuses() if s.get("samples_real") == 20_000 and s.get("samples_twin") == 20_000]
            return full[-1] if full else None

        status = wait_for(judged, 60, "an evaluation of the full windows")
        assert 1.2 < status["mismatch"] < 1.8, status
        assert status["coverage"] == 1.0 and status["mismatch_upper"] == pytest.approx(status["mismatch"], abs=1e-6)
        assert daemon.metric("dtsync_rejected_total", reason="wrong_type") in (None, 0.0)
    finally:
        sub.close()
        assert daemon.stop() == 0
    log = [json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{")]
    assert not [e for e in log if e.get("level") == "error"], log
