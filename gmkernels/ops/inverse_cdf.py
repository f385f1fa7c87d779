"""1-D mixture inverse CDF and Knothe-Rosenblatt transports (docs/ops.md#inverse-cdf-and-transports):
``gm1d_inverse_cdf``, ``gaussian_samples_to_gm_samples``, ``gm_samples_to_gaussian_samples``.

Names, arguments and defaults follow the public GMFlow code (``gmflow_ops``): scaled CDFs in
``[-1, 1]``, ``n_steps`` Newton iterations with the step clamped to ``max_step_size`` component
stds, ``eps`` for the pdf floor and the CDF clamp, and ``axis_aligned`` KR in the eigenbasis of
the pixel-averaged covariance (see ``reference/inverse_cdf.py`` for the math). GMFlow's
``n_axes``, ``backward_steps`` and ``force_fp32`` are not offered: every axis is transported,
the torch path differentiates through all steps, and the kernels always compute in float32.

Kernels (layout ``means (R, K, C, P)``, ``logweights (R, K, P)``, samples ``(R, N, C, P)`` by
strides, ``R = prod(*B)``, ``P = H * W``; one program owns ``BLOCK_P`` pixels of one sample
row ``(r, n)`` and walks the axes ``c = 0 .. C-1``):

* ``_kr_inverse_kernel``: per axis, one online pass over K tiles for the moment-matched start
  (running max, weight sum, mean and Chan-merged variance), ``n_steps`` Newton passes (CDF and
  pdf with the weights normalised by that max and sum) and one pass adding the axis's squared
  distances ``((x_c - mu_kc) / s)^2`` to a float32 scratch ``(R * N, K, P)`` that carries the
  KR slice log-weights to the next axis (not allocated when ``C == 1``, the 1-D case). A barrier
  separates an axis's scratch stores from the next axis's loads, so the read-after-write holds
  whichever threads the compiler gives each access.
* ``_kr_cdf_kernel``: per axis, one online pass for the conditional scaled CDF; ``erfinv`` of
  it is taken in torch afterwards.

``gm1d_inverse_cdf`` has its own op (``gmkernels::gm1d_inverse_cdf``) launching
``_kr_inverse_kernel`` on ``C = 1`` views of its 4-D tensors, so a call adds no channel axis.
Every launcher stores its plan per input geometry (``_launch.planned_args``).
The eigenbasis (a ``C x C`` ``eigh`` per batch element or pixel) and the rotations are torch.
Inputs that need a gradient, and float64 inputs, take the differentiable torch path.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import reference.inverse_cdf as ref

from .._dispatch import run_reference
from .._validate import check_count, check_gm, check_gm1d, check_positive, check_state, require_range
from ._launch import (
    PlanCache,
    cdiv,
    checked_once,
    kernels_wanted,
    needs_int64,
    next_pow2,
    per_row,
    pixel_rows,
    planned_args,
)
from .mixture import online_moments_update

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

_SQRT2 = math.sqrt(2.0)


def kr_blocks(K: int, P: int, tile: int = 1024, partial_warps: int = 4) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_P, num_warps)``: up to 128 pixels per program and ``BLOCK_K * BLOCK_P
    <= tile`` over 8 warps, so the three tiles loaded per pass (log-weights, scratch, means)
    stay in registers (at 4 warps a full bf16 tile spills at sm_80). A tile that K or P leave
    partly empty (K < 8, fewer than 128 pixels) runs on ``partial_warps``: 4 for several axes
    (at 8 such tiles keep 8-16 bytes of stack at sm_80/sm_90, where ptxas wraps the barrier of
    a cross-warp reduction in a subroutine), 8 for one axis (at 4 its 64-pixel fp32 build keeps
    8 bytes at sm_80). Fewer than 128 pixels take a smaller block rather than masked lanes (a
    masked 128-pixel block of the 1-D inverse keeps stack too). The KR inverse over several
    axes of point data (a strided pixel axis) uses a tile of 512 (at 1024 its fp32 build
    spills)."""
    block_p = min(next_pow2(P), 128)
    block_k = max(1, min(next_pow2(K), tile // block_p))
    return block_k, block_p, 8 if block_k * block_p >= tile else partial_warps


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _slice_logits2(lw_ptrs, acc_ptrs, mask, use_acc):
        """Base-2 KR slice logits ``log2e * (logweights - 0.5 * acc)`` of one ``[BK, BP]`` tile;
        ``-inf`` for dead or masked components; the scratch is not read while ``use_acc`` is false."""
        lw = tl.load(lw_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        acc = tl.load(acc_ptrs, mask=mask & use_acc, other=0.0)
        return (lw - 0.5 * acc) * 1.4426950408889634

    @triton.jit
    def _kr_inverse_kernel(
        means_ptr,
        lw_ptr,
        logstds_ptr,
        z_ptr,
        u_ptr,
        out_ptr,
        acc_ptr,
        K,
        C,
        P,
        N,
        n_pblocks,
        s_mr,
        s_mk,
        s_mc,
        s_mp,
        s_lr,
        s_lk,
        s_lp,
        s_sr,
        s_sp,
        s_zr,
        s_zn,
        s_zc,
        s_zp,
        s_ur,
        s_un,
        s_uc,
        s_up,
        s_or,
        s_on,
        s_oc,
        s_op,
        n_steps,
        eps,
        max_step_size,
        HAS_U: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """KR inverse transport ``z (R, N, C, P) -> x (R, N, C, P)``: axis by axis, Newton on the
        conditional scaled CDF at ``u = erf(z / sqrt 2)`` (or at ``u_ptr`` when ``HAS_U``),
        started from the moment-matched Gaussian at ``z``. ``acc_ptr``: float32 ``(R*N, K, P)``
        scratch (unused when ``C == 1``). Grid: ``R * N * n_pblocks``, pixel block fastest."""
        pid = tl.program_id(0)
        pb = pid % n_pblocks
        rn = pid // n_pblocks
        row = rn // N
        n = rn % N
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        ar_k = tl.arange(0, BLOCK_K)
        if INT64:
            row = row.to(tl.int64)
            n = n.to(tl.int64)
            rn = rn.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
            ar_k = ar_k.to(tl.int64)
        mask_p = offs_p < P
        logstd = tl.load(logstds_ptr + row * s_sr + offs_p * s_sp, mask=mask_p, other=0.0).to(tl.float32)
        std = tl.exp(logstd)
        inv_std = tl.exp(-logstd)
        max_step = max_step_size * std
        m_base = means_ptr + row * s_mr + offs_p[None, :] * s_mp
        l_base = lw_ptr + row * s_lr + offs_p[None, :] * s_lp
        a_base = acc_ptr + rn * K * P + offs_p[None, :]
        for c in range(C):
            use_acc = ((offs_p * 0 + c) > 0)[None, :]  # a [1, BLOCK_P] mask operand (the interpreter wants a tensor)
            z = tl.load(z_ptr + row * s_zr + n * s_zn + c * s_zc + offs_p * s_zp, mask=mask_p, other=0.0).to(tl.float32)
            if HAS_U:
                u = tl.load(u_ptr + row * s_ur + n * s_un + c * s_uc + offs_p * s_up, mask=mask_p, other=0.0)
                u = u.to(tl.float32)
            else:
                u = tl.erf(z * 0.7071067811865476)
            # pass 1: normaliser and moment-matched start (online over K tiles)
            m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
            w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
            mean = tl.zeros([1, BLOCK_P], dtype=tl.float32)
            m2 = tl.zeros([1, BLOCK_P], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + ar_k
                mask = (offs_k < K)[:, None] & mask_p[None, :]
                lw2 = _slice_logits2(l_base + offs_k[:, None] * s_lk, a_base + offs_k[:, None] * P, mask, use_acc)
                mu = tl.load(m_base + offs_k[:, None] * s_mk + c * s_mc, mask=mask, other=0.0).to(tl.float32)
                m, w_sum, mean, m2 = online_moments_update(lw2, mu[:, None, :], m, w_sum, mean, m2, True)
            m_ref = tl.where(m == float("-inf"), 0.0, m)
            inv_w = 1.0 / tl.where(w_sum > 0, w_sum, 1.0)
            x = tl.sum(mean, axis=0) + z * tl.sqrt(tl.sum(m2, axis=0) * inv_w + std * std)
            # Newton: x -= clamp(0.5 * (F(x) - u) / max(pdf(x), eps), +-max_step)
            for _ in range(n_steps):
                cdf = tl.zeros([BLOCK_P], dtype=tl.float32)
                dens = tl.zeros([BLOCK_P], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + ar_k
                    mask = (offs_k < K)[:, None] & mask_p[None, :]
                    lw2 = _slice_logits2(l_base + offs_k[:, None] * s_lk, a_base + offs_k[:, None] * P, mask, use_acc)
                    mu = tl.load(m_base + offs_k[:, None] * s_mk + c * s_mc, mask=mask, other=0.0).to(tl.float32)
                    w = tl.exp2(lw2 - m_ref[None, :])
                    d = (x[None, :] - mu) * inv_std[None, :]
                    cdf += tl.sum(w * tl.erf(d * 0.7071067811865476), axis=0)
                    dens += tl.sum(w * tl.exp(-0.5 * d * d), axis=0)
                pdf = dens * inv_w * inv_std * 0.3989422804014327
                delta = 0.5 * (cdf * inv_w - u) / tl.maximum(pdf, eps)
                x -= tl.minimum(tl.maximum(delta, -max_step), max_step)
            tl.store(
                out_ptr + row * s_or + n * s_on + c * s_oc + offs_p * s_op, x.to(out_ptr.dtype.element_ty), mask=mask_p
            )
            # carry the squared distances of this axis to the next axis's slice weights
            if c + 1 < C:
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + ar_k
                    mask = (offs_k < K)[:, None] & mask_p[None, :]
                    a_ptrs = a_base + offs_k[:, None] * P
                    acc = tl.load(a_ptrs, mask=mask & use_acc, other=0.0)
                    mu = tl.load(m_base + offs_k[:, None] * s_mk + c * s_mc, mask=mask, other=0.0).to(tl.float32)
                    d = (x[None, :] - mu) * inv_std[None, :]
                    tl.store(a_ptrs, acc + d * d, mask=mask)
                # the next axis reads this scratch back; its tiles may sit in other threads than
                # the ones that stored them (the compiler picks each access's layout), so every
                # store of the program completes before any load of the next axis
                tl.debug_barrier()

    @triton.jit
    def _kr_cdf_kernel(
        means_ptr,
        lw_ptr,
        logstds_ptr,
        x_ptr,
        out_ptr,
        acc_ptr,
        K,
        C,
        P,
        N,
        n_pblocks,
        s_mr,
        s_mk,
        s_mc,
        s_mp,
        s_lr,
        s_lk,
        s_lp,
        s_sr,
        s_sp,
        s_xr,
        s_xn,
        s_xc,
        s_xp,
        s_or,
        s_on,
        s_oc,
        s_op,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """KR forward map to scaled CDFs ``x (R, N, C, P) -> u (R, N, C, P)``: axis by axis, one
        online pass over K tiles for the conditional scaled CDF, adding the axis's squared
        distances to the ``(R*N, K, P)`` scratch. Grid as ``_kr_inverse_kernel``."""
        pid = tl.program_id(0)
        pb = pid % n_pblocks
        rn = pid // n_pblocks
        row = rn // N
        n = rn % N
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        ar_k = tl.arange(0, BLOCK_K)
        if INT64:
            row = row.to(tl.int64)
            n = n.to(tl.int64)
            rn = rn.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
            ar_k = ar_k.to(tl.int64)
        mask_p = offs_p < P
        inv_std = tl.exp(-tl.load(logstds_ptr + row * s_sr + offs_p * s_sp, mask=mask_p, other=0.0).to(tl.float32))
        m_base = means_ptr + row * s_mr + offs_p[None, :] * s_mp
        l_base = lw_ptr + row * s_lr + offs_p[None, :] * s_lp
        a_base = acc_ptr + rn * K * P + offs_p[None, :]
        for c in range(C):
            c_p = offs_p * 0 + c  # the axis as a [BLOCK_P] tensor (a mask operand in the interpreter, too)
            use_acc = (c_p > 0)[None, :]
            store_acc = (c_p + 1 < C)[None, :]
            x = tl.load(x_ptr + row * s_xr + n * s_xn + c * s_xc + offs_p * s_xp, mask=mask_p, other=0.0).to(tl.float32)
            m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
            w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
            cdf = tl.zeros([BLOCK_P], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + ar_k
                mask = (offs_k < K)[:, None] & mask_p[None, :]
                a_ptrs = a_base + offs_k[:, None] * P
                acc = tl.load(a_ptrs, mask=mask & use_acc, other=0.0)
                lw = tl.load(l_base + offs_k[:, None] * s_lk, mask=mask, other=float("-inf")).to(tl.float32)
                lw2 = (lw - 0.5 * acc) * 1.4426950408889634
                mu = tl.load(m_base + offs_k[:, None] * s_mk + c * s_mc, mask=mask, other=0.0).to(tl.float32)
                d = (x[None, :] - mu) * inv_std[None, :]
                m_new = tl.maximum(m, tl.max(lw2, axis=0))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_ref)
                w = tl.exp2(lw2 - m_ref[None, :])
                w_sum = w_sum * alpha + tl.sum(w, axis=0)
                cdf = cdf * alpha + tl.sum(w * tl.erf(d * 0.7071067811865476), axis=0)
                m = m_new
                tl.store(a_ptrs, acc + d * d, mask=mask & store_acc)
            u = cdf / tl.where(w_sum > 0, w_sum, 1.0)
            tl.store(
                out_ptr + row * s_or + n * s_on + c * s_oc + offs_p * s_op, u.to(out_ptr.dtype.element_ty), mask=mask_p
            )
            tl.debug_barrier()  # the scratch stores above complete before the next axis loads them (any thread)


# --------------------------------------------------------------------------- launchers
#
# Each launcher gets its kernel's views, grid, integer arguments and options from one plan per
# input geometry (``planned_args``). The KR scratch is float32 ``(R * N, K, P)``, contiguous,
# allocated per call (one element, never read, when there is one axis).


def _kr_views(means: torch.Tensor, logweights: torch.Tensor, logstds: torch.Tensor, *samples: torch.Tensor) -> tuple:
    """``(R, K, C, P)`` means, ``(R, K, P)`` log-weights, ``(R, P)`` log-stds and ``(R, N, C, P)``
    samples (views whenever the strides allow), with rows and pixels swapped for point data
    (``H = W = 1``)."""
    *batch, K, C, H, W = means.shape
    R, P = math.prod(batch), H * W
    s4 = [x.reshape(R, x.shape[-4], C, P) for x in samples]
    return pixel_rows(means.reshape(R, K, C, P), logweights.reshape(R, K, P), per_row(logstds, R, P), *s4)


def _kr_inverse_args(
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor,
    out: torch.Tensor,
    acc: torch.Tensor,
    has_u: bool,
) -> tuple:
    """``_kr_inverse_kernel``'s views of a GM ``(*B, K, C, H, W)``, the starts ``z``, the targets
    ``u`` (``z`` again, unread, without ``has_u``), the output ``(*B, N, C, H, W)`` and the
    scratch, its grid, integer arguments and options."""
    m4, l3, s2, z4, u4, o4 = _kr_views(means, logweights, logstds, z, u, out)
    R, K, C, P = m4.shape
    N = z4.shape[1]
    block_k, block_p, warps = kr_blocks(K, P, 1024 if C == 1 or m4.stride(-1) == 1 else 512, 8 if C == 1 else 4)
    n_pblocks = cdiv(P, block_p)
    ints = (K, C, P, N, n_pblocks, *m4.stride(), *l3.stride(), *s2.stride(), *z4.stride(), *u4.stride(), *o4.stride())
    options = dict(
        HAS_U=has_u, BLOCK_K=block_k, BLOCK_P=block_p, INT64=needs_int64(m4, l3, z4, u4, o4, acc), num_warps=warps
    )
    return (m4, l3, s2, z4, u4, o4, acc), (R * N * n_pblocks,), ints, options


_KR_INVERSE_PLANS = PlanCache()


def _launch_kr_inverse(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor | None,
    n_steps: int,
    eps: float,
    max_step_size: float,
) -> torch.Tensor:
    """Run ``_kr_inverse_kernel``: ``(*B, N, C, H, W)`` in the dtype of ``means``."""
    out = means.new_empty(z.shape)
    if out.numel() == 0:
        return out
    K, C = means.shape[-4], means.shape[-3]
    acc = torch.empty(size=(out.numel() // C * K if C > 1 else 1,), dtype=torch.float32, device=means.device)
    tensors = (means, logweights, logstds, z, z if u is None else u, out, acc)
    t, grid, ints, options = planned_args(_KR_INVERSE_PLANS, _kr_inverse_args, tensors, u is not None, n_key=5)
    _kr_inverse_kernel[grid](*t, *ints, n_steps, eps, max_step_size, **options)
    return out


def _gm1d_args(
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor,
    out: torch.Tensor,
    acc: torch.Tensor,
) -> tuple:
    """``_kr_inverse_kernel``'s views of a 1-D GM ``(*B, K, H, W)`` and samples ``(*B, N, H, W)``
    as ``C = 1`` (the views ``_kr_views`` makes of the same tensors with a channel axis), its
    grid, integer arguments and options. ``acc``: the kernel's scratch pointer, never read or
    written with one axis."""
    *batch, K, H, W = means.shape
    R, P, N = math.prod(batch), H * W, u.shape[-3]
    views = pixel_rows(
        means.reshape(R, K, 1, P),
        logweights.reshape(R, K, P),
        per_row(logstds, R, P),
        z.reshape(R, N, 1, P),
        u.reshape(R, N, 1, P),
        out.view(R, N, 1, P),
    )
    m4, l3, s2, z4, u4, o4 = views
    R, P = m4.shape[0], m4.shape[-1]
    block_k, block_p, warps = kr_blocks(K, P, 1024, 8)
    n_pblocks = cdiv(P, block_p)
    ints = (K, 1, P, N, n_pblocks, *m4.stride(), *l3.stride(), *s2.stride(), *z4.stride(), *u4.stride(), *o4.stride())
    options = dict(HAS_U=True, BLOCK_K=block_k, BLOCK_P=block_p, INT64=needs_int64(m4, l3, z4, u4, o4), num_warps=warps)
    return (m4, l3, s2, z4, u4, o4, acc), (R * N * n_pblocks,), ints, options


_GM1D_PLANS = PlanCache()
_SQRT2_T = torch.tensor(_SQRT2, dtype=torch.float32)  # a CPU scalar: ``z.mul_`` by it is cheaper than ``z * _SQRT2``


def _launch_gm1d_inverse(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    u: torch.Tensor,
    z: torch.Tensor | None,
    n_steps: int,
    eps: float,
    max_step_size: float,
) -> torch.Tensor:
    """Run ``_kr_inverse_kernel`` on a 1-D GM: ``(*B, N, H, W)`` in the dtype of ``means``, the
    Newton targets ``u``, the start from ``z`` (when None: ``sqrt(2) erfinv(clamp(u))`` in
    float32)."""
    out = torch.empty_like(u, dtype=means.dtype, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    if z is None:
        z = u.float().clamp(-1 + eps, 1 - eps).erfinv_().mul_(_SQRT2_T)
    acc = torch.empty(size=(1,), dtype=torch.float32, device=means.device)
    tensors = (means, logweights, logstds, z, u, out, acc)
    t, grid, ints, options = planned_args(_GM1D_PLANS, _gm1d_args, tensors, n_key=5)
    _kr_inverse_kernel[grid](*t, *ints, n_steps, eps, max_step_size, **options)
    return out


def _kr_cdf_args(
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    acc: torch.Tensor,
) -> tuple:
    """``_kr_cdf_kernel``'s views of a GM ``(*B, K, C, H, W)``, the samples ``x``, the output
    ``(*B, N, C, H, W)`` and the scratch, its grid, integer arguments and options."""
    m4, l3, s2, x4, o4 = _kr_views(means, logweights, logstds, x, out)
    R, K, C, P = m4.shape
    N = x4.shape[1]
    block_k, block_p, warps = kr_blocks(K, P)
    n_pblocks = cdiv(P, block_p)
    ints = (K, C, P, N, n_pblocks, *m4.stride(), *l3.stride(), *s2.stride(), *x4.stride(), *o4.stride())
    options = dict(BLOCK_K=block_k, BLOCK_P=block_p, INT64=needs_int64(m4, l3, x4, o4, acc), num_warps=warps)
    return (m4, l3, s2, x4, o4, acc), (R * N * n_pblocks,), ints, options


_KR_CDF_PLANS = PlanCache()


def _launch_kr_cdf(
    means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Run ``_kr_cdf_kernel``: scaled CDFs ``(*B, N, C, H, W)``, float32."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    K, C = means.shape[-4], means.shape[-3]
    acc = torch.empty(size=(out.numel() // C * K if C > 1 else 1,), dtype=torch.float32, device=means.device)
    t, grid, ints, options = planned_args(
        _KR_CDF_PLANS, _kr_cdf_args, (means, logweights, logstds, x, out, acc), n_key=4
    )
    _kr_cdf_kernel[grid](*t, *ints, **options)
    return out


# --------------------------------------------------------------------------- torch.library ops

if triton is not None:

    @torch.library.custom_op("gmkernels::kr_inverse", mutates_args=())
    def _kr_inverse_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        logweights: torch.Tensor,
        gaussian_samples: torch.Tensor,
        scaled_cdfs: torch.Tensor | None,
        n_steps: int,
        eps: float,
        max_step_size: float,
    ) -> torch.Tensor:
        """KR transport N(0, I) -> GM along the given channel axes (``C = 1``: the 1-D inverse CDF)."""
        return _launch_kr_inverse(
            means, logstds, logweights, gaussian_samples, scaled_cdfs, n_steps, eps, max_step_size
        )

    @_kr_inverse_op.register_fake
    def _(means, logstds, logweights, gaussian_samples, scaled_cdfs, n_steps, eps, max_step_size):
        return means.new_empty(gaussian_samples.shape)

    @torch.library.custom_op("gmkernels::kr_scaled_cdfs", mutates_args=())
    def _kr_cdf_op(
        means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor, gm_samples: torch.Tensor
    ) -> torch.Tensor:
        """Scaled CDFs of the KR conditionals along the given channel axes, float32."""
        return _launch_kr_cdf(means, logstds, logweights, gm_samples)

    @_kr_cdf_op.register_fake
    def _(means, logstds, logweights, gm_samples):
        return gm_samples.new_empty(gm_samples.shape, dtype=torch.float32)

    @torch.library.custom_op("gmkernels::gm1d_inverse_cdf", mutates_args=())
    def _gm1d_inverse_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        logweights: torch.Tensor,
        scaled_cdfs: torch.Tensor,
        gaussian_samples: torch.Tensor | None,
        n_steps: int,
        eps: float,
        max_step_size: float,
    ) -> torch.Tensor:
        """The 1-D inverse CDF (``kr_inverse`` with one axis, without its channel axis)."""
        return _launch_gm1d_inverse(
            means, logstds, logweights, scaled_cdfs, gaussian_samples, n_steps, eps, max_step_size
        )

    @_gm1d_inverse_op.register_fake
    def _(means, logstds, logweights, scaled_cdfs, gaussian_samples, n_steps, eps, max_step_size):
        return means.new_empty(scaled_cdfs.shape)


# --------------------------------------------------------------------------- public functions


def _check_newton(n_steps: Any, eps: Any, max_step_size: Any) -> tuple[int, float, float]:
    """``n_steps`` an int >= 0, ``eps`` and ``max_step_size`` finite floats > 0 (a Python int and
    floats in range pass without the per-argument checks, which word the errors)."""
    if (
        type(n_steps) is int
        and n_steps >= 0
        and type(eps) is float
        and 0.0 < eps < math.inf
        and type(max_step_size) is float
        and 0.0 < max_step_size < math.inf
    ):
        return n_steps, eps, max_step_size
    return (
        check_count(n_steps, "n_steps", 0),
        check_positive(eps, "eps"),
        check_positive(max_step_size, "max_step_size"),
    )


def gm1d_inverse_cdf(
    gm1d: dict,
    scaled_cdfs: torch.Tensor,
    n_steps: int = 8,
    eps: float = 1e-6,
    max_step_size: float = 1.5,
    gaussian_samples: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of the scaled CDF ``F(x) = 2 P(X <= x) - 1`` of a per-pixel 1-D GM, by ``n_steps``
    Newton iterations ``x -= clamp(0.5 * (F(x) - u) / max(pdf(x), eps), +-max_step_size * s)``
    started at ``mean + sqrt(var) * z`` of the moment-matched Gaussian, with
    ``z = gaussian_samples`` or ``sqrt(2) * erfinv(clamp(u, -1 + eps, 1 - eps))``.

    Well-separated modes need more steps (each step moves at most ``max_step_size`` stds).
    Differentiable in every tensor input on the torch path (taken whenever one needs a gradient).

    Args:
        gm1d: ``{means (*B, K, H, W), logstds (*B, 1, 1, 1) | (*B, 1, H, W), logweights (*B, K, H, W)}``;
            weights are ``softmax_k(logweights)``.
        scaled_cdfs: ``(*B, N, H, W)``, targets ``u`` in ``[-1, 1]`` (others, NaN included, raise
            ``ValueError`` on CPU and fail a device-side assert on CUDA).
        gaussian_samples: optional ``(*B, N, H, W)`` standard-normal values with ``erf(z / sqrt 2) = u``.
    Returns:
        ``(*B, N, H, W)`` in the dtype of ``means``.
    """
    if type(gm1d) is dict:  # the structure is checked once per metadata of the four tensors
        s = checked_once(
            "gm1d, scaled_cdfs",
            lambda: check_gm1d(gm1d, scaled_cdfs, "scaled_cdfs"),
            gm1d.get("means"),
            gm1d.get("logstds"),
            gm1d.get("logweights"),
            scaled_cdfs,
        )
    else:
        s = check_gm1d(gm1d, scaled_cdfs, "scaled_cdfs")
    n_steps, eps, max_step_size = _check_newton(n_steps, eps, max_step_size)
    if gaussian_samples is not None:
        check_gm1d(gm1d, gaussian_samples, "gaussian_samples")
        if gaussian_samples.shape != scaled_cdfs.shape:
            raise ValueError(
                f"gaussian_samples must have the shape of scaled_cdfs {tuple(scaled_cdfs.shape)}, "
                f"got {tuple(gaussian_samples.shape)}"
            )
    require_range(scaled_cdfs, -1.0, 1.0, "scaled_cdfs must lie in [-1, 1]")
    means, logstds, logweights = gm1d["means"], gm1d["logstds"], gm1d["logweights"]
    wanted = (
        kernels_wanted(means, logstds, logweights, scaled_cdfs)
        if gaussian_samples is None
        else kernels_wanted(means, logstds, logweights, scaled_cdfs, gaussian_samples)
    )
    if not wanted:
        return run_reference(
            ref.gm1d_inverse_cdf, gm1d, scaled_cdfs, n_steps, eps, max_step_size, gaussian_samples, out_dtype=s.dtype
        )
    return _gm1d_inverse_op(means, logstds, logweights, scaled_cdfs, gaussian_samples, n_steps, eps, max_step_size)


def _rotated(gm: dict, axis_aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The KR basis (``ref.kr_basis``: GMFlow's float32 ``eigh``) and the means in it (float32)."""
    basis = ref.kr_basis(gm, axis_aligned, torch.float32)
    return ref.to_basis(gm["means"].float(), basis), basis


def gaussian_samples_to_gm_samples(
    gm: dict,
    gaussian_samples: torch.Tensor,
    n_steps: int = 16,
    eps: float = 1e-6,
    max_step_size: float = 1.5,
    axis_aligned: bool = True,
) -> torch.Tensor:
    """Knothe-Rosenblatt transport of standard-normal samples to samples of the per-pixel GM.

    Channels are rotated into the eigenbasis ``V`` of the GM's full covariance (GMFlow's float32 ``eigh``)
    (eigenvalues descending; with ``axis_aligned`` one ``V`` per batch element from the
    pixel-averaged covariance, and ``z`` taken as the coordinates in ``V`` as it is, so the
    spatial correlation of ``z`` carries over to the GM samples; otherwise a per-pixel ``V`` and
    ``z`` rotated into it). Axis by axis, the conditional 1-D mixture given the axes before is
    inverted at ``erf(z_c / sqrt 2)`` (``gm1d_inverse_cdf`` with ``n_steps``, ``eps``,
    ``max_step_size``), then rotated back. Inverse: ``gm_samples_to_gaussian_samples``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1), logweights (*B, K, 1, H, W)}``.
        gaussian_samples: ``(*B, N, C, H, W)``.
    Returns:
        ``(*B, N, C, H, W)`` in the dtype of ``means``.
    """
    s = check_gm(gm)
    check_state(gaussian_samples, "gaussian_samples", s, n_samples=True)
    n_steps, eps, max_step_size = _check_newton(n_steps, eps, max_step_size)
    if not kernels_wanted(gm["means"], gm["logstds"], gm["logweights"], gaussian_samples):
        return run_reference(
            ref.gaussian_samples_to_gm_samples,
            gm,
            gaussian_samples,
            n_steps,
            eps,
            max_step_size,
            bool(axis_aligned),
            out_dtype=s.dtype,
        )
    means_rot, basis = _rotated(gm, axis_aligned)
    z = gaussian_samples if axis_aligned else ref.to_basis(gaussian_samples.float(), basis)
    x_rot = _kr_inverse_op(means_rot, gm["logstds"], gm["logweights"], z, None, n_steps, eps, max_step_size)
    return ref.from_basis(x_rot, basis).to(s.dtype)


def gm_samples_to_gaussian_samples(
    gm: dict, gm_samples: torch.Tensor, eps: float = 1e-6, axis_aligned: bool = True
) -> torch.Tensor:
    """Knothe-Rosenblatt transport of GM samples to standard-normal samples, the inverse of
    ``gaussian_samples_to_gm_samples`` (same basis ``V``): the conditional scaled CDFs ``F`` of
    ``V^T x`` axis by axis, ``z = sqrt(2) * erfinv(clamp(F, -1 + eps, 1 - eps))``, rotated back
    by ``V`` unless ``axis_aligned``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1), logweights (*B, K, 1, H, W)}``.
        gm_samples: ``(*B, N, C, H, W)``.
    Returns:
        ``(*B, N, C, H, W)`` in the dtype of ``means``.
    """
    s = check_gm(gm)
    check_state(gm_samples, "gm_samples", s, n_samples=True)
    eps = check_positive(eps, "eps")
    if not kernels_wanted(gm["means"], gm["logstds"], gm["logweights"], gm_samples):
        return run_reference(
            ref.gm_samples_to_gaussian_samples, gm, gm_samples, eps, bool(axis_aligned), out_dtype=s.dtype
        )
    means_rot, basis = _rotated(gm, axis_aligned)
    u = _kr_cdf_op(means_rot, gm["logstds"], gm["logweights"], ref.to_basis(gm_samples.float(), basis))
    z = torch.erfinv(u.clamp(-1 + eps, 1 - eps)) * _SQRT2
    return (z if axis_aligned else ref.from_basis(z, basis)).to(s.dtype)
