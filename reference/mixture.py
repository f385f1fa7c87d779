"""Mixture moments: the mean of a GM and its moment-matched isotropic Gaussian (docs/ops.md#mixture-moments).

Shapes: ``means (*B, K, C, H, W)``, ``logstds (*B, 1, 1, 1, 1)``, ``logweights (*B, K, 1, H, W)``.
"""

from __future__ import annotations

import torch

from ._util import scaled_logits


def gm_to_mean(gm: dict, power: float = 1.0) -> torch.Tensor:
    """Mean of the tempered mixture: ``sum_k softmax_k(power * logweights) * mu_k``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``.
        power: temperature on the weights, >= 0 (0 gives the plain average of live components).
    Returns:
        ``(*B, C, H, W)``.
    """
    w = torch.softmax(scaled_logits(gm["logweights"], power), dim=-4)  # (*B, K, 1, H, W)
    return (w * gm["means"]).sum(dim=-4)


def gm_to_iso_gaussian(gm: dict) -> dict:
    """Moment-matched isotropic Gaussian of a GM.

    ``mean = sum_k w_k mu_k``;  ``var = mean_c(sum_k w_k (mu_k - mean)^2) + exp(2 * logstds)``.

    Returns:
        ``{mean (*B, C, H, W), var (*B, 1, H, W)}`` (``var`` per pixel when ``logstds`` is).
    """
    w = torch.softmax(gm["logweights"], dim=-4)  # (*B, K, 1, H, W)
    mean = (w * gm["means"]).sum(dim=-4)  # (*B, C, H, W)
    diff2 = (gm["means"] - mean.unsqueeze(-4)).square()  # (*B, K, C, H, W)
    between = (w * diff2).sum(dim=-4).mean(dim=-3, keepdim=True)  # (*B, 1, H, W)
    var = between + torch.exp(2 * gm["logstds"]).squeeze(-4)  # (*B, 1, H, W)
    return {"mean": mean, "var": var}
