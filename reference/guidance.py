"""Guidance on the x0-GMs of a conditional and an unconditional pass (docs/ops.md#guidance)."""

from __future__ import annotations

import torch

from .mixture import gm_to_iso_gaussian, gm_to_mean
from .product import gm_mul_iso_gaussian, iso_gaussian_mul_iso_gaussian

_DIMS = (-3, -2, -1)


def _orthogonalise(bias: torch.Tensor, m_c: torch.Tensor, amount: float) -> torch.Tensor:
    """``bias - amount * <bias, m_c> / max(<m_c, m_c>, 1e-6) * m_c``, ``<.,.>`` the mean over (C, H, W)."""
    proj = (bias * m_c).mean(_DIMS, keepdim=True) / (m_c * m_c).mean(_DIMS, keepdim=True).clamp(min=1e-6)
    return bias - amount * proj * m_c


def guidance_target(gm_cond: dict, gm_uncond: dict, scale: float, orthogonal: float = 1.0) -> tuple[dict, dict]:
    """The two Gaussians of probabilistic guidance: the conditional moment match ``(m_c, v_c)``
    with ``v_c`` averaged over H, W, and the target ``(m_c + bias, v_c * (1 - scale^2))``.

    Returns:
        ``(target, cond)``, each ``{mean (*B, C, H, W), var (*B, 1, 1, 1)}``.
    """
    cond = gm_to_iso_gaussian(gm_cond)
    m_c, v_c = cond["mean"], cond["var"].mean(dim=(-2, -1), keepdim=True)  # v_c: (*B, 1, 1, 1)
    bias = m_c - gm_to_mean(gm_uncond)
    if orthogonal > 0:
        bias = _orthogonalise(bias, m_c, orthogonal)
    P = (bias * bias).mean(_DIMS, keepdim=True)
    V = v_c.mean(_DIMS, keepdim=True)
    bias = bias * (scale * torch.sqrt(V / P.clamp(min=1e-6)))
    return {"mean": m_c + bias, "var": v_c * (1 - scale * scale)}, {"mean": m_c, "var": v_c}


def probabilistic_guidance(gm_cond: dict, gm_uncond: dict, scale: float, orthogonal: float = 1.0) -> dict:
    """GMFlow's probabilistic guidance, ``scale`` in [0, 1).

    The conditional GM is reweighted by ``target / cond`` (a Gaussian quotient, power -1), which
    moves its mean by the (optionally orthogonalised) bias normalised to the average variance
    and shrinks its spread by ``1 - scale^2``. ``scale == 0`` returns ``gm_cond`` itself: there
    the quotient degenerates (its normaliser is clamped at eps), and the identity is exact.
    """
    if scale == 0:
        return gm_cond
    target, cond = guidance_target(gm_cond, gm_uncond, scale, orthogonal)
    return gm_mul_iso_gaussian(gm_cond, iso_gaussian_mul_iso_gaussian(target, cond, 1.0, -1.0))


def weight_guidance(gm_cond: dict, gm_uncond: dict, scale: float) -> dict:
    """CFG in log-weight space for mixtures whose components correspond:
    ``logweights = log_softmax_k(l_c + (scale - 1) * (l_c - l_u))``; means and std of ``gm_cond``.

    Dead components (``-inf``) are clamped to ``-1e30`` first so the difference stays finite:
    a component dead in ``gm_cond`` stays (numerically) dead.
    """
    l_c = gm_cond["logweights"].clamp(min=-1e30)
    l_u = gm_uncond["logweights"].clamp(min=-1e30)
    logweights = torch.log_softmax(l_c + (scale - 1) * (l_c - l_u), dim=-4)
    return {"means": gm_cond["means"], "logstds": gm_cond["logstds"], "logweights": logweights}


def mean_cfg(gm_cond: dict, gm_uncond: dict, scale: float, orthogonal: bool = False) -> dict:
    """Plain classifier-free guidance, the baseline: every conditional mean moves by
    ``(scale - 1) * (m_c - m_u)`` (made orthogonal to ``m_c`` when ``orthogonal``)."""
    m_c = gm_to_mean(gm_cond)
    bias = m_c - gm_to_mean(gm_uncond)
    if orthogonal:
        bias = _orthogonalise(bias, m_c, 1.0)
    return {
        "means": gm_cond["means"] + (scale - 1) * bias.unsqueeze(-4),
        "logstds": gm_cond["logstds"],
        "logweights": gm_cond["logweights"],
    }
