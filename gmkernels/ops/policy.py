"""Fused kernels of pi-Flow GM policies: the velocity ``pi`` and the whole Euler rollout.

The math of every kernel is ``reference.policy`` (the policy's x0-GM, its posterior mean at a
new state, the Euler rollout along per-sample sigma tables). The affine map of op 5 from the
network's u-GM to the x0-GM (``mu_k = x_src - sigma_src * u_k``) is applied in registers, so no
x0-GM is ever written. The kernels evaluate the posterior's logits centred at component 0
(``e_k = mu_k - mu_0 = sigma_src * (u_0 - u_k)``): the same softmax, without the means' common
offset, whose float32 rounding otherwise dominates (found by hypothesis at K = 300).

* ``policy_velocity``: one pass over K per pixel (online softmax over K tiles), writes only ``u``.
* ``policy_rollout``: one kernel for all substeps. When ``next_pow2(K) * next_pow2(C) <= 1024``
  the pixel's K means and log-weights are loaded once and kept in registers across every
  substep; otherwise K tiles are re-read (from L2) per substep. Each sample follows its own row
  of the sigma table; a finished sample's row is constant and its state is kept.
* Training: both are differentiable w.r.t. the u-means, the variance, the log-weights, ``x`` and
  ``x_src`` (not the sigmas) with fused backward kernels. The rollout's forward saves the state
  every ``S = ceil(sqrt(N))`` substeps (``ceil(N / S)`` states per pixel); its backward walks
  the segments in reverse, recomputing each substep's state from the segment's checkpoint in
  registers, and accumulates the GM gradients in registers: memory is the gradients plus
  ``ceil(N / S) * C`` floats per pixel, never K x C x H x W per substep. The fused backward
  needs the one-tile case (``next_pow2(K) * next_pow2(C) <= 1024``); larger GMs are
  differentiated through the torch path (one checkpoint per substep).

Shapes (spatial dims flattened to ``P``): ``means_u (B, K, C, P)``, ``logweights (B, K, P)``,
states ``(B, C, P)``, ``gm_vars``/``sigma_src``/``sigma`` ``(B,)``, sigma tables ``(B, N + 1)``.

Op layer: ``policy_velocity`` and ``policy_rollout`` (behind ``GMFlowPolicy.pi`` and
``GMFlowPolicy.integrate``) pick the backend once and call the custom ops ``gmkernels::policy_pi``
and ``gmkernels::policy_rollout`` directly; their registered autograd formulas call
``gmkernels::policy_pi_backward`` and ``gmkernels::policy_rollout_backward``. The training
rollout returns its checkpoints as a second output (what its backward reads), so the ops are
opaque nodes with fakes for ``torch.compile``, forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint

import reference.policy as ref

from .._dispatch import compute_dtype, select_backend
from ._launch import PlanCache, cdiv, needs_int64, next_pow2, planned_args

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

_TILE_FWD = 2048  # elements of the (K, C, pixels) register tile of the forward kernels
_TILE_BWD = 512  # the backward keeps the means, their gradient accumulator and the recomputed posterior
_WARPS_BWD = (
    4  # 4 tile elements per thread: at 8 the rollout's fp32 backward spills at the benchmark shapes (sm_80, sm_90)
)
_ONE_TILE_KC = 1024  # largest next_pow2(K) * next_pow2(C) kept in registers across substeps


def one_tile(K: int, C: int) -> bool:
    """True when a pixel's whole GM stays in registers across substeps (and the fused backward
    applies)."""
    return next_pow2(K) * next_pow2(C) <= _ONE_TILE_KC


def _blocks(K: int, C: int, P: int, tile: int, one_tile_kc: int = _ONE_TILE_KC) -> tuple[int, int, int, bool]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, ONE_TILE)``: all of K in one register tile when
    ``next_pow2(K) * next_pow2(C) <= one_tile_kc``, else K tiles with at least 16 pixels."""
    bk, bc = next_pow2(K), next_pow2(C)
    if bk * bc <= one_tile_kc:
        return bk, bc, max(1, min(next_pow2(P), tile // (bk * bc), 128)), True
    bp = min(next_pow2(P), 16)
    return max(1, min(bk, tile // (bc * bp))), bc, bp, False


def rollout_blocks(K: int, C: int, P: int) -> tuple[int, int, int, int] | None:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, num_warps)`` of the one-tile rollout of a ``(K, C)`` GM over
    ``P`` pixels per sample (the forward's register tile), or ``None`` when the GM does not fit
    one tile."""
    bk, bc, bp, one = _blocks(K, C, P, _TILE_FWD)
    return (bk, bc, bp, 4) if one else None


def _pi_blocks(K: int, C: int, P: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P)`` of the one-pass velocity: K streamed in tiles of a
    1024-element register tile, 32 pixels for up to 4 channels, down to 8 pixels from 16 channels
    (32 pixels x 16 channels spill at the FLUX shape)."""
    bc = next_pow2(C)
    bp = min(next_pow2(P), 32, max(8, 128 // bc))
    return max(1, min(next_pow2(K), 1024 // (bc * bp))), bc, bp


def checkpoint_stride(N: int) -> int:
    """Substeps between two saved states of a training rollout: ``ceil(sqrt(N))``."""
    return math.isqrt(max(N, 1) - 1) + 1


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    from .mixture import program_tile

    @triton.jit
    def _consts(s_raw, ss, s2, eps):
        """Per-sample constants at noise level ``s_raw``: ``(inv_s, zeta, cx, cs, dd, inv_d)``
        with ``nu = cx * x - cs * x_src`` and ``dd = s2 * zeta + 1`` before the ``eps`` floor.

        Reciprocals by ``tl.fdiv`` (a few ulp, no IEEE slow-path subroutine: its call frame is
        local memory in the compile report); every divisor is in [eps, 1/eps^2]."""
        s = tl.maximum(s_raw, eps)
        inv_s = tl.fdiv(1.0, s)
        inv_ss = tl.fdiv(1.0, ss)
        a = 1.0 - s
        a_src = 1.0 - ss
        zeta = (a * inv_s) * (a * inv_s) - (a_src * inv_ss) * (a_src * inv_ss)
        cx = a * inv_s * inv_s
        cs = a_src * inv_ss * inv_ss
        dd = s2 * zeta + 1.0
        inv_d = tl.fdiv(1.0, tl.maximum(dd, eps))
        return inv_s, zeta, cx, cs, dd, inv_d

    @triton.jit
    def _posterior_one(e, lw, nu2, zeta, inv_d):
        """Posterior weights ``(BLOCK_K, BLOCK_P)``, the logit terms ``D`` and the weighted mean
        of the centred means ``ebar (BLOCK_C, BLOCK_P)`` of a whole-K register tile.

        Centred form: with ``e_k = mu_k - c`` (``c = mu_0``) and ``nu2 = nu - zeta * c``,
        ``sum_c e_kc (nu2_c - zeta e_kc / 2)`` differs from ``D_k`` by a constant over k (the
        softmax is unchanged) but does not carry the means' common offset, whose rounding would
        otherwise dominate the float32 logits."""
        dlog = tl.sum(e * (nu2[None, :, :] - 0.5 * zeta * e), axis=1)
        logit = lw + dlog * inv_d
        mx = tl.max(logit, axis=0)
        ex = tl.exp(logit - mx[None, :])
        w = ex * tl.fdiv(1.0, tl.sum(ex, axis=0))[None, :]  # the sum is >= 1
        ebar = tl.sum(w[:, None, :] * e, axis=0)
        return w, dlog, ebar

    @triton.jit
    def _step_one(e, lw, x, xs, c0, s2, ss, s_j, s_n, eps):
        """One Euler substep ``x + pi(x, s_j) * (s_n - s_j)`` with the whole GM in registers
        (centred means ``e``, centre ``c0``); the state is kept exactly where ``s_n == s_j``
        (a finished sample)."""
        inv_s, zeta, cx, cs, dd, inv_d = _consts(s_j, ss, s2, eps)
        nu = cx * x - cs * xs
        w, dlog, ebar = _posterior_one(e, lw, nu - zeta * c0, zeta, inv_d)
        u = (x - (s2 * nu + c0 + ebar) * inv_d) * inv_s
        return tl.where(s_n != s_j, x + u * (s_n - s_j), x)

    @triton.jit
    def _ebar_streamed(
        means_ptr,
        m_off,
        lw_ptr,
        l_off,
        s_mk,
        s_lk,
        u0,
        a,
        nu2,
        zeta,
        inv_d,
        K,
        kr,
        cmask,
        pmask,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """``ebar`` of the posterior (centred at component 0, whose loaded mean is ``u0``; the
        centred x0-means are ``e_k = a (m_k - u0)``: ``a = -sigma_src`` for a u-GM, 1 for an
        x0-GM) with K streamed in tiles (online softmax; a fully dead tile so far gives no NaN).
        ``m_off (1, BLOCK_C, BLOCK_P)``, ``l_off (1, BLOCK_P)``."""
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        s_run = tl.zeros([BLOCK_P], tl.float32)
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        xmask = cmask[:, None] & pmask[None, :]
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kr
            kmask = k < K
            mu_u = tl.load(
                means_ptr + m_off + k[:, None, None] * s_mk, mask=kmask[:, None, None] & xmask[None, :, :], other=0.0
            ).to(tl.float32)
            e = a * (mu_u - u0[None, :, :])
            lw = tl.load(
                lw_ptr + l_off + k[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")
            ).to(tl.float32)
            lw = tl.where(pmask[None, :], lw, 0.0)
            lw = tl.where(kmask[:, None], lw, float("-inf"))
            logit = lw + tl.sum(e * (nu2[None, :, :] - 0.5 * zeta * e), axis=1) * inv_d
            m_new = tl.maximum(m_run, tl.max(logit, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale = tl.exp(m_run - m_safe)
            ex = tl.exp(logit - m_safe[None, :])
            s_run = s_run * scale + tl.sum(ex, axis=0)
            acc = acc * scale[None, :] + tl.sum(ex[:, None, :] * e, axis=0)
            m_run = m_new
        return acc * tl.fdiv(1.0, s_run)[None, :]  # s_run >= 1

    @triton.jit
    def _program_states(
        xs_ptr,
        x_ptr,
        C,
        P,
        NPB,
        s_sb,
        s_sc,
        s_sp,
        s_xb,
        s_xc,
        s_xp,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """This program's batch row ``b``, pixels ``p [BP]``, channel and component ranges, masks and
        float32 states ``x_src``, ``x`` ``[BC, BP]``, on a 1-D grid of ``B * NPB`` programs, pixel
        blocks fastest (``mixture.program_tile`` with one channel tile: any batch fits CUDA's limits)."""
        b, _, p, kr, c = program_tile(NPB, 1, BLOCK_K, BLOCK_C, BLOCK_P, INT64)
        pmask = p < P
        cmask = c < C
        xmask = cmask[:, None] & pmask[None, :]
        xs = tl.load(xs_ptr + b * s_sb + c[:, None] * s_sc + p[None, :] * s_sp, mask=xmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + p[None, :] * s_xp, mask=xmask, other=0.0).to(tl.float32)
        return b, p, c, kr, pmask, cmask, xmask, xs, x

    @triton.jit
    def _policy_pi_kernel(
        means_ptr,
        lw_ptr,
        xs_ptr,
        x_ptr,
        var_ptr,
        ssrc_ptr,
        sig_ptr,
        out_ptr,
        K,
        C,
        P,
        NPB,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        s_lb,
        s_lk,
        s_lp,
        s_sb,
        s_sc,
        s_sp,
        s_xb,
        s_xc,
        s_xp,
        eps,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """``u = pi(x, sigma)`` for the ``BLOCK_P`` pixels ``p`` of batch element ``b``, all
        channels, K streamed in ``BLOCK_K`` tiles. Writes only ``u``."""
        b, p, c, kr, pmask, cmask, xmask, xs, x = _program_states(
            xs_ptr, x_ptr, C, P, NPB, s_sb, s_sc, s_sp, s_xb, s_xc, s_xp, BLOCK_K, BLOCK_C, BLOCK_P, INT64
        )
        s2 = tl.load(var_ptr + b)
        ssrc = tl.load(ssrc_ptr + b)
        inv_s, zeta, cx, cs, dd, inv_d = _consts(tl.load(sig_ptr + b), tl.maximum(ssrc, eps), s2, eps)
        nu = cx * x - cs * xs
        m_off = b * s_mb + c[None, :, None] * s_mc + p[None, None, :] * s_mp
        l_off = b * s_lb + p[None, :] * s_lp
        u0 = tl.load(means_ptr + b * s_mb + c[:, None] * s_mc + p[None, :] * s_mp, mask=xmask, other=0.0).to(
            tl.float32
        )  # the centre: component 0
        c0 = xs - ssrc * u0
        ebar = _ebar_streamed(
            means_ptr,
            m_off,
            lw_ptr,
            l_off,
            s_mk,
            s_lk,
            u0,
            -ssrc,
            nu - zeta * c0,
            zeta,
            inv_d,
            K,
            kr,
            cmask,
            pmask,
            BLOCK_K,
            BLOCK_C,
            BLOCK_P,
        )
        u = (x - (s2 * nu + c0 + ebar) * inv_d) * inv_s
        tl.store(out_ptr + b * (C * P) + c[:, None] * P + p[None, :], u.to(out_ptr.dtype.element_ty), mask=xmask)

    @triton.jit
    def _policy_rollout_kernel(
        means_ptr,
        lw_ptr,
        xs_ptr,
        x_ptr,
        var_ptr,
        ssrc_ptr,
        tab_ptr,
        out_ptr,
        ck_ptr,
        K,
        C,
        P,
        N,
        S,
        NPB,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        s_lb,
        s_lk,
        s_lp,
        s_sb,
        s_sc,
        s_sp,
        s_xb,
        s_xc,
        s_xp,
        s_tb,
        s_vb,
        s_ssb,
        eps,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        ONE_TILE: tl.constexpr,
        SAVE: tl.constexpr,
        X0: tl.constexpr,
        PIXEL_VAR: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """All ``N`` Euler substeps of the policy for the ``BLOCK_P`` pixels ``p`` of batch element
        ``b`` along row ``b`` of the sigma table; stores the final state and, when ``SAVE``, the
        state before every ``S``-th substep (``ck (B, ceil(N / S), C, P)``). ``X0``: the means
        are an x0-GM's (``gm_ode_substeps``: the policy's affine map is the identity);
        ``PIXEL_VAR``: the variance is per pixel (``var (B, P)``, batch stride ``s_vb``).
        A 1-D grid of ``B * NPB`` programs, pixel blocks fastest (any batch fits CUDA's limits);
        ``s_vb``, ``s_ssb`` and ``s_tb`` the batch strides of the per-sample variance, sigma_src and
        sigma table (0: shared by the batch)."""
        b, p, c, kr, pmask, cmask, xmask, xs, x = _program_states(
            xs_ptr, x_ptr, C, P, NPB, s_sb, s_sc, s_sp, s_xb, s_xc, s_xp, BLOCK_K, BLOCK_C, BLOCK_P, INT64
        )
        if PIXEL_VAR:
            s2 = tl.load(var_ptr + b * s_vb + p, mask=pmask, other=1.0)
        else:
            s2 = tl.load(var_ptr + b * s_vb)
        ssrc = tl.load(ssrc_ptr + b * s_ssb)
        ss = tl.maximum(ssrc, eps)
        m_off = b * s_mb + c[None, :, None] * s_mc + p[None, None, :] * s_mp
        l_off = b * s_lb + p[None, :] * s_lp
        st_off = c[:, None] * P + p[None, :]
        u0 = tl.load(means_ptr + b * s_mb + c[:, None] * s_mc + p[None, :] * s_mp, mask=xmask, other=0.0).to(
            tl.float32
        )  # the centre: component 0
        if X0:
            a = ssrc * 0.0 + 1.0
            c0 = u0
        else:
            a = -ssrc
            c0 = xs - ssrc * u0
        if ONE_TILE:  # the pixel's whole GM, loaded once for all N substeps
            kmask = kr < K
            e = a * (
                tl.load(
                    means_ptr + m_off + kr[:, None, None] * s_mk,
                    mask=kmask[:, None, None] & xmask[None, :, :],
                    other=0.0,
                ).to(tl.float32)
                - u0[None, :, :]
            )
            lw = tl.load(
                lw_ptr + l_off + kr[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")
            ).to(tl.float32)
            lw = tl.where(pmask[None, :], lw, 0.0)
            lw = tl.where(kmask[:, None], lw, float("-inf"))
        for j in range(N):
            if SAVE:
                if j % S == 0:
                    tl.store(ck_ptr + (b * ((N + S - 1) // S) + j // S) * (C * P) + st_off, x, mask=xmask)
            s_j = tl.load(tab_ptr + b * s_tb + j)
            s_n = tl.load(tab_ptr + b * s_tb + j + 1)
            if ONE_TILE:
                x = _step_one(e, lw, x, xs, c0, s2, ss, s_j, s_n, eps)
            else:
                inv_s, zeta, cx, cs, dd, inv_d = _consts(s_j, ss, s2, eps)
                nu = cx * x - cs * xs
                ebar = _ebar_streamed(
                    means_ptr,
                    m_off,
                    lw_ptr,
                    l_off,
                    s_mk,
                    s_lk,
                    u0,
                    a,
                    nu - zeta * c0,
                    zeta,
                    inv_d,
                    K,
                    kr,
                    cmask,
                    pmask,
                    BLOCK_K,
                    BLOCK_C,
                    BLOCK_P,
                )
                u = (x - (s2 * nu + c0 + ebar) * inv_d) * inv_s
                x = tl.where(s_n != s_j, x + u * (s_n - s_j), x)
        tl.store(out_ptr + b * (C * P) + st_off, x.to(out_ptr.dtype.element_ty), mask=xmask)

    @triton.jit
    def _pi_backward_one(e, lw, x, xs, c0, g_u, inv_s, zeta, cx, cs, s2, dd, inv_d, eps):
        """Vector-Jacobian product of ``u = pi(x)`` at one state, whole GM in registers.

        Returns ``g_x (BLOCK_C, BLOCK_P)``, ``g_mu (BLOCK_K, BLOCK_C, BLOCK_P)`` (w.r.t. the
        x0-means), ``g_l (BLOCK_K, BLOCK_P)``, ``g_xs`` (through ``nu`` only) and ``g_s2
        (BLOCK_P,)``. With ``x0 = (s2 * nu + mbar) * inv_d``, ``mbar = sum_k w_k mu_k``,
        ``w = softmax(l + D * inv_d)``, ``D_k = sum_c mu_kc (nu_c - zeta mu_kc / 2)``. In the
        centred form of ``_posterior_one`` (``e_k = mu_k - c0``) every term is the same: the
        softmax gradient sums to 0 over k, so the constant shift of ``D`` drops out.
        """
        nu = cx * x - cs * xs
        nu2 = nu - zeta * c0
        w, dlog, ebar = _posterior_one(e, lw, nu2, zeta, inv_d)
        g_x0 = -g_u * inv_s
        g_mbar = g_x0 * inv_d
        g_l = w * (tl.sum(e * g_mbar[None, :, :], axis=1) - tl.sum(ebar * g_mbar, axis=0)[None, :])
        g_dlog = g_l * inv_d
        g_mu = w[:, None, :] * g_mbar[None, :, :] + g_dlog[:, None, :] * (nu2[None, :, :] - zeta * e)
        g_nu = s2 * g_mbar + tl.sum(g_dlog[:, None, :] * e, axis=0)
        g_inv_d = tl.sum(g_x0 * (s2 * nu + c0 + ebar), axis=0) + tl.sum(g_l * dlog, axis=0)
        g_dd = tl.where(dd > eps, -g_inv_d * inv_d * inv_d, 0.0)
        g_s2 = tl.sum(g_x0 * nu, axis=0) * inv_d + g_dd * zeta
        g_x = g_u * inv_s + cx * g_nu
        return g_x, g_mu, g_l, -cs * g_nu, g_s2

    @triton.jit
    def _policy_backward_kernel(
        means_ptr,
        lw_ptr,
        xs_ptr,
        x_ptr,
        var_ptr,
        ssrc_ptr,
        tab_ptr,
        ck_ptr,
        g_ptr,
        gm_ptr,
        gl_ptr,
        gxs_ptr,
        gx_ptr,
        gv_ptr,
        K,
        C,
        P,
        N,
        S,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        s_lb,
        s_lk,
        s_lp,
        s_sb,
        s_sc,
        s_sp,
        s_xb,
        s_xc,
        s_xp,
        s_tb,
        eps,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        ROLLOUT: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """Backward of ``pi`` (``ROLLOUT=False``: ``x`` is the state, the table row holds
        ``sigma``) or of the whole rollout (``ROLLOUT=True``: segments of ``S`` substeps in
        reverse, each substep's state recomputed from the segment's saved state ``ck``).

        Accumulates in registers and stores once: ``g_means_u (B, K, C, P)``, ``g_logweights
        (B, K, P)``, ``g_x_src (B, C, P)``, ``g_x (B, C, P)`` (of ``x``, or of ``x_start``) and
        the per-pixel share of ``g_gm_vars`` ``(B, P)`` (fp32; summed over pixels by the caller).
        """
        b = tl.program_id(0)  # batch on the grid's x axis (no limit that matters), pixel blocks on y
        pid_p = tl.program_id(1)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        kr = tl.arange(0, BLOCK_K)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
        pmask = p < P
        cmask = c < C
        kmask = kr < K
        xmask = cmask[:, None] & pmask[None, :]
        mmask = kmask[:, None, None] & xmask[None, :, :]
        lmask = kmask[:, None] & pmask[None, :]
        st_off = c[:, None] * P + p[None, :]
        xs = tl.load(xs_ptr + b * s_sb + c[:, None] * s_sc + p[None, :] * s_sp, mask=xmask, other=0.0).to(tl.float32)
        s2 = tl.load(var_ptr + b)
        ssrc = tl.load(ssrc_ptr + b)
        ss = tl.maximum(ssrc, eps)
        m_off = b * s_mb + c[None, :, None] * s_mc + p[None, None, :] * s_mp
        u0 = tl.load(means_ptr + b * s_mb + c[:, None] * s_mc + p[None, :] * s_mp, mask=xmask, other=0.0).to(
            tl.float32
        )  # the centre: component 0
        c0 = xs - ssrc * u0
        e = ssrc * (
            u0[None, :, :] - tl.load(means_ptr + m_off + kr[:, None, None] * s_mk, mask=mmask, other=0.0).to(tl.float32)
        )
        lw = tl.load(lw_ptr + b * s_lb + p[None, :] * s_lp + kr[:, None] * s_lk, mask=lmask, other=float("-inf")).to(
            tl.float32
        )
        lw = tl.where(pmask[None, :], lw, 0.0)
        lw = tl.where(kmask[:, None], lw, float("-inf"))
        g = tl.load(g_ptr + b * (C * P) + st_off, mask=xmask, other=0.0).to(tl.float32)
        acc_mu = tl.zeros([BLOCK_K, BLOCK_C, BLOCK_P], tl.float32)
        acc_l = tl.zeros([BLOCK_K, BLOCK_P], tl.float32)
        acc_xs = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        acc_s2 = tl.zeros([BLOCK_P], tl.float32)
        if ROLLOUT:
            n_ck = (N + S - 1) // S
            for cc in range(n_ck):
                seg = n_ck - 1 - cc
                j0 = seg * S
                x_seg = tl.load(ck_ptr + (b * n_ck + seg) * (C * P) + st_off, mask=xmask, other=0.0)
                seg_len = N - j0
                if seg_len > S:
                    seg_len = S
                for jj in range(seg_len):
                    j = j0 + seg_len - 1 - jj
                    x = x_seg
                    for i in range(j - j0):  # the state before substep j, from the segment's start
                        x = _step_one(
                            e,
                            lw,
                            x,
                            xs,
                            c0,
                            s2,
                            ss,
                            tl.load(tab_ptr + b * s_tb + j0 + i),
                            tl.load(tab_ptr + b * s_tb + j0 + i + 1),
                            eps,
                        )
                    s_j = tl.load(tab_ptr + b * s_tb + j)
                    h = tl.load(tab_ptr + b * s_tb + j + 1) - s_j
                    inv_s, zeta, cx, cs, dd, inv_d = _consts(s_j, ss, s2, eps)
                    g_x, g_mu, g_l, g_xs, g_s2 = _pi_backward_one(
                        e, lw, x, xs, c0, h * g, inv_s, zeta, cx, cs, s2, dd, inv_d, eps
                    )
                    g = g + g_x
                    acc_mu += g_mu
                    acc_l += g_l
                    acc_xs += g_xs
                    acc_s2 += g_s2
        else:
            x = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + p[None, :] * s_xp, mask=xmask, other=0.0).to(tl.float32)
            inv_s, zeta, cx, cs, dd, inv_d = _consts(tl.load(tab_ptr + b * s_tb), ss, s2, eps)
            g_x, acc_mu, acc_l, acc_xs, acc_s2 = _pi_backward_one(
                e, lw, x, xs, c0, g, inv_s, zeta, cx, cs, s2, dd, inv_d, eps
            )
            g = g_x
        # back through mu = x_src - sigma_src * u
        acc_xs += tl.sum(acc_mu, axis=0)
        go_off = b * (K * C * P) + kr[:, None, None] * (C * P) + c[None, :, None] * P + p[None, None, :]
        tl.store(gm_ptr + go_off, (-ssrc * acc_mu).to(gm_ptr.dtype.element_ty), mask=mmask)
        tl.store(gl_ptr + b * (K * P) + kr[:, None] * P + p[None, :], acc_l.to(gl_ptr.dtype.element_ty), mask=lmask)
        tl.store(gxs_ptr + b * (C * P) + st_off, acc_xs.to(gxs_ptr.dtype.element_ty), mask=xmask)
        tl.store(gx_ptr + b * (C * P) + st_off, g.to(gx_ptr.dtype.element_ty), mask=xmask)
        tl.store(gv_ptr + b * P + p, acc_s2, mask=pmask)


# ----------------------------------------------------------------------------- launchers


def _flat(means_u: torch.Tensor, logweights: torch.Tensor, x_src: torch.Tensor, x: torch.Tensor) -> tuple:
    """``means_u (B, K, C, P)``, ``logweights (B, K, P)``, ``x_src``, ``x (B, C, P)``: the spatial
    dims flattened, views whenever the strides allow."""
    B, K, C = means_u.shape[:3]
    m = means_u.reshape(B, K, C, -1)
    P = m.shape[-1]
    return m, logweights.reshape(B, K, P), x_src.reshape(B, C, P), x.reshape(B, C, P)


def _f32(gm_vars: torch.Tensor, sigma_src: torch.Tensor, sigmas: torch.Tensor) -> tuple:
    """The per-sample variances, source sigmas and sigmas (or sigma tables) as the kernels read
    them: contiguous float32 (the tensors themselves when they are already)."""
    for t in (gm_vars, sigma_src, sigmas):
        if t.dtype is not torch.float32 or not t.is_contiguous():
            return tuple([t.to(torch.float32).contiguous() for t in (gm_vars, sigma_src, sigmas)])
    return gm_vars, sigma_src, sigmas


def _pi_args(means_u, logweights, x_src, x, gm_vars, sigma_src, sigma, out, int64_fn) -> tuple:
    """``_policy_pi_kernel``'s views (in the order of the arguments), grid, integer arguments and
    options; ``int64_fn`` is ``needs_int64``, a key of the stored plan (tests replace it)."""
    m, lw, xs, xf = _flat(means_u, logweights, x_src, x)
    B, K, C, P = m.shape
    bk, bc, bp = _pi_blocks(K, C, P)
    npb = cdiv(P, bp)
    ints = (K, C, P, npb, *m.stride(), *lw.stride(), *xs.stride(), *xf.stride())
    options = dict(BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, INT64=int64_fn(m, lw, xs, xf, out), num_warps=4)
    return (m, lw, xs, xf, gm_vars, sigma_src, sigma, out), (B * npb,), ints, options


def _rollout_args(
    means_u, logweights, x_src, x, gm_vars, sigma_src, sigmas, out, ck, save: bool, blocks_fn, int64_fn
) -> tuple:
    """``_policy_rollout_kernel``'s views, grid, integer arguments and options (``blocks_fn,
    int64_fn``: ``_blocks, needs_int64``, keys of the stored plan)."""
    m, lw, xs, xf = _flat(means_u, logweights, x_src, x)
    B, K, C, P = m.shape
    N = sigmas.shape[1] - 1
    bk, bc, bp, one = blocks_fn(K, C, P, _TILE_FWD)
    npb = cdiv(P, bp)
    ints = (
        K,
        C,
        P,
        N,
        checkpoint_stride(N),
        npb,
        *m.stride(),
        *lw.stride(),
        *xs.stride(),
        *xf.stride(),
        sigmas.stride(0),
        1,
        1,
    )
    options = dict(
        BLOCK_K=bk,
        BLOCK_C=bc,
        BLOCK_P=bp,
        ONE_TILE=one,
        SAVE=save,
        X0=False,
        PIXEL_VAR=False,
        INT64=int64_fn(m, lw, xs, xf, out, ck),
        num_warps=4,
    )
    return (m, lw, xs, xf, gm_vars, sigma_src, sigmas, out, ck), (B * npb,), ints, options


def _backward_args(
    means_u, logweights, x_src, x, gm_vars, sigma_src, sigmas, ck, g, g_m, g_l, g_xs, g_x, g_v, rollout: bool, int64_fn
) -> tuple:
    """``_policy_backward_kernel``'s views, grid, integer arguments and options; raises where the
    GM does not fit the one-tile register layout it needs or the grid's y axis overflows."""
    m, lw, xs, xf = _flat(means_u, logweights, x_src, x)
    B, K, C, P = m.shape
    bk, bc, bp, one = _blocks(K, C, P, _TILE_BWD)
    if not one:
        raise ValueError(
            f"the fused policy backward needs next_pow2(K) * next_pow2(C) <= {_ONE_TILE_KC}, got K={K}, C={C}"
        )
    npb = cdiv(P, bp)
    if npb > 65535:  # CUDA's limit of the grid's y axis (a 1-D grid's division spills in this kernel)
        raise ValueError(f"the fused policy backward takes at most {65535 * bp} pixels per sample for this GM, got {P}")
    N = sigmas.shape[1] - 1
    ints = (K, C, P, N, checkpoint_stride(N), *m.stride(), *lw.stride(), *xs.stride(), *xf.stride(), sigmas.stride(0))
    options = dict(
        BLOCK_K=bk,
        BLOCK_C=bc,
        BLOCK_P=bp,
        ROLLOUT=rollout,
        INT64=int64_fn(m, lw, xs, xf, g_m, ck),
        num_warps=_WARPS_BWD,
    )
    views = (
        m,
        lw,
        xs,
        xf,
        gm_vars,
        sigma_src,
        sigmas,
        ck,
        g.view(B, C, P),
        g_m.view(B, K, C, P),
        g_l.view(B, K, P),
        g_xs.view(B, C, P),
        g_x.view(B, C, P),
        g_v,
    )
    return views, (B, npb), ints, options


_PI_PLANS = PlanCache()
_ROLLOUT_PLANS = PlanCache()
_BACKWARD_PLANS = PlanCache()


def _launch_pi(means_u, gm_vars, logweights, x_src, sigma_src, x, sigma, eps: float) -> torch.Tensor:
    """``u (B, C, *S)`` in the dtype of ``x``; the plan stored per shape (``planned_args``, the
    key leaves out ``out``, allocated here contiguous)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    tensors = (means_u, logweights, x_src, x, *_f32(gm_vars, sigma_src, sigma), out)
    tensors, grid, ints, options = planned_args(_PI_PLANS, _pi_args, tensors, needs_int64, n_key=7)
    _policy_pi_kernel[grid](*tensors, *ints, eps, **options)
    return out


def _launch_rollout(means_u, gm_vars, logweights, x_src, sigma_src, x, sigmas, eps: float, save: bool) -> tuple:
    """The rollout's final state ``(B, C, *S)`` in the dtype of ``x`` and, when ``save``, the
    float32 checkpoints ``(B, ceil(N / S), C, P)`` of a training rollout (else a placeholder of
    one element); the plan's key leaves out both (allocated here contiguous)."""
    B, C = x.shape[:2]
    P = x.numel() // max(B * C, 1)
    N = sigmas.shape[1] - 1
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ck_shape = (B, cdiv(N, checkpoint_stride(N)), C, P) if save else (1,)
    ck = torch.empty(ck_shape, device=x.device, dtype=torch.float32)
    tensors = (means_u, logweights, x_src, x, *_f32(gm_vars, sigma_src, sigmas), out, ck)
    tensors, grid, ints, options = planned_args(
        _ROLLOUT_PLANS, _rollout_args, tensors, save, _blocks, needs_int64, n_key=7
    )
    _policy_rollout_kernel[grid](*tensors, *ints, eps, **options)
    return out, ck


def _launch_backward(
    g, means_u, gm_vars, logweights, x_src, sigma_src, x, sigmas, ck, eps: float, rollout: bool
) -> tuple:
    """Gradients ``(means_u, gm_vars, logweights, x_src, x)`` in their dtypes of ``pi`` (``x``
    the state, ``sigmas (B, 1)`` its sigma) or of the rollout (``x`` its start, ``ck`` its
    checkpoints) for the upstream gradient ``g``; the plan's key leaves out the gradients."""
    g = g.contiguous()
    g_m = torch.empty_like(means_u, memory_format=torch.contiguous_format)
    g_l = torch.empty_like(logweights, memory_format=torch.contiguous_format)
    g_xs = torch.empty_like(x_src, memory_format=torch.contiguous_format)
    g_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    B, C = x.shape[:2]
    g_v = torch.empty((B, x.numel() // max(B * C, 1)), device=x.device, dtype=torch.float32)  # per-pixel shares
    tensors = (means_u, logweights, x_src, x, *_f32(gm_vars, sigma_src, sigmas), ck, g, g_m, g_l, g_xs, g_x, g_v)
    tensors, grid, ints, options = planned_args(_BACKWARD_PLANS, _backward_args, tensors, rollout, needs_int64, n_key=9)
    _policy_backward_kernel[grid](*tensors, *ints, eps, **options)
    return g_m, g_v.sum(dim=1).to(gm_vars.dtype), g_l, g_xs, g_x


# ----------------------------------------------------------------------------- torch.library ops
# The Triton path: the entry points below pick the backend and call these directly.

_T = torch.Tensor


@torch.library.custom_op("gmkernels::policy_pi", mutates_args=())
def _pi_op(means_u: _T, gm_vars: _T, logweights: _T, x_src: _T, sigma_src: _T, x: _T, sigma: _T, eps: float) -> _T:
    """``u = pi(x, sigma)`` of the policy, ``(B, C, *S)`` in the dtype of ``x``."""
    return _launch_pi(means_u, gm_vars, logweights, x_src, sigma_src, x, sigma, eps)


@_pi_op.register_fake
def _(means_u, gm_vars, logweights, x_src, sigma_src, x, sigma, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("gmkernels::policy_pi_backward", mutates_args=())
def _pi_backward_op(
    g: _T, means_u: _T, gm_vars: _T, logweights: _T, x_src: _T, sigma_src: _T, x: _T, sigma: _T, eps: float
) -> tuple[_T, _T, _T, _T, _T]:
    """Gradients of ``policy_pi`` for ``means_u, gm_vars, logweights, x_src, x``."""
    return _launch_backward(g, means_u, gm_vars, logweights, x_src, sigma_src, x, sigma.view(-1, 1), x, eps, False)


@torch.library.custom_op("gmkernels::policy_rollout", mutates_args=())
def _rollout_op(
    means_u: _T, gm_vars: _T, logweights: _T, x_src: _T, sigma_src: _T, x_start: _T, sigmas: _T, eps: float, save: bool
) -> tuple[_T, _T]:
    """The Euler rollout along the sigma tables ``(B, N + 1)``: the final state ``(B, C, *S)`` in
    the dtype of ``x_start`` and the float32 checkpoints its backward reads (``save``; else a
    placeholder)."""
    return _launch_rollout(means_u, gm_vars, logweights, x_src, sigma_src, x_start, sigmas, eps, save)


@_rollout_op.register_fake
def _(means_u, gm_vars, logweights, x_src, sigma_src, x_start, sigmas, eps, save):
    B, C = x_start.shape[:2]
    N = sigmas.shape[1] - 1
    ck_shape = (B, cdiv(N, checkpoint_stride(N)), C, x_start.numel() // max(B * C, 1)) if save else (1,)
    return torch.empty_like(x_start, memory_format=torch.contiguous_format), x_start.new_empty(
        ck_shape, dtype=torch.float32
    )


@torch.library.custom_op("gmkernels::policy_rollout_backward", mutates_args=())
def _rollout_backward_op(
    g: _T,
    means_u: _T,
    gm_vars: _T,
    logweights: _T,
    x_src: _T,
    sigma_src: _T,
    x_start: _T,
    sigmas: _T,
    ck: _T,
    eps: float,
) -> tuple[_T, _T, _T, _T, _T]:
    """Gradients of ``policy_rollout`` for ``means_u, gm_vars, logweights, x_src, x_start``."""
    return _launch_backward(g, means_u, gm_vars, logweights, x_src, sigma_src, x_start, sigmas, ck, eps, True)


@_pi_backward_op.register_fake
@_rollout_backward_op.register_fake
def _(g, means_u, gm_vars, logweights, x_src, sigma_src, x, *rest):
    return (
        *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (means_u, gm_vars, logweights, x_src)),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def _pi_setup(ctx, inputs, output):
    *tensors, ctx.eps = inputs
    ctx.save_for_backward(*tensors)


def _pi_backward(ctx, g):
    g_m, g_v, g_l, g_xs, g_x = _pi_backward_op(g, *ctx.saved_tensors, ctx.eps)
    return g_m, g_v, g_l, g_xs, None, g_x, None, None  # no gradient for the sigmas


def _rollout_setup(ctx, inputs, output):
    *tensors, ctx.eps, ctx.save = inputs
    ctx.save_for_backward(*tensors, output[1])


def _rollout_backward(ctx, g, g_ck):
    if not ctx.save:
        raise RuntimeError("gmkernels::policy_rollout: a rollout run with save=False saved no states to differentiate")
    g_m, g_v, g_l, g_xs, g_x = _rollout_backward_op(g, *ctx.saved_tensors, ctx.eps)
    return g_m, g_v, g_l, g_xs, None, g_x, None, None, None


_pi_op.register_autograd(_pi_backward, setup_context=_pi_setup)
_rollout_op.register_autograd(_rollout_backward, setup_context=_rollout_setup)


# ----------------------------------------------------------------------------- entry points


def _triton_path(
    means_u: torch.Tensor, gm_vars: torch.Tensor, logweights: torch.Tensor, x_src: torch.Tensor, x: torch.Tensor
) -> bool | None:
    """``None`` for the torch path (``select_backend`` says so, an input is float64, or a
    gradient is needed of a GM too large for the fused backward's register tile), else whether
    autograd tracks an input (the Triton path then trains)."""
    if select_backend(means_u) == "torch":
        return None
    track = torch.is_grad_enabled()
    grad = False
    for t in (means_u, gm_vars, logweights, x_src, x):
        if t.dtype is torch.float64:
            return None
        grad = grad or (track and t.requires_grad)
    if grad and not one_tile(means_u.shape[1], means_u.shape[2]):
        return None
    return grad


def _torch_args(means_u, gm_vars, logweights, x_src, sigma_src, x, sig):
    cdt = compute_dtype(means_u.dtype, gm_vars.dtype, logweights.dtype, x_src.dtype, x.dtype)
    return [t.to(cdt) for t in (means_u, gm_vars, logweights, x_src, sigma_src, x, sig)]


def policy_velocity(means_u, gm_vars, logweights, x_src, sigma_src, x, sigma, eps: float = 1e-6) -> torch.Tensor:
    """The policy's velocity at ``(x, sigma)`` (validated inputs, see ``GMFlowPolicy.pi``).

    Args:
        means_u: ``(B, K, C, *S)``; gm_vars, sigma_src, sigma: ``(B,)`` float32/64;
        logweights: ``(B, K, 1, *S)``; x_src, x: ``(B, C, *S)``.
    Returns:
        ``u (B, C, *S)`` in the dtype of ``x``.
    """
    if _triton_path(means_u, gm_vars, logweights, x_src, x) is None:
        args = _torch_args(means_u, gm_vars, logweights, x_src, sigma_src, x, sigma)
        return ref.policy_pi(*args, eps).to(x.dtype)
    return _pi_op(means_u, gm_vars, logweights, x_src, sigma_src, x, sigma, eps)


def _rollout_torch(means_u, gm_vars, logweights, x_src, sigma_src, x, sigmas, eps):
    """``reference.policy_rollout`` with one activation checkpoint per substep when a gradient
    is needed (what the public pi-Flow code does): memory one state per substep."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (means_u, gm_vars, logweights, x_src, x))):
        return ref.policy_rollout(means_u, gm_vars, logweights, x_src, sigma_src, x, sigmas, eps)
    nd = x.dim()
    for j in range(sigmas.shape[1] - 1):
        s_j, s_n = sigmas[:, j], sigmas[:, j + 1]
        u = torch.utils.checkpoint.checkpoint(
            ref.policy_pi, means_u, gm_vars, logweights, x_src, sigma_src, x, s_j, eps, use_reentrant=False
        )
        keep = (s_n != s_j).reshape(-1, *([1] * (nd - 1)))
        x = torch.where(keep, x + u * (s_n - s_j).reshape(keep.shape), x)
    return x


def policy_rollout(means_u, gm_vars, logweights, x_src, sigma_src, x_start, sigmas, eps: float = 1e-6) -> torch.Tensor:
    """The policy's Euler rollout along per-sample sigma tables (validated inputs, see
    ``GMFlowPolicy.integrate``).

    Args:
        sigmas: ``(B, N + 1)`` float32/64, row ``b`` the noise levels of sample ``b`` (constant
            after its last substep).
    Returns:
        ``(B, C, *S)`` in the dtype of ``x_start``.
    """
    train = _triton_path(means_u, gm_vars, logweights, x_src, x_start)
    if train is None:
        args = _torch_args(means_u, gm_vars, logweights, x_src, sigma_src, x_start, sigmas)
        return _rollout_torch(*args, eps).to(x_start.dtype)
    return _rollout_op(means_u, gm_vars, logweights, x_src, sigma_src, x_start, sigmas, eps, train)[0]
