"""GM policies of pi-Flow: the velocity of a fixed x0-GM at any state, and its Euler rollout.

A policy is a u-GM predicted at ``(x_src, sigma_src)`` and turned into an x0-GM (op 5):
``mu_k = x_src - sigma_src * u_k``, variance ``s2 = exp(2 * logstd) * sigma_src^2`` (times a
temperature), log-weights ``l_k``. Its velocity at ``(x, sigma)`` is ``u = (x - x0_hat) / sigma``
with ``x0_hat`` the posterior mean of x0 at the new state, in the form of the public pi-Flow code
(with ``a = 1 - sigma`` and both sigmas floored at ``eps``)::

    zeta = (a / sigma)^2 - (a_src / sigma_src)^2
    nu   = a * x / sigma^2 - a_src * x_src / sigma_src^2          # (C,) per pixel
    d    = max(s2 * zeta + 1, eps)
    mu'_k = (s2 * nu + mu_k) / d
    D_k   = sum_c mu_kc * (nu_c - zeta * mu_kc / 2) / d
    x0_hat = sum_k softmax_k(l + D)_k * mu'_k

Shapes (``*S`` the spatial dims, ``(H, W)`` or ``(T, H, W)``): ``means_u (B, K, C, *S)``,
``gm_vars (B,)``, ``logweights (B, K, 1, *S)``, states ``(B, C, *S)``, sigmas ``(B,)``.
"""

from __future__ import annotations

from typing import Callable

import torch


def _per_sample(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B,)`` viewed as ``(B, 1, ..., 1)`` with ``ndim`` dims."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def policy_x0_means(means_u: torch.Tensor, x_src: torch.Tensor, sigma_src: torch.Tensor) -> torch.Tensor:
    """Op 5 on the means: ``x_src - sigma_src * u_k``, ``(B, K, C, *S)``."""
    return x_src.unsqueeze(1) - _per_sample(sigma_src, means_u.dim()) * means_u


def policy_pi(
    means_u: torch.Tensor,
    gm_vars: torch.Tensor,
    logweights: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The policy's velocity ``u = (x - x0_hat) / max(sigma, eps)`` at ``(x, sigma)``.

    Args:
        means_u: ``(B, K, C, *S)`` means of the u-GM predicted at ``(x_src, sigma_src)``.
        gm_vars: ``(B,)`` variance of the x0-GM (``exp(2 * logstd_u) * sigma_src^2``).
        logweights: ``(B, K, 1, *S)``.
        x_src, x: ``(B, C, *S)``.
        sigma_src, sigma: ``(B,)``.
    Returns:
        ``(B, C, *S)``.
    """
    nd = x.dim()
    mu = policy_x0_means(means_u, x_src, sigma_src)  # (B, K, C, *S)
    s_src = _per_sample(sigma_src.clamp(min=eps), nd)
    s = _per_sample(sigma.clamp(min=eps), nd)
    a_src, a = 1 - s_src, 1 - s
    zeta = (a / s) ** 2 - (a_src / s_src) ** 2  # (B, 1, ..., 1)
    nu = a * x / s**2 - a_src * x_src / s_src**2  # (B, C, *S)
    s2 = _per_sample(gm_vars, nd)
    d = (s2 * zeta + 1).clamp(min=eps)
    mu_post = (s2.unsqueeze(1) * nu.unsqueeze(1) + mu) / d.unsqueeze(1)
    delta = (mu * (nu.unsqueeze(1) - 0.5 * zeta.unsqueeze(1) * mu)).sum(dim=2, keepdim=True) / d.unsqueeze(1)
    w = torch.softmax(logweights + delta, dim=1)  # (B, K, 1, *S)
    x0 = (w * mu_post).sum(dim=1)
    return (x - x0) / s


def rollout_sigmas(
    sigma_start: torch.Tensor,
    raw_t_start: torch.Tensor,
    raw_t_end: torch.Tensor,
    total_substeps: int,
    warp: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise-level tables of a rollout, built with tensor ops only (no host reads).

    Sample ``b`` takes ``n_b = max(ceil((raw_t_start - raw_t_end) * total_substeps), 1)`` substeps
    of raw size ``h_b = (raw_t_start - raw_t_end) / n_b``; ``raw_j = max(raw_t_start - j * h_b, 0)``
    for ``j <= n_b`` and held at ``raw_{n_b}`` after it, ``sigma_j = warp(raw_j)``, except
    ``sigma_0 = sigma_start``.

    Args:
        sigma_start, raw_t_start, raw_t_end: ``(B,)``.
        warp: elementwise map from raw time to sigma.
    Returns:
        ``sigmas (B, total_substeps + 1)`` and ``n (B,)`` int64 substep counts (``<= total_substeps``
        when ``raw_t_start - raw_t_end <= 1``).
    """
    delta = raw_t_start - raw_t_end
    n = torch.ceil(delta * total_substeps).to(torch.int64).clamp(min=1, max=total_substeps)
    h = delta / n
    j = torch.arange(total_substeps + 1, device=raw_t_start.device)
    j = torch.minimum(j[None, :], n[:, None]).to(raw_t_start.dtype)
    raw = (raw_t_start[:, None] - j * h[:, None]).clamp(min=0)
    sigmas = warp(raw)
    sigmas = torch.cat([sigma_start[:, None].to(sigmas.dtype), sigmas[:, 1:]], dim=1)
    return sigmas, n


def policy_rollout(
    means_u: torch.Tensor,
    gm_vars: torch.Tensor,
    logweights: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    x_start: torch.Tensor,
    sigmas: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Euler rollout of the policy along per-sample tables: for ``j < N``,
    ``x <- x + pi(x, sigmas[:, j]) * (sigmas[:, j + 1] - sigmas[:, j])``; a sample whose table has
    ended (``sigmas[:, j + 1] == sigmas[:, j]``) keeps its state exactly.

    Args:
        sigmas: ``(B, N + 1)`` from ``rollout_sigmas``.
    Returns:
        ``(B, C, *S)``: the state at ``sigmas[:, N]``.
    """
    nd = x_start.dim()
    x = x_start
    for j in range(sigmas.shape[1] - 1):
        s_j, s_n = sigmas[:, j], sigmas[:, j + 1]
        u = policy_pi(means_u, gm_vars, logweights, x_src, sigma_src, x, s_j, eps)
        x = torch.where(_per_sample(s_n != s_j, nd), x + u * _per_sample(s_n - s_j, nd), x)
    return x


def gm_temperature(logweights: torch.Tensor, gm_vars: torch.Tensor, temperature: float, eps: float = 1e-6):
    """Temperature ``T`` of the public pi-Flow code: ``log_softmax(logweights / T)`` over K and the
    variance times ``T`` (``T`` floored at ``eps``). Returns ``(logweights, gm_vars)``."""
    t = max(float(temperature), eps)
    return torch.log_softmax(logweights / t, dim=1), gm_vars * t
