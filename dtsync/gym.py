"""Record any Gymnasium environment's steps as dtsync telemetry (``pip install 'dtsync[gym]'``).

    import gymnasium as gym
    from dtsync.gym import JsonlSink, MqttSink, RecordTransitions

    env = RecordTransitions(gym.make("FrozenLake-v1"), JsonlSink("real.jsonl"))            # a trace to rank
    env = RecordTransitions(gym.make("FrozenLake-v1"), MqttSink("cell-1", stream="real"))  # live, to the daemon

Every ``step`` becomes one contract transition (s, a, r, s_next, t, seq, done): ``s`` is the observation the
previous step (or ``reset``) returned, ``done`` is Gymnasium's ``terminated`` (never ``truncated``: a time limit
is not a terminal state, see dtsync.episodes). Observations and actions become contract labels:

- ``Discrete``: the integer itself (``start`` included).
- ``MultiDiscrete``: a tuple label, written on the wire as the string ``"i,j,..."`` so that no encoder is
  needed to read it.
- ``Box``: the vector as it is, for the cell's ``encoder.bins`` to discretise (the same bins must be in the
  daemon's config and in ``replay``/``rank --config``); or pass ``observation=`` a function to a label.
- anything else needs ``observation=`` (or ``action=``) — refused at construction rather than at the first step.

The wrapper never makes ``step`` wait on the network: the MQTT sink hands each transition to dtsync.client's
background publisher (a bounded queue; what does not fit is dropped and counted in ``sink.stats.dropped``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any, Protocol, SupportsFloat

import gymnasium
import numpy as np
from gymnasium import spaces

from dtsync.client import Publisher, PublisherStats
from dtsync.config import MqttSettings
from dtsync.contract import Action, State, Transition, encode_transition
from dtsync.daemon.topics import REAL

__all__ = ["JsonlSink", "MqttSink", "RecordTransitions", "Sink", "label_function", "rollout"]

Labeller = Callable[[Any], Any]


class Sink(Protocol):
    """Where recorded transitions go; `write` must return quickly (it runs inside ``step``)."""

    def write(self, transition: Transition) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """A JSON Lines trace (one transition per line), the input of ``dtsync replay`` and ``dtsync rank``."""

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = path
        self._file = open(path, "ab" if append else "wb")  # noqa: SIM115 - closed by close()
        self.written = 0

    def write(self, transition: Transition) -> None:
        self._file.write(encode_transition(transition) + b"\n")
        self.written += 1

    def close(self) -> None:
        self._file.close()


class MqttSink:
    """Live telemetry to a cell's topic (``stream`` ``real`` or a twin's name), through a background publisher.

    Options are dtsync.client.Publisher's (`batch`, `linger`, `queue_size`, `qos`, `host`, `port`...).
    """

    def __init__(
        self,
        cell: str,
        stream: str = REAL,
        settings: MqttSettings | None = None,
        *,
        close_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        self.stream = stream
        self.close_timeout = close_timeout
        self.publisher = Publisher(cell, settings, **options)

    @property
    def stats(self) -> PublisherStats:
        return self.publisher.stats

    def write(self, transition: Transition) -> None:
        self.publisher.send(transition, self.stream)

    def close(self) -> None:
        self.publisher.close(self.close_timeout)


def label_function(space: spaces.Space[Any], what: str = "observation") -> Labeller:
    """How values of `space` become contract labels (see the module docstring); TypeError if it has no rule."""
    if isinstance(space, spaces.Discrete):
        return int
    if isinstance(space, spaces.MultiDiscrete):
        return lambda x: ",".join(str(int(v)) for v in np.asarray(x).ravel())
    if isinstance(space, spaces.Box) and what == "observation":
        return lambda x: tuple(float(v) for v in np.asarray(x, dtype=np.float64).ravel())
    raise TypeError(f"no rule turns a {type(space).__name__} {what} into a dtsync label: pass {what}=a function")


class RecordTransitions(gymnasium.Wrapper[Any, Any, Any, Any]):
    """Write every step of `env` to `sink` as a contract transition; the environment is otherwise unchanged.

    `observation` / `action`: functions from a value to a label (int, str, or a tuple of floats for the
    cell's encoder), overriding the rule for the space. `clock` stamps ``t`` (default wall-clock time, as live
    telemetry should be; None leaves ``t`` out, so replay orders a trace by line). ``seq`` counts the steps.
    """

    def __init__(
        self,
        env: gymnasium.Env[Any, Any],
        sink: Sink,
        *,
        observation: Labeller | None = None,
        action: Labeller | None = None,
        clock: Callable[[], float] | None = time.time,
    ) -> None:
        super().__init__(env)
        self.sink = sink
        self._observation = observation or label_function(env.observation_space, "observation")
        self._action = action or label_function(env.action_space, "action")
        self._clock = clock
        self._state: State | None = None
        self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._state = self._observation(obs)
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._state is None:
            raise RuntimeError("call reset() before step() (and again after an episode ends)")
        obs, reward, terminated, truncated, info = self.env.step(action)
        s_next = self._observation(obs)
        a: Action = self._action(action)
        t = None if self._clock is None else self._clock()
        self.sink.write(Transition(self._state, a, float(reward), s_next, t, self.steps, bool(terminated)))
        self.steps += 1
        self._state = None if terminated or truncated else s_next
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        try:
            self.sink.close()
        finally:
            super().close()


def rollout(env: gymnasium.Env[Any, Any], steps: int, *, seed: int | None = None,
            policy: Callable[[Any], Any] | None = None) -> int:  # fmt: skip
    """Step `env` `steps` times, resetting after each episode; `policy(obs)` picks actions (default: uniformly
    random from the action space, seeded). Returns the number of episodes started."""
    rng = random.Random(seed)
    env.action_space.seed(rng.randrange(2**31))
    obs, _ = env.reset(seed=rng.randrange(2**31))
    episodes = 1
    for _ in range(steps):
        act = env.action_space.sample() if policy is None else policy(obs)
        obs, _, terminated, truncated, _ = env.step(act)
        if terminated or truncated:
            obs, _ = env.reset()
            episodes += 1
    return episodes
