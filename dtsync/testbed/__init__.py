"""Reference testbed: one gNB sharing uplink RBs among a camera, a gaming laptop and a livestreaming phone.

Use it to try the DT-BSM workflow without a live network::

    from dtsync.testbed import Switch, exact_mdp, preset, transitions

    real = preset("real")
    for tr in transitions(real, steps=1000, seed=1):                   # dtsync.contract.Transition objects
        ...
    stale = transitions(real, steps=1000, seed=2, switch=Switch(500, preset("frozen-channel")))
    mdp = exact_mdp(real)                                              # R (S, A), P (S, A, S), labels

A twin is the same simulator with other parameters (:mod:`dtsync.testbed.variants`); parameters load from
YAML (:func:`load_params`, ``dtsync testbed show real`` prints a template). The pre-filtering study of
candidate twins is :func:`dtsync.testbed.study.run_study` (``dtsync study prefilter``).
"""

from dtsync.testbed.model import TestbedMDP, exact_mdp, state_labels
from dtsync.testbed.params import TestbedParams, load_params, parse_params
from dtsync.testbed.presets import PRESETS, preset
from dtsync.testbed.simulate import Switch, transitions

__all__ = [
    "PRESETS",
    "Switch",
    "TestbedMDP",
    "TestbedParams",
    "exact_mdp",
    "load_params",
    "parse_params",
    "preset",
    "state_labels",
    "transitions",
]
