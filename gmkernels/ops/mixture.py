"""Mixture moments (docs/ops.md#mixture-moments): ``gm_to_mean`` and ``gm_to_iso_gaussian``.

Kernel: ``_gm_moments_kernel`` reads the means and log-weights once and writes the mixture mean
(and, for ``gm_to_iso_gaussian``, the per-pixel variance). Layout seen by the kernel:
``means (R, K, C, P)``, ``logweights (R, K, P)``, ``out (R, C, P)`` given by strides, with
``R = prod(*B)`` rows and ``P = H * W`` pixels (``R = 1, P = prod(*B)`` when ``H * W == 1``,
so point data still fills a pixel block). One program owns ``BLOCK_P`` contiguous pixels of
one row and one tile of ``BLOCK_C`` channels (all channel tiles, in a loop, when the variance
is wanted, since it sums over channels) and runs an online softmax over tiles of ``BLOCK_K``
components: a running max, the running weight sum, the running weighted mean and, for the
variance, the running weighted sum of squared deviations merged tile by tile with Chan's
formula (no ``E[x^2] - E[x]^2`` cancellation). Registers do not grow with K or C. The layout
is pixel-per-thread (``pixel_blocks``): warps along the pixels, each thread's K and C tiles in
its registers, so the K loop has no barrier or shuffle (image data; for point data the
contiguous axes are K and C, and the compiler may still split them across threads).

Launcher helpers shared with the other families live in ``_launch``.
"""

from __future__ import annotations

from typing import Any

import torch

import reference.mixture as ref

from .._dispatch import run_reference
from .._validate import check_gm, check_power
from ._launch import (
    LOG2E,
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

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

# --------------------------------------------------------------------------- kernel

if triton is not None:

    @triton.jit
    def program_tile(
        n_pblocks, n_ctiles, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr
    ):
        """This program's ``(row, channel tile, pixel offsets [BP], k range [BK], c range [BC])`` for
        a grid of ``R * n_pblocks * n_ctiles`` programs, channel tile fastest; offsets in int64
        when ``INT64``."""
        pid = tl.program_id(0)
        cb = pid % n_ctiles
        pb = (pid // n_ctiles) % n_pblocks
        row = pid // (n_ctiles * n_pblocks)
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        ar_k = tl.arange(0, BLOCK_K)
        ar_c = tl.arange(0, BLOCK_C)
        if INT64:
            row = row.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
            ar_k = ar_k.to(tl.int64)
            ar_c = ar_c.to(tl.int64)
        return row, cb, offs_p, ar_k, ar_c

    @triton.jit
    def online_moments_update(lw2, mu, m, w_sum, mean, m2, WITH_VAR: tl.constexpr, PIXEL_M2: tl.constexpr = False):
        """Merge one K tile into the running softmax-weighted moments of each pixel.

        ``lw2 [BK, BP]``: logits in base 2 (``-inf`` for dead or masked components);
        ``mu [BK, BC, BP]``; state ``m [BP]`` running max, ``w_sum [BP]`` weight sum relative to
        ``2^m``, ``mean [BC, BP]`` running weighted mean, ``m2 [BC, BP]`` running weighted sum of
        squared deviations (relative to ``2^m``; only updated ``WITH_VAR``), or with ``PIXEL_M2``
        its sum over the channels ``m2 [BP]`` (fewer registers where only that sum is needed). A
        tile or a running max that is all ``-inf`` gives no NaN.
        """
        m_new = tl.maximum(m, tl.max(lw2, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)  # 0 while nothing was alive
        p = tl.exp2(lw2 - m_ref[None, :])  # [BK, BP]
        w_t = tl.sum(p, axis=0)
        w_old = w_sum * alpha
        w_new = w_old + w_t
        mean_t = tl.sum(p[:, None, :] * mu, axis=0) / tl.where(w_t > 0, w_t, 1.0)[None, :]
        frac = w_t / tl.where(w_new > 0, w_new, 1.0)
        delta = mean_t - mean
        mean = mean + delta * frac[None, :]
        if WITH_VAR:
            dev = mu - mean_t[None, :, :]
            if PIXEL_M2:
                m2_t = tl.sum(p * tl.sum(dev * dev, axis=1), axis=0)
                m2 = m2 * alpha + m2_t + tl.sum(delta * delta, axis=0) * (w_old * frac)
            else:
                m2_t = tl.sum(p[:, None, :] * dev * dev, axis=0)
                m2 = m2 * alpha[None, :] + m2_t + delta * delta * (w_old * frac)[None, :]
        return m_new, w_new, mean, m2

    @triton.jit
    def _gm_moments_kernel(
        means_ptr,
        lw_ptr,
        logstds_ptr,
        mean_ptr,
        var_ptr,
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
        s_or,
        s_oc,
        s_op,
        s_vr,
        s_vp,
        power_log2e,
        WITH_VAR: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """Mixture mean ``(R, C, P)`` of ``softmax_k(power * logweights)`` (and, ``WITH_VAR``,
        the variance ``(R, P)``: channel-mean of the between-component variance plus
        ``exp(2 * logstds)``). Grid: ``R * n_pblocks * n_ctiles`` programs, channel tile fastest."""
        row, cb, offs_p, ar_k, ar_c = program_tile(n_pblocks, n_ctiles, BLOCK_K, BLOCK_C, BLOCK_P, INT64)
        mask_p = offs_p < P
        m_base = means_ptr + row * s_mr + offs_p[None, None, :] * s_mp
        l_base = lw_ptr + row * s_lr + offs_p[None, :] * s_lp
        if WITH_VAR:  # the variance sums over channels: this program does every channel tile
            c_lo = 0
            c_hi = C
        else:
            c_lo = cb * BLOCK_C
            c_hi = c_lo + 1
        var_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            offs_c = c0 + ar_c
            mask_cp = (offs_c < C)[:, None] & mask_p[None, :]
            m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
            w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
            mean = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + ar_k
                mask_k = offs_k < K
                lw = tl.load(
                    l_base + offs_k[:, None] * s_lk, mask=mask_k[:, None] & mask_p[None, :], other=float("-inf")
                )
                dead = lw == float("-inf")
                lw2 = tl.where(dead, float("-inf"), tl.where(dead, 0.0, lw.to(tl.float32)) * power_log2e)
                mu = tl.load(
                    m_base + offs_k[:, None, None] * s_mk + offs_c[None, :, None] * s_mc,
                    mask=mask_k[:, None, None] & mask_cp[None, :, :],
                    other=0.0,
                ).to(tl.float32)
                m, w_sum, mean, m2 = online_moments_update(lw2, mu, m, w_sum, mean, m2, WITH_VAR)
            mean = tl.where((w_sum > 0)[None, :], mean, float("nan"))  # every component dead: not a GM, NaN
            out_offs = row * s_or + offs_c[:, None] * s_oc + offs_p[None, :] * s_op
            tl.store(mean_ptr + out_offs, mean.to(mean_ptr.dtype.element_ty), mask=mask_cp)
            if WITH_VAR:
                var_acc += tl.sum(m2, axis=0) / w_sum  # 0 / 0, NaN, where every component is dead
        if WITH_VAR:
            logstd = tl.load(logstds_ptr + row * s_sr + offs_p * s_sp, mask=mask_p, other=0.0).to(tl.float32)
            var = var_acc / C + tl.exp(2.0 * logstd)
            tl.store(var_ptr + row * s_vr + offs_p * s_vp, var.to(var_ptr.dtype.element_ty), mask=mask_p)


def single_row_views(*views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``views`` with the stride of their first (row) axis set to 0 when that axis has size 1 (as
    point data has after ``pixel_rows``): the same elements, but Triton then sees a row offset
    divisible by 16 instead of ``row * 1``, which keeps 128-bit loads along the points'
    contiguous log-weights."""
    if views[0].shape[0] != 1:
        return views
    return tuple(v.as_strided(v.shape, (0, *v.stride()[1:]), v.storage_offset()) for v in views)


def pixel_blocks(
    K: int,
    C: int,
    P: int,
    programs_per_pblock: int,
    elem_bytes: int,
    tile: int,
    c_tiles_in_grid: bool,
    contiguous_pixels: bool = True,
) -> tuple[int, int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, num_warps)`` for a pixel-per-thread layout: every warp lies
    along the pixels and each thread owns ``vec`` contiguous pixels (one 128-bit load,
    ``vec = 16 / elem_bytes``) with its whole ``BLOCK_K x BLOCK_C`` tile in registers, so the
    reductions over K and C never cross threads (no barrier, no shuffle). That holds when
    ``BLOCK_P = 32 * vec * num_warps``: Triton gives each thread ``vec`` pixels and spreads the
    threads, then the warps, along the contiguous pixel axis before any other.

    ``tile`` caps the per-thread tile ``BLOCK_K * BLOCK_C * vec`` for 4-byte elements, scaled
    by ``elem_bytes / 4`` (the fp32 state per pixel doubles with ``vec``; triton 3.6 spilled bf16
    builds at the full tile). 64 keeps the mean kernels near 128 registers; kernels that keep
    more per element use 32. Channels up to
    ``tile / vec`` a tile, then as many components as fit. Warps: 4, halved down to 1 while the
    grid has fewer than 1024 programs (a GPU wants a few per SM); fewer pixels than one warp's
    ``32 * vec`` take one warp.

    Without ``contiguous_pixels`` (point data: the pixel axis is the batch, K and C are the
    contiguous axes) each thread owns one pixel, one channel per tile (a wider channel tile
    would put threads along C) and one 128-bit load of log-weights per K tile.
    """
    vec = max(1, 16 // elem_bytes) if contiguous_pixels else 1
    if contiguous_pixels:  # 2-byte elements: twice the pixels a thread, so half the K x C tile
        tile = max(vec, tile * elem_bytes // 4)
    block_c = min(next_pow2(C), max(1, tile // vec)) if contiguous_pixels else 1
    c_progs = cdiv(C, block_c) if c_tiles_in_grid else 1
    warps = 4
    while warps > 1 and programs_per_pblock * c_progs * cdiv(P, 32 * vec * warps) < 1024:
        warps //= 2
    block_p = min(32 * vec * warps, next_pow2(P))
    warps = max(1, min(warps, block_p // (32 * vec)))
    block_k = max(1, min(next_pow2(K), tile // (block_c * vec) if contiguous_pixels else 16 // elem_bytes))
    return block_k, block_c, block_p, warps


def _moments_layout(
    K: int, C: int, P: int, R: int, with_var: bool, elem_bytes: int, contiguous_pixels: bool
) -> tuple[int, int, int, int]:
    # the variance path keeps a second [BLOCK_C, BLOCK_P] accumulator and the deviations
    return pixel_blocks(K, C, P, R, elem_bytes, 32 if with_var else 64, not with_var, contiguous_pixels)


def _moments_blocks(K: int, C: int, P: int, R: int, with_var: bool) -> tuple[int, int, int, int]:
    """Blocks for 4-byte elements along contiguous pixels (the common case, and the hook the
    tests replace to force multi-tile paths)."""
    return _moments_layout(K, C, P, R, with_var, 4, True)


def _moments_args(
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    with_var: bool,
    blocks_fn: Any,
    int64_fn: Any,
) -> tuple:
    """The kernel's views (in the order of the arguments; without the variance ``logstds`` and
    ``var`` stand in as placeholders, the kernel does not read them), grid, integer arguments
    and options. ``blocks_fn, int64_fn`` are ``_moments_blocks, needs_int64``, keys of the
    stored plan (tests replace them)."""
    K, C = means.shape[-4], means.shape[-3]
    m4, l3 = gm_views(means, logweights)
    R, P = m4.shape[0], m4.shape[-1]
    o3 = mean.view(R, C, P)
    s2 = per_row(logstds, R, P) if with_var else o3[:, 0, :]
    v2 = var.view(R, P) if with_var else o3[:, 0, :]
    views = single_row_views(*pixel_rows(m4, l3, s2, o3, v2))
    m4, l3, s2, o3, v2 = views
    R, P = m4.shape[0], m4.shape[-1]
    if means.element_size() == 4 and m4.stride(-1) == 1:
        block_k, block_c, block_p, warps = blocks_fn(K, C, P, R, with_var)
    else:
        block_k, block_c, block_p, warps = _moments_layout(
            K, C, P, R, with_var, means.element_size(), m4.stride(-1) == 1
        )
    n_pblocks = cdiv(P, block_p)
    n_ctiles = 1 if with_var else cdiv(C, block_c)
    ints = (K, C, P, n_pblocks, n_ctiles, *m4.stride(), *l3.stride(), *s2.stride(), *o3.stride(), *v2.stride())
    options = dict(
        WITH_VAR=with_var,
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        INT64=int64_fn(m4, l3, o3),
        num_warps=warps,
    )
    return views, (R * n_pblocks * n_ctiles,), ints, options


_PLANS = PlanCache()


def _launch_moments(
    means: torch.Tensor, logweights: torch.Tensor, logstds: torch.Tensor | None, power: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``_gm_moments_kernel``: mean ``(*B, C, H, W)`` and, when ``logstds`` is given,
    var ``(*B, 1, H, W)``, both in the dtype of ``means``. The launch plan is stored per shape
    (``planned_args``)."""
    *batch, K, C, H, W = means.shape
    with_var = logstds is not None
    mean = torch.empty(*batch, C, H, W, dtype=means.dtype, device=means.device)
    var = torch.empty(*batch, 1, H, W, dtype=means.dtype, device=means.device) if with_var else None
    if mean.numel() == 0:
        return mean, var
    tensors = (means, logweights, logstds, mean, var) if with_var else (means, logweights, mean, mean, mean)
    tensors, grid, ints, options = planned_args(
        _PLANS, _moments_args, tensors, with_var, _moments_blocks, needs_int64, n_key=3
    )
    _gm_moments_kernel[grid](*tensors, *ints, power * LOG2E, **options)
    return mean, var


# --------------------------------------------------------------------------- torch.library ops

if triton is not None:

    @torch.library.custom_op("gmkernels::gm_to_mean", mutates_args=())
    def _gm_to_mean_op(means: torch.Tensor, logweights: torch.Tensor, power: float) -> torch.Tensor:
        return _launch_moments(means, logweights, None, power)[0]

    @_gm_to_mean_op.register_fake
    def _(means: torch.Tensor, logweights: torch.Tensor, power: float) -> torch.Tensor:
        return means.new_empty((*means.shape[:-4], *means.shape[-3:]))

    @torch.library.custom_op("gmkernels::gm_to_iso_gaussian", mutates_args=())
    def _gm_to_iso_gaussian_op(
        means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_moments(means, logweights, logstds, 1.0)

    @_gm_to_iso_gaussian_op.register_fake
    def _(means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *batch, _, C, H, W = means.shape
        return means.new_empty((*batch, C, H, W)), means.new_empty((*batch, 1, H, W))


# --------------------------------------------------------------------------- public functions


def gm_to_mean(gm: dict, power: float = 1.0) -> torch.Tensor:
    """Mean of the tempered mixture, ``sum_k softmax_k(power * logweights) * mu_k``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1), logweights (*B, K, 1, H, W)}``.
        power: weight temperature, >= 0; dead components stay dead for every power.
    Returns:
        ``(*B, C, H, W)`` in the dtype of ``means``. A pixel whose components are all dead is
        not a GM and gives NaN, as the reference does.
    """
    s = check_gm(gm)
    power = check_power(power, "power")
    if not kernels_wanted(gm["means"], gm["logweights"]):
        return run_reference(ref.gm_to_mean, gm, power, out_dtype=s.dtype)
    return _gm_to_mean_op(gm["means"], gm["logweights"], power)


def gm_to_iso_gaussian(gm: dict) -> dict:
    """Moment-matched isotropic Gaussian: ``mean = sum_k w_k mu_k``,
    ``var = mean_c(sum_k w_k (mu_k - mean)^2) + exp(2 * logstds)``.

    Returns:
        ``{mean (*B, C, H, W), var (*B, 1, H, W)}`` in the dtype of ``means``. A pixel whose
        components are all dead is not a GM and gives NaN in both, as the reference does.
    """
    s = check_gm(gm)
    if not kernels_wanted(gm["means"], gm["logstds"], gm["logweights"]):
        return run_reference(ref.gm_to_iso_gaussian, gm, out_dtype=s.dtype)
    mean, var = _gm_to_iso_gaussian_op(gm["means"], gm["logstds"], gm["logweights"])
    return {"mean": mean, "var": var}
