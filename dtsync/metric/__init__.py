"""The DT bisimulation metric and its bounds, as plain functions on numpy arrays."""

from dtsync.metric.bounds import regret_bound, regret_bound_tv, regret_estimate, sample_size, value_iteration
from dtsync.metric.dtbsm import DTBSMResult, DTBSMSolver, dtbsm
from dtsync.metric.tv import TVResult, dtbsm_tv

__all__ = [
    "DTBSMResult",
    "DTBSMSolver",
    "TVResult",
    "dtbsm",
    "dtbsm_tv",
    "regret_bound",
    "regret_bound_tv",
    "regret_estimate",
    "sample_size",
    "value_iteration",
]
