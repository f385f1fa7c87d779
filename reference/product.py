"""Products of densities: GM x isotropic Gaussian (posterior reweighting) and Gaussian x
Gaussian (docs/ops.md#products).

Shapes: GM as in ``reference.mixture``; a Gaussian is ``{mean (*B, C, H, W), var}`` with
``var (*B, 1, H, W)`` or ``(*B, 1, 1, 1)``.
"""

from __future__ import annotations

import torch


def gm_mul_iso_gaussian(
    gm: dict, gaussian: dict, gm_power: float = 1.0, gaussian_power: float = 1.0, eps: float = 1e-6
) -> dict:
    """Normalised product ``p_gm^a * N(g, v)^b`` with ``a = gm_power``, ``b = gaussian_power``.

    With ``r = b / a`` and ``n = max(v + r * s2, eps)`` (``s2 = exp(2 * logstds)``)::

        mu'_k        = (v * mu_k + r * s2 * g) / n
        logweights'  = log_softmax_k(logweights_k - 0.5 * r / n * sum_c (mu_k - g)^2)
                     = log_softmax_k(logweights_k - 0.5 * r / n * sum_c (mu_k - mu_0)((mu_k - g) + (mu_0 - g)))
        logstds'     = logstds + 0.5 * log(v) - 0.5 * log(n)

    Returns:
        A GM; ``logstds'`` is ``(*B, 1, 1, 1, 1)`` for a per-sample ``var`` and
        ``(*B, 1, 1, H, W)`` for a per-pixel one.
    """
    r = gaussian_power / gm_power
    g = gaussian["mean"].unsqueeze(-4)  # (*B, 1, C, H, W)
    v = gaussian["var"].unsqueeze(-4)  # (*B, 1, 1, H|1, W|1)
    s2 = torch.exp(2 * gm["logstds"])  # (*B, 1, 1, 1|H, 1|W)
    n = (v + r * s2).clamp(min=eps)
    means = (v / n) * gm["means"] + (r * s2 / n) * g  # ratios first: no overflow for huge v or s2
    # sum_c (mu_k - g)^2 less its k-independent part sum_c (mu_0 - g)^2, which log_softmax drops
    # anyway: when g is far from the components (a short posterior step) this keeps fp32 logits
    # small, and when g and the components share a large offset every difference is exact.
    mu0 = gm["means"][..., :1, :, :, :]
    dist2 = ((gm["means"] - mu0) * ((gm["means"] - g) + (mu0 - g))).sum(dim=-3, keepdim=True)  # (*B, K, 1, H, W)
    logweights = torch.log_softmax(gm["logweights"] - 0.5 * r / n * dist2, dim=-4)
    # 0.5 * log(v) - 0.5 * log(n) = -0.5 * log1p(n / v - 1): accurate when the Gaussian is broad
    logstds = gm["logstds"] - 0.5 * torch.log1p(torch.maximum(r * s2 / v, eps / v - 1))
    return {"means": means, "logstds": logstds, "logweights": logweights}


def iso_gaussian_mul_iso_gaussian(
    g1: dict, g2: dict, power1: float = 1.0, power2: float = 1.0, eps: float = 1e-6
) -> dict:
    """Normalised product ``N(m1, v1)^power1 * N(m2, v2)^power2``; a power of -1 divides.

    ``n = max(power1 * v2 + power2 * v1, eps)``, ``var = v1 * v2 / n``,
    ``mean = (power1 * v2 * m1 + power2 * v1 * m2) / n``.

    Returns:
        ``{mean (*B, C, H, W), var}`` with ``var`` the broadcast shape of ``v1`` and ``v2``.
    """
    v1, v2 = g1["var"], g2["var"]
    n = (power1 * v2 + power2 * v1).clamp(min=eps)
    w1, w2 = v2 / n, v1 / n  # ratios first: no overflow for huge variances
    return {"mean": power1 * w1 * g1["mean"] + power2 * w2 * g2["mean"], "var": v1 * w1}
