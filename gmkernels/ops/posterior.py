"""Posterior mean at a new state (docs/ops.md#gm_posterior_mean): ``gm_posterior_mean``, the mixture velocity of
the GM-ODE substeps.

Kernel: ``_gm_posterior_mean_kernel`` fuses ``transfer_gaussian`` (the Gaussian ``N(g, v)`` in
x0 that links the two states), the reweighting of ``gm_mul_iso_gaussian`` and ``gm_to_mean``.
It reads the GM, ``x_src`` and ``x_tgt`` once and writes only the ``(*B, C, H, W)`` mean: the
new means are affine in the old ones, ``(v / n) mu_k + (s2 / n) g``, so the kernel averages the
old means under the reweighted softmax and applies the affine map once per pixel.

A program owns ``BLOCK_P`` pixels of one batch row and one tile of ``BLOCK_C`` channels. A first
sweep over K finds each pixel's reference component ``r`` (largest naive posterior logit); the
second runs an online softmax over K tiles (``mixture.online_moments_update``) on logits taken
relative to ``r`` (``reference.posterior.gm_posterior_mean`` explains the conditioning; the
first sweep's reads mostly hit L2). The reweighting needs
``sum_c (mu_k - g)^2`` over every channel: when ``C <= BLOCK_C`` (16) the tile holds them all;
otherwise each program also walks the other channel tiles of its pixels for the distance term
(extra reads that the neighbouring programs of the same pixels, scheduled next to it, mostly
find in L2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

import reference.posterior as ref

from .._dispatch import run_reference
from .._validate import Sigma, check_gm, check_sigma_pair, check_state
from ._launch import (
    THREADS_ALONG_K,
    PlanCache,
    cdiv,
    gm_views,
    kernels_wanted,
    needs_int64,
    next_pow2,
    per_row,
    pixel_rows,
    planned_args,
)
from .mixture import online_moments_update, program_tile
from .product import _check_real

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _transfer_mean(xt_base, xs_base, offs_c, mask_cp, s_tc, s_sc, ct, cs):
        """``g = ct * x_tgt - cs * x_src`` for the channels ``offs_c`` ``[BC, BP]``."""
        xt = tl.load(xt_base + offs_c[:, None] * s_tc, mask=mask_cp, other=0.0).to(tl.float32)
        xs = tl.load(xs_base + offs_c[:, None] * s_sc, mask=mask_cp, other=0.0).to(tl.float32)
        return ct[None, :] * xt - cs[None, :] * xs

    @triton.jit(
        do_not_specialize=[
            "P",
            "s_mr",
            "s_mk",
            "s_mc",
            "s_lr",
            "s_lk",
            "s_xsr",
            "s_xsc",
            "s_xtr",
            "s_xtc",
            "s_or",
            "s_oc",
        ]
    )
    def _gm_posterior_mean_kernel(
        means_ptr,
        lw_ptr,
        logstds_ptr,
        xs_ptr,
        xt_ptr,
        sig_s_ptr,
        sig_t_ptr,
        out_ptr,
        K,
        C,
        P,
        n_pblocks,
        n_ctiles,
        s_mr,
        s_mk,
        s_mc,
        s_mp,
        s_lr,
        s_lk,
        s_lp,
        s_sr,
        s_sp,
        s_xsr,
        s_xsc,
        s_xsp,
        s_xtr,
        s_xtc,
        s_xtp,
        s_ssr,
        s_ssp,
        s_str,
        s_stp,
        s_or,
        s_oc,
        s_op,
        eps,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        SINGLE_C: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """Posterior mean ``(R, C, P)``. Grid: ``R * n_pblocks * n_ctiles``, channel tile fastest."""
        row, cb, offs_p, ar_k, ar_c = program_tile(n_pblocks, n_ctiles, BLOCK_K, BLOCK_C, BLOCK_P, INT64)
        mask_p = offs_p < P
        # transfer Gaussian N(g, v) and the product coefficients, per pixel
        ss = tl.load(sig_s_ptr + row * s_ssr + offs_p * s_ssp, mask=mask_p, other=1.0).to(tl.float32)
        st = tl.load(sig_t_ptr + row * s_str + offs_p * s_stp, mask=mask_p, other=1.0).to(tl.float32)
        a_s = 1.0 - ss
        a_t = 1.0 - st
        d = tl.maximum((a_t * ss) * (a_t * ss) - (a_s * st) * (a_s * st), eps)
        ct = a_t * ss * ss / d
        cs = a_s * st * st / d
        v = (st * ss) * (st * ss) / d
        logstd = tl.load(logstds_ptr + row * s_sr + offs_p * s_sp, mask=mask_p, other=0.0).to(tl.float32)
        s2 = tl.exp(2.0 * logstd)
        n = tl.maximum(v + s2, eps)
        coef2 = (-0.5 * 1.4426950408889634) / n

        m_base = means_ptr + row * s_mr + offs_p[None, None, :] * s_mp
        l_base = lw_ptr + row * s_lr + offs_p[None, :] * s_lp
        xt_base = xt_ptr + row * s_xtr + offs_p[None, :] * s_xtp
        xs_base = xs_ptr + row * s_xsr + offs_p[None, :] * s_xsp
        offs_c = cb * BLOCK_C + ar_c
        mask_cp = (offs_c < C)[:, None] & mask_p[None, :]
        g = _transfer_mean(xt_base, xs_base, offs_c, mask_cp, s_xtc, s_xsc, ct, cs)
        # the reference component: largest naive posterior logit l_k - |mu_k - g|^2 / (2n) (pass 1)
        best = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        k_best = tl.zeros([BLOCK_P], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + ar_k
            mask_k = offs_k < K
            if SINGLE_C:
                mu = tl.load(
                    m_base + offs_k[:, None, None] * s_mk + offs_c[None, :, None] * s_mc,
                    mask=mask_k[:, None, None] & mask_cp[None, :, :],
                    other=0.0,
                ).to(tl.float32)
                q = tl.sum((mu - g[None, :, :]) * (mu - g[None, :, :]), axis=1)
            else:
                q = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    offs_c2 = c0 + ar_c
                    mask_cp2 = (offs_c2 < C)[:, None] & mask_p[None, :]
                    mu_c = tl.load(
                        m_base + offs_k[:, None, None] * s_mk + offs_c2[None, :, None] * s_mc,
                        mask=mask_k[:, None, None] & mask_cp2[None, :, :],
                        other=0.0,
                    ).to(tl.float32)
                    g_c = _transfer_mean(xt_base, xs_base, offs_c2, mask_cp2, s_xtc, s_xsc, ct, cs)
                    q += tl.sum((mu_c - g_c[None, :, :]) * (mu_c - g_c[None, :, :]), axis=1)
            lw = tl.load(l_base + offs_k[:, None] * s_lk, mask=mask_k[:, None] & mask_p[None, :], other=float("-inf"))
            naive = tl.where(
                mask_k[:, None], lw.to(tl.float32) * 1.4426950408889634 + coef2[None, :] * q, float("-inf")
            )
            t_best = tl.max(naive, axis=0)
            t_k = tl.min(tl.where(naive == t_best[None, :], offs_k[:, None], K), axis=0).to(tl.int32)
            take = t_best > best
            k_best = tl.where(take, t_k, k_best)
            best = tl.where(take, t_best, best)
        if INT64:
            r_base = m_base + k_best.to(tl.int64)[None, None, :] * s_mk
        else:
            r_base = m_base + k_best[None, None, :] * s_mk
        if SINGLE_C:
            mu0 = tl.load(r_base + offs_c[None, :, None] * s_mc, mask=mask_cp[None, :, :], other=0.0).to(tl.float32)
            shift = mu0 - g[None, :, :]
        m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + ar_k
            mask_k = offs_k < K
            mu = tl.load(
                m_base + offs_k[:, None, None] * s_mk + offs_c[None, :, None] * s_mc,
                mask=mask_k[:, None, None] & mask_cp[None, :, :],
                other=0.0,
            ).to(tl.float32)
            # sum_c (mu_k - r)((mu_k - g) + (r - g)) = sum_c (mu_k - g)^2 - sum_c (r - g)^2 (r: pass 1's component)
            if SINGLE_C:
                dist = tl.sum((mu - mu0) * ((mu - g[None, :, :]) + shift), axis=1)
            else:
                dist = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    offs_c2 = c0 + ar_c
                    mask_cp2 = (offs_c2 < C)[:, None] & mask_p[None, :]
                    mu_c = tl.load(
                        m_base + offs_k[:, None, None] * s_mk + offs_c2[None, :, None] * s_mc,
                        mask=mask_k[:, None, None] & mask_cp2[None, :, :],
                        other=0.0,
                    ).to(tl.float32)
                    mu0_c = tl.load(r_base + offs_c2[None, :, None] * s_mc, mask=mask_cp2[None, :, :], other=0.0)
                    mu0_c = mu0_c.to(tl.float32)
                    g_c = _transfer_mean(xt_base, xs_base, offs_c2, mask_cp2, s_xtc, s_xsc, ct, cs)
                    dist += tl.sum((mu_c - mu0_c) * ((mu_c - g_c[None, :, :]) + (mu0_c - g_c[None, :, :])), axis=1)
            lw = tl.load(l_base + offs_k[:, None] * s_lk, mask=mask_k[:, None] & mask_p[None, :], other=float("-inf"))
            dead = lw == float("-inf")
            logit2 = tl.where(dead, float("-inf"), tl.where(dead, 0.0, lw.to(tl.float32)) * 1.4426950408889634)
            logit2 = logit2 + coef2[None, :] * dist
            m, w_sum, mean, _ = online_moments_update(logit2, mu, m, w_sum, mean, mean, False)
        mean = tl.where((w_sum > 0)[None, :], mean, float("nan"))  # every component dead: not a GM, NaN
        out = (v / n)[None, :] * mean + (s2 / n)[None, :] * g
        tl.store(
            out_ptr + row * s_or + offs_c[:, None] * s_oc + offs_p[None, :] * s_op,
            out.to(out_ptr.dtype.element_ty),
            mask=mask_cp,
        )


_REG_TILE = 64  # GM elements (BLOCK_K x BLOCK_C) of a pixel per thread and K tile


def _posterior_blocks(K: int, C: int, P: int, R: int) -> tuple[int, int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, num_warps)``: one pixel per thread. The pixel stride 1 is
    specialised (tiles ordered pixels-fastest) but the row, component and channel strides and
    ``P`` are not, so no load may assume an alignment and no thread gets a vector of pixels: the
    ``(K, C, pixels)`` tile lies with K and C inside the thread and the warps along the pixels
    (triton 3.6 and 3.9 alike), and the distance and softmax reductions need no shuffle or
    barrier. Up to 16 channels per tile, ``BLOCK_K * BLOCK_C <= _REG_TILE``, 32 to 128 pixels."""
    del R  # the grid is rows x pixel blocks x channel tiles whatever the batch
    block_c = min(next_pow2(C), 16)
    block_p = min(max(next_pow2(P), 32), 128)
    block_k = max(1, min(next_pow2(K), _REG_TILE // block_c))
    return block_k, block_c, block_p, block_p // 32


def _posterior_args(
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    x_src: torch.Tensor,
    x_tgt: torch.Tensor,
    sigma_src: torch.Tensor,
    sigma_tgt: torch.Tensor,
    out: torch.Tensor,
    blocks_fn: Any,
    int64_fn: Any,
) -> tuple:
    """The kernel's views (in the order of the arguments), grid, integer arguments and options.
    ``blocks_fn, int64_fn`` are ``_posterior_blocks, needs_int64``, keys of the stored plan
    (tests replace them)."""
    *batch, K, C, H, W = means.shape
    m4, l3 = gm_views(means, logweights)
    R, P = m4.shape[0], m4.shape[-1]

    def per_batch(sigma: torch.Tensor) -> torch.Tensor:
        return per_row(sigma.expand(*batch, 1, 1, 1), R, P)

    views = (m4, l3, per_row(logstds, R, P), x_src.reshape(R, C, P), x_tgt.reshape(R, C, P))
    views = pixel_rows(*views, per_batch(sigma_src), per_batch(sigma_tgt), out.view(R, C, P))
    m4, l3, s2, xs, xt, ss, st, o3 = views
    R, P = m4.shape[0], m4.shape[-1]
    block_k, block_c, block_p, warps = blocks_fn(K, C, P, R)
    # ``THREADS_ALONG_K`` (triton < 3.9) with several channel tiles (C > 16) or packed 2-D points
    # spills at the users' C = 32 / 64 and point shapes: one component per K step and 8-channel
    # tiles there, as the fused step's channel splits
    if THREADS_ALONG_K and (block_c < C or m4.stride(-1) != 1):
        block_k, block_c = 1, min(block_c, 8)
    n_pblocks, n_ctiles = cdiv(P, block_p), cdiv(C, block_c)
    ints = (
        K,
        C,
        P,
        n_pblocks,
        n_ctiles,
        *m4.stride(),
        *l3.stride(),
        *s2.stride(),
        *xs.stride(),
        *xt.stride(),
        *ss.stride(),
        *st.stride(),
        *o3.stride(),
    )
    options = dict(
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        SINGLE_C=n_ctiles == 1,
        INT64=int64_fn(m4, l3, xs, xt, o3),
        num_warps=warps,
    )
    return views, (R * n_pblocks * n_ctiles,), ints, options


_PLANS = PlanCache()


def _launch_posterior(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    x_src: torch.Tensor,
    sigma_src: torch.Tensor,
    x_tgt: torch.Tensor,
    sigma_tgt: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Run ``_gm_posterior_mean_kernel``; sigmas are tensors broadcastable to ``(*B, 1, 1, 1)``.
    The launch plan is stored per shape (``planned_args``)."""
    out = torch.empty(*x_src.shape, dtype=means.dtype, device=means.device)
    if out.numel() == 0:
        return out
    tensors = (means, logweights, logstds, x_src, x_tgt, sigma_src, sigma_tgt, out)
    tensors, grid, ints, options = planned_args(
        _PLANS, _posterior_args, tensors, _posterior_blocks, needs_int64, n_key=7
    )
    _gm_posterior_mean_kernel[grid](*tensors, *ints, eps, **options)
    return out


if triton is not None:

    @torch.library.custom_op("gmkernels::gm_posterior_mean", mutates_args=())
    def _gm_posterior_mean_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        logweights: torch.Tensor,
        x_src: torch.Tensor,
        sigma_src: torch.Tensor,
        x_tgt: torch.Tensor,
        sigma_tgt: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        return _launch_posterior(means, logstds, logweights, x_src, sigma_src, x_tgt, sigma_tgt, eps)

    @_gm_posterior_mean_op.register_fake
    def _(means, logstds, logweights, x_src, sigma_src, x_tgt, sigma_tgt, eps):
        return means.new_empty((*means.shape[:-4], *means.shape[-3:]))


def gm_posterior_mean(
    gm: dict, x_src: torch.Tensor, sigma_src: Sigma, x_tgt: torch.Tensor, sigma_tgt: Sigma, eps: float = 1e-6
) -> torch.Tensor:
    """Mean of x0 at ``(x_tgt, sigma_tgt)`` from the x0-GM predicted at ``(x_src, sigma_src)``.

    Args:
        gm: x0-GM ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``.
        x_src, x_tgt: ``(*B, C, H, W)``.
        sigma_src, sigma_tgt: floats or tensors broadcastable to ``(*B, 1, 1, 1)``,
            ``sigma_tgt <= sigma_src``.
        eps: floor of the transfer Gaussian's denominator and of the product's.
    Returns:
        ``(*B, C, H, W)`` in the dtype of ``means``. On the Triton path nothing else is
        written: no ``K x C x H x W`` temporary. A pixel whose components are all dead is not
        a GM and gives NaN, as the reference does.
    """
    s = check_gm(gm)
    check_state(x_src, "x_src", s)
    check_state(x_tgt, "x_tgt", s)
    sigma_src, sigma_tgt = check_sigma_pair(sigma_src, "sigma_src", sigma_tgt, "sigma_tgt", s)
    if type(eps) is not float or not math.isfinite(eps):  # the common case inline, without a call
        eps = _check_real(eps, "eps")
    means, logstds, logweights = gm["means"], gm["logstds"], gm["logweights"]
    src_t, tgt_t = isinstance(sigma_src, torch.Tensor), isinstance(sigma_tgt, torch.Tensor)
    tensors = [means, logstds, logweights, x_src, x_tgt]
    if src_t:
        tensors.append(sigma_src)
    if tgt_t:
        tensors.append(sigma_tgt)
    if not kernels_wanted(*tensors):
        return run_reference(ref.gm_posterior_mean, gm, x_src, sigma_src, x_tgt, sigma_tgt, eps, out_dtype=s.dtype)
    # float sigmas as 0-dim tensors on the GM's device (a fill: safe in CUDA-graph capture)
    if not src_t:
        sigma_src = torch.full((), sigma_src, dtype=torch.float32, device=s.device)
    if not tgt_t:
        sigma_tgt = torch.full((), sigma_tgt, dtype=torch.float32, device=s.device)
    return _gm_posterior_mean_op(means, logstds, logweights, x_src, sigma_src, x_tgt, sigma_tgt, eps)
