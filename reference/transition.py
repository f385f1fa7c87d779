"""Affine changes of variable on a GM: velocity <-> denoised sample, and the exact reverse
transition of the rectified-flow path (docs/ops.md#changes-of-variable-and-the-reverse-transition).

Path: ``x_t = a * x0 + sigma * eps`` with ``a = 1 - sigma``; velocity ``u = eps - x0`` so
``x0 = x_t - sigma * u``. ``x_t`` is ``(*B, C, H, W)``; sigmas are floats or tensors
broadcastable to ``(*B, 1, 1, 1)``.
"""

from __future__ import annotations

import torch

from ._util import Sigma, clamp_min, log, to_gm_dims


def u_to_x0(gm_u: dict, x_t: torch.Tensor, sigma: Sigma, eps: float = 1e-6) -> dict:
    """GM over the velocity -> GM over x0: ``means = x_t - sigma * means_u``,
    ``logstds = logstds_u + log(max(sigma, eps))``, same logweights."""
    s = to_gm_dims(sigma)
    return {
        "means": x_t.unsqueeze(-4) - s * gm_u["means"],
        "logstds": gm_u["logstds"] + log(clamp_min(s, eps)),
        "logweights": gm_u["logweights"],
    }


def x0_to_u(gm_x0: dict, x_t: torch.Tensor, sigma: Sigma, eps: float = 1e-6) -> dict:
    """Inverse of :func:`u_to_x0`: ``means_u = (x_t - means_x0) / max(sigma, eps)``,
    ``logstds_u = logstds_x0 - log(max(sigma, eps))``, same logweights."""
    s = clamp_min(to_gm_dims(sigma), eps)
    return {
        "means": (x_t.unsqueeze(-4) - gm_x0["means"]) / s,
        "logstds": gm_x0["logstds"] - log(s),
        "logweights": gm_x0["logweights"],
    }


def transition_coefficients(sigma: Sigma, sigma_to: Sigma, eps: float = 1e-6) -> tuple[Sigma, Sigma, Sigma]:
    """Constants of the reverse transition ``x_{sigma_to} | x_sigma, x0``.

    With ``a = 1 - sigma``, ``q = sigma_to / max(sigma, eps)``, ``p = a / max(a_to, eps)``,
    ``beta = 1 - (q * p)^2``: returns ``c1 = q^2 * p``, ``c2 = beta * a_to``,
    ``c3 = beta * sigma_to^2`` so that
    ``x_{sigma_to} = c1 * x_sigma + c2 * x0 + sqrt(c3) * z``.
    """
    a, a_to = 1 - sigma, 1 - sigma_to
    q = sigma_to / clamp_min(sigma, eps)
    p = a / clamp_min(a_to, eps)
    beta = 1 - (q * p) ** 2
    return q * q * p, beta * a_to, beta * sigma_to * sigma_to


def reverse_transition(gm_x0: dict, x_t: torch.Tensor, sigma: Sigma, sigma_to: Sigma, eps: float = 1e-6) -> dict:
    """GM of ``x_{sigma_to}`` given ``x_t`` at ``sigma`` (``sigma_to <= sigma``), from the x0-GM.

    Means ``c1 * x_t + c2 * mu_k``; ``logstds = 0.5 * log(c2^2 * s2 + c3)`` evaluated as
    ``0.5 * logaddexp(2 * log(c2) + 2 * logstds, log(max(c3, eps^2)))`` so that huge or tiny
    stds stay finite (the ``eps^2`` floor keeps ``sigma_to == sigma`` finite); same weights.
    """
    c1, c2, c3 = (to_gm_dims(c) for c in transition_coefficients(sigma, sigma_to, eps))
    ls = gm_x0["logstds"]
    log_c2 = torch.as_tensor(c2, dtype=ls.dtype, device=ls.device).abs().log()
    log_c3 = torch.as_tensor(clamp_min(c3, eps * eps), dtype=ls.dtype, device=ls.device).log()
    return {
        "means": c1 * x_t.unsqueeze(-4) + c2 * gm_x0["means"],
        "logstds": 0.5 * torch.logaddexp(2 * log_c2 + 2 * ls, log_c3),
        "logweights": gm_x0["logweights"],
    }
