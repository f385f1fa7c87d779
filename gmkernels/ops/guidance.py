"""Guidance on conditional/unconditional x0-GMs (docs/ops.md#guidance): ``probabilistic_guidance``,
``weight_guidance``, ``mean_cfg``.

Kernels (all self-contained: the mixture moments and the GM x Gaussian product are fused in):

* ``_guidance_stats_kernel`` (pass 1, per batch element and block of pixels): online softmax
  over K tiles of both GMs gives ``m_c``, the per-pixel conditional variance ``v_c`` (Chan-merged
  weighted sum of squared deviations, no ``E[x^2] - E[x]^2`` cancellation) and ``m_u``; it writes
  ``m_c`` and ``d = m_c - m_u`` (float32 scratch, ``C*H*W`` per batch element, i.e. ``1/K`` of the
  means) and per-program partial sums ``(sum d m_c, sum m_c^2, sum d^2, sum v_c)``.
* A few torch ops give the per-batch-element scalars, folded into three numbers ``A, B, v``:
  ``g = A m_c + B d`` is the mean of the Gaussian that reweights the GM and ``v`` its variance.
  The projection and ``V`` come from the ``(B, programs, 4)`` partials (float64); the bias power
  ``P = <bias, bias>`` of the orthogonalised bias is evaluated exactly from the scratch
  (``d - proj m_c``, float32, one read of ``2*C*H*W`` floats per batch element) rather than as
  ``<d,d> - proj <d,m_c>``, whose cancellation would cost ``1e-7 / sin^2(theta)`` relative
  accuracy when ``d`` is nearly parallel to ``m_c``.
* ``_guidance_apply_kernel`` (pass 2, per pixel): ``means' = (v mu + s2 g) / n``,
  ``logweights' = log_softmax_k(logweights - 0.5 / n * sum_c (mu - g)^2)``,
  ``logstds' = logstds + 0.5 log v - 0.5 log n`` with ``n = max(v + s2, eps)``. For
  ``K <= BLOCK_K`` it reads the conditional GM once; for larger K a second sweep over the K tiles
  re-reads the means to normalise the log-weights (the log-softmax needs the whole K first).
* ``_weight_guidance_kernel``: online log-softmax of ``l_c + (scale - 1)(l_c - l_u)`` (dead
  components clamped to ``-1e30`` as in the reference); means and stds of ``gm_cond`` pass through.
* ``mean_cfg``: pass 1 (without the variance; ``m_c`` and the sums only when orthogonal), then
  ``_mean_cfg_apply_kernel``, elementwise ``means' = mu + a d + b m_c``.

Conditioning: with ``orthogonal > 0`` and ``d`` nearly parallel to ``m_c`` the bias is a small
residual that is then scaled up to power ``scale^2 V``; in float32 its relative error is about
``1e-7 / sin(theta)`` (theta the angle between ``d`` and ``m_c``). With ``C*H*W == 1`` the
residual is pure rounding (as in any float32 evaluation of the reference).

Block sizes come from a fixed heuristic (no autotuning: deterministic, CUDA-graph safe).
"""

from __future__ import annotations

import math
import sys

import torch

import reference.guidance as ref

from .._aot import AOT_DTYPES, SHAPE_SETS, AotCase, launch_cases, meta_gm, shape_tag
from .._dispatch import run_reference, select_backend
from .._validate import GMShape, check_gm, check_power
from ._launch import call_op, cdiv, kernels_wanted, launch_plan, needs_int64, pixel_rows
from .mixture import online_moments_update
from .transition import flat_gm, flat_logstds, pow2_at_most

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

_TILE = 2048  # register-tile elements (BLOCK_K * BLOCK_C * BLOCK_P) per program
_NEG_BIG = -1e30  # weight_guidance's clamp of dead log-weights (reference.guidance)


@launch_plan
def _blocks(K: int, C: int, HW: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P)``: up to 16 components and 8 channels per tile, pixels
    filling the rest of a 2048-element tile (at least 16, at most the next power of 2 of H*W)."""
    bk = pow2_at_most(K, 16)
    bc = pow2_at_most(C, 8)
    bp = pow2_at_most(HW, max(16, _TILE // (bk * bc)))
    return bk, bc, bp


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _moments(
        m_ptr, l_ptr, K, s_k, s_c, s_lk, kr, cc, cmask, pmask,
        WITH_VAR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        """Softmax-weighted mean ``[BC, BP]`` over K of one channel tile and (``WITH_VAR``) the
        weighted variance per channel ``[BC, BP]``; ``m_ptr``/``l_ptr`` are ``[1, 1, BP]``/``[1, BP]``
        pointer blocks at component 0, channel 0 of this program's pixels. Online over K tiles:
        running max, weight sum, mean and Chan-merged M2 (``mixture.online_moments_update``); all-dead
        tiles or pixels give no NaN."""
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_P], tl.float32)
        mean = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        m2 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
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
            m_run, l_run, mean, m2 = online_moments_update(lw2, mu, m_run, l_run, mean, m2, WITH_VAR)
        var = m2 / tl.where(l_run > 0, l_run, 1.0)[None, :]
        return mean, var

    @triton.jit
    def _guidance_stats_kernel(
        mc_ptr, lc_ptr, ls_ptr, mu_ptr, lu_ptr, out_mc_ptr, out_d_ptr, part_ptr,
        Kc, Ku, C, HW, NPB,
        s_cb, s_ck, s_cc, s_cp,
        s_lcb, s_lck, s_lcp,
        s_lsb, s_lsp,
        s_ub, s_uk, s_uc, s_up,
        s_lub, s_luk, s_lup,
        WITH_VAR: tl.constexpr, WITH_MC: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
    ):  # fmt: skip
        """Pass 1 of guidance for batch element ``b``, pixels ``[pb*BLOCK_P, (pb+1)*BLOCK_P)``:
        writes ``d = m_c - m_u`` (and ``m_c`` when ``WITH_MC``) to ``(B, C, HW)`` float32 scratch and
        ``part[b, pb, :] = (sum d m_c, sum m_c^2, sum d^2, sum_p v_c)`` (the last only ``WITH_VAR``)."""
        pid = tl.program_id(0)
        b = pid // NPB
        pb = pid % NPB
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        kr = tl.arange(0, BLOCK_K)
        cr = tl.arange(0, BLOCK_C)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
            kr = kr.to(tl.int64)
            cr = cr.to(tl.int64)
        pmask = p < HW
        mc_base = mc_ptr + b * s_cb + p[None, None, :] * s_cp
        lc_base = lc_ptr + b * s_lcb + p[None, :] * s_lcp
        mu_base = mu_ptr + b * s_ub + p[None, None, :] * s_up
        lu_base = lu_ptr + b * s_lub + p[None, :] * s_lup
        acc_dm = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        acc_mm = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        acc_dd = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        var_sum = tl.zeros([BLOCK_P], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cr
            cmask = cc < C
            mask2 = cmask[:, None] & pmask[None, :]
            m_c, v_k = _moments(mc_base, lc_base, Kc, s_ck, s_cc, s_lck, kr, cc, cmask, pmask,
                                WITH_VAR, BLOCK_K, BLOCK_C, BLOCK_P)  # fmt: skip
            m_u, _unused = _moments(mu_base, lu_base, Ku, s_uk, s_uc, s_luk, kr, cc, cmask, pmask,
                                    False, BLOCK_K, BLOCK_C, BLOCK_P)  # fmt: skip
            d = tl.where(mask2, m_c - m_u, 0.0)
            out_off = (b * C + cc[:, None]) * HW + p[None, :]
            tl.store(out_d_ptr + out_off, d, mask=mask2)
            acc_dd += d * d
            if WITH_MC:
                tl.store(out_mc_ptr + out_off, m_c, mask=mask2)
                acc_dm += d * m_c
                acc_mm += m_c * m_c
            if WITH_VAR:
                var_sum += tl.sum(tl.where(mask2, v_k, 0.0), axis=0)
        part = part_ptr + pid * 4
        tl.store(part + 0, tl.sum(tl.sum(acc_dm, axis=1), axis=0))
        tl.store(part + 1, tl.sum(tl.sum(acc_mm, axis=1), axis=0))
        tl.store(part + 2, tl.sum(tl.sum(acc_dd, axis=1), axis=0))
        if WITH_VAR:
            ls = tl.load(ls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)
            v_c = var_sum / C + tl.exp(2.0 * ls)
            tl.store(part + 3, tl.sum(tl.where(pmask, v_c, 0.0), axis=0))
        else:
            tl.store(part + 3, 0.0)

    @triton.jit
    def _guidance_apply_kernel(
        m_ptr, l_ptr, ls_ptr, mc_ptr, d_ptr, coef_ptr, out_m_ptr, out_l_ptr, out_ls_ptr,
        K, C, HW, NPB, LS_HW,
        s_mb, s_mk, s_mc, s_mp,
        s_lb, s_lk, s_lp,
        s_lsb, s_lsp,
        eps,
        SINGLE_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):  # fmt: skip
        """Pass 2: the conditional GM times ``N(g, v)`` with ``g = A m_c + B d`` and
        ``(A, B, v) = coef[b, :]``; writes means ``(B, K, C, HW)``, log-weights ``(B, K, HW)`` and
        log-stds ``(B, LS_HW)`` (contiguous)."""
        pid = tl.program_id(0)
        b = pid // NPB
        pb = pid % NPB
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        kr = tl.arange(0, BLOCK_K)
        cr = tl.arange(0, BLOCK_C)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
            kr = kr.to(tl.int64)
            cr = cr.to(tl.int64)
        pmask = p < HW
        coef_a = tl.load(coef_ptr + b * 3)
        coef_b = tl.load(coef_ptr + b * 3 + 1)
        v = tl.load(coef_ptr + b * 3 + 2)
        ls = tl.load(ls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)
        s2 = tl.exp(2.0 * ls)
        n = tl.maximum(v + s2, eps)
        w_v = v / n
        w_s = s2 / n
        half_inv_n = 0.5 / n
        ls_out = ls + 0.5 * tl.log(v) - 0.5 * tl.log(n)
        tl.store(out_ls_ptr + b * LS_HW + p, ls_out.to(out_ls_ptr.dtype.element_ty), mask=p < LS_HW)

        m_base = m_ptr + b * s_mb + p[None, None, :] * s_mp
        l_base = l_ptr + b * s_lb + p[None, :] * s_lp
        om_base = out_m_ptr + b * K * C * HW + p[None, None, :]
        ol_base = out_l_ptr + b * K * HW + p[None, :]
        g_base = b * C * HW + p[None, :]
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + kr
            kmask = kk < K
            dist = tl.zeros([BLOCK_K, BLOCK_P], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cr
                mask2 = (cc < C)[:, None] & pmask[None, :]
                mask3 = kmask[:, None, None] & mask2[None, :, :]
                g_off = g_base + cc[:, None] * HW
                g = coef_a * tl.load(mc_ptr + g_off, mask=mask2, other=0.0) + coef_b * tl.load(d_ptr + g_off, mask=mask2, other=0.0)
                mu = tl.load(m_base + kk[:, None, None] * s_mk + cc[None, :, None] * s_mc, mask=mask3, other=0.0).to(tl.float32)
                out = w_v[None, None, :] * mu + (w_s[None, :] * g)[None, :, :]
                tl.store(om_base + (kk[:, None, None] * C + cc[None, :, None]) * HW, out.to(out_m_ptr.dtype.element_ty), mask=mask3)
                diff = mu - g[None, :, :]
                dist += tl.sum(diff * diff, axis=1)
            lw = tl.load(l_base + kk[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")).to(tl.float32)
            logit = lw - half_inv_n[None, :] * dist
            m_new = tl.maximum(m_run, tl.max(logit, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_run = l_run * tl.exp(m_run - m_ref) + tl.sum(tl.exp(logit - m_ref[None, :]), axis=0)
            m_run = m_new
            if SINGLE_K:  # K <= BLOCK_K, one tile: the log-weights are final now
                lse = m_ref + tl.log(tl.where(l_run > 0, l_run, 1.0))
                tl.store(ol_base + kk[:, None] * HW, (logit - lse[None, :]).to(out_l_ptr.dtype.element_ty),
                         mask=kmask[:, None] & pmask[None, :])  # fmt: skip
        if not SINGLE_K:  # second sweep: recompute the logits tile by tile, normalised
            lse = tl.where(m_run == float("-inf"), 0.0, m_run) + tl.log(tl.where(l_run > 0, l_run, 1.0))
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + kr
                kmask = kk < K
                dist = tl.zeros([BLOCK_K, BLOCK_P], tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + cr
                    mask2 = (cc < C)[:, None] & pmask[None, :]
                    g_off = g_base + cc[:, None] * HW
                    g = coef_a * tl.load(mc_ptr + g_off, mask=mask2, other=0.0) + coef_b * tl.load(d_ptr + g_off, mask=mask2, other=0.0)
                    mu = tl.load(m_base + kk[:, None, None] * s_mk + cc[None, :, None] * s_mc,
                                 mask=kmask[:, None, None] & mask2[None, :, :], other=0.0).to(tl.float32)  # fmt: skip
                    diff = mu - g[None, :, :]
                    dist += tl.sum(diff * diff, axis=1)
                lw = tl.load(l_base + kk[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")).to(tl.float32)
                logit = lw - half_inv_n[None, :] * dist
                tl.store(ol_base + kk[:, None] * HW, (logit - lse[None, :]).to(out_l_ptr.dtype.element_ty),
                         mask=kmask[:, None] & pmask[None, :])  # fmt: skip

    @triton.jit
    def _weight_guidance_kernel(
        lc_ptr, lu_ptr, out_ptr,
        K, HW, NPB,
        s_cb, s_ck, s_cp,
        s_ub, s_uk, s_up,
        s_ob, s_ok, s_op,
        scale_m1,
        SINGLE_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
    ):  # fmt: skip
        """``out[b, :, p] = log_softmax_k(l_c + (scale - 1) (l_c - l_u))`` with both log-weights
        clamped at ``-1e30``; ``(B, K, HW)`` views of any strides (point data comes as one row of
        ``B`` pixels). One K sweep when
        ``K <= BLOCK_K``, else a second sweep re-reads the (small) log-weights."""
        pid = tl.program_id(0)
        b = pid // NPB
        pb = pid % NPB
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        kr = tl.arange(0, BLOCK_K)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
            kr = kr.to(tl.int64)
        pmask = p < HW
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + kr
            mask = (kk < K)[:, None] & pmask[None, :]
            lc = tl.maximum(tl.load(lc_ptr + b * s_cb + kk[:, None] * s_ck + p[None, :] * s_cp, mask=mask, other=0.0).to(tl.float32), -1e30)
            lu = tl.maximum(tl.load(lu_ptr + b * s_ub + kk[:, None] * s_uk + p[None, :] * s_up, mask=mask, other=0.0).to(tl.float32), -1e30)
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
                lc = tl.maximum(tl.load(lc_ptr + b * s_cb + kk[:, None] * s_ck + p[None, :] * s_cp, mask=mask, other=0.0).to(tl.float32), -1e30)
                lu = tl.maximum(tl.load(lu_ptr + b * s_ub + kk[:, None] * s_uk + p[None, :] * s_up, mask=mask, other=0.0).to(tl.float32), -1e30)
                x = lc + scale_m1 * (lc - lu)
                o_off = b * s_ob + kk[:, None] * s_ok + p[None, :] * s_op
                tl.store(out_ptr + o_off, (x - lse[None, :]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mean_cfg_apply_kernel(
        m_ptr, mc_ptr, d_ptr, coef_ptr, out_ptr,
        R, K, C, HW,
        s_mb, s_mk, s_mc, s_mp,
        ORTHO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
    ):  # fmt: skip
        """``out[b,k,c,p] = mu + coef[b,0] * d[b,c,p] (+ coef[b,1] * m_c[b,c,p] when ORTHO)`` over
        rows ``r = (b, k, c)``; ``out`` is ``(B, K, C, HW)`` contiguous."""
        pid = tl.program_id(0)
        n_pb = tl.cdiv(HW, BLOCK_P)
        r = (pid // n_pb) * BLOCK_R + tl.arange(0, BLOCK_R)
        p = (pid % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
        if INT64:
            r = r.to(tl.int64)
            p = p.to(tl.int64)
        rmask = r < R
        mask = rmask[:, None] & (p < HW)[None, :]
        c = r % C
        k = (r // C) % K
        b = r // (C * K)
        mu = tl.load(m_ptr + (b * s_mb + k * s_mk + c * s_mc)[:, None] + p[None, :] * s_mp, mask=mask, other=0.0).to(tl.float32)
        g_off = (b * C + c)[:, None] * HW + p[None, :]
        out = mu + tl.load(coef_ptr + b * 2, mask=rmask, other=0.0)[:, None] * tl.load(d_ptr + g_off, mask=mask, other=0.0)
        if ORTHO:
            out += tl.load(coef_ptr + b * 2 + 1, mask=rmask, other=0.0)[:, None] * tl.load(mc_ptr + g_off, mask=mask, other=0.0)
        tl.store(out_ptr + r[:, None] * HW + p[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _launch_stats(cm, cl, cls, um, ul, with_var: bool, with_mc: bool):
    """Pass 1. Returns ``(m_c, d, sums)``: ``(B, C, HW)`` float32 scratch (``m_c`` only
    ``with_mc``) and the float64 sums ``(B, 4)`` over C, H, W of ``d m_c, m_c^2, d^2`` and over
    H, W of ``v_c``."""
    *_, Kc, C, H, W = cm.shape
    Ku, HW = um.shape[-4], H * W
    m4, l3 = flat_gm(cm, cl)
    u4, ul3 = flat_gm(um, ul)
    ls, _, s_lsb, s_lsp = flat_logstds(cls, H, W)
    B = m4.shape[0]
    bk, bc, bp = _blocks(max(Kc, Ku), C, HW)
    npb = cdiv(HW, bp)
    d = torch.empty((B, C, HW), device=cm.device, dtype=torch.float32)
    m_c = torch.empty_like(d) if with_mc else d
    part = torch.empty((B, npb, 4), device=cm.device, dtype=torch.float32)
    _guidance_stats_kernel[(B * npb,)](
        m4, l3, ls, u4, ul3, m_c, d, part,
        Kc, Ku, C, HW, npb,
        *m4.stride(), *l3.stride(), s_lsb, s_lsp, *u4.stride(), *ul3.stride(),
        WITH_VAR=with_var, WITH_MC=with_mc, BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp,
        INT64=needs_int64(m4, l3, u4, ul3, d), num_warps=_stats_warps(with_var, with_mc, m4.element_size(), C),
    )  # fmt: skip
    return m_c, d, part.sum(dim=1, dtype=torch.float64)


# ptxas of triton < 3.5 and >= 3.5 disagree on the lightest statistics variant (see _stats_warps)
_OLD_PTXAS = triton is not None and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 5)


def _stats_warps(with_var: bool, with_mc: bool, elem_bytes: int, C: int) -> int:
    """Warps of the statistics pass: 2 for plain mean-CFG on fp32 with up to 32 channels (the lightest
    variant: at 4 warps triton 3.6 and 3.9 spilled 8 bytes at sm_90 for K = 8 to 1024, C = 4), else 4
    (2 warps spilled bf16, and fp32 at C = 64). Keyed to the triton version because the older
    compiler does the opposite: with triton 3.4, 4 warps compile clean and 2 spill 8-16 bytes."""
    return 2 if not (with_var or with_mc) and elem_bytes == 4 and C <= 32 and not _OLD_PTXAS else 4


def _projection(sums: torch.Tensor, CHW: int, orthogonal: float) -> torch.Tensor:
    """``proj = orthogonal * <d, m_c> / max(<m_c, m_c>, 1e-6)`` (0 when ``orthogonal == 0``),
    ``<.,.>`` the mean over (C, H, W); float64 ``(B,)``."""
    if orthogonal <= 0:
        return torch.zeros_like(sums[:, 0])
    return orthogonal * (sums[:, 0] / CHW) / (sums[:, 1] / CHW).clamp(min=1e-6)


def _launch_probabilistic(cm, cls, cl, um, ul, scale: float, orthogonal: float):
    *batch, K, C, H, W = cm.shape
    HW = H * W
    if cm.numel() == 0:
        return torch.empty_like(cm, memory_format=torch.contiguous_format), cls.to(cm.dtype, copy=True), cl.to(cm.dtype, copy=True)
    m_c, d, sums = _launch_stats(cm, cl, cls, um, ul, with_var=True, with_mc=True)
    proj = _projection(sums, C * HW, orthogonal)
    if orthogonal > 0:  # P from the scratch: no <d,d> - proj <d,m_c> cancellation
        bias = torch.addcmul(d, m_c, proj.to(torch.float32).view(-1, 1, 1), value=-1.0)
        P = torch.linalg.vector_norm(bias.view(bias.shape[0], -1), dim=1, dtype=torch.float64).square() / (C * HW)
    else:
        P = sums[:, 2] / (C * HW)
    V = sums[:, 3] / HW
    factor = scale * torch.sqrt(V / P.clamp(min=1e-6))
    # target (m_c + factor (d - proj m_c), V (1 - scale^2)) divided by cond (m_c, V): the
    # quotient's normaliser V - V (1 - scale^2) is formed as V scale^2 (no cancellation).
    n_q = (V * scale * scale).clamp(min=1e-6)
    coef = torch.stack([(V * scale * scale - V * factor * proj) / n_q, V * factor / n_q, V * (1 - scale * scale) * V / n_q], dim=1)
    coef = coef.to(torch.float32).contiguous()

    m4, l3 = flat_gm(cm, cl)
    ls, ls_hw, s_lsb, s_lsp = flat_logstds(cls, H, W)
    B = m4.shape[0]
    out_m = torch.empty((B, K, C, HW), device=cm.device, dtype=cm.dtype)
    out_l = torch.empty((B, K, HW), device=cm.device, dtype=cm.dtype)
    out_ls = torch.empty((B, ls_hw), device=cm.device, dtype=cm.dtype)
    bk, bc, bp = _blocks(K, C, HW)
    npb = cdiv(HW, bp)
    _guidance_apply_kernel[(B * npb,)](
        m4, l3, ls, m_c, d, coef, out_m, out_l, out_ls,
        K, C, HW, npb, ls_hw,
        *m4.stride(), *l3.stride(), s_lsb, s_lsp, 1e-6,
        SINGLE_K=K <= bk, BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, INT64=needs_int64(m4, l3, out_m), num_warps=4,
    )  # fmt: skip
    return out_m.view(cm.shape), out_ls.view(cls.shape), out_l.view(cl.shape)


def _launch_weight(lc: torch.Tensor, lu: torch.Tensor, scale: float) -> torch.Tensor:
    *_, K, _, H, W = lc.shape
    HW = H * W
    out = torch.empty((math.prod(lc.shape[:-4]), K, HW), device=lc.device, dtype=lc.dtype)
    if out.numel() == 0:
        return out.view(lc.shape)
    # per pixel only: point data (H = W = 1) runs as one row of B pixels
    c3, u3, o3 = pixel_rows(lc.reshape(-1, K, HW), lu.reshape(-1, K, HW), out)
    B, P = c3.shape[0], c3.shape[-1]
    bk = pow2_at_most(K, 16)
    bp = pow2_at_most(P, max(16, _TILE // bk))
    npb = cdiv(P, bp)
    _weight_guidance_kernel[(B * npb,)](
        c3, u3, o3, K, P, npb, *c3.stride(), *u3.stride(), *o3.stride(), scale - 1.0,
        SINGLE_K=K <= bk, BLOCK_K=bk, BLOCK_P=bp, INT64=needs_int64(c3, u3, o3), num_warps=4,
    )  # fmt: skip
    return out.view(lc.shape)


def _launch_mean_cfg(cm, cl, um, ul, scale: float, orthogonal: bool) -> torch.Tensor:
    *_, K, C, H, W = cm.shape
    HW = H * W
    if cm.numel() == 0:
        return torch.empty_like(cm, memory_format=torch.contiguous_format)
    # no variance here: the log-weights stand in for the unused logstds pointer
    m_c, d, sums = _launch_stats(cm, cl, cl, um, ul, with_var=False, with_mc=orthogonal)
    proj = _projection(sums, C * HW, 1.0 if orthogonal else 0.0)
    coef = torch.stack([torch.full_like(proj, scale - 1.0), -(scale - 1.0) * proj], dim=1).to(torch.float32).contiguous()
    m4 = flat_gm(cm)
    B = m4.shape[0]
    out = torch.empty((B, K, C, HW), device=cm.device, dtype=cm.dtype)
    R = B * K * C
    block_p = pow2_at_most(HW, 1024)
    block_r = pow2_at_most(R, max(1, _TILE // block_p))
    grid = (cdiv(R, block_r) * cdiv(HW, block_p),)
    _mean_cfg_apply_kernel[grid](
        m4, m_c, d, coef, out, R, K, C, HW, *m4.stride(),
        ORTHO=orthogonal, BLOCK_R=block_r, BLOCK_P=block_p, INT64=needs_int64(m4, out), num_warps=4,
    )  # fmt: skip
    return out.view(cm.shape)


# ----------------------------------------------------------------------------- torch.library ops


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
        return cond_means.clone(), cond_logstds.to(cond_means.dtype, copy=True), cond_logweights.to(cond_means.dtype, copy=True)
    if select_backend(cond_means) == "triton":
        return _launch_probabilistic(cond_means, cond_logstds, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal)
    gm_c = {"means": cond_means, "logstds": cond_logstds, "logweights": cond_logweights}
    gm_u = {"means": uncond_means, "logstds": None, "logweights": uncond_logweights}
    out = run_reference(ref.probabilistic_guidance, gm_c, gm_u, scale, orthogonal, out_dtype=cond_means.dtype)
    return out["means"], out["logstds"], out["logweights"]


@_probabilistic_guidance_op.register_fake
def _(cond_means, cond_logstds, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal):
    dt = cond_means.dtype
    return cond_means.new_empty(cond_means.shape), cond_logstds.new_empty(cond_logstds.shape, dtype=dt), cond_logweights.new_empty(cond_logweights.shape, dtype=dt)


@torch.library.custom_op("gmkernels::weight_guidance", mutates_args=())
def _weight_guidance_op(cond_logweights: torch.Tensor, uncond_logweights: torch.Tensor, scale: float) -> torch.Tensor:
    if select_backend(cond_logweights) == "triton":
        return _launch_weight(cond_logweights, uncond_logweights, scale)
    gm_c = {"means": None, "logstds": None, "logweights": cond_logweights}
    gm_u = {"means": None, "logstds": None, "logweights": uncond_logweights}
    return run_reference(ref.weight_guidance, gm_c, gm_u, scale, out_dtype=cond_logweights.dtype)["logweights"]


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
    if select_backend(cond_means) == "triton":
        return _launch_mean_cfg(cond_means, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal)
    gm_c = {"means": cond_means, "logstds": None, "logweights": cond_logweights}
    gm_u = {"means": uncond_means, "logstds": None, "logweights": uncond_logweights}
    return run_reference(ref.mean_cfg, gm_c, gm_u, scale, orthogonal, out_dtype=cond_means.dtype)["means"]


@_mean_cfg_op.register_fake
def _(cond_means, cond_logweights, uncond_means, uncond_logweights, scale, orthogonal):
    return cond_means.new_empty(cond_means.shape)


# ----------------------------------------------------------------------------- public ops


def _check_pair(gm_cond: dict, gm_uncond: dict) -> GMShape:
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
        The guided GM, shapes of ``gm_cond``, dtype of ``gm_cond['means']``. Two kernel passes on
        CUDA (see the module docstring).
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
    means, logstds, logweights = call_op(torch.ops.gmkernels.probabilistic_guidance, *tensors, scale, orthogonal)
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
    logweights = call_op(torch.ops.gmkernels.weight_guidance, gm_cond["logweights"], gm_uncond["logweights"], scale)
    return {"means": gm_cond["means"], "logstds": gm_cond["logstds"].to(s.dtype), "logweights": logweights.to(s.dtype)}


def mean_cfg(gm_cond: dict, gm_uncond: dict, scale: float, orthogonal: bool = False) -> dict:
    """Plain CFG on the GM, the baseline: every conditional mean moves by ``(scale - 1) (m_c - m_u)``
    (made orthogonal to ``m_c`` over (C, H, W) when ``orthogonal``); ``logstds`` and ``logweights``
    of ``gm_cond`` are returned as given (cast to the dtype of its means). Means ``(*B, K, C, H, W)``."""
    s = _check_pair(gm_cond, gm_uncond)
    scale = check_power(scale, "scale")
    tensors = (gm_cond["means"], gm_cond["logweights"], gm_uncond["means"], gm_uncond["logweights"])
    if not kernels_wanted(*tensors):
        return run_reference(ref.mean_cfg, gm_cond, gm_uncond, scale, bool(orthogonal), out_dtype=s.dtype)
    means = call_op(torch.ops.gmkernels.mean_cfg, *tensors, scale, bool(orthogonal))
    return {"means": means, "logstds": gm_cond["logstds"].to(s.dtype), "logweights": gm_cond["logweights"].to(s.dtype)}


# ----------------------------------------------------------------------------- AOT cases


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """The launches of the three guidance ops for a pair of ``(B, K, C, H, W)`` GMs with
    per-sample stds, fp32 and bf16: probabilistic guidance (statistics ``#0``, apply ``#1``),
    weight guidance, mean-CFG plain and orthogonal (statistics ``#0``, apply ``#1``)."""
    cases = []
    mod = sys.modules[__name__]
    for dt in AOT_DTYPES:
        g = meta_gm(B, K, C, H, W, dt)
        m, ls, lw = g["means"], g["logstds"], g["logweights"]
        tag = shape_tag(B, K, C, H, W, dt)
        cases += launch_cases(mod, f"probabilistic_guidance[{tag}]", _launch_probabilistic, m, ls, lw, m, lw, 2.0, 1.0)
        cases += launch_cases(mod, f"weight_guidance[{tag}]", _launch_weight, lw, lw, 2.0)
        for ortho in (False, True):
            cases += launch_cases(mod, f"mean_cfg[ortho={ortho},{tag}]", _launch_mean_cfg, m, lw, m, lw, 2.0, ortho)
    return cases


AOT_CASES = [c for shape in SHAPE_SETS["bench"] for c in aot_cases(*shape)] if triton is not None else []
