"""GM log-density and the GM negative log-likelihood training loss (docs/ops.md#likelihood)."""

from __future__ import annotations

import math

import torch

from ._util import Sigma
from .transition import reverse_transition, u_to_x0


def gm_logprob(gm: dict, samples: torch.Tensor) -> torch.Tensor:
    """Log-density of ``N`` samples per pixel under the per-pixel GM.

    ``log p(y) = logsumexp_k(logweights_k + sum_c(-0.5 * ((y_c - mu_kc) / s)^2) - C * logstds
    - 0.5 * C * log(2 pi))``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``.
        samples: ``(*B, N, C, H, W)``.
    Returns:
        ``(*B, N, H, W)``.
    """
    C = gm["means"].shape[-3]
    y = samples.unsqueeze(-4)  # (*B, N, 1, C, H, W)
    mu = gm["means"].unsqueeze(-5)  # (*B, 1, K, C, H, W)
    logstds = gm["logstds"].unsqueeze(-5)  # (*B, 1, 1, 1, 1|H, 1|W)
    sq = (((y - mu) * torch.exp(-logstds)) ** 2).sum(dim=-3)  # (*B, N, K, H, W)
    comp = -0.5 * sq - C * logstds.squeeze(-3) - 0.5 * C * math.log(2 * math.pi)
    return torch.logsumexp(gm["logweights"].squeeze(-3).unsqueeze(-4) + comp, dim=-3)


def gm_nll_loss(gm: dict, target: torch.Tensor, eps: float = 1e-4, reduction: str = "mean") -> torch.Tensor:
    """GM negative log-likelihood, per pixel (no ``2 pi`` constant):

    ``-logsumexp_k(logweights_k + sum_c(-0.5 * ((y_c - mu_kc) * istd)^2 - logstds))`` with
    ``istd = min(exp(-logstds), 1 / eps)``; a dead component (log-weight ``-inf``) contributes
    nothing, also at a zero std.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``.
        target: ``(*B, C, H, W)``.
        reduction: ``"mean"`` or ``"sum"`` over all ``(*B, H, W)`` pixels, or ``"none"``.
    Returns:
        A scalar, or ``(*B, H, W)`` for ``reduction="none"``.
    """
    logstds = gm["logstds"]
    istd = torch.exp(-logstds).clamp(max=1 / eps)
    sq = ((target.unsqueeze(-4) - gm["means"]) * istd).square()  # (*B, K, C, H, W)
    comp = (-0.5 * sq - logstds).sum(dim=-3)  # (*B, K, H, W)
    # a dead component has no mass and gets no gradient, also where a zero std makes comp +inf
    # (docs/numerics.md#likelihood)
    logweights = gm["logweights"].squeeze(-3)
    logits = torch.where(logweights == -math.inf, -math.inf, logweights + comp)
    loss = -torch.logsumexp(logits, dim=-3)  # (*B, H, W)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def gm_nll_loss_backward(gm: dict, target: torch.Tensor, grad_loss: torch.Tensor, eps: float = 1e-4) -> dict:
    """Closed-form gradients of the per-pixel NLL (``reduction="none"``), the math of the fused
    backward kernel.

    With ``d_kc = (y_c - mu_kc) * istd``, ``q_k = sum_c d_kc^2``, the component log-likelihood
    ``l_k = logweights_k - 0.5 * q_k - C * logstds`` and the responsibility
    ``r_k = exp(l_k - logsumexp_k l_k)``, the loss is ``-logsumexp_k l_k`` and, for an upstream
    gradient ``g`` per pixel:

    * ``dL/dlogweights_k = -g * r_k`` (0 for a dead component, ``logweights_k = -inf``);
    * ``dL/dmu_kc = -g * r_k * d_kc * istd``;
    * ``dL/dlogstds = -g * sum_k r_k * (q_k * [exp(-logstds) <= 1/eps] - C)``, summed over the
      pixels that share the log-std (the clamp ``istd = min(exp(-logstds), 1/eps)`` has no
      gradient where it is active).

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1) | (*B, 1, 1, H, W), logweights}``.
        target: ``(*B, C, H, W)``.
        grad_loss: ``(*B, H, W)``, the gradient of the per-pixel loss.
    Returns:
        ``{means, logstds, logweights}`` gradients, shaped like the GM's tensors.
    """
    logstds = gm["logstds"]
    C = gm["means"].shape[-3]
    istd = torch.exp(-logstds).clamp(max=1 / eps)
    active = (torch.exp(-logstds) <= 1 / eps).to(logstds.dtype)
    d = (target.unsqueeze(-4) - gm["means"]) * istd  # (*B, K, C, H, W)
    q = d.square().sum(dim=-3, keepdim=True)  # (*B, K, 1, H, W)
    r = torch.softmax(gm["logweights"] - 0.5 * q, dim=-4)  # the -C * logstds term cancels
    r = torch.where(gm["logweights"] == -math.inf, 0.0, r)  # a dead component: 0, also in a pixel of no live one
    gr = -grad_loss.unsqueeze(-3).unsqueeze(-4) * r  # (*B, K, 1, H, W)
    g_logstds = (gr * (q * active - C)).sum(dim=-4, keepdim=True)  # (*B, 1, 1, H, W)
    if logstds.shape[-2:] != g_logstds.shape[-2:]:
        g_logstds = g_logstds.sum(dim=(-2, -1), keepdim=True)
    return {"means": gr * d * istd, "logstds": g_logstds, "logweights": gr}


def transition_loss(
    gm_u: dict,
    x_t_high: torch.Tensor,
    t_high: Sigma,
    x_t_low: torch.Tensor,
    t_low: Sigma,
    eps: float = 1e-4,
    reduction: str = "mean",
) -> torch.Tensor:
    """GMFlow transition loss: NLL of ``x_t_low`` under the GM of ``x_{t_low}`` given ``x_t_high``.

    With ``sigma = t / 1000``: the u-GM predicted at ``(x_t_high, t_high)`` becomes the x0-GM
    ``u_to_x0(gm_u, x_t_high, sigma_high)``, which the exact reverse transition carries to
    ``reverse_transition(gm_x0, x_t_high, sigma_high, sigma_low)``; the loss is
    ``gm_nll_loss(that GM, x_t_low, eps, reduction)`` (``t_low == 0`` is plain x0 NLL).

    Args:
        gm_u: ``{means (*B, K, C, H, W), logstds, logweights}`` over the velocity.
        x_t_high, x_t_low: ``(*B, C, H, W)``.
        t_high, t_low: timesteps in ``[0, 1000]``, floats or tensors broadcastable to
            ``(*B, 1, 1, 1)``, ``t_low <= t_high``.
    """
    sigma_high, sigma_low = t_high / 1000, t_low / 1000
    gm_x0 = u_to_x0(gm_u, x_t_high, sigma_high)
    gm_low = reverse_transition(gm_x0, x_t_high, sigma_high, sigma_low)
    return gm_nll_loss(gm_low, x_t_low, eps, reduction)
