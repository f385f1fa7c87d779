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

    ``v = inf`` carries no information: ``mu'_k = mu_k``, ``logstds' = logstds`` and the
    log-weights are renormalised (``v / n`` is taken as 1 there, not ``inf / inf``). A pixel
    whose components are all dead gives NaN log-weights (it is not a GM).

    Returns:
        A GM; ``logstds'`` is ``(*B, 1, 1, 1, 1)`` for a per-sample ``var`` and
        ``(*B, 1, 1, H, W)`` for a per-pixel one.
    """
    r = gaussian_power / gm_power
    g = gaussian["mean"].unsqueeze(-4)  # (*B, 1, C, H, W)
    v = gaussian["var"].unsqueeze(-4)  # (*B, 1, 1, H|1, W|1)
    s2 = torch.exp(2 * gm["logstds"])  # (*B, 1, 1, 1|H, 1|W)
    n = (v + r * s2).clamp(min=eps)
    # ratios first: no overflow for huge v or s2; an infinite v is no information (v / n would be NaN)
    means = torch.where(v == float("inf"), 1.0, v / n) * gm["means"] + (r * s2 / n) * g
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

    An infinite variance carries no information: in the ratios ``(v1, v2) = (inf, finite)``
    stands as ``(1, 0)`` (the limit ``v1 -> inf``: the product is ``N(m2, v2 / power2)``, the
    other factor for ``power2 = 1``), ``(finite, inf)`` as ``(0, 1)`` and ``(inf, inf)`` as
    ``(1, 1)`` (the limit of equal variances: ``var = inf``, ``mean = (power1 * m1 + power2 * m2)
    / (power1 + power2)``).

    Returns:
        ``{mean (*B, C, H, W), var}`` with ``var`` the broadcast shape of ``v1`` and ``v2``.
    """
    v1, v2 = g1["var"], g2["var"]
    inf1, inf2 = v1 == float("inf"), v2 == float("inf")
    u1 = torch.where(inf1, 1.0, torch.where(inf2, 0.0, v1))
    u2 = torch.where(inf2, 1.0, torch.where(inf1, 0.0, v2))
    n = (power1 * u2 + power2 * u1).clamp(min=eps)
    w1, w2 = u2 / n, u1 / n  # ratios first: no overflow for huge variances
    return {"mean": power1 * w1 * g1["mean"] + power2 * w2 * g2["mean"], "var": torch.where(inf1, v2 * w2, v1 * w1)}
