"""``FlowEulerODEScheduler`` and ``GMFlowSDEScheduler`` of the public GMFlow code base
(``lib/models/diffusions/schedulers``): the classes of :mod:`gmkernels.gmflow_schedulers`, which
keep the official contract (constructor arguments, config keys, ``set_timesteps``, and ``step`` on
tensors with ``prediction_type`` and ``eps``), so swapping the import is the whole change::

    # from lib.models.diffusions.schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler
    from gmkernels.compat.schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler
    pipe.scheduler = GMFlowSDEScheduler.from_config(pipe.scheduler.config)
"""

from ..gmflow_schedulers import (
    HAS_DIFFUSERS,
    FlowEulerODEScheduler,
    FlowEulerODESchedulerOutput,
    GMFlowSDEScheduler,
    GMFlowSDESchedulerOutput,
)

__all__ = [
    "FlowEulerODEScheduler",
    "GMFlowSDEScheduler",
    "FlowEulerODESchedulerOutput",
    "GMFlowSDESchedulerOutput",
    "HAS_DIFFUSERS",
]
