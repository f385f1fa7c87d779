"""Products of densities (docs/ops.md#products): ``gm_mul_iso_gaussian`` (posterior reweighting) and
``iso_gaussian_mul_iso_gaussian``.

Kernels:

* ``_gm_mul_kernel``: one program owns ``BLOCK_P`` contiguous pixels of one batch row and walks
  the K tiles; per tile it loops over channel tiles, writes the new means
  ``(v / n) * mu_k + (r * s2 / n) * g`` and accumulates the distance term, then forms the
  logits. With a single K tile (``K <= BLOCK_K``) the log-softmax is done in registers;
  otherwise the raw logits go to a float32 scratch (the output itself when it is float32) while
  a running max and sum build the normaliser, and a second loop over the K tiles of the same
  program subtracts it: the means, the biggest tensor, are read once. (Logits stored relative
  to the running max in a bf16 output would save the scratch but round twice.)
* ``_gauss_mul_kernel``: elementwise over ``(R, C, P)``.

The distance term is ``sum_c (mu_k - mu_0)((mu_k - g) + (mu_0 - g))``: ``sum_c (mu_k - g)^2``
less the k-independent ``sum_c (mu_0 - g)^2``, which the log-softmax drops. It stays small in
fp32 when g is far from the components (a short posterior step, where ``|g|^2`` would
dominate), and each difference is exact when g and the components share a large offset.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import reference.product as ref

from .._dispatch import run_reference
from .._validate import check_gaussian, check_gm, require_range
from ._launch import (
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
from .mixture import pixel_blocks, single_row_views

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _check_real(x: object, name: str) -> float:
    """``x`` as a finite Python float, or a ``TypeError`` / ``ValueError`` naming ``name``
    (the callers test the common case, a finite float, inline)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(x).__name__}")
    x = float(x)
    if x != x or abs(x) == float("inf"):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def log1p(x):
        """``log(1 + x)``, accurate for small ``x`` (Goldberg: ``log(u) * x / (u - 1)``, ``u = 1 + x``)."""
        u = 1.0 + x
        d = u - 1.0
        big = u == float("inf")
        ratio = tl.where(big, 1.0, x / tl.where((d == 0.0) | big, 1.0, d))
        return tl.where(d == 0.0, x, tl.log(u) * ratio)

    @triton.jit
    def reweight_logits(
        m_base,
        l_base,
        g_base,
        om_base,
        offs_k,
        K,
        C,
        s_mk,
        s_mc,
        s_lk,
        s_gc,
        s_omk,
        s_omc,
        mask_p,
        a_mu,
        a_g,
        coef2,
        WRITE_MEANS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Base-2 logits ``[BK, BP]`` of the reweighted GM for the components ``offs_k``:
        ``log2(e) * logweights_k + coef2 * sum_c (mu_k - mu_0)(mu_k + mu_0 - 2 g)``, ``-inf`` for
        dead and masked components. With ``WRITE_MEANS`` it also stores the new means
        ``a_mu * mu_k + a_g * g``. ``*_base`` point at the row and pixels (``[1, 1, BP]`` for
        means, ``[1, BP]`` for the others); channels are walked in tiles of ``BLOCK_C``."""
        mask_k = offs_k < K
        mask_kp = mask_k[:, None] & mask_p[None, :]
        dist = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
        ar_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            mask_cp = (offs_c < C)[:, None] & mask_p[None, :]
            mask = mask_k[:, None, None] & mask_cp[None, :, :]
            mu = tl.load(m_base + offs_k[:, None, None] * s_mk + offs_c[None, :, None] * s_mc, mask=mask, other=0.0)
            mu = mu.to(tl.float32)
            g = tl.load(g_base + offs_c[:, None] * s_gc, mask=mask_cp, other=0.0).to(tl.float32)
            mu0 = tl.load(m_base + offs_c[None, :, None] * s_mc, mask=mask_cp[None, :, :], other=0.0).to(tl.float32)
            dist += tl.sum((mu - mu0) * ((mu - g[None, :, :]) + (mu0 - g[None, :, :])), axis=1)
            if WRITE_MEANS:
                new_mu = a_mu[None, None, :] * mu + (a_g[None, :] * g)[None, :, :]
                om = om_base + offs_k[:, None, None] * s_omk + offs_c[None, :, None] * s_omc
                tl.store(om, new_mu.to(om_base.dtype.element_ty), mask=mask)
        lw = tl.load(l_base + offs_k[:, None] * s_lk, mask=mask_kp, other=float("-inf")).to(tl.float32)
        dead = lw == float("-inf")
        return tl.where(dead, float("-inf"), tl.where(dead, 0.0, lw) * 1.4426950408889634 + coef2[None, :] * dist)

    @triton.jit
    def softmax_stats_update(logit2, m, w_sum):
        """Running base-2 max ``m [BP]`` and sum ``w_sum = sum 2^(logit2 - m)`` over one K tile
        (no NaN while everything so far is ``-inf``)."""
        m_new = tl.maximum(m, tl.max(logit2, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_sum = w_sum * tl.exp2(m - m_ref) + tl.sum(tl.exp2(logit2 - m_ref[None, :]), axis=0)
        return m_new, w_sum

    @triton.jit
    def _gm_mul_kernel(
        means_ptr,
        lw_ptr,
        logstds_ptr,
        g_ptr,
        v_ptr,
        out_m_ptr,
        out_lw_ptr,
        out_s_ptr,
        raw_ptr,
        K,
        C,
        P,
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
        s_gr,
        s_gc,
        s_gp,
        s_vr,
        s_vp,
        s_omr,
        s_omk,
        s_omc,
        s_omp,
        s_olr,
        s_olk,
        s_olp,
        s_osr,
        s_osp,
        s_rr,
        s_rk,
        s_rp,
        r,
        eps,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        SINGLE_K: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """GM ``(R, K, C, P)`` times isotropic Gaussian ``(R, C, P)``, normalised. Grid:
        ``R * n_pblocks`` programs. ``out_s`` has pixel stride 0 when the new log-std is per
        batch row; then only the row's first pixel lane stores it."""
        pid = tl.program_id(0)
        pb = pid % n_pblocks
        row = pid // n_pblocks
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        ar_k = tl.arange(0, BLOCK_K)
        if INT64:
            row = row.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
            ar_k = ar_k.to(tl.int64)
        mask_p = offs_p < P
        logstd = tl.load(logstds_ptr + row * s_sr + offs_p * s_sp, mask=mask_p, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * s_vr + offs_p * s_vp, mask=mask_p, other=1.0).to(tl.float32)
        rs2 = r * tl.exp(2.0 * logstd)
        n = tl.maximum(v + rs2, eps)
        a_mu = tl.where(v == float("inf"), 1.0, v / n)  # an infinite variance is no information: means unchanged
        a_g = rs2 / n
        coef2 = (-0.5 * 1.4426950408889634) * r / n
        # logstds + 0.5 * log(v) - 0.5 * log(n), as -0.5 * log1p(n / v - 1): exact for broad Gaussians
        new_logstd = logstd - 0.5 * log1p(tl.maximum(rs2 / v, eps / v - 1.0))
        mask_s = mask_p & ((offs_p == 0) | (offs_p * s_osp != 0))
        tl.store(out_s_ptr + row * s_osr + offs_p * s_osp, new_logstd.to(out_s_ptr.dtype.element_ty), mask=mask_s)

        m_base = means_ptr + row * s_mr + offs_p[None, None, :] * s_mp
        l_base = lw_ptr + row * s_lr + offs_p[None, :] * s_lp
        g_base = g_ptr + row * s_gr + offs_p[None, :] * s_gp
        om_base = out_m_ptr + row * s_omr + offs_p[None, None, :] * s_omp
        ol_base = out_lw_ptr + row * s_olr + offs_p[None, :] * s_olp
        m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
        if SINGLE_K:
            mask_kp = (ar_k < K)[:, None] & mask_p[None, :]
            logit2 = reweight_logits(
                m_base,
                l_base,
                g_base,
                om_base,
                ar_k,
                K,
                C,
                s_mk,
                s_mc,
                s_lk,
                s_gc,
                s_omk,
                s_omc,
                mask_p,
                a_mu,
                a_g,
                coef2,
                True,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
            )
            m, w_sum = softmax_stats_update(logit2, m, w_sum)
            lse2 = m + tl.log2(w_sum)  # -inf where every component is dead: NaN log-weights there
            out = (logit2 - lse2[None, :]) * 0.6931471805599453
            tl.store(ol_base + ar_k[:, None] * s_olk, out.to(out_lw_ptr.dtype.element_ty), mask=mask_kp)
        else:
            r_base = raw_ptr + row * s_rr + offs_p[None, :] * s_rp
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + ar_k
                mask_kp = (offs_k < K)[:, None] & mask_p[None, :]
                logit2 = reweight_logits(
                    m_base,
                    l_base,
                    g_base,
                    om_base,
                    offs_k,
                    K,
                    C,
                    s_mk,
                    s_mc,
                    s_lk,
                    s_gc,
                    s_omk,
                    s_omc,
                    mask_p,
                    a_mu,
                    a_g,
                    coef2,
                    True,
                    BLOCK_K,
                    BLOCK_C,
                    BLOCK_P,
                )
                tl.store(r_base + offs_k[:, None] * s_rk, logit2, mask=mask_kp)
                m, w_sum = softmax_stats_update(logit2, m, w_sum)
            tl.debug_barrier()  # the raw logits of this program are visible to all its threads
            lse2 = m + tl.log2(w_sum)  # -inf where every component is dead: NaN log-weights there
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + ar_k
                mask_kp = (offs_k < K)[:, None] & mask_p[None, :]
                logit2 = tl.load(r_base + offs_k[:, None] * s_rk, mask=mask_kp, other=0.0)
                out = (logit2 - lse2[None, :]) * 0.6931471805599453
                tl.store(ol_base + offs_k[:, None] * s_olk, out.to(out_lw_ptr.dtype.element_ty), mask=mask_kp)

    @triton.jit
    def _gauss_mul_kernel(
        m1_ptr,
        v1_ptr,
        m2_ptr,
        v2_ptr,
        out_m_ptr,
        out_v_ptr,
        C,
        P,
        n_pblocks,
        n_ctiles,
        s_1r,
        s_1c,
        s_1p,
        s_v1r,
        s_v1p,
        s_2r,
        s_2c,
        s_2p,
        s_v2r,
        s_v2p,
        s_or,
        s_oc,
        s_op,
        s_ovr,
        s_ovp,
        power1,
        power2,
        eps,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """``N(m1, v1)^power1 * N(m2, v2)^power2`` over ``(R, C, P)``; grid ``R * n_pblocks *
        n_ctiles``. The variance is stored by channel tile 0, by the first pixel lane only
        when it is per row (``s_ovp == 0``)."""
        pid = tl.program_id(0)
        cb = pid % n_ctiles
        pb = (pid // n_ctiles) % n_pblocks
        row = pid // (n_ctiles * n_pblocks)
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        if INT64:
            row = row.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
            offs_c = offs_c.to(tl.int64)
        mask_p = offs_p < P
        mask = (offs_c < C)[:, None] & mask_p[None, :]
        v1 = tl.load(v1_ptr + row * s_v1r + offs_p * s_v1p, mask=mask_p, other=0.0).to(tl.float32)
        v2 = tl.load(v2_ptr + row * s_v2r + offs_p * s_v2p, mask=mask_p, other=0.0).to(tl.float32)
        # an infinite variance is no information: (1, 0) stands in for (inf, finite) in the ratios
        # (the product is then the other factor), (1, 1) for (inf, inf); finite pairs as given
        inf1 = v1 == float("inf")
        inf2 = v2 == float("inf")
        u1 = tl.where(inf1, 1.0, tl.where(inf2, 0.0, v1))
        u2 = tl.where(inf2, 1.0, tl.where(inf1, 0.0, v2))
        n = tl.maximum(power1 * u2 + power2 * u1, eps)
        w1 = u2 / n
        w2 = u1 / n
        m1 = tl.load(m1_ptr + row * s_1r + offs_c[:, None] * s_1c + offs_p[None, :] * s_1p, mask=mask, other=0.0)
        m2 = tl.load(m2_ptr + row * s_2r + offs_c[:, None] * s_2c + offs_p[None, :] * s_2p, mask=mask, other=0.0)
        mean = (power1 * w1)[None, :] * m1.to(tl.float32) + (power2 * w2)[None, :] * m2.to(tl.float32)
        out = out_m_ptr + row * s_or + offs_c[:, None] * s_oc + offs_p[None, :] * s_op
        tl.store(out, mean.to(out_m_ptr.dtype.element_ty), mask=mask)
        if cb == 0:
            mask_v = mask_p & ((offs_p == 0) | (offs_p * s_ovp != 0))
            var = tl.where(inf1, v2 * w2, v1 * w1)
            tl.store(out_v_ptr + row * s_ovr + offs_p * s_ovp, var.to(out_v_ptr.dtype.element_ty), mask=mask_v)


# --------------------------------------------------------------------------- launchers


def _gm_mul_layout(
    K: int, C: int, P: int, R: int, elem_bytes: int, contiguous_pixels: bool
) -> tuple[int, int, int, int]:
    """Pixel-per-thread blocks (``mixture.pixel_blocks``: warps along the pixels, K and C in
    each thread's registers). Channels are looped inside the program and the tile holds mu,
    the new means and the distances, so along contiguous pixels the components come first (up
    to 32 values a thread in fp32, 16 with 2-byte elements: one K tile keeps the logits in
    registers, no scratch pass, for K <= 8 in fp32) and the channel tile takes what is left,
    usually 1."""
    bk, bc, bp, warps = pixel_blocks(K, C, P, R, elem_bytes, 32, False, contiguous_pixels)
    if contiguous_pixels:
        vec = 16 // elem_bytes
        tile = 32 * elem_bytes // 4  # 2-byte elements: twice the pixels a thread, half the tile
        bk = min(next_pow2(K), max(1, tile // vec))
        bc = max(1, min(next_pow2(C), tile // (bk * vec)))
    return bk, bc, bp, warps


def _gm_mul_blocks(K: int, C: int, P: int, R: int) -> tuple[int, int, int, int]:
    """Blocks for 4-byte elements along contiguous pixels (the common case, and the hook the
    tests replace to force multi-tile paths)."""
    return _gm_mul_layout(K, C, P, R, 4, True)


def _gm_mul_args(
    means: torch.Tensor,
    logweights: torch.Tensor,
    logstds: torch.Tensor,
    g: torch.Tensor,
    var: torch.Tensor,
    out_m: torch.Tensor,
    out_lw: torch.Tensor,
    out_s: torch.Tensor,
    raw: torch.Tensor,
    blocks_fn: Any,
    int64_fn: Any,
) -> tuple:
    """The kernel's views (in the order of the arguments; ``raw`` is ``out_lw`` or, for a
    multi-tile K of 2-byte logits, a float32 scratch made here), grid, integer arguments,
    options. ``blocks_fn, int64_fn`` are ``_gm_mul_blocks, needs_int64``, keys of the stored
    plan (tests replace them)."""
    K, C = means.shape[-4], means.shape[-3]
    m4, l3 = gm_views(means, logweights)
    R, P = m4.shape[0], m4.shape[-1]
    om4, ol3 = gm_views(out_m, out_lw)
    views = (m4, l3, per_row(logstds, R, P), g.reshape(R, C, P), per_row(var, R, P), om4, ol3, per_row(out_s, R, P))
    m4, l3, s2, g3, v2, om4, ol3, os2 = single_row_views(*pixel_rows(*views))
    R, P = m4.shape[0], m4.shape[-1]
    if means.element_size() == 4 and m4.stride(-1) == 1:
        block_k, block_c, block_p, warps = blocks_fn(K, C, P, R)
    else:
        block_k, block_c, block_p, warps = _gm_mul_layout(K, C, P, R, means.element_size(), m4.stride(-1) == 1)
    single_k = K <= block_k
    # raw logits of a multi-tile K: in the output when it is float32, else in a float32 scratch
    raw = ol3 if single_k or out_lw.dtype == torch.float32 else torch.empty(ol3.shape, device=means.device)
    n_pblocks = cdiv(P, block_p)
    ints = (
        K,
        C,
        P,
        n_pblocks,
        *m4.stride(),
        *l3.stride(),
        *s2.stride(),
        *g3.stride(),
        *v2.stride(),
        *om4.stride(),
        *ol3.stride(),
        *os2.stride(),
        *raw.stride(),
    )
    options = dict(
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        SINGLE_K=single_k,
        INT64=int64_fn(m4, l3, g3, om4, ol3, raw),
        num_warps=warps,
    )
    return (m4, l3, s2, g3, v2, om4, ol3, os2, raw), (R * n_pblocks,), ints, options


_GM_MUL_PLANS = PlanCache()
_GAUSS_PLANS = PlanCache()


def _launch_gm_mul(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    g: torch.Tensor,
    var: torch.Tensor,
    r: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``_gm_mul_kernel``; returns new ``(means, logstds, logweights)`` in the dtype of
    ``means``, ``logstds`` per pixel ``(*B, 1, 1, H, W)`` when ``logstds`` or ``var`` is. The
    launch plan is stored per shape (``planned_args``)."""
    *batch, K, C, H, W = means.shape
    per_pixel = logstds.shape[-1] * logstds.shape[-2] > 1 or var.shape[-1] * var.shape[-2] > 1
    out_m = torch.empty(*means.shape, dtype=means.dtype, device=means.device)
    out_lw = torch.empty(*logweights.shape, dtype=means.dtype, device=means.device)
    out_s = torch.empty(
        *batch, 1, 1, H if per_pixel else 1, W if per_pixel else 1, dtype=means.dtype, device=means.device
    )
    if out_m.numel() == 0:
        return out_m, out_s, out_lw
    tensors = (means, logweights, logstds, g, var, out_m, out_lw, out_s, out_lw)
    tensors, grid, ints, options = planned_args(
        _GM_MUL_PLANS, _gm_mul_args, tensors, _gm_mul_blocks, needs_int64, n_key=5
    )
    _gm_mul_kernel[grid](*tensors, *ints, r, eps, **options)
    return out_m, out_s, out_lw


def _gauss_mul_args(m1, v1, m2, v2, mean, var) -> tuple:
    """The kernel's views (in the order of the arguments), grid, integer arguments, options:
    elementwise, up to 8 channels x 128 pixels a program (8 per thread at 4 warps)."""
    C, H, W = m1.shape[-3:]
    R, P = mean.numel() // (C * H * W), H * W
    views = (m1.reshape(R, C, P), per_row(v1, R, P), m2.reshape(R, C, P), per_row(v2, R, P))
    views = pixel_rows(*views, mean.view(R, C, P), per_row(var, R, P))
    a1, b1, a2, b2, om, ov = views
    R, P = a1.shape[0], a1.shape[-1]
    block_c, block_p = min(next_pow2(C), 8), min(next_pow2(P), 128)
    n_pblocks, n_ctiles = cdiv(P, block_p), cdiv(C, block_c)
    ints = (
        C,
        P,
        n_pblocks,
        n_ctiles,
        *a1.stride(),
        *b1.stride(),
        *a2.stride(),
        *b2.stride(),
        *om.stride(),
        *ov.stride(),
    )
    options = dict(BLOCK_C=block_c, BLOCK_P=block_p, INT64=needs_int64(a1, a2, om), num_warps=4)
    return views, (R * n_pblocks * n_ctiles,), ints, options


def _launch_gauss_mul(
    m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor, power1: float, power2: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``_gauss_mul_kernel``: ``(mean, var)`` in the dtype of ``m1``, ``var`` per pixel when
    ``v1`` or ``v2`` is. The launch plan is stored per shape (``planned_args``)."""
    *batch, C, H, W = m1.shape
    per_pixel = v1.shape[-1] * v1.shape[-2] > 1 or v2.shape[-1] * v2.shape[-2] > 1
    mean = torch.empty(*m1.shape, dtype=m1.dtype, device=m1.device)
    var = torch.empty(*batch, 1, H if per_pixel else 1, W if per_pixel else 1, dtype=m1.dtype, device=m1.device)
    if mean.numel() == 0:
        return mean, var
    tensors, grid, ints, options = planned_args(_GAUSS_PLANS, _gauss_mul_args, (m1, v1, m2, v2, mean, var), n_key=4)
    _gauss_mul_kernel[grid](*tensors, *ints, power1, power2, eps, **options)
    return mean, var


# --------------------------------------------------------------------------- torch.library ops

if triton is not None:

    @torch.library.custom_op("gmkernels::gm_mul_iso_gaussian", mutates_args=())
    def _gm_mul_iso_gaussian_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        logweights: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        gm_power: float,
        gaussian_power: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_gm_mul(means, logstds, logweights, mean, var, gaussian_power / gm_power, eps)

    @_gm_mul_iso_gaussian_op.register_fake
    def _(means, logstds, logweights, mean, var, gm_power, gaussian_power, eps):
        *batch, _, _, H, W = means.shape
        per_pixel = logstds.shape[-1] * logstds.shape[-2] > 1 or var.shape[-1] * var.shape[-2] > 1
        std_shape = (*batch, 1, 1, H, W) if per_pixel else (*batch, 1, 1, 1, 1)
        return means.new_empty(means.shape), means.new_empty(std_shape), means.new_empty(logweights.shape)

    @torch.library.custom_op("gmkernels::iso_gaussian_mul_iso_gaussian", mutates_args=())
    def _iso_gaussian_mul_op(
        mean1: torch.Tensor,
        var1: torch.Tensor,
        mean2: torch.Tensor,
        var2: torch.Tensor,
        power1: float,
        power2: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_gauss_mul(mean1, var1, mean2, var2, power1, power2, eps)

    @_iso_gaussian_mul_op.register_fake
    def _(mean1, var1, mean2, var2, power1, power2, eps):
        *batch, _, H, W = mean1.shape
        per_pixel = var1.shape[-1] * var1.shape[-2] > 1 or var2.shape[-1] * var2.shape[-2] > 1
        return mean1.new_empty(mean1.shape), mean1.new_empty((*batch, 1, H, W) if per_pixel else (*batch, 1, 1, 1))


# --------------------------------------------------------------------------- public functions


def gm_mul_iso_gaussian(
    gm: dict, gaussian: dict, gm_power: float = 1.0, gaussian_power: float = 1.0, eps: float = 1e-6
) -> dict:
    """Normalised product ``p_gm^gm_power * N(mean, var)^gaussian_power``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``.
        gaussian: ``{mean (*B, C, H, W), var (*B, 1, H, W) | (*B, 1, 1, 1)}``, ``var > 0``; an
            infinite ``var`` carries no information: means and log-stds come back unchanged,
            log-weights renormalised.
        gm_power: > 0. gaussian_power: any finite float (negative divides).
    Returns:
        A GM in the dtype of ``means``; ``logstds`` is per pixel ``(*B, 1, 1, H, W)`` when
        ``var`` (or ``logstds``) is per pixel. A pixel whose components are all dead is not a
        GM: its log-weights are NaN (docs/numerics.md#products).
    """
    s = check_gm(gm)
    check_gaussian(gaussian, "gaussian", s)
    mean, var = gaussian["mean"], gaussian["var"]
    require_range(
        var, 0.0, math.inf, "gaussian['var'] must be > 0 (a variance; inf means no information)", low_open=True
    )
    if type(gm_power) is not float or not 0.0 < gm_power < math.inf:  # the common case inline, without a call
        gm_power = _check_real(gm_power, "gm_power")
        if gm_power <= 0:
            raise ValueError(f"gm_power must be > 0, got {gm_power}")
    if type(gaussian_power) is not float or not math.isfinite(gaussian_power):
        gaussian_power = _check_real(gaussian_power, "gaussian_power")
    if type(eps) is not float or not math.isfinite(eps):
        eps = _check_real(eps, "eps")
    means, logstds, logweights = gm["means"], gm["logstds"], gm["logweights"]
    if not kernels_wanted(means, logstds, logweights, mean, var):
        return run_reference(ref.gm_mul_iso_gaussian, gm, gaussian, gm_power, gaussian_power, eps, out_dtype=s.dtype)
    means, logstds, logweights = _gm_mul_iso_gaussian_op(
        means, logstds, logweights, mean, var, gm_power, gaussian_power, eps
    )
    return {"means": means, "logstds": logstds, "logweights": logweights}


def iso_gaussian_mul_iso_gaussian(
    g1: dict, g2: dict, power1: float = 1.0, power2: float = 1.0, eps: float = 1e-6
) -> dict:
    """Normalised product ``N(m1, v1)^power1 * N(m2, v2)^power2`` (a power of -1 divides).

    Args:
        g1, g2: ``{mean (*B, C, H, W), var (*B, 1, H, W) | (*B, 1, 1, 1)}``, same ``*B, C, H, W``,
            ``var > 0``. An infinite variance carries no information: the product is the other
            factor, ``N(m2, v2 / power2)`` for an infinite ``v1`` (``power2 > 0``); both infinite
            give ``var = inf`` and ``mean = (power1 * m1 + power2 * m2) / (power1 + power2)``.
    Returns:
        ``{mean (*B, C, H, W), var}`` in the dtype of ``g1['mean']``; ``var`` is per pixel
        ``(*B, 1, H, W)`` when either input's is.
    """
    s = check_gaussian(g1, "g1")
    check_gaussian(g2, "g2", s)
    m1, v1, m2, v2 = g1["mean"], g1["var"], g2["mean"], g2["var"]
    require_range(v1, 0.0, math.inf, "g1['var'] must be > 0 (a variance; inf means no information)", low_open=True)
    require_range(v2, 0.0, math.inf, "g2['var'] must be > 0 (a variance; inf means no information)", low_open=True)
    if type(power1) is not float or not math.isfinite(power1):  # the common case inline, without a call
        power1 = _check_real(power1, "power1")
    if type(power2) is not float or not math.isfinite(power2):
        power2 = _check_real(power2, "power2")
    if type(eps) is not float or not math.isfinite(eps):
        eps = _check_real(eps, "eps")
    if not kernels_wanted(m1, v1, m2, v2):
        return run_reference(ref.iso_gaussian_mul_iso_gaussian, g1, g2, power1, power2, eps, out_dtype=s.dtype)
    mean, var = _iso_gaussian_mul_op(m1, v1, m2, v2, power1, power2, eps)
    return {"mean": mean, "var": var}
