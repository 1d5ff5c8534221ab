"""dtsync: is the digital twin still behaving like the real network? DT-BSM monitoring and offline tools."""

from dtsync.metric import (
    DTBSMResult,
    DTBSMSolver,
    TVResult,
    dtbsm,
    dtbsm_tv,
    regret_bound,
    regret_bound_tv,
    regret_estimate,
    sample_size,
    value_iteration,
)

__version__ = "0.1.0"

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
