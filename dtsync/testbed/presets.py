"""Named parameter sets: the real testbed and a few twins of it (``dtsync testbed show NAME`` prints one as YAML).

``real`` (and ``faithful``, the same parameters: a perfect twin) has three UEs on 6 uplink RBs, each with
two channel levels (0 bad, 1 good) whose rates are in chunks per RB:

- camera: surveillance video at a steady bitrate above its share, so always backlogged (no buffer state);
  the lowest priority, a slowly changing channel (it does not move);
- laptop: cloud gaming, bursty on/off: bursts of 2 chunks at 0.15 a step, nothing in between; buffer 0-2
  chunks; the highest priority (weight 2);
- phone: livestreaming at a variable bitrate, batches of 1 or 2 chunks at 0.2 a step; buffer 0-2 chunks; the
  fastest-changing channel (it moves around).

State space 2 * 6 * 6 = 72 states, 6 allocation schemes. Each twin changes one model choice: traffic made
Poisson (same mean), channel memoryless, frozen (stale) or mis-estimated (every rate believed 1.5 times what it
is), buffers modelled as empty/non-empty only, or every probability perturbed (``noisy``, sigma 0.3).
``frozen-channel`` is the one to switch to for a twin whose channel model goes stale midway.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dtsync.testbed.params import TestbedParams, parse_params
from dtsync.testbed.variants import (
    coarse_buffers,
    frozen_channel,
    iid_channel,
    optimistic_channel,
    perturbed,
    poisson_traffic,
)

__all__ = ["PRESETS", "preset"]

_REAL = {
    "rbs": 6,
    "schemes": {
        "equal": [2, 2, 2],
        "camera": [4, 1, 1],
        "laptop": [1, 4, 1],
        "phone": [1, 1, 4],
        "camera+laptop": [3, 3, 0],
        "laptop+phone": [0, 3, 3],
    },
    "ues": [
        {
            "name": "camera",
            "weight": 0.25,
            "buffer_levels": 1,
            "traffic": {"kind": "full"},
            "channel": {"rates": [0.55, 1.05], "transition": [[0.7, 0.3], [0.15, 0.85]], "update": 0.06},
        },
        {
            "name": "laptop",
            "weight": 2.0,
            "buffer_levels": 3,
            "traffic": {"kind": "batch", "rate": 0.15, "sizes": [0.0, 1.0]},
            "channel": {"rates": [0.3, 0.8], "transition": [[0.6, 0.4], [0.3, 0.7]], "update": 0.14},
        },
        {
            "name": "phone",
            "weight": 1.5,
            "buffer_levels": 3,
            "traffic": {"kind": "batch", "rate": 0.2, "sizes": [0.6, 0.4]},
            "channel": {"rates": [0.55, 1.05], "transition": [[0.5, 0.5], [0.4, 0.6]], "update": 0.2},
        },
    ],
}


def _real() -> TestbedParams:
    return parse_params(_REAL, source="preset real")


PRESETS: dict[str, Callable[[], TestbedParams]] = {
    "real": _real,
    "faithful": _real,
    "poisson-traffic": lambda: poisson_traffic(_real()),
    "iid-channel": lambda: iid_channel(_real()),
    "frozen-channel": lambda: frozen_channel(_real()),
    "misestimated-channel": lambda: optimistic_channel(_real()),
    "coarse-buffers": lambda: coarse_buffers(_real()),
    "noisy": lambda: perturbed(_real(), 0.3, np.random.default_rng(0)),
}
"""Name -> builder (parameters are rebuilt and validated on each call)."""


def preset(name: str) -> TestbedParams:
    """The named parameter set; KeyError naming the available ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()
