"""The solver steps (docs/solvers.md): ``gm_ode_substeps`` (``ode``), ``gm_sde_step`` (``sde``)
and the sampler's fused step ``fused_step`` (``step``), with the ``@triton.jit`` helpers they
share in ``common``. The reference twins are ``reference.solver_steps``."""

from reference.solver_steps import CA, CB, RHO_MIN

from .ode import gm_ode_substeps, ode_path
from .sde import gm_sde_step
from .step import fused_step

__all__ = ["CA", "CB", "RHO_MIN", "fused_step", "gm_ode_substeps", "gm_sde_step", "ode_path"]
