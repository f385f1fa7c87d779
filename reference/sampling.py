"""Ancestral sampling from a per-pixel GM (docs/ops.md#gm_sample)."""

from __future__ import annotations

import torch

from ._util import scaled_logits


def sample_components(
    logweights: torch.Tensor, n_samples: int, power: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``n_samples`` component indices per pixel from ``softmax_k(power * logweights)`` by
    inverting the categorical CDF at a uniform draw.

    Args:
        logweights: ``(*B, K, 1, H, W)``.
    Returns:
        ``(*B, N, 1, H, W)`` int64 indices in ``[0, K)``; never a dead component.
    """
    *batch, K, _, H, W = logweights.shape
    w = torch.softmax(scaled_logits(logweights, power), dim=-4)  # (*B, K, 1, H, W)
    cdf = torch.cumsum(w, dim=-4).movedim(-4, -1)  # (*B, 1, H, W, K)
    u = torch.rand((*batch, 1, H, W, n_samples), generator=generator, dtype=w.dtype, device=w.device)
    u = u * cdf[..., -1:]  # the CDF's own total, so rounding never runs past the last live one
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(max=K - 1)
    return idx.movedim(-1, -4)  # (*B, N, 1, H, W)


def gm_sample(
    gm: dict, n_samples: int = 1, power: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``n_samples`` samples per pixel: component ``k ~ softmax(power * logweights)``, then
    ``mu_k + exp(logstds) * z`` with ``z ~ N(0, I)``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``.
    Returns:
        ``(*B, N, C, H, W)``.
    """
    means = gm["means"]
    *batch, K, C, H, W = means.shape
    idx = sample_components(gm["logweights"], n_samples, power, generator)  # (*B, N, 1, H, W)
    mu = torch.gather(means, -4, idx.expand(*batch, n_samples, C, H, W))  # (*B, N, C, H, W)
    z = torch.randn((*batch, n_samples, C, H, W), generator=generator, dtype=means.dtype, device=means.device)
    return mu + torch.exp(gm["logstds"]) * z
