"""gmkernels: fused, exact Triton kernels for Gaussian Mixture Flow Matching (GMFlow).

Every op takes the GM dicts of the public GMFlow code base (``docs/layout.md``)::

    gm = {"means": (*B, K, C, H, W), "logstds": (*B, 1, 1, 1, 1), "logweights": (*B, K, 1, H, W)}

CUDA tensors run Triton kernels, CPU tensors the plain-PyTorch ``reference`` package;
``use_backend`` forces one. Inputs may be fp32/bf16/fp16 (arithmetic is fp32) and outputs
take the dtype of ``means``.
"""

from ._dispatch import current_backend, use_backend
from .capture import CapturedSampler
from .ops.guidance import mean_cfg, probabilistic_guidance, weight_guidance
from .ops.inverse_cdf import gaussian_samples_to_gm_samples, gm1d_inverse_cdf, gm_samples_to_gaussian_samples
from .ops.likelihood import gm_logprob, gm_nll_loss, transition_loss
from .ops.mixture import gm_to_iso_gaussian, gm_to_mean
from .ops.posterior import gm_posterior_mean
from .ops.product import gm_mul_iso_gaussian, iso_gaussian_mul_iso_gaussian
from .ops.sampling import gm_sample
from .ops.solver import gm_ode_substeps, gm_sde_step
from .ops.transition import reverse_transition, u_to_x0, x0_to_u
from .sampler import sample
from .schedulers import GMEulerScheduler, GMODEScheduler, GMSDEScheduler

__version__ = "0.1.0"

__all__ = [
    "use_backend",
    "current_backend",
    "gm_to_mean",
    "gm_to_iso_gaussian",
    "gm_mul_iso_gaussian",
    "iso_gaussian_mul_iso_gaussian",
    "u_to_x0",
    "x0_to_u",
    "gm_posterior_mean",
    "reverse_transition",
    "gm_logprob",
    "gm_nll_loss",
    "transition_loss",
    "gm_sample",
    "probabilistic_guidance",
    "weight_guidance",
    "mean_cfg",
    "gm1d_inverse_cdf",
    "gaussian_samples_to_gm_samples",
    "gm_samples_to_gaussian_samples",
    "sample",
    "CapturedSampler",
    "gm_ode_substeps",
    "gm_sde_step",
    "GMSDEScheduler",
    "GMODEScheduler",
    "GMEulerScheduler",
]
