"""1-D mixture inverse CDF and the Knothe-Rosenblatt (KR) transports between standard-normal and
GM samples (docs/ops.md#inverse-cdf-and-transports), following the conventions of the public GMFlow code (``gmflow_ops``).

CDFs are *scaled* to ``[-1, 1]``: ``F(x) = sum_k w_k erf((x - mu_k) / (s sqrt 2)) = 2 cdf(x) - 1``,
so a standard-normal ``z`` has ``F = erf(z / sqrt 2)``.

1-D GM shapes: ``means (*B, K, H, W)``, ``logstds (*B, 1, 1, 1)`` (or ``(*B, 1, H, W)``),
``logweights (*B, K, H, W)``, samples and scaled CDFs ``(*B, N, H, W)``; batch dims broadcast.
Weights are ``softmax_k(logweights)`` (a no-op on normalised log-weights; the KR slices are not
normalised).

KR transport of a C-channel GM: rotate channels into the eigenbasis ``V`` of the GM's covariance
(``kr_basis``: GMFlow's float32 ``eigh``, eigenvalues descending; shared by all pixels of a batch
element when ``axis_aligned``), then for
axis ``c = 0 .. C-1`` in turn solve the 1-D inverse CDF of the conditional mixture of axis ``c``
given the axes before it, whose log-weights are
``logweights_k - 0.5 * sum_{c' < c} ((x_c' - mu_kc') / s)^2``.
"""

from __future__ import annotations

import math

import torch

_SQRT2 = math.sqrt(2.0)


def gm1d_pdf_cdf(gm1d: dict, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Density and scaled CDF of a 1-D GM at ``samples``.

    Args:
        gm1d: ``{means (*B, K, H, W), logstds (*B, 1, 1|H, 1|W), logweights (*B, K, H, W)}``.
        samples: ``(*B, N, H, W)``.
    Returns:
        ``(pdf, cdf)``, each ``(*B, N, H, W)``; ``cdf = 2 * P(X <= x) - 1`` in ``[-1, 1]``.
    """
    w = torch.softmax(gm1d["logweights"], dim=-3).unsqueeze(-4)  # (*B, 1, K, H, W)
    logstds = gm1d["logstds"].unsqueeze(-4)  # (*B, 1, 1, 1|H, 1|W)
    d = (samples.unsqueeze(-3) - gm1d["means"].unsqueeze(-4)) * torch.exp(-logstds)  # (*B, N, K, H, W)
    pdf = (w * torch.exp(-0.5 * d.square() - logstds)).sum(dim=-3) / math.sqrt(2 * math.pi)
    cdf = (w * torch.erf(d / _SQRT2)).sum(dim=-3)
    return pdf, cdf


def gm1d_moments(gm1d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a 1-D GM: ``sum_k w_k mu_k`` and ``sum_k w_k (mu_k - mean)^2 + s^2``,
    each ``(*B, 1, H, W)``."""
    w = torch.softmax(gm1d["logweights"], dim=-3)
    mean = (w * gm1d["means"]).sum(dim=-3, keepdim=True)
    var = (w * (gm1d["means"] - mean).square()).sum(dim=-3, keepdim=True) + torch.exp(2 * gm1d["logstds"])
    return mean, var


def gm1d_inverse_cdf(
    gm1d: dict,
    scaled_cdfs: torch.Tensor,
    n_steps: int = 8,
    eps: float = 1e-6,
    max_step_size: float = 1.5,
    gaussian_samples: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse scaled CDF of a 1-D GM by Newton iterations.

    Start (not differentiated): ``x = mean + sqrt(var) * z`` with the moment-matched Gaussian and
    ``z = gaussian_samples`` or ``sqrt(2) * erfinv(clamp(scaled_cdfs, -1 + eps, 1 - eps))``.
    Then ``n_steps`` times: ``x -= clamp(0.5 * (F(x) - u) / max(pdf(x), eps), -r, r)`` with
    ``r = max_step_size * exp(logstds)``. Differentiable (autograd through the iterations) in
    ``means``, ``logstds``, ``logweights`` and ``scaled_cdfs``.

    Args:
        gm1d: ``{means (*B, K, H, W), logstds (*B, 1, 1|H, 1|W), logweights (*B, K, H, W)}``.
        scaled_cdfs: ``(*B, N, H, W)`` targets ``u`` in ``[-1, 1]``.
        gaussian_samples: optional ``(*B, N, H, W)`` with ``erf(z / sqrt 2) = u``.
    Returns:
        ``(*B, N, H, W)``.
    """
    with torch.no_grad():
        if gaussian_samples is None:
            gaussian_samples = torch.erfinv(scaled_cdfs.clamp(-1 + eps, 1 - eps)) * _SQRT2
        mean, var = gm1d_moments(gm1d)
        x = gaussian_samples * var.sqrt() + mean
    r = max_step_size * torch.exp(gm1d["logstds"])
    for _ in range(n_steps):
        pdf, cdf = gm1d_pdf_cdf(gm1d, x)
        delta = 0.5 * (cdf - scaled_cdfs) / pdf.clamp(min=eps)
        x = x - torch.maximum(torch.minimum(delta, r), -r)
    return x


def kr_basis(gm: dict, axis_aligned: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthonormal KR basis, the one of the public GMFlow code: eigenvectors (columns, eigenvalues
    descending) of the GM's full covariance per pixel ``sum_k w_k (mu_k - m)(mu_k - m)^T + s^2 I``,
    averaged over pixels when ``axis_aligned``. The covariance and ``torch.linalg.eigh`` are
    computed in float32 whatever the input dtype, as there, so each eigenvector comes with the
    sign ``eigh`` gives it on that device and seeded transports reproduce GMFlow's samples.
    Not differentiated.

    Where eigenvalues coincide (always when the spread has rank below C, e.g. ``C > K - 1`` for
    one pixel: the ``C - rank`` smallest all equal ``s^2``) any orthonormal basis of that
    eigenspace is an eigenbasis, and which one ``eigh`` returns depends on float32 rounding and
    on the LAPACK / cuSOLVER build; samples then agree with GMFlow's in their component along the
    distinct eigenvectors and in the length of the rest, and in distribution, not value by value.

    Returns:
        ``(*B, 1, 1, C, C)`` if ``axis_aligned`` else ``(*B, H, W, C, C)``, in ``dtype`` (default:
        the dtype of ``means``).
    """
    with torch.no_grad():
        means = gm["means"].float()
        C = means.shape[-3]
        w = torch.softmax(gm["logweights"].float(), dim=-4)  # (*B, K, 1, H, W)
        diff = means - (w * means).sum(dim=-4, keepdim=True)  # (*B, K, C, H, W)
        s2 = torch.exp(2 * gm["logstds"].float()).squeeze(-3).squeeze(-3)  # (*B, 1|H, 1|W)
        eye = torch.eye(C, dtype=torch.float32, device=means.device)
        cov = torch.einsum("...kchw,...kdhw->...hwcd", w * diff, diff) + s2[..., None, None] * eye  # (*B, H, W, C, C)
        if axis_aligned:
            cov = cov.mean(dim=(-4, -3), keepdim=True)
        return torch.linalg.eigh(cov)[1].flip(-1).to(dtype or gm["means"].dtype)


def to_basis(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates in ``basis``: ``x (*B, M, C, H, W)``, ``basis (*B, 1|H, 1|W, C, C)`` ->
    ``(*B, M, C, H, W)`` with ``out[.., d, h, w] = sum_c x[.., c, h, w] basis[.., h, w, c, d]``."""
    return torch.einsum("...mchw,...hwcd->...mdhw", x, basis)


def from_basis(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_basis`` (the basis is orthonormal)."""
    return torch.einsum("...mdhw,...hwcd->...mchw", x, basis)


def _slice_gm1d(gm: dict, c: int, acc: torch.Tensor | float) -> dict:
    """The 1-D conditional GM of axis ``c`` with batch ``(*B, N)``: means ``(*B, 1, K, H, W)``,
    log-weights ``(*B, N|1, K, H, W)`` given ``acc = sum_{c'<c} ((x_c' - mu_kc') / s)^2``."""
    return {
        "means": gm["means"][..., c, :, :].unsqueeze(-4),
        "logstds": gm["logstds"],
        "logweights": gm["logweights"].squeeze(-3).unsqueeze(-4) - 0.5 * acc,
    }


def _next_acc(gm: dict, c: int, x_c: torch.Tensor, acc: torch.Tensor | float) -> torch.Tensor:
    """``acc + ((x_c - mu_kc) / s)^2`` for ``x_c (*B, N, 1, H, W)`` -> ``(*B, N, K, H, W)``."""
    d = (x_c - gm["means"][..., c, :, :].unsqueeze(-4)) * torch.exp(-gm["logstds"])
    return acc + d.square()


def kr_gaussian_to_gm(
    gm: dict,
    gaussian_samples: torch.Tensor,
    n_steps: int = 16,
    eps: float = 1e-6,
    max_step_size: float = 1.5,
    scaled_cdfs: torch.Tensor | None = None,
) -> torch.Tensor:
    """KR transport along the channel axes as they are (no rotation): N(0, I) -> GM.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1|H, 1|W), logweights (*B, K, 1, H, W)}``.
        gaussian_samples: ``(*B, N, C, H, W)``.
        scaled_cdfs: optional ``(*B, N, C, H, W)`` targets; ``erf(z / sqrt 2)`` when ``None``.
    Returns:
        ``(*B, N, C, H, W)``: axis ``c`` is the inverse CDF at ``u_c`` of the conditional
        mixture given axes ``< c``, by ``gm1d_inverse_cdf`` with ``z_c`` as start.
    """
    acc: torch.Tensor | float = 0.0
    out = []
    for c in range(gm["means"].shape[-3]):
        z_c = gaussian_samples[..., c : c + 1, :, :]  # (*B, N, 1, H, W)
        u_c = torch.erf(z_c / _SQRT2) if scaled_cdfs is None else scaled_cdfs[..., c : c + 1, :, :]
        x_c = gm1d_inverse_cdf(_slice_gm1d(gm, c, acc), u_c, n_steps, eps, max_step_size, gaussian_samples=z_c)
        acc = _next_acc(gm, c, x_c, acc)
        out.append(x_c)
    return torch.cat(out, dim=-3)


def kr_gm_to_scaled_cdfs(gm: dict, gm_samples: torch.Tensor) -> torch.Tensor:
    """Scaled CDFs of the KR conditionals along the channel axes as they are (no rotation).

    Args:
        gm_samples: ``(*B, N, C, H, W)``.
    Returns:
        ``(*B, N, C, H, W)`` in ``[-1, 1]``: axis ``c`` is the scaled CDF of ``x_c`` under the
        conditional mixture given axes ``< c``.
    """
    acc: torch.Tensor | float = 0.0
    out = []
    for c in range(gm["means"].shape[-3]):
        x_c = gm_samples[..., c : c + 1, :, :]
        out.append(gm1d_pdf_cdf(_slice_gm1d(gm, c, acc), x_c)[1])
        acc = _next_acc(gm, c, x_c, acc)
    return torch.cat(out, dim=-3)


def _rotated_gm(gm: dict, basis: torch.Tensor) -> dict:
    return {"means": to_basis(gm["means"], basis), "logstds": gm["logstds"], "logweights": gm["logweights"]}


def gaussian_samples_to_gm_samples(
    gm: dict,
    gaussian_samples: torch.Tensor,
    n_steps: int = 16,
    eps: float = 1e-6,
    max_step_size: float = 1.5,
    axis_aligned: bool = True,
) -> torch.Tensor:
    """KR transport N(0, I) -> GM in the eigenbasis ``V = kr_basis(gm, axis_aligned)``.

    ``axis_aligned``: ``z`` is used as the coordinates in ``V`` directly (one ``V`` per batch
    element, so spatial correlation of the noise carries over); otherwise ``z`` is first rotated
    into the per-pixel ``V``. The result is rotated back: ``x = V x_rot``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``.
        gaussian_samples: ``(*B, N, C, H, W)``.
    Returns:
        ``(*B, N, C, H, W)``.
    """
    basis = kr_basis(gm, axis_aligned)
    z = gaussian_samples if axis_aligned else to_basis(gaussian_samples, basis)
    return from_basis(kr_gaussian_to_gm(_rotated_gm(gm, basis), z, n_steps, eps, max_step_size), basis)


def gm_samples_to_gaussian_samples(
    gm: dict, gm_samples: torch.Tensor, eps: float = 1e-6, axis_aligned: bool = True
) -> torch.Tensor:
    """KR transport GM -> N(0, I), the inverse of ``gaussian_samples_to_gm_samples``:
    ``z_rot = sqrt(2) * erfinv(clamp(F, -1 + eps, 1 - eps))`` of the conditional scaled CDFs of
    ``V^T x``, rotated back by ``V`` unless ``axis_aligned``.

    Args:
        gm_samples: ``(*B, N, C, H, W)``.
    Returns:
        ``(*B, N, C, H, W)``.
    """
    basis = kr_basis(gm, axis_aligned)
    u = kr_gm_to_scaled_cdfs(_rotated_gm(gm, basis), to_basis(gm_samples, basis))
    z = torch.erfinv(u.clamp(-1 + eps, 1 - eps)) * _SQRT2
    return z if axis_aligned else from_basis(z, basis)
