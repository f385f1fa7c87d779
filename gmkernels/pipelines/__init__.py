"""diffusers pipeline and schedulers for GMFlow checkpoints (needs the ``diffusers`` extra:
``pip install -e '.[diffusers]'`` from a checkout).

* :class:`GMDiTPipeline` — loads a checkpoint directory in the public GMFlow layout and samples it
  with ``gmkernels``' GM-ODE / GM-SDE solvers;
* :class:`FlowEulerODEScheduler`, :class:`GMFlowSDEScheduler` — diffusers schedulers
  (``SchedulerMixin`` + ``ConfigMixin``) on top of :mod:`gmkernels.schedulers`.
"""

from .gmdit import GMDiTPipeline
from .schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler

__all__ = ["GMDiTPipeline", "FlowEulerODEScheduler", "GMFlowSDEScheduler"]
