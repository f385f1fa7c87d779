"""Plain-PyTorch reference of every gmkernels op: the oracle of the tests and the CPU fallback.

One module per op family, mirroring ``gmkernels.ops``. Written to be read: each function
carries the equation of ``docs/ops.md`` it implements. Works in float32 and float64 with any
leading batch dims; dead components (``-inf`` log-weights) give no NaN. No validation here:
the public ``gmkernels`` functions validate and then call these.
"""

from .guidance import mean_cfg, probabilistic_guidance, weight_guidance
from .inverse_cdf import gaussian_samples_to_gm_samples, gm1d_inverse_cdf, gm_samples_to_gaussian_samples
from .likelihood import gm_logprob, gm_nll_loss
from .mixture import gm_to_iso_gaussian, gm_to_mean
from .posterior import gm_posterior_mean
from .product import gm_mul_iso_gaussian, iso_gaussian_mul_iso_gaussian
from .sampling import gm_sample
from .transition import reverse_transition, u_to_x0, x0_to_u

__all__ = [
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
    "gm_sample",
    "probabilistic_guidance",
    "weight_guidance",
    "mean_cfg",
    "gm1d_inverse_cdf",
    "gaussian_samples_to_gm_samples",
    "gm_samples_to_gaussian_samples",
]
