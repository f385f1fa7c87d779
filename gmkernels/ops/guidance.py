"""Guidance on conditional/unconditional x0-GMs (docs/ops.md#guidance): ``probabilistic_guidance``,
``weight_guidance``, ``mean_cfg``.

Layout (every kernel here): pixel-per-thread, as the mixture kernels (``mixture.pixel_blocks``):
warps along the pixels, each thread owns ``vec`` contiguous pixels with its whole ``BLOCK_K x
BLOCK_C`` tile in registers, so the loops over K and C never reduce across threads (no barrier,
no shuffle). Tensors are seen as ``means (R, K, C, P)``, ``logweights (R, K, P)`` with ``R``
rows (samples) and ``P = H * W`` pixels; point data (``H = W = 1``) is seen as one row of ``B``
pixels (``_launch.pixel_rows``), each lane its own sample (``POINTS``), so its per-sample sums
are the lane's own values and a program packs ``BLOCK_P`` points.

Kernels (self-contained: the mixture moments and the GM x Gaussian product are fused in):

* ``_guidance_stats_kernel`` (pass 1): per pixel and channel tile, an online softmax over K tiles
  of both GMs gives ``m_c``, the conditional variance (Chan-merged weighted sums of squared
  deviations, no ``E[x^2] - E[x]^2`` cancellation) and ``m_u``; it writes ``d = m_c - m_u`` (and
  ``m_c``) to float32 scratch (``C * P`` per row, ``1/K`` of the means) and per-sample partial
  sums ``(sum d m_c, sum m_c^2, sum d^2, sum_p v_c)``: one row per program (reduced over the
  program's pixels after the loops) or, ``POINTS``, one row per lane. With ``C`` up to one
  channel tile (8 channels fp32, 2 bf16) each pixel's softmax is computed once; wider ``C``
  redoes the online softmax per channel tile (registers bound the tile).
* ``_guidance_bias_power_kernel`` (probabilistic, ``orthogonal > 0``): the power ``<b, b>`` of the
  orthogonalised bias ``b = d - proj m_c``, summed exactly from the scratch (one read of
  ``2 * C * P`` floats) into the third partial column, rather than as
  ``<d,d> - 2 proj <d,m_c> + proj^2 <m_c,m_c>``, whose cancellation would cost
  ``1e-7 / sin^2(theta)`` relative accuracy when ``d`` is nearly parallel to ``m_c``.
* ``_guidance_apply_kernel`` (probabilistic, pass 2): each program sums its sample's partials
  (float64) into ``proj, P, V`` and the reweighting Gaussian ``N(A m_c + B d, v)`` (no host-side
  tensor math between the launches), then per pixel ``means' = (v mu + s2 g) / n``,
  ``logweights' = log_softmax_k(logweights - 0.5 / n * sum_c (mu - g)^2)``,
  ``logstds' = logstds + 0.5 log v - 0.5 log n`` with ``n = max(v + s2, eps)``. For ``K <=
  BLOCK_K`` the log-weights are final after one sweep; otherwise the unnormalised logits are
  stored (in the output when it is float32, else in a float32 scratch) and a second sweep over
  the log-weights alone (not the means) normalises them, each thread re-reading what it wrote.
* ``_weight_guidance_kernel``: online log-softmax of ``l_c + (scale - 1)(l_c - l_u)`` (dead
  components clamped to ``-1e30`` as in the reference); means and stds of ``gm_cond`` pass through.
* ``mean_cfg``: pass 1 (without the variance; ``m_c`` and the sums only when orthogonal), then
  ``_mean_cfg_apply_kernel``: ``means' = mu + a d + b m_c`` with ``a = scale - 1`` and ``b =
  -a proj`` from the partials, each channel tile's shift loaded once per pixel for all K.

Conditioning: with ``orthogonal > 0`` and ``d`` nearly parallel to ``m_c`` the bias is a small
residual that is then scaled up to power ``scale^2 V``; in float32 its relative error is about
``1e-7 / sin(theta)`` (theta the angle between ``d`` and ``m_c``). With ``C*H*W == 1`` the
residual is pure rounding (as in any float32 evaluation of the reference).

Block sizes come from a fixed heuristic (no autotuning: deterministic, CUDA-graph safe); each
launcher's plan (views' strides, blocks, grids, scratch sizes) is stored per input geometry
(``_launch.planned_args``).
"""

from __future__ import annotations

import torch

import reference.guidance as ref

from .._dispatch import run_reference
from .._validate import GMShape, check_gm, check_power
from ._launch import (
    TRITON_VERSION,
    PlanCache,
    cdiv,
    checked_once,
    gm_views,
    kernels_wanted,
    needs_int64,
    per_row,
    pixel_rows,
    planned_args,
)
from .mixture import pixel_blocks

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

_NSUM = 32  # partial sums read per step when a program totals its sample's partials
# The statistics pass's per-thread tile: 32 elements; 16 on triton < 3.5, whose ptxas spills at 32
# (sm_90: plain mean-CFG fp32 and probabilistic bf16).
_STATS_TILE = 16 if TRITON_VERSION is not None and TRITON_VERSION < (3, 5) else 32


def _apply_layout(K: int, C: int, P: int, R: int, elem_bytes: int, contiguous: bool) -> tuple[int, int, int, int]:
    """The probabilistic apply's ``(BLOCK_K, BLOCK_C, BLOCK_P, num_warps)``, pixel-per-thread
    (``mixture.pixel_blocks``): tile 32 when the channels fit one tile (``g`` then stays in
    registers across the K loop), else 16 (``g`` is re-formed per K tile next to the means tile;
    at 32 that spills at sm_90, fp32, C >= 16)."""
    one = pixel_blocks(K, C, P, R, elem_bytes, 32, False, contiguous)
    return one if C <= one[1] else pixel_blocks(K, C, P, R, elem_bytes, 16, False, contiguous)


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    from .mixture import online_moments_update

    @triton.jit
    def _moments(
        m_ptr,
        l_ptr,
        K,
        s_k,
        s_c,
        s_lk,
        kr,
        cc,
        cmask,
        pmask,
        WITH_VAR: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Softmax-weighted mean ``[BC, BP]`` over K of one channel tile and (``WITH_VAR``) the
        weighted sum of squared deviations summed over its channels ``[BP]``; ``m_ptr``/``l_ptr``
        are ``[1, 1, BP]``/``[1, BP]`` pointer blocks at component 0, channel 0 of this program's
        pixels. Online over K tiles by ``mixture.online_moments_update`` (running max, weight sum,
        mean, Chan-merged M2, no ``E[x^2] - E[x]^2`` cancellation), M2 kept per pixel, not per
        channel (``PIXEL_M2``: the statistics only need its channel sum, fewer registers).
        All-dead tiles or pixels give no NaN."""
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        w_sum = tl.zeros([BLOCK_P], tl.float32)
        mean = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        m2 = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + kr
            kmask = kk < K
            lw = tl.load(l_ptr + kk[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf"))
            mu = tl.load(
                m_ptr + kk[:, None, None] * s_k + cc[None, :, None] * s_c,
                mask=kmask[:, None, None] & (cmask[:, None] & pmask[None, :])[None, :, :],
                other=0.0,
            ).to(tl.float32)
            lw2 = lw.to(tl.float32) * 1.4426950408889634  # base-2 logits; -inf stays -inf
            m_run, w_sum, mean, m2 = online_moments_update(lw2, mu, m_run, w_sum, mean, m2, WITH_VAR, True)
        return mean, m2 / tl.where(w_sum > 0, w_sum, 1.0)

    @triton.jit
    def _sample_sums(part_ptr, b, p, pmask, NPB, POINTS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Totals of the partial sums ``part[row, :NPB, 0..3]`` of this program's sample ``b``
        (scalars, accumulated in float64, returned in float32) or, ``POINTS``, of each lane's
        sample ``p`` (``[BP]``, one partial each)."""
        if POINTS:
            base = part_ptr + p * 4  # lanes past the end read 1s: finite, unused
            s0 = tl.load(base + 0, mask=pmask, other=1.0)
            s1 = tl.load(base + 1, mask=pmask, other=1.0)
            s2 = tl.load(base + 2, mask=pmask, other=1.0)
            s3 = tl.load(base + 3, mask=pmask, other=1.0)
        else:
            ir = tl.arange(0, BLOCK_N)
            a0 = tl.zeros([BLOCK_N], tl.float64)
            a1 = tl.zeros([BLOCK_N], tl.float64)
            a2 = tl.zeros([BLOCK_N], tl.float64)
            a3 = tl.zeros([BLOCK_N], tl.float64)
            for i0 in range(0, NPB, BLOCK_N):
                ii = i0 + ir
                base = part_ptr + (b * NPB + ii) * 4
                a0 += tl.load(base + 0, mask=ii < NPB, other=0.0).to(tl.float64)
                a1 += tl.load(base + 1, mask=ii < NPB, other=0.0).to(tl.float64)
                a2 += tl.load(base + 2, mask=ii < NPB, other=0.0).to(tl.float64)
                a3 += tl.load(base + 3, mask=ii < NPB, other=0.0).to(tl.float64)
            s0 = tl.sum(a0, axis=0).to(tl.float32)
            s1 = tl.sum(a1, axis=0).to(tl.float32)
            s2 = tl.sum(a2, axis=0).to(tl.float32)
            s3 = tl.sum(a3, axis=0).to(tl.float32)
        return s0, s1, s2, s3

    @triton.jit
    def _store_sums(part_ptr, pid, p, pmask, s0, s1, s2, s3, POINTS: tl.constexpr):
        """Write this program's partial sums (``[BP]`` per-pixel values) at ``part[pid, :]``
        (summed over the pixels) or, ``POINTS``, each lane's own at ``part[p, :]``."""
        if POINTS:
            base = part_ptr + p * 4
            tl.store(base + 0, s0, mask=pmask)
            tl.store(base + 1, s1, mask=pmask)
            tl.store(base + 2, s2, mask=pmask)
            tl.store(base + 3, s3, mask=pmask)
        else:
            base = part_ptr + pid * 4
            tl.store(base + 0, tl.sum(s0, axis=0))
            tl.store(base + 1, tl.sum(s1, axis=0))
            tl.store(base + 2, tl.sum(s2, axis=0))
            tl.store(base + 3, tl.sum(s3, axis=0))

    @triton.jit
    def _program_pixels(NPB, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
        """``(pid, row, pixel offsets [BP], k range [BK], c range [BC])`` of a grid of
        ``R * NPB`` programs, pixel block fastest; int64 offsets when ``INT64``."""
        pid = tl.program_id(0)
        b = pid // NPB
        p = (pid % NPB) * BLOCK_P + tl.arange(0, BLOCK_P)
        kr = tl.arange(0, BLOCK_K)
        cr = tl.arange(0, BLOCK_C)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
            kr = kr.to(tl.int64)
            cr = cr.to(tl.int64)
        return pid, b, p, kr, cr

    @triton.jit
    def _guidance_stats_kernel(
        mc_ptr,
        lc_ptr,
        ls_ptr,
        mu_ptr,
        lu_ptr,
        out_mc_ptr,
        out_d_ptr,
        part_ptr,
        Kc,
        Ku,
        C,
        P,
        NPB,
        s_cb,
        s_ck,
        s_cc,
        s_cp,
        s_lcb,
        s_lck,
        s_lcp,
        s_lsb,
        s_lsp,
        s_ub,
        s_uk,
        s_uc,
        s_up,
        s_lub,
        s_luk,
        s_lup,
        WITH_VAR: tl.constexpr,
        WITH_MC: tl.constexpr,
        WITH_DD: tl.constexpr,
        SUMS: tl.constexpr,
        POINTS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """Pass 1 of guidance for row ``b`` and pixels ``[pb*BLOCK_P, (pb+1)*BLOCK_P)``: writes
        ``d = m_c - m_u`` (and ``m_c`` when ``WITH_MC``) to ``(R, C, P)`` float32 scratch and the
        partial sums ``(sum d m_c, sum m_c^2, sum d^2, sum_p v_c)``: the first two ``WITH_MC``,
        the third ``WITH_DD``, the last ``WITH_VAR`` (``v_c`` the per-pixel variance including
        ``exp(2 logstds)``); columns not asked for hold zeros, none written without any."""
        pid, b, p, kr, cr = _program_pixels(NPB, BLOCK_K, BLOCK_C, BLOCK_P, INT64)
        pmask = p < P
        mc_base = mc_ptr + b * s_cb + p[None, None, :] * s_cp
        lc_base = lc_ptr + b * s_lcb + p[None, :] * s_lcp
        mu_base = mu_ptr + b * s_ub + p[None, None, :] * s_up
        lu_base = lu_ptr + b * s_lub + p[None, :] * s_lup
        s_dm = tl.zeros([BLOCK_P], tl.float32)
        s_mm = tl.zeros([BLOCK_P], tl.float32)
        s_dd = tl.zeros([BLOCK_P], tl.float32)
        var_sum = tl.zeros([BLOCK_P], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cr
            cmask = cc < C
            mask2 = cmask[:, None] & pmask[None, :]
            m_c, v_k = _moments(
                mc_base, lc_base, Kc, s_ck, s_cc, s_lck, kr, cc, cmask, pmask, WITH_VAR, BLOCK_K, BLOCK_C, BLOCK_P
            )
            m_u, _unused = _moments(
                mu_base, lu_base, Ku, s_uk, s_uc, s_luk, kr, cc, cmask, pmask, False, BLOCK_K, BLOCK_C, BLOCK_P
            )
            d = tl.where(mask2, m_c - m_u, 0.0)
            out_off = (b * C + cc[:, None]) * P + p[None, :]
            tl.store(out_d_ptr + out_off, d, mask=mask2)
            if WITH_MC:
                tl.store(out_mc_ptr + out_off, m_c, mask=mask2)
                m_z = tl.where(mask2, m_c, 0.0)
                s_dm += tl.sum(d * m_z, axis=0)
                s_mm += tl.sum(m_z * m_z, axis=0)
            if WITH_DD:
                s_dd += tl.sum(d * d, axis=0)
            if WITH_VAR:
                var_sum += v_k
        if SUMS:  # any of the three
            v_c = tl.zeros([BLOCK_P], tl.float32)
            if WITH_VAR:
                ls = tl.load(ls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)
                v_c = tl.where(pmask, var_sum / C + tl.exp(2.0 * ls), 0.0)
            _store_sums(part_ptr, pid, p, pmask, s_dm, s_mm, s_dd, v_c, POINTS)

    @triton.jit
    def _guidance_bias_power_kernel(
        mc_ptr,
        d_ptr,
        part_ptr,
        C,
        P,
        NPB,
        inv_chw,
        orthogonal,
        POINTS: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """``part[.., 2] = sum (d - proj m_c)^2`` over this program's pixels (the statistics
        pass's grid and partial rows) with ``proj = orthogonal <d, m_c> / max(<m_c, m_c>, 1e-6)``
        of the sample, from its partials (``<.,.>`` the mean over C, H, W)."""
        pid, b, p, _kr, cr = _program_pixels(NPB, 1, BLOCK_C, BLOCK_P, INT64)
        pmask = p < P
        s_dm, s_mm, _s2, _s3 = _sample_sums(part_ptr, b, p, pmask, NPB, POINTS, BLOCK_N)
        proj = orthogonal * (s_dm * inv_chw) / tl.maximum(s_mm * inv_chw, 1e-6)
        acc = tl.zeros([BLOCK_P], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cr
            mask2 = (cc < C)[:, None] & pmask[None, :]
            off = (b * C + cc[:, None]) * P + p[None, :]
            r = tl.load(d_ptr + off, mask=mask2, other=0.0) - proj * tl.load(mc_ptr + off, mask=mask2, other=0.0)
            acc += tl.sum(r * r, axis=0)
        if POINTS:
            tl.store(part_ptr + p * 4 + 2, acc, mask=pmask)
        else:
            tl.store(part_ptr + pid * 4 + 2, tl.sum(acc, axis=0))

    @triton.jit
    def _guidance_apply_kernel(
        m_ptr,
        l_ptr,
        ls_ptr,
        mc_ptr,
        d_ptr,
        part_ptr,
        out_m_ptr,
        out_l_ptr,
        out_ls_ptr,
        lg_ptr,
        K,
        C,
        P,
        NPB,
        NPB_S,
        LS_P,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        s_lb,
        s_lk,
        s_lp,
        s_lsb,
        s_lsp,
        s_omb,
        s_omk,
        s_omc,
        s_omp,
        s_olb,
        s_olk,
        s_olp,
        s_osb,
        s_osp,
        inv_chw,
        inv_hw,
        scale,
        orthogonal,
        eps,
        POINTS: tl.constexpr,
        SINGLE_K: tl.constexpr,
        ONE_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """Pass 2: the conditional GM times ``N(g, v)``, ``g = A m_c + B d``; ``A, B, v`` of each
        sample from the statistics' partials (``NPB_S`` per row). Writes means, log-weights and
        log-stds (``LS_P`` pixels: 1 for per-sample stds) through their strides; ``lg_ptr`` holds
        the unnormalised logits between the two sweeps when ``K > BLOCK_K`` (strides of the
        log-weights output)."""
        _pid, b, p, kr, cr = _program_pixels(NPB, BLOCK_K, BLOCK_C, BLOCK_P, INT64)
        pmask = p < P
        s_dm, s_mm, s_pp, s_v = _sample_sums(part_ptr, b, p, pmask, NPB_S, POINTS, BLOCK_N)
        # target (m_c + f (d - proj m_c), V (1 - scale^2)) divided by cond (m_c, V): the
        # quotient's normaliser V - V (1 - scale^2) is formed as V scale^2 (no cancellation).
        V = s_v * inv_hw
        proj = orthogonal * (s_dm * inv_chw) / tl.maximum(s_mm * inv_chw, 1e-6)
        f = scale * tl.sqrt(V / tl.maximum(s_pp * inv_chw, 1e-6))
        vs2 = V * scale * scale
        inv_nq = 1.0 / tl.maximum(vs2, 1e-6)
        coef_a = (vs2 - V * f * proj) * inv_nq
        coef_b = V * f * inv_nq
        v = V * (1 - scale * scale) * V * inv_nq

        ls = tl.load(ls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)
        s2 = tl.exp(2.0 * ls)
        n = tl.maximum(v + s2, eps)
        inv_n = 1.0 / n
        w_v = v * inv_n
        w_s = s2 * inv_n
        half_inv_n = 0.5 * inv_n
        ls_out = ls + 0.5 * tl.log(v) - 0.5 * tl.log(n)
        tl.store(out_ls_ptr + b * s_osb + p * s_osp, ls_out.to(out_ls_ptr.dtype.element_ty), mask=pmask & (p < LS_P))

        m_base = m_ptr + b * s_mb + p[None, None, :] * s_mp
        l_base = l_ptr + b * s_lb + p[None, :] * s_lp
        om_base = out_m_ptr + b * s_omb + p[None, None, :] * s_omp
        ol_off = b * s_olb + p[None, :] * s_olp
        g_base = b * C * P + p[None, :]
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_P], tl.float32)
        if ONE_C:  # one channel tile: g once per pixel, kept in registers across the K loop
            mask2 = (cr < C)[:, None] & pmask[None, :]
            g_off = g_base + cr[:, None] * P
            g1 = coef_a * tl.load(mc_ptr + g_off, mask=mask2, other=0.0) + coef_b * tl.load(
                d_ptr + g_off, mask=mask2, other=0.0
            )
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + kr
            kmask = kk < K
            dist = tl.zeros([BLOCK_K, BLOCK_P], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cr
                mask2 = (cc < C)[:, None] & pmask[None, :]
                mask3 = kmask[:, None, None] & mask2[None, :, :]
                if ONE_C:
                    g = g1
                else:
                    g_off = g_base + cc[:, None] * P
                    g = coef_a * tl.load(mc_ptr + g_off, mask=mask2, other=0.0) + coef_b * tl.load(
                        d_ptr + g_off, mask=mask2, other=0.0
                    )
                mu = tl.load(m_base + kk[:, None, None] * s_mk + cc[None, :, None] * s_mc, mask=mask3, other=0.0).to(
                    tl.float32
                )
                out = w_v[None, None, :] * mu + (w_s[None, :] * g)[None, :, :]
                tl.store(
                    om_base + kk[:, None, None] * s_omk + cc[None, :, None] * s_omc,
                    out.to(out_m_ptr.dtype.element_ty),
                    mask=mask3,
                )
                diff = mu - g[None, :, :]
                dist += tl.sum(diff * diff, axis=1)
            kpmask = kmask[:, None] & pmask[None, :]
            lw = tl.load(l_base + kk[:, None] * s_lk, mask=kpmask, other=float("-inf")).to(tl.float32)
            logit = lw - half_inv_n[None, :] * dist
            m_new = tl.maximum(m_run, tl.max(logit, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_run = l_run * tl.exp(m_run - m_ref) + tl.sum(tl.exp(logit - m_ref[None, :]), axis=0)
            m_run = m_new
            if SINGLE_K:  # K <= BLOCK_K, one tile: the log-weights are final now
                lse = m_ref + tl.log(tl.where(l_run > 0, l_run, 1.0))
                tl.store(
                    out_l_ptr + ol_off + kk[:, None] * s_olk,
                    (logit - lse[None, :]).to(out_l_ptr.dtype.element_ty),
                    mask=kpmask,
                )
            else:  # kept unnormalised (float32) for the second sweep
                tl.store(lg_ptr + ol_off + kk[:, None] * s_olk, logit, mask=kpmask)
        if not SINGLE_K:  # second sweep over the logits alone; each thread re-reads what it wrote
            lse = tl.where(m_run == float("-inf"), 0.0, m_run) + tl.log(tl.where(l_run > 0, l_run, 1.0))
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + kr
                kpmask = (kk < K)[:, None] & pmask[None, :]
                logit = tl.load(lg_ptr + ol_off + kk[:, None] * s_olk, mask=kpmask, other=0.0)
                tl.store(
                    out_l_ptr + ol_off + kk[:, None] * s_olk,
                    (logit - lse[None, :]).to(out_l_ptr.dtype.element_ty),
                    mask=kpmask,
                )

    @triton.jit
    def _weight_guidance_kernel(
        lc_ptr,
        lu_ptr,
        out_ptr,
        K,
        HW,
        NPB,
        s_cb,
        s_ck,
        s_cp,
        s_ub,
        s_uk,
        s_up,
        s_ob,
        s_ok,
        s_op,
        scale_m1,
        SINGLE_K: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """``out[b, :, p] = log_softmax_k(l_c + (scale - 1) (l_c - l_u))`` with both log-weights
        clamped at ``-1e30``; ``(B, K, HW)`` views of any strides (point data comes as one row of
        ``B`` pixels). One K sweep when
        ``K <= BLOCK_K``, else a second sweep re-reads the (small) log-weights."""
        _pid, b, p, kr, _cr = _program_pixels(NPB, BLOCK_K, 1, BLOCK_P, INT64)
        pmask = p < HW
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + kr
            mask = (kk < K)[:, None] & pmask[None, :]
            lc = tl.maximum(
                tl.load(lc_ptr + b * s_cb + kk[:, None] * s_ck + p[None, :] * s_cp, mask=mask, other=0.0).to(
                    tl.float32
                ),
                -1e30,
            )
            lu = tl.maximum(
                tl.load(lu_ptr + b * s_ub + kk[:, None] * s_uk + p[None, :] * s_up, mask=mask, other=0.0).to(
                    tl.float32
                ),
                -1e30,
            )
            x = tl.where(mask, lc + scale_m1 * (lc - lu), float("-inf"))
            m_new = tl.maximum(m_run, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_run = l_run * tl.exp(m_run - m_ref) + tl.sum(tl.exp(x - m_ref[None, :]), axis=0)
            m_run = m_new
            if SINGLE_K:
                lse = m_ref + tl.log(tl.where(l_run > 0, l_run, 1.0))
                o_off = b * s_ob + kk[:, None] * s_ok + p[None, :] * s_op
                tl.store(out_ptr + o_off, (x - lse[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
        if not SINGLE_K:
            lse = tl.where(m_run == float("-inf"), 0.0, m_run) + tl.log(tl.where(l_run > 0, l_run, 1.0))
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + kr
                mask = (kk < K)[:, None] & pmask[None, :]
                lc = tl.maximum(
                    tl.load(lc_ptr + b * s_cb + kk[:, None] * s_ck + p[None, :] * s_cp, mask=mask, other=0.0).to(
                        tl.float32
                    ),
                    -1e30,
                )
                lu = tl.maximum(
                    tl.load(lu_ptr + b * s_ub + kk[:, None] * s_uk + p[None, :] * s_up, mask=mask, other=0.0).to(
                        tl.float32
                    ),
                    -1e30,
                )
                x = lc + scale_m1 * (lc - lu)
                o_off = b * s_ob + kk[:, None] * s_ok + p[None, :] * s_op
                tl.store(out_ptr + o_off, (x - lse[None, :]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mean_cfg_apply_kernel(
        m_ptr,
        mc_ptr,
        d_ptr,
        part_ptr,
        out_ptr,
        K,
        C,
        P,
        NPB,
        NPB_S,
        inv_chw,
        scale_m1,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        s_ob,
        s_ok,
        s_oc,
        s_op,
        ORTHO: tl.constexpr,
        POINTS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """``out[b, k, c, p] = mu + a d[b, c, p] (+ b_s m_c[b, c, p] when ORTHO)`` with ``a = scale -
        1`` and ``b_s = -a proj`` of the sample (from the statistics' partials, ``NPB_S`` per row);
        each channel tile's shift is formed once per pixel and added to every component."""
        _pid, b, p, kr, cr = _program_pixels(NPB, BLOCK_K, BLOCK_C, BLOCK_P, INT64)
        pmask = p < P
        if ORTHO:
            s_dm, s_mm, _s2, _s3 = _sample_sums(part_ptr, b, p, pmask, NPB_S, POINTS, BLOCK_N)
            coef_m = -scale_m1 * (s_dm * inv_chw) / tl.maximum(s_mm * inv_chw, 1e-6)
        m_base = m_ptr + b * s_mb + p[None, None, :] * s_mp
        o_base = out_ptr + b * s_ob + p[None, None, :] * s_op
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cr
            mask2 = (cc < C)[:, None] & pmask[None, :]
            g_off = (b * C + cc[:, None]) * P + p[None, :]
            shift = scale_m1 * tl.load(d_ptr + g_off, mask=mask2, other=0.0)
            if ORTHO:
                shift += coef_m * tl.load(mc_ptr + g_off, mask=mask2, other=0.0)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + kr
                mask3 = (kk < K)[:, None, None] & mask2[None, :, :]
                mu = tl.load(m_base + kk[:, None, None] * s_mk + cc[None, :, None] * s_mc, mask=mask3, other=0.0).to(
                    tl.float32
                )
                tl.store(
                    o_base + kk[:, None, None] * s_ok + cc[None, :, None] * s_oc,
                    (mu + shift[None, :, :]).to(out_ptr.dtype.element_ty),
                    mask=mask3,
                )

# ----------------------------------------------------------------------------- launchers
#
# Each launcher gets its kernels' views, grids, scalar arguments, options and scratch sizes from
# one plan per input geometry (``planned_args``): a repeated call allocates its outputs and
# scratch and launches.


def _stats_plan(m4, l3, ls2, u4, ul3, with_var: bool, with_mc: bool, with_dd: bool, points: bool) -> tuple:
    """Pass 1 on ``(R, K, C, P)`` / ``(R, K, P)`` / ``(R, P)`` views (after ``pixel_rows``):
    ``(grid, ints, options, part_rows, (npb, BLOCK_C, BLOCK_P, num_warps))``, ``part_rows`` the
    rows of float32 partial sums (a row per program, or per lane for point data; 0 when no
    column is asked for), the last the layout that the bias-power pass reuses (it writes the
    same rows)."""
    R, Kc, C, P = m4.shape
    elem = min(m4.element_size(), u4.element_size())
    contiguous = m4.stride(-1) == 1 and u4.stride(-1) == 1
    bk, bc, bp, warps = pixel_blocks(max(Kc, u4.shape[1]), C, P, R, elem, _STATS_TILE, False, contiguous)
    if not contiguous:  # point data: a K tile of one component keeps the log-weights' and the
        bk = 1  # means' loads in one layout (a wider tile vectorises only the log-weights along K)
    npb = cdiv(P, bp)
    sums = with_var or with_mc or with_dd
    ints = (Kc, u4.shape[1], C, P, npb, *m4.stride(), *l3.stride(), *ls2.stride(), *u4.stride(), *ul3.stride())
    options = dict(
        WITH_VAR=with_var,
        WITH_MC=with_mc,
        WITH_DD=with_dd,
        SUMS=sums,
        POINTS=points,
        BLOCK_K=bk,
        BLOCK_C=bc,
        BLOCK_P=bp,
        INT64=needs_int64(m4, l3, ls2, u4, ul3),
        num_warps=warps,
    )
    return (R * npb,), ints, options, (P if points else R * npb) if sums else 0, (npb, bc, bp, warps)


def _probabilistic_args(cm, cl, cls, um, ul, out_m, out_l, out_ls, orthogonal: bool) -> tuple:
    """Probabilistic guidance's three launches (statistics, bias power, apply) for inputs
    ``(cm, cl, cls, um, ul)`` and the contiguous outputs ``(out_m, out_l, out_ls)``: the views
    of those eight (in order), then per launch the grids, the scalar arguments and the options,
    the options followed by the float32 scratch sizes ``(elements of m_c and of d, elements of
    the partial sums, (shape, stride) of the logits kept between the apply's two sweeps or
    None)``. Point data (``H = W = 1``) runs as one row of ``B`` pixels (``pixel_rows``)."""
    *_, K, C, H, W = cm.shape
    m4, l3 = gm_views(cm, cl)
    u4, ul3 = gm_views(um, ul)
    R, P = m4.shape[0], m4.shape[-1]
    points = R > 1 and P == 1
    views = pixel_rows(
        m4, l3, per_row(cls, R, P), u4, ul3, out_m.view(R, K, C, P), out_l.view(R, K, P), out_ls.view(R, -1)
    )
    m4, l3, ls2, u4, ul3, om, ol, ols = views
    R, P = m4.shape[0], m4.shape[-1]
    s_grid, s_ints, s_opts, part_rows, (npb_s, bc_s, bp_s, warps_s) = _stats_plan(
        m4, l3, ls2, u4, ul3, True, True, not orthogonal, points
    )
    int64 = needs_int64(*views)
    b_ints = (C, P, npb_s, 1.0 / (C * H * W))
    b_opts = dict(POINTS=points, BLOCK_C=bc_s, BLOCK_P=bp_s, BLOCK_N=_NSUM, INT64=int64, num_warps=warps_s)
    bk, bc, bp, warps = _apply_layout(K, C, P, R, cm.element_size(), m4.stride(-1) == 1)
    single_k = K <= bk
    npb = cdiv(P, bp)
    a_ints = (
        K,
        C,
        P,
        npb,
        npb_s,
        ols.shape[-1],
        *m4.stride(),
        *l3.stride(),
        *ls2.stride(),
        *om.stride(),
        *ol.stride(),
        *ols.stride(),
        1.0 / (C * H * W),
        1.0 / (H * W),
    )
    a_opts = dict(
        POINTS=points,
        SINGLE_K=single_k,
        ONE_C=C <= bc,
        BLOCK_K=bk,
        BLOCK_C=bc,
        BLOCK_P=bp,
        BLOCK_N=_NSUM,
        INT64=int64,
        num_warps=warps,
    )
    # unnormalised logits between the apply's two sweeps: float32, with the log-weights' strides
    logits = None if single_k or cm.dtype == torch.float32 else (ol.shape, ol.stride())
    grids = (s_grid, (R * npb_s,), (R * npb,))
    return views, grids, (s_ints, b_ints, a_ints), (s_opts, b_opts, a_opts, (R * C * P, 4 * part_rows, logits))


_PROBABILISTIC_PLANS = PlanCache()


def _launch_probabilistic(cm, cls, cl, um, ul, scale: float, orthogonal: float):
    """Run probabilistic guidance: the guided ``(means, logstds, logweights)``, contiguous, in
    the dtype of ``cm``. A pass over both GMs writes ``m_c``, ``d`` and the partial sums to
    float32 scratch; with ``orthogonal > 0`` a pass over that scratch sums ``<b, b>`` exactly
    (no ``<d,d> - 2 proj <d,m_c> + ...`` cancellation); the apply pass reweights the GM."""
    dt = cm.dtype
    out_m = torch.empty_like(cm, memory_format=torch.contiguous_format)
    if cm.numel() == 0:
        return out_m, cls.to(dt, copy=True), cl.to(dt, copy=True)
    out_l = torch.empty_like(cl, dtype=dt, memory_format=torch.contiguous_format)
    out_ls = torch.empty_like(cls, dtype=dt, memory_format=torch.contiguous_format)
    t, grids, ints, opts = planned_args(
        _PROBABILISTIC_PLANS, _probabilistic_args, (cm, cl, cls, um, ul, out_m, out_l, out_ls), orthogonal > 0, n_key=5
    )
    n_scratch, n_part, logits = opts[3]
    dev = cm.device
    # ``size=`` by keyword: the argument parser then skips the varargs overload
    d = torch.empty(size=(n_scratch,), device=dev, dtype=torch.float32)
    m_c = torch.empty(size=(n_scratch,), device=dev, dtype=torch.float32)
    part = torch.empty(size=(n_part,), device=dev, dtype=torch.float32)
    _guidance_stats_kernel[grids[0]](t[0], t[1], t[2], t[3], t[4], m_c, d, part, *ints[0], **opts[0])
    if orthogonal > 0:
        _guidance_bias_power_kernel[grids[1]](m_c, d, part, *ints[1], orthogonal, **opts[1])
    lg = t[6] if logits is None else torch.empty_strided(*logits, device=dev, dtype=torch.float32)
    _guidance_apply_kernel[grids[2]](
        t[0], t[1], t[2], m_c, d, part, t[5], t[6], t[7], lg, *ints[2], scale, orthogonal, 1e-6, **opts[2]
    )
    return out_m, out_ls, out_l


def _weight_args(lc: torch.Tensor, lu: torch.Tensor, out: torch.Tensor) -> tuple:
    """The weight-guidance kernel's ``(B, K, HW)`` views of the log-weights and of the contiguous
    output (point data as one row of ``B`` pixels: per pixel only), grid, integer arguments and
    options."""
    *_, K, _, H, W = lc.shape
    HW = H * W
    views = pixel_rows(lc.reshape(-1, K, HW), lu.reshape(-1, K, HW), out.view(-1, K, HW))
    c3, u3, o3 = views
    B, P = c3.shape[0], c3.shape[-1]
    elem = min(c3.element_size(), u3.element_size())
    bk, _, bp, warps = pixel_blocks(K, 1, P, B, elem, 64, False, c3.stride(-1) == 1 and u3.stride(-1) == 1)
    npb = cdiv(P, bp)
    options = dict(SINGLE_K=K <= bk, BLOCK_K=bk, BLOCK_P=bp, INT64=needs_int64(c3, u3, o3), num_warps=warps)
    return views, (B * npb,), (K, P, npb, *c3.stride(), *u3.stride(), *o3.stride()), options


_WEIGHT_PLANS = PlanCache()


def _launch_weight(lc: torch.Tensor, lu: torch.Tensor, scale: float) -> torch.Tensor:
    """Run ``_weight_guidance_kernel``: the guided log-weights, contiguous, dtype of ``lc``."""
    out = torch.empty_like(lc, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    t, grid, ints, options = planned_args(_WEIGHT_PLANS, _weight_args, (lc, lu, out), n_key=2)
    _weight_guidance_kernel[grid](*t, *ints, scale - 1.0, **options)
    return out


def _mean_cfg_args(cm, cl, um, ul, out, orthogonal: bool) -> tuple:
    """Mean-CFG's two launches (statistics without the variance, apply) for inputs
    ``(cm, cl, um, ul)`` and the contiguous output: the views of those five, then per launch
    the grids, the scalar arguments (the apply's in two parts, around ``scale - 1``) and the
    options, followed by the float32 scratch sizes ``(elements of d (and m_c), elements of the
    partial sums)``."""
    *_, K, C, H, W = cm.shape
    m4, l3 = gm_views(cm, cl)
    u4, ul3 = gm_views(um, ul)
    R, P = m4.shape[0], m4.shape[-1]
    points = R > 1 and P == 1
    views = pixel_rows(m4, l3, u4, ul3, out.view(R, K, C, P))
    m4, l3, u4, ul3, om = views
    R, P = m4.shape[0], m4.shape[-1]
    # no variance: the log-weights stand in for the unused logstds
    s_grid, s_ints, s_opts, part_rows, (npb_s, *_) = _stats_plan(
        m4, l3, l3[:, 0], u4, ul3, False, orthogonal, False, points
    )
    bk, bc, bp, warps = pixel_blocks(K, C, P, R, cm.element_size(), 64, False, m4.stride(-1) == 1)
    npb = cdiv(P, bp)
    a_opts = dict(
        ORTHO=orthogonal,
        POINTS=points,
        BLOCK_K=bk,
        BLOCK_C=bc,
        BLOCK_P=bp,
        BLOCK_N=_NSUM,
        INT64=needs_int64(m4, om),
        num_warps=warps,
    )
    ints = (s_ints, (K, C, P, npb, npb_s, 1.0 / (C * H * W)), (*m4.stride(), *om.stride()))
    return views, (s_grid, (R * npb,)), ints, (s_opts, a_opts, (R * C * P, 4 * part_rows))


_MEAN_CFG_PLANS = PlanCache()


def _launch_mean_cfg(cm, cl, um, ul, scale: float, orthogonal: bool) -> torch.Tensor:
    """Run mean-CFG: the shifted means, contiguous, in the dtype of ``cm``."""
    out = torch.empty_like(cm, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    t, grids, ints, opts = planned_args(_MEAN_CFG_PLANS, _mean_cfg_args, (cm, cl, um, ul, out), orthogonal, n_key=4)
    n_scratch, n_part = opts[2]
    dev = cm.device
    d = torch.empty(size=(n_scratch,), device=dev, dtype=torch.float32)
    m_c = torch.empty(size=(n_scratch,), device=dev, dtype=torch.float32) if orthogonal else d
    part = torch.empty(size=(n_part,), device=dev, dtype=torch.float32) if n_part else d
    # no variance: the log-weights stand in for the unused logstds pointer
    _guidance_stats_kernel[grids[0]](t[0], t[1], t[1], t[2], t[3], m_c, d, part, *ints[0], **opts[0])
    _mean_cfg_apply_kernel[grids[1]](t[0], m_c, d, part, t[4], *ints[1], scale - 1.0, *ints[2], **opts[1])
    return out


# ----------------------------------------------------------------------------- torch.library ops

if triton is not None:

    @torch.library.custom_op("gmkernels::probabilistic_guidance", mutates_args=())
    def _probabilistic_guidance_op(
        cond_means: torch.Tensor,
        cond_logstds: torch.Tensor,
        cond_logweights: torch.Tensor,
        uncond_means: torch.Tensor,
        uncond_logweights: torch.Tensor,
        scale: float,
        orthogonal: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if scale == 0:  # the identity (reference.guidance); outputs must not alias inputs
            dt = cond_means.dtype
            return cond_means.clone(), cond_logstds.to(dt, copy=True), cond_logweights.to(dt, copy=True)
        return _launch_probabilistic(
            cond_means, cond_logstds, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal
        )

    @_probabilistic_guidance_op.register_fake
    def _(cond_means, cond_logstds, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal):
        dt = cond_means.dtype
        return (
            cond_means.new_empty(cond_means.shape),
            cond_logstds.new_empty(cond_logstds.shape, dtype=dt),
            cond_logweights.new_empty(cond_logweights.shape, dtype=dt),
        )

    @torch.library.custom_op("gmkernels::weight_guidance", mutates_args=())
    def _weight_guidance_op(
        cond_logweights: torch.Tensor, uncond_logweights: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return _launch_weight(cond_logweights, uncond_logweights, scale)

    @_weight_guidance_op.register_fake
    def _(cond_logweights, uncond_logweights, scale):
        return cond_logweights.new_empty(cond_logweights.shape)

    @torch.library.custom_op("gmkernels::mean_cfg", mutates_args=())
    def _mean_cfg_op(
        cond_means: torch.Tensor,
        cond_logweights: torch.Tensor,
        uncond_means: torch.Tensor,
        uncond_logweights: torch.Tensor,
        scale: float,
        orthogonal: bool,
    ) -> torch.Tensor:
        return _launch_mean_cfg(cond_means, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal)

    @_mean_cfg_op.register_fake
    def _(cond_means, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal):
        return cond_means.new_empty(cond_means.shape)


# ----------------------------------------------------------------------------- public ops


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is a no-op."""
    return t if t.dtype == dtype else t.to(dtype)


def _check_pair(gm_cond: dict, gm_uncond: dict) -> GMShape:
    """Validate a pair of GMs (``check_gm`` of each, then matching ``*B, C, H, W`` and device)
    and return the sizes of ``gm_cond``; once per metadata of the six tensors
    (:func:`checked_once`)."""
    if type(gm_cond) is dict and type(gm_uncond) is dict:
        c, u = gm_cond, gm_uncond
        return checked_once(
            "guidance pair",
            lambda: _checked_pair(c, u),
            c.get("means"),
            c.get("logstds"),
            c.get("logweights"),
            u.get("means"),
            u.get("logstds"),
            u.get("logweights"),
        )
    return _checked_pair(gm_cond, gm_uncond)


def _checked_pair(gm_cond: dict, gm_uncond: dict) -> GMShape:
    s = check_gm(gm_cond, "gm_cond")
    u = check_gm(gm_uncond, "gm_uncond")
    if (u.batch, u.C, u.H, u.W) != (s.batch, s.C, s.H, s.W) or u.device != s.device:
        raise ValueError(
            f"gm_uncond['means'] {(*u.batch, u.K, u.C, u.H, u.W)} on {u.device} must match "
            f"gm_cond['means'] {(*s.batch, s.K, s.C, s.H, s.W)} on {s.device} in *B, C, H, W and device"
        )
    return s


def probabilistic_guidance(gm_cond: dict, gm_uncond: dict, scale: float, orthogonal: float = 1.0) -> dict:
    """GMFlow's probabilistic guidance (docs/ops.md#guidance): the conditional GM reweighted by the Gaussian
    quotient ``target / cond``, which moves its mean by the (orthogonalised) bias normalised to
    the average variance and shrinks its spread by ``1 - scale^2``.

    Args:
        gm_cond, gm_uncond: x0-GMs ``{means (*B, K, C, H, W), logstds, logweights (*B, K, 1, H, W)}``;
            the K of the two may differ, ``*B, C, H, W`` must match.
        scale: in [0, 1); ``scale == 0`` returns ``gm_cond`` itself (the identity).
        orthogonal: amount >= 0 of the projection of the bias onto ``m_c`` that is removed.
    Returns:
        The guided GM, shapes of ``gm_cond``, dtype of ``gm_cond['means']``. On CUDA: one pass
        over both GMs (statistics), one over the conditional GM (the reweighting) and, with
        ``orthogonal > 0``, one over the ``(*B, C, H, W)`` statistics in between (see the module
        docstring).
    """
    s = _check_pair(gm_cond, gm_uncond)
    scale = check_power(scale, "scale")
    if scale >= 1:
        raise ValueError(f"scale must lie in [0, 1) for probabilistic guidance, got {scale}")
    orthogonal = check_power(orthogonal, "orthogonal")
    if scale == 0:
        return gm_cond
    tensors = (gm_cond["means"], gm_cond["logstds"], gm_cond["logweights"], gm_uncond["means"], gm_uncond["logweights"])
    if not kernels_wanted(*tensors):
        return run_reference(ref.probabilistic_guidance, gm_cond, gm_uncond, scale, orthogonal, out_dtype=s.dtype)
    means, logstds, logweights = _probabilistic_guidance_op(*tensors, scale, orthogonal)
    return {"means": means, "logstds": logstds, "logweights": logweights}


def weight_guidance(gm_cond: dict, gm_uncond: dict, scale: float) -> dict:
    """CFG on log-weights for mixtures whose components correspond (same K):
    ``logweights = log_softmax_k(l_c + (scale - 1) (l_c - l_u))`` with dead components clamped to
    ``-1e30``; ``means`` and ``logstds`` of ``gm_cond`` are returned as given (cast to the dtype of
    its means). Log-weights ``(*B, K, 1, H, W)``."""
    s = _check_pair(gm_cond, gm_uncond)
    if gm_uncond["means"].shape[-4] != s.K:
        raise ValueError(
            f"weight_guidance needs matching K: gm_cond has K={s.K}, gm_uncond has K={gm_uncond['means'].shape[-4]}"
        )
    scale = check_power(scale, "scale")
    if not kernels_wanted(gm_cond["means"], gm_cond["logweights"], gm_uncond["logweights"]):
        return run_reference(ref.weight_guidance, gm_cond, gm_uncond, scale, out_dtype=s.dtype)
    logweights = _weight_guidance_op(gm_cond["logweights"], gm_uncond["logweights"], scale)
    return {
        "means": gm_cond["means"],
        "logstds": _as(gm_cond["logstds"], s.dtype),
        "logweights": _as(logweights, s.dtype),
    }


def mean_cfg(gm_cond: dict, gm_uncond: dict, scale: float, orthogonal: bool = False) -> dict:
    """Plain CFG on the GM, the baseline: every conditional mean moves by ``(scale - 1) (m_c - m_u)``
    (made orthogonal to ``m_c`` over (C, H, W) when ``orthogonal``); ``logstds`` and ``logweights``
    of ``gm_cond`` are returned as given (cast to the dtype of its means). Means ``(*B, K, C, H, W)``.

    ``orthogonal`` is a bool (docs/ops.md#mean_cfg: the bias is made orthogonal or left as it
    is); a number raises ``TypeError`` rather than being read as a fraction (the removed share
    of ``probabilistic_guidance``'s ``orthogonal``).
    """
    s = _check_pair(gm_cond, gm_uncond)
    scale = check_power(scale, "scale")
    if type(orthogonal) is not bool:
        raise TypeError(
            f"orthogonal must be a bool (mean_cfg makes the bias orthogonal to m_c or not; unlike "
            f"probabilistic_guidance it takes no fraction), got {type(orthogonal).__name__} {orthogonal!r}"
        )
    tensors = (gm_cond["means"], gm_cond["logweights"], gm_uncond["means"], gm_uncond["logweights"])
    if not kernels_wanted(*tensors):
        return run_reference(ref.mean_cfg, gm_cond, gm_uncond, scale, orthogonal, out_dtype=s.dtype)
    means = _mean_cfg_op(*tensors, scale, orthogonal)
    return {
        "means": means,
        "logstds": _as(gm_cond["logstds"], s.dtype),
        "logweights": _as(gm_cond["logweights"], s.dtype),
    }
