"""diffusers pipeline for GMFlow checkpoints (needs the ``diffusers`` extra: ``pip install -e
'.[diffusers]'`` from a checkout).

* :class:`GMDiTPipeline` — loads a checkpoint directory in the public GMFlow layout and samples it
  with ``gmkernels``' fused GM-ODE / GM-SDE steps;
* :class:`FlowEulerODEScheduler`, :class:`GMFlowSDEScheduler` — the official tensor-stepping
  schedulers (:mod:`gmkernels.gmflow_schedulers`, the same classes as ``gmkernels.compat``'s) that
  ``GMDiTPipeline.scheduler`` holds.
"""

from ..gmflow_schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler
from .gmdit import GMDiTPipeline

__all__ = ["GMDiTPipeline", "FlowEulerODEScheduler", "GMFlowSDEScheduler"]
