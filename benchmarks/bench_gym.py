"""What recording costs a Gymnasium step: FrozenLake under a random policy, bare and through dtsync.gym's sinks.

Run: .venv/bin/python benchmarks/bench_gym.py [--steps N]

Reports process CPU time per step (the cost a training loop pays, the MQTT sink's sender thread included) and
wall time, for the bare environment (the baseline, measured in the same run), the JSON Lines sink and the MQTT
sink publishing to a private Mosquitto (tests/mqtt_harness.py), alternating the three twice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mqtt_harness import Mosquitto  # noqa: E402

from dtsync.gym import JsonlSink, MqttSink, RecordTransitions, rollout  # noqa: E402


def per_step(env: gym.Env, steps: int) -> tuple[float, float]:  # type: ignore[type-arg]
    wall, cpu = time.perf_counter(), time.process_time()
    rollout(env, steps, seed=1)
    return (time.process_time() - cpu) / steps * 1e6, (time.perf_counter() - wall) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    steps = parser.parse_args().steps
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir)
        broker.start()
        try:
            for _ in range(2):
                base = per_step(gym.make("FrozenLake-v1"), steps)
                env = RecordTransitions(gym.make("FrozenLake-v1"), JsonlSink(workdir / "trace.jsonl"))
                jsonl = per_step(env, steps)
                env.close()
                sink = MqttSink("bench", host="127.0.0.1", port=broker.port)
                env = RecordTransitions(gym.make("FrozenLake-v1"), sink)
                mqtt = per_step(env, steps)
                env.close()
                for name, (cpu, wall) in (("bare", base), ("jsonl", jsonl), ("mqtt", mqtt)):
                    extra = "" if name == "bare" else f"  (+{cpu - base[0]:.1f} us CPU over bare)"
                    print(f"{name:6s} {cpu:6.1f} us CPU/step  {wall:6.1f} us wall/step{extra}")
                print(f"mqtt: {sink.stats.messages} messages, {sum(sink.stats.sent.values())} sent, "
                      f"{sink.stats.dropped} dropped")  # fmt: skip
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
