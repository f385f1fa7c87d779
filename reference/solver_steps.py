"""Fused sampler steps (docs/solvers.md#fused-steps), written as the plain loops they fuse: the oracle of the Triton
kernels in ``gmkernels.ops.solver`` and the CPU path of the samplers.

Shapes: an x0-GM ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1|H, 1|W), logweights
(*B, K, 1, H, W)}``; states ``x (*B, C, H, W)``. Sigmas of the schedule are Python floats or
0-d tensors (one schedule for the whole batch).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._util import Sigma, clamp_min, scaled_logits
from .mixture import gm_to_mean
from .posterior import gm_posterior_mean
from .transition import transition_coefficients

# Constants of the 2nd-order rule (docs/solvers.md#2nd-order): the error power
# ``E = V * (scale^2 * CB^2 + CA)`` and the floor of the relative variance reduction ``rho`` of a
# Gaussian reweighting, ``rho in [RHO_MIN, 1 - RHO_MIN]``.
CA, CB = 0.005, 1.0
RHO_MIN = 1e-6

# The fused sampler step's per-sample coefficients, ``coef (B, N_COEF)`` float32, by slot: written
# by the coefficient launch after a statistics pass (``step_coefficients`` is its twin) and read
# by the next launch of the step. Per pixel, ``d = m_c - m_u`` and ``db = d - proj * m_c``.
COEF_PROJ = 0  # proj = amount * <d, m_c> / <m_c, m_c>
COEF_CFG = 1  # mean-CFG: every mean moves by (scale - 1) * db
COEF_G1_MC = 2  # probabilistic guidance reweights by N(g1, v1), g1 = G1_MC * m_c + G1_DB * db
COEF_G1_DB = 3
COEF_V1 = 4
COEF_GA_DB = 5  # 2nd order reweights by N(gA, vA), gA = m_c + GA_DB * db + GA_E * e
COEF_GA_E = 6
COEF_VA = 7
COEF_DAMP = 8  # the bias-power pass's damped step ratio and guidance factor alpha
COEF_ALPHA = 9
N_COEF = 10

# The statistics passes' partial sums, ``stats (B * npb, N_STAT)`` float32 (one row per program,
# ``npb`` programs a batch row), by column.
STAT_VAR = 0  # per-pixel variance of the (guided) x0-GM, summed over the pixels
STAT_D_MC = 1  # <d, m_c>, <m_c, m_c>, <d, d>: sums over channels and pixels
STAT_MC_MC = 2
STAT_D_D = 3
STAT_E_E = 4  # <e, e> of the unscaled 2nd-order mean difference e
STAT_BIAS = 5  # the exact 2nd-order bias power, from the bias-power pass
N_STAT = 6


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: Sigma, sigma_next: Sigma, eps: float = 1e-6) -> torch.Tensor:
    """One flow-matching Euler step ``x + (x - x0) / sigma * (sigma_next - sigma)``
    (``sigma`` floored at ``eps``, so a step from 0 to 0 is a no-op instead of 0/0)."""
    return x + (x - x0) * ((sigma_next - sigma) / clamp_min(sigma, eps))


def gm_ode_substeps(gm: dict, x: torch.Tensor, sigmas: Sequence[Sigma], eps: float = 1e-6) -> torch.Tensor:
    """All ``N = len(sigmas) - 1`` GM-ODE substeps of one main step.

    Substep 0 uses ``x0 = gm_to_mean(gm)``; substep ``j > 0`` uses the posterior mean of the
    same GM moved from the base state ``(x, sigmas[0])`` to the current one ``(x_j, sigmas[j])``
    (op 6); every substep is an Euler step from ``sigmas[j]`` to ``sigmas[j + 1]``.

    Args:
        gm: x0-GM predicted at ``(x, sigmas[0])``.
        x: ``(*B, C, H, W)`` base state.
        sigmas: ``N + 1`` non-increasing noise levels, ``sigmas[0]`` the base one.
    Returns:
        ``(*B, C, H, W)``: the state at ``sigmas[N]``.
    """
    x_base = x
    for j in range(len(sigmas) - 1):
        x0 = gm_to_mean(gm) if j == 0 else gm_posterior_mean(gm, x_base, sigmas[0], x, sigmas[j], eps)
        x = euler_step(x, x0, sigmas[j], sigmas[j + 1], eps)
    return x


def select_components(logweights: torch.Tensor, u: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Inverse-CDF draw of one component per pixel from ``softmax_k(power * logweights)``.

    The chosen index is the first ``k`` whose cumulative weight exceeds ``u * total``; when
    rounding puts the target past the end, the last live component is taken (a dead one,
    weight 0, is never chosen).

    Args:
        logweights: ``(*B, K, 1, H, W)``.
        u: ``(*B, 1, H, W)`` uniforms in [0, 1).
    Returns:
        ``(*B, 1, 1, H, W)`` int64 indices.
    """
    logits = scaled_logits(logweights, power)
    w = torch.exp(logits - logits.amax(dim=-4, keepdim=True))  # (*B, K, 1, H, W), unnormalised
    cdf = torch.cumsum(w, dim=-4)
    target = u.unsqueeze(-4) * w.sum(dim=-4, keepdim=True)
    K = w.shape[-4]
    idx = (cdf <= target).sum(dim=-4, keepdim=True)  # first k with cdf_k > target
    k = torch.arange(K, device=w.device).view(K, 1, 1, 1)
    last_live = torch.where(w > 0, k, 0).amax(dim=-4, keepdim=True)
    return torch.where(idx >= K, last_live, idx)


def sde_noise_std(logstds: torch.Tensor, c2: Sigma, c3: Sigma) -> torch.Tensor:
    """``sqrt(c2^2 * exp(2 * logstds) + c3)`` as ``hi * sqrt(1 + (lo / hi)^2)`` so that huge
    stds neither overflow nor, with ``c2 = c3 = 0``, produce 0/0."""
    p = abs(c2) * torch.exp(logstds)
    q = torch.as_tensor(c3, dtype=p.dtype, device=p.device).clamp(min=0).sqrt()
    hi, lo = torch.maximum(p, q), torch.minimum(p, q)
    ratio = torch.where(hi > 0, lo / torch.where(hi > 0, hi, 1.0), 0.0)
    return hi * torch.sqrt(1 + ratio * ratio)


def gm_sde_step(
    gm: dict,
    x: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    u: torch.Tensor,
    z: torch.Tensor,
    power: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One GM-SDE step: an exact draw of ``x_{sigma_next}`` from the GM reverse transition (op 7).

    The component ``k`` per pixel is drawn from ``softmax(power * logweights)`` at the uniform
    ``u``; then ``x_next = c1 * x + c2 * mu_k + sqrt(c2^2 * s2 + c3) * z``, which is
    ``c1 * x + c2 * x0 + sqrt(c3) * z'`` with ``x0 = mu_k + s * z''`` (``gm_sample``) with the
    two Gaussian draws merged into one.

    Args:
        gm: x0-GM predicted at ``(x, sigma)``.
        x: ``(*B, C, H, W)``.
        u: ``(*B, 1, H, W)`` uniforms in [0, 1).
        z: ``(*B, C, H, W)`` standard normals.
    Returns:
        ``(*B, C, H, W)``.
    """
    means = gm["means"]
    *batch, K, C, H, W = means.shape
    idx = select_components(gm["logweights"], u, power)  # (*B, 1, 1, H, W)
    mu = torch.gather(means, -4, idx.expand(*batch, 1, C, H, W)).squeeze(-4)  # (*B, C, H, W)
    c1, c2, c3 = transition_coefficients(sigma, sigma_next, eps)
    std = sde_noise_std(gm["logstds"], c2, c3).squeeze(-4)  # (*B, 1, 1|H, 1|W)
    return c1 * x + c2 * mu + std * z


def step_coefficients(
    stats: torch.Tensor,
    coef: torch.Tensor,
    npb: int,
    HW: int,
    C: int,
    mode: int,
    *,
    uncond: bool,
    meancfg: bool,
    prob: bool,
    order2: bool,
    bias_pass: bool,
    amount: float,
    scale: float,
    h: float,
    h_prev: float,
    ca: float = CA,
    cb: float = CB,
    rho_min: float = RHO_MIN,
) -> torch.Tensor:
    """The fused sampler step's per-sample coefficients from its statistics passes (the twin of
    the coefficient kernel of ``gmkernels.ops.solver.step``; docs/solvers.md#fused-steps).

    ``stats (B * npb, N_STAT)`` holds each program's partial sums (``npb`` programs a row), by
    the ``STAT_*`` columns: the per-pixel variance (a mean over ``HW``), ``<d, m_c>``,
    ``<m_c, m_c>``, ``<d, d>``, the unscaled 2nd-order bias power ``<e, e>`` and, after the
    bias-power pass, the exact one (each a mean over ``C * HW``). Returns a copy of
    ``coef (B, N_COEF)`` with the ``COEF_*`` entries that ``mode`` 1 (after the first pass) or 2
    (after the bias-power pass) writes: ``PROJ``, ``CFG`` (mean-CFG), ``G1_*`` and ``V1`` (the
    probabilistic-guidance reweighting), ``DAMP`` and ``ALPHA`` (for the bias-power pass),
    ``GA_*`` and ``VA`` (the 2nd-order reweighting). Float64 arithmetic."""
    B = coef.shape[0]
    mean = stats.double().view(B, npb, N_STAT).sum(1)
    V = mean[:, STAT_VAR] / HW
    dm, mm, dd = mean[:, STAT_D_MC] / (C * HW), mean[:, STAT_MC_MC] / (C * HW), mean[:, STAT_D_D] / (C * HW)
    out = coef.clone()
    proj = amount * dm / mm.clamp(min=1e-6)
    pg = (dd - 2 * proj * dm + proj * proj * mm).clamp(min=0)  # <db, db>, db = d - proj m_c
    alpha = scale * torch.sqrt(V / pg.clamp(min=1e-6)) if prob else torch.zeros_like(V)
    if mode == 1:
        if uncond:
            out[:, COEF_PROJ] = proj.float()
        if meancfg:
            out[:, COEF_CFG] = scale - 1
        if prob:
            vt = V * (1 - scale * scale)  # op 4: target / cond
            n4 = (V - vt).clamp(min=1e-6)
            out[:, COEF_G1_MC], out[:, COEF_G1_DB], out[:, COEF_V1] = (
                ((V - vt) / n4).float(),
                (V * alpha / n4).float(),
                (vt * V / n4).float(),
            )
    if order2:
        E = V * ((scale * scale * cb * cb if prob else 0.0) + ca)
        damp = torch.sqrt((1 - E / (h_prev * h_prev)).clamp(min=0)) * (0.5 * h / h_prev)
        if mode == 1 and bias_pass:
            out[:, COEF_DAMP], out[:, COEF_ALPHA] = damp.float(), alpha.float()
        else:
            P = mean[:, STAT_BIAS] / (C * HW) if mode == 2 else damp * damp * mean[:, STAT_E_E] / (C * HW)
            cap = torch.sqrt((V / P.clamp(min=1e-6)).clamp(max=1))
            rho = (P / V.clamp(min=1e-6)).clamp(min=rho_min, max=1 - rho_min)
            out[:, COEF_GA_DB], out[:, COEF_GA_E], out[:, COEF_VA] = (
                (cap * alpha / rho).float(),
                (cap * damp / rho).float(),
                (V * (1 - rho) / rho).float(),
            )
    return out


def second_order_bias(
    mean_now: torch.Tensor,
    mean_prev: torch.Tensor,
    V: torch.Tensor,
    h: Sigma,
    h_prev: Sigma,
    scale: float = 0.0,
    cfg_bias: torch.Tensor | None = None,
    ca: float = 0.005,
    cb: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2nd-order rule of docs/solvers.md#2nd-order on whole tensors: the host-side form that the
    scheduler objects and ``gmkernels.compat`` apply (the fused kernel keeps its own in-kernel copy,
    ``step_coefficients`` above is its twin).

    Args:
        mean_now: ``(*B, C, H, W)`` mean of this step's (guided) x0-GM.
        mean_prev: ``(*B, C, H, W)`` the previous step's x0-GM carried to this state (op 6).
        V: ``(*B, 1, 1, 1)`` the base GM's variance averaged over the pixels.
        h, h_prev: this and the previous step's length in sigma units (``t / T``).
        scale: the probabilistic-guidance scale (0 without it). cfg_bias: its bias
            ``(*B, C, H, W)``, added to the 2nd-order one, or None.
        ca, cb: the error-power coefficients of ``E = V * (scale^2 * cb^2 + ca)``.
    Returns:
        ``(bias, P, mean_diff)``: the total bias with its power capped at ``V``, the power
        ``P (*B, 1, 1, 1)`` of the uncapped total (the base variance shrinks by ``1 - P / V``), and
        the damped mean difference ``(mean_now - mean_prev) * 0.5 * h / h_prev * sqrt(max(0, 1 -
        E / h_prev^2))``.
    """
    E = V * (scale * scale * cb * cb + ca)
    damp = torch.sqrt((1 - E / (h_prev * h_prev)).clamp(min=0)) * (0.5 * h / h_prev)
    mean_diff = (mean_now - mean_prev) * damp
    bias = mean_diff if cfg_bias is None else mean_diff + cfg_bias
    P = bias.square().mean(dim=(-3, -2, -1), keepdim=True)
    return bias * torch.sqrt((V / P.clamp(min=1e-6)).clamp(max=1)), P, mean_diff
