"""GM log-density and NLL loss (docs/ops.md#likelihood): ``gm_logprob``, ``gm_nll_loss``, ``transition_loss``.

Kernels
-------
``_gm_loglik_fwd_kernel`` (one program = one row (batch element), one sample, ``BLOCK_P``
pixels): for each tile of ``BLOCK_K`` components it accumulates
``q_k = sum_c ((y_c - mu_kc) * istd)^2`` over a loop on C, forms
``l_k = logweights_k - 0.5 * q_k - C * logstds`` and folds the tile into an online logsumexp
(running max and rescaled sum; an all-dead tile gives no NaN), so registers do not grow with K
or C. It writes ``sign * logsumexp_k l_k + shift`` per pixel: the NLL (``sign=-1``, ``istd``
clamped at ``1/eps``, no ``2 pi``) or the log-density (``sign=1``, unclamped, ``shift`` the
Gaussian constant). For the NLL the per-pixel loss (float32) is the only thing saved for the
backward pass.

``_gm_nll_bwd_kernel`` (same grid) recomputes ``l_k`` tile by tile, turns it into the
responsibilities ``r_k = exp(l_k - lse)`` with the saved ``lse``, and writes ``dL/dlogweights``
and ``dL/dmeans`` directly in the dtype of the inputs. The gradient of a shared log-std is summed
in registers over the program's pixels and written as one partial per program,
``(R, n_programs)``, then summed by ``torch`` (no atomics); a per-pixel log-std gets its
gradient per pixel. ``reference.likelihood.gm_nll_loss_backward`` is the same math in torch.

Both kernels optionally evaluate the transition loss (``TRANSITION``): the GM is then the
reverse transition of a u-GM from ``(x, t_high)`` to ``t_low``, whose per-row constants each
program computes in float64 from the timesteps (``_transition_map``, one per row, given by
strides: stride 0 for one shared timestep). The means become ``mscale * mu_k + (1 - xres) * x``
with a state ``x (R, C, P)``, the residual formed as ``(y - x) + xres * x - mscale * mu_k``,
exact when ``y`` is close to ``x`` (a target state close to the input state, as at small
sigmas); the log-std becomes ``0.5 * logaddexp(2 * logstds + A, L)``, and the backward
multiplies the log-std gradient by its derivative before the partial sums. So the transition
loss is one fused NLL, forward and backward, with no K*C*H*W GM formed and no per-row tensor.

Point data (``H = W = 1``) swaps rows and pixels so the batch fills the pixel block. Precision:
``l_k`` is assembled in float32, so when a target lies thousands of stds from every component
(NLL ~ 1e8) the log-weights fall below its resolution; the float32 reference has the same limit.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

import reference.likelihood as ref

from .._dispatch import run_reference, select_backend
from .._validate import Sigma, check_gm, check_sigma_pair, check_state, per_sample_view
from ._launch import PlanCache, cdiv, kernels_wanted, needs_int64, next_pow2, planned_args

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch backend needs no triton
    triton = None

REDUCTIONS = ("mean", "sum", "none")
TILE = 1024  # elements of a BLOCK_K x BLOCK_P register tile
NUM_WARPS = 4
LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# Triton kernels. Layout seen by a kernel: means (R, K, C, P), logweights (R, K, P), logstds
# (R, P) (pixel stride 0 when shared), samples (R, N, C, P), all given by strides, with
# R = prod(*B) rows and P = H * W pixels (R and P swapped for point data, H = W = 1).
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _target(y_base, x_base, c, sy_c, sx_c, xres, mask_p, AFFINE: tl.constexpr):
        """Channel ``c`` of the target ``[BP]``; with ``AFFINE`` the state part of the means moves
        to it: ``y - (1 - xres) * x``."""
        y = tl.load(y_base + c * sy_c, mask=mask_p, other=0.0).to(tl.float32)
        if AFFINE:
            xv = tl.load(x_base + c * sx_c, mask=mask_p, other=0.0).to(tl.float32)
            y = (y - xv) + xres * xv
        return y

    @triton.jit
    def _component_q(
        mu_ptrs,
        y_base,
        x_base,
        C,
        sm_c,
        sy_c,
        sx_c,
        mask,
        mask_p,
        istd,
        msc,
        xres,
        AFFINE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """``q [BK, BP] = sum_c ((y_c - mu_kc) * istd)^2`` for one K tile (with ``AFFINE`` the means
        are ``msc * mu`` and the target that of ``_target``)."""
        q = tl.zeros([BLOCK_K, BLOCK_P], tl.float32)
        for c in range(C):
            y = _target(y_base, x_base, c, sy_c, sx_c, xres, mask_p, AFFINE)
            mu = tl.load(mu_ptrs + c * sm_c, mask=mask, other=0.0).to(tl.float32)
            if AFFINE:
                mu = mu * msc[None, :]
            d = (y[None, :] - mu) * istd[None, :]
            q += d * d
        return q

    @triton.jit
    def _timestep_sigma(t, T_TY: tl.constexpr):
        """``sigma = t / 1000`` in float64 for float64 timesteps, else in float32 as the torch
        path computes it (the float64 quotient rounded to float32 is the correctly rounded
        float32 quotient), widened to float64."""
        s = t.to(tl.float64) / 1000.0
        if T_TY != tl.float64:
            s = s.to(tl.float32).to(tl.float64)
        return s

    @triton.jit
    def _transition_map(th_ptr, tlow_ptr, r, offs_p, sth_r, sth_p, stl_r, stl_p, mask_p, ls, BLOCK_P: tl.constexpr):
        """The reverse transition of the transition loss, per lane ``[BP]``, computed in float64
        from the timesteps ``t_high``, ``t_low`` (one per row, given by strides; ``sigma`` of
        ``_timestep_sigma``) and the u-GM's log-std ``ls``. With ``c1, c2, c3`` of the reverse
        transition, returns float32 ``mscale = -c2 * sigma_high`` and ``xres = 1 - c1 - c2``
        (formed in float64: it cancels at close timesteps), so that the reverse-transition GM has
        means ``mscale * means_u + (1 - xres) * x_t_high``; its log-std
        ``0.5 * logaddexp(2 * ls + A, L)`` with ``A = 2 log(|c2| max(sigma_high, 1e-6))``,
        ``L = log(max(c3, 1e-12))``; and that log-std's derivative in ``ls``,
        ``sigmoid(2 * ls + A - L)`` (``A = -inf`` at ``t_low = t_high`` gives ``L / 2`` and 0)."""
        th = tl.load(th_ptr + r * sth_r + offs_p * sth_p, mask=mask_p, other=1000.0)
        tlow = tl.load(tlow_ptr + r * stl_r + offs_p * stl_p, mask=mask_p, other=0.0)
        sh = _timestep_sigma(th, th_ptr.dtype.element_ty)
        sl = _timestep_sigma(tlow, tlow_ptr.dtype.element_ty)
        eps = tl.full([BLOCK_P], 1e-6, tl.float64)  # float64 constants: a literal would be float32
        one = tl.full([BLOCK_P], 1.0, tl.float64)
        a = one - sh
        a_to = one - sl
        q = sl / tl.maximum(sh, eps)
        p = a / tl.maximum(a_to, eps)
        qp = q * p
        beta = one - qp * qp
        c1 = q * q * p  # the reference's association (1 - c1 - c2 cancels at close timesteps)
        c2 = beta * a_to
        c3 = beta * sl * sl
        A = 2.0 * tl.log(tl.abs(c2) * tl.maximum(sh, eps))
        L = tl.log(tl.maximum(c3, eps * eps))
        v = 2.0 * ls.to(tl.float64) + A
        d = v - L
        e = tl.exp(-tl.abs(d))  # in [0, 1]
        u = one + e
        log1p_e = tl.where(u == one, e, tl.log(u) * (e / tl.where(u == one, one, u - one)))  # log1p, exact for tiny e
        logstd = 0.5 * (tl.maximum(v, L) + log1p_e)
        dlogstd = tl.where(d >= 0, one, e) / u
        return (
            (-c2 * sh).to(tl.float32),
            (one - c1 - c2).to(tl.float32),
            logstd.to(tl.float32),
            dlogstd.to(tl.float32),
        )

    @triton.jit
    def _row_logstds(
        logstds_ptr,
        ss_r,
        ss_p,
        th_ptr,
        tlow_ptr,
        sth_r,
        sth_p,
        stl_r,
        stl_p,
        r,
        offs_p,
        mask_p,
        TRANSITION: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """The NLL kernels' per-lane log-std ``[BP]`` of row ``r`` (float32) and, with
        ``TRANSITION``, the reverse transition's ``mscale``, ``xres`` and mapped log-std
        (``_transition_map``); without it ``mscale`` and ``xres`` are unused placeholders."""
        ls = tl.load(logstds_ptr + r * ss_r + offs_p * ss_p, mask=mask_p, other=0.0).to(tl.float32)
        if TRANSITION:
            msc, xres, ls, _ = _transition_map(
                th_ptr, tlow_ptr, r, offs_p, sth_r, sth_p, stl_r, stl_p, mask_p, ls, BLOCK_P
            )
        else:
            msc = ls
            xres = ls
        return msc, xres, ls

    @triton.jit
    def _gm_loglik_fwd_kernel(
        means_ptr,
        logstds_ptr,
        logweights_ptr,
        y_ptr,
        out_ptr,
        th_ptr,
        tlow_ptr,
        x_ptr,
        N,
        K,
        C,
        P,
        n_pb,
        sm_r,
        sm_k,
        sm_c,
        sm_p,
        ss_r,
        ss_p,
        sw_r,
        sw_k,
        sw_p,
        sy_r,
        sy_n,
        sy_c,
        sy_p,
        so_r,
        so_n,
        so_p,
        sth_r,
        sth_p,
        stl_r,
        stl_p,
        sx_r,
        sx_c,
        sx_p,
        istd_max,
        sign,
        shift,
        TRANSITION: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        I64: tl.constexpr,
    ):
        """``out[r, n, p] = sign * logsumexp_k(l_k) + shift`` for samples ``y (R, N, C, P)``;
        with ``TRANSITION`` the GM is the reverse transition of the u-GM from ``x (R, C, P)`` at
        the timesteps ``t_high``, ``t_low (R, P)`` (``_transition_map``)."""
        pid = tl.program_id(0)
        pb = pid % n_pb
        rn = pid // n_pb
        n = rn % N
        r = rn // N
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        if I64:
            r = r.to(tl.int64)
            n = n.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
        mask_p = offs_p < P
        msc, xres, ls = _row_logstds(
            logstds_ptr,
            ss_r,
            ss_p,
            th_ptr,
            tlow_ptr,
            sth_r,
            sth_p,
            stl_r,
            stl_p,
            r,
            offs_p,
            mask_p,
            TRANSITION,
            BLOCK_P,
        )
        istd = tl.minimum(tl.exp(-ls), istd_max)
        # under the NLL's floor on 1/std a zero std keeps q finite while -C * logstds is +inf for
        # every live component: capped at the largest float in the loop (no inf - inf of a dead
        # component), the logsumexp is set to +inf after it unless every component is dead; the
        # log-density (no floor) keeps the reference's NaN there
        big = tl.where(istd_max < float("inf"), 3.4028234663852886e38, float("inf"))  # the largest float32
        base = tl.minimum(-ls * C, big, propagate_nan=tl.PropagateNan.ALL)  # a NaN log-std stays NaN
        x_base = x_ptr + r * sx_r + offs_p * sx_p
        y_base = y_ptr + r * sy_r + n * sy_n + offs_p * sy_p
        m = tl.full([BLOCK_P], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if I64:
                offs_k = offs_k.to(tl.int64)
            mask = (offs_k < K)[:, None] & mask_p[None, :]
            lw = tl.load(
                logweights_ptr + r * sw_r + offs_k[:, None] * sw_k + offs_p[None, :] * sw_p,
                mask=mask,
                other=float("-inf"),
            ).to(tl.float32)
            mu_ptrs = means_ptr + r * sm_r + offs_k[:, None] * sm_k + offs_p[None, :] * sm_p
            q = _component_q(
                mu_ptrs,
                y_base,
                x_base,
                C,
                sm_c,
                sy_c,
                sx_c,
                mask,
                mask_p,
                istd,
                msc,
                xres,
                TRANSITION,
                BLOCK_K,
                BLOCK_P,
            )
            logit = lw - 0.5 * q + base[None, :]
            m_new = tl.maximum(m, tl.max(logit, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a dead tile gives no NaN
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(logit - m_safe[None, :]), axis=0)
            m = m_new
        lse = m + tl.log(tl.where(mask_p, s, 1.0))
        lse = tl.where((base == 3.4028234663852886e38) & (m > float("-inf")), float("inf"), lse)
        tl.store(out_ptr + r * so_r + n * so_n + offs_p * so_p, sign * lse + shift, mask=mask_p)

    @triton.jit
    def _gm_nll_bwd_kernel(
        means_ptr,
        logstds_ptr,
        logweights_ptr,
        y_ptr,
        loss_ptr,
        gloss_ptr,
        th_ptr,
        tlow_ptr,
        x_ptr,
        gmeans_ptr,
        glogweights_ptr,
        glogstds_ptr,
        K,
        C,
        P,
        n_pb,
        sm_r,
        sm_k,
        sm_c,
        sm_p,
        ss_r,
        ss_p,
        sw_r,
        sw_k,
        sw_p,
        sy_r,
        sy_c,
        sy_p,
        sl_r,
        sl_p,
        sg_r,
        sg_p,
        sgm_r,
        sgm_k,
        sgm_c,
        sgm_p,
        sgw_r,
        sgw_k,
        sgw_p,
        sth_r,
        sth_p,
        stl_r,
        stl_p,
        sx_r,
        sx_c,
        sx_p,
        istd_max,
        TRANSITION: tl.constexpr,
        STD_PER_PIXEL: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        I64: tl.constexpr,
    ):
        """Gradients of the per-pixel NLL ``loss (R, P)`` for the upstream gradient
        ``gloss (R, P)``: ``gmeans (R, K, C, P)``, ``glogweights (R, K, P)``, and ``glogstds``:
        ``(R, P)`` contiguous with ``STD_PER_PIXEL``, else one float32 partial sum per program,
        ``(R, n_pb)`` contiguous. With ``TRANSITION`` (the GM is the reverse transition of the
        u-GM, ``_transition_map``) ``gmeans`` and ``glogstds`` are the gradients for the u-GM's
        means and log-stds."""
        pid = tl.program_id(0)
        pb = pid % n_pb
        r = pid // n_pb
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        if I64:
            r = r.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
        mask_p = offs_p < P
        msc, xres, ls = _row_logstds(
            logstds_ptr,
            ss_r,
            ss_p,
            th_ptr,
            tlow_ptr,
            sth_r,
            sth_p,
            stl_r,
            stl_p,
            r,
            offs_p,
            mask_p,
            TRANSITION,
            BLOCK_P,
        )
        e = tl.exp(-ls)
        istd = tl.minimum(e, istd_max)
        active = (e <= istd_max).to(tl.float32)  # the clamp passes no gradient where it bites
        base = -ls * C
        x_base = x_ptr + r * sx_r + offs_p * sx_p
        lse = -tl.load(loss_ptr + r * sl_r + offs_p * sl_p, mask=mask_p, other=0.0).to(tl.float32)
        g = -tl.load(gloss_ptr + r * sg_r + offs_p * sg_p, mask=mask_p, other=0.0).to(tl.float32)  # d/d lse
        y_base = y_ptr + r * sy_r + offs_p * sy_p
        acc_ls = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if I64:
                offs_k = offs_k.to(tl.int64)
            mask = (offs_k < K)[:, None] & mask_p[None, :]
            lw = tl.load(
                logweights_ptr + r * sw_r + offs_k[:, None] * sw_k + offs_p[None, :] * sw_p,
                mask=mask,
                other=float("-inf"),
            ).to(tl.float32)
            mu_ptrs = means_ptr + r * sm_r + offs_k[:, None] * sm_k + offs_p[None, :] * sm_p
            q = _component_q(
                mu_ptrs,
                y_base,
                x_base,
                C,
                sm_c,
                sy_c,
                sx_c,
                mask,
                mask_p,
                istd,
                msc,
                xres,
                TRANSITION,
                BLOCK_K,
                BLOCK_P,
            )
            gr = g[None, :] * tl.exp(lw - 0.5 * q + base[None, :] - lse[None, :])  # g * r_k
            gr = tl.where(lw == float("-inf"), 0.0, gr)  # 0 if dead, also where lse or base is infinite
            tl.store(
                glogweights_ptr + r * sgw_r + offs_k[:, None] * sgw_k + offs_p[None, :] * sgw_p,
                gr.to(glogweights_ptr.dtype.element_ty),
                mask=mask,
            )
            acc_ls += tl.sum(gr * (q * active[None, :] - C), axis=0)
            coef = gr * istd[None, :]
            gm_ptrs = gmeans_ptr + r * sgm_r + offs_k[:, None] * sgm_k + offs_p[None, :] * sgm_p
            for c in range(C):
                y = _target(y_base, x_base, c, sy_c, sx_c, xres, mask_p, TRANSITION)
                mu = tl.load(mu_ptrs + c * sm_c, mask=mask, other=0.0).to(tl.float32)
                if TRANSITION:
                    gmu = coef * ((y[None, :] - mu * msc[None, :]) * istd[None, :]) * msc[None, :]
                else:
                    gmu = coef * ((y[None, :] - mu) * istd[None, :])
                tl.store(gm_ptrs + c * sgm_c, gmu.to(gmeans_ptr.dtype.element_ty), mask=mask)
        if TRANSITION:  # through the reverse transition's log-std; its derivative recomputed here, from
            # reloaded inputs, so that it is not held in a register across the K loop
            ls_u = tl.load(logstds_ptr + r * ss_r + offs_p * ss_p, mask=mask_p, other=0.0).to(tl.float32)
            _, _, _, dls = _transition_map(
                th_ptr, tlow_ptr, r, offs_p, sth_r, sth_p, stl_r, stl_p, mask_p, ls_u, BLOCK_P
            )
            acc_ls = acc_ls * dls
        if STD_PER_PIXEL:
            tl.store(glogstds_ptr + r * P + offs_p, acc_ls, mask=mask_p)
        else:
            tl.store(glogstds_ptr + pid, tl.sum(acc_ls, axis=0))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _blocks(K: int, P: int, transition: bool = False, backward: bool = False, tile: int = TILE) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_P)``: 128 pixels per program (128-bit loads; smaller blocks, which would
    give grids of few programs more of them, spill a register in some sm_80 / sm_90 builds at the
    compile report's users shapes), and as many components per tile as keep the
    ``BLOCK_K x BLOCK_P`` tile at ``tile`` elements (8 fp32 per thread at 4 warps). The
    transition map holds more per pixel: its backward takes half that tile, its forward a quarter
    (larger ones spill in the point-data builds)."""
    block_p = min(next_pow2(P), 128)
    if transition:
        tile = tile // 2 if backward else tile // 4
    block_k = max(1, min(next_pow2(K), tile // block_p))
    return block_k, block_p


def _views(means, logstds, logweights, t_high, t_low, x, transition: bool, *pixel_tensors) -> list:
    """Kernel views ``[means (R, K, C, P), logstds (R, P), logweights (R, K, P), t_high, t_low
    (R, P), x (R, C, P), *pixel_tensors (R, ..., P)]`` of ``(*B, ...)`` tensors, with
    ``R = prod(*B)``, ``P = H * W``: views when the strides allow (a stride 0 along P for a
    shared log-std or timestep). Without ``transition`` the timesteps and ``x`` are stand-ins
    the kernel does not read (views of ``logstds`` and ``means``, so that they are the passed
    tensors' data). For point data (``P == 1 < R``) rows and pixels are swapped, so the batch
    fills the pixel block."""
    *batch, K, C, H, W = means.shape
    R, P = math.prod(batch), H * W
    mf = means.reshape(R, K, C, P)
    sf = logstds.reshape(R, -1).expand(R, P)
    if transition:  # timesteps (*B,) or broadcastable to (*B, 1, 1, 1)
        th, tlow = [
            (t if t.shape == tuple(batch) else t.expand(*batch, 1, 1, 1)).reshape(R, 1).expand(R, P)
            for t in (t_high, t_low)
        ]
        xf = x.reshape(R, C, P)
    else:
        th = tlow = sf
        xf = mf[:, 0]
    views = [
        mf,
        sf,
        logweights.reshape(R, K, P),
        th,
        tlow,
        xf,
        *[t.reshape(R, *t.shape[len(batch) : -2], P) for t in pixel_tensors],
    ]
    if P == 1 and R > 1:
        views = [v.transpose(0, -1) for v in views]
    return views


def _loglik_args(means, logstds, logweights, y, t_high, t_low, x, out, transition: bool, blocks_fn, int64_fn) -> tuple:
    """The forward kernel's views (in the order of the arguments), grid, integer arguments and
    options. ``y`` is ``(*B, N, C, H, W)`` with ``out (*B, N, H, W)``, or one target per pixel
    ``(*B, C, H, W)`` with ``out (*B, H, W)``. ``blocks_fn, int64_fn`` are ``_blocks,
    needs_int64``, keys of the stored plan (tests replace them)."""
    K, C = means.shape[-4], means.shape[-3]
    per_sample = y.dim() == means.dim()
    N = y.shape[-4] if per_sample else 1
    mf, sf, wf, thf, tlf, xf, yf, of = _views(means, logstds, logweights, t_high, t_low, x, transition, y, out)
    if not per_sample:  # the N axis of the kernel's layout, of size 1
        yf, of = yf.unsqueeze(1), of.unsqueeze(1)
    R, P = mf.shape[0], mf.shape[-1]
    block_k, block_p = blocks_fn(K, P, transition)
    n_pb = cdiv(P, block_p)
    ints = (
        N,
        K,
        C,
        P,
        n_pb,
        *mf.stride(),
        *sf.stride(),
        *wf.stride(),
        *yf.stride(),
        *of.stride(),
        *thf.stride(),
        *tlf.stride(),
        *xf.stride(),
    )
    options = dict(
        TRANSITION=transition, BLOCK_K=block_k, BLOCK_P=block_p, I64=int64_fn(mf, wf, yf, of, xf), num_warps=NUM_WARPS
    )
    return (mf, sf, wf, yf, thf, tlf, xf, of), (n_pb * R * N,), ints, options


_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()


def _launch_loglik(
    means, logstds, logweights, y, x, t_high, t_low, istd_max: float, sign: float, shift: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """``sign * logsumexp_k l_k + shift`` for ``y (*B, N, C, H, W)`` -> ``(*B, N, H, W)``, or
    for one target per pixel ``y (*B, C, H, W)`` -> ``(*B, H, W)``; with ``x (*B, C, H, W)``
    and the timesteps (``(*B,)`` or broadcastable to ``(*B, 1, 1, 1)``) given, the GM is the
    reverse transition of the u-GM ``(means, logstds, logweights)`` from ``(x, t_high)`` to
    ``t_low`` (all three None: the GM itself). The plan is stored per shape (``planned_args``;
    its key leaves out ``out``, allocated here contiguous, and the stand-ins of ``_views``)."""
    *batch, _, _, H, W = means.shape
    out_shape = (*batch, y.shape[-4], H, W) if y.dim() == means.dim() else (*batch, H, W)
    out = torch.empty(out_shape, device=means.device, dtype=out_dtype)
    transition = x is not None
    if not transition:
        t_high = t_low = logstds
        x = means
    tensors = (means, logstds, logweights, y, t_high, t_low, x, out)
    (m, s, w, yv, th, tlow, xv, o), grid, ints, options = planned_args(
        _FWD_PLANS, _loglik_args, tensors, transition, _blocks, needs_int64, n_key=7 if transition else 4
    )
    if grid[0] > 0:
        _gm_loglik_fwd_kernel[grid](m, s, w, yv, o, th, tlow, xv, *ints, istd_max, sign, shift, **options)
    return out


def _nll_bwd_args(
    means,
    logstds,
    logweights,
    target,
    loss,
    grad_loss,
    t_high,
    t_low,
    x,
    g_means,
    g_logweights,
    transition: bool,
    blocks_fn,
    int64_fn,
) -> tuple:
    """The backward kernel's views (in the order of the arguments; ``g_logweights`` as its
    ``(R, K, P)`` view), grid, integer arguments and options (``blocks_fn, int64_fn`` as in
    :func:`_loglik_args`)."""
    K, C = means.shape[-4], means.shape[-3]
    mf, sf, wf, thf, tlf, xf, yf, lf, gf, gmf, gwf = _views(
        means,
        logstds,
        logweights,
        t_high,
        t_low,
        x,
        transition,
        target,
        loss,
        grad_loss,
        g_means,
        g_logweights.select(-3, 0),
    )
    R, P = mf.shape[0], mf.shape[-1]
    block_k, block_p = blocks_fn(K, P, transition, True)
    n_pb = cdiv(P, block_p)
    ints = (
        K,
        C,
        P,
        n_pb,
        *mf.stride(),
        *sf.stride(),
        *wf.stride(),
        *yf.stride(),
        *lf.stride(),
        *gf.stride(),
        *gmf.stride(),
        *gwf.stride(),
        *thf.stride(),
        *tlf.stride(),
        *xf.stride(),
    )
    options = dict(
        TRANSITION=transition,
        STD_PER_PIXEL=sf.stride(-1) != 0,
        BLOCK_K=block_k,
        BLOCK_P=block_p,
        I64=int64_fn(mf, wf, yf, gmf, xf),
        num_warps=NUM_WARPS,
    )
    return (mf, sf, wf, yf, lf, gf, thf, tlf, xf, gmf, gwf), (n_pb * R,), ints, options


def _launch_nll_bwd(grad_loss, loss, means, logstds, logweights, target, x, t_high, t_low, eps: float) -> tuple:
    """Gradients of the per-pixel NLL for means, logstds, logweights, in their dtypes (with
    ``x`` and the timesteps, as in :func:`_launch_loglik`, those of the u-GM). The plan's key
    leaves out the gradients (allocated here contiguous, shapes and dtypes those of means and
    logweights) and the stand-ins."""
    g_means = torch.empty_like(means, memory_format=torch.contiguous_format)
    g_logweights = torch.empty_like(logweights, memory_format=torch.contiguous_format)
    transition = x is not None
    if not transition:
        t_high = t_low = logstds
        x = means
    tensors = (means, logstds, logweights, target, loss, grad_loss, t_high, t_low, x, g_means, g_logweights)
    tensors, grid, ints, options = planned_args(
        _BWD_PLANS, _nll_bwd_args, tensors, transition, _blocks, needs_int64, n_key=9 if transition else 6
    )
    n_pb = ints[3]
    # a log-std shared by the pixels of a row gets one float32 partial sum per program when the
    # row spans several programs (after the point-data swap a per-row log-std is per pixel);
    # otherwise one value per log-std
    partials = not options["STD_PER_PIXEL"] and n_pb > 1
    if partials:
        g_std = torch.empty((grid[0] // n_pb, n_pb), device=means.device, dtype=torch.float32)
    else:
        g_std = torch.empty_like(logstds, dtype=torch.float32, memory_format=torch.contiguous_format)
    if grid[0] > 0:
        _gm_nll_bwd_kernel[grid](*tensors, g_std, *ints, 1.0 / eps, **options)
    if partials:
        g_std = g_std.sum(dim=1).view(logstds.shape)
    return g_means, g_std if g_std.dtype == logstds.dtype else g_std.to(logstds.dtype), g_logweights


# --------------------------------------------------------------------------------------------
# torch.library ops: the Triton path (the public functions pick the backend)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("gmkernels::gm_nll_loss_pixels", mutates_args=())
def _nll_pixels(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    target: torch.Tensor,
    x_t_high: Optional[torch.Tensor],
    t_high: Optional[torch.Tensor],
    t_low: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """Per-pixel NLL ``(*B, H, W)`` in float32 of ``target`` under the GM, or, with
    ``x_t_high (*B, C, H, W)`` and the timesteps (``(*B,)`` or broadcastable to
    ``(*B, 1, 1, 1)``) given, under the reverse transition of the u-GM from
    ``(x_t_high, t_high)`` to ``t_low`` (the transition loss; all None: the plain NLL)."""
    return _launch_loglik(
        means, logstds, logweights, target, x_t_high, t_high, t_low, 1.0 / eps, -1.0, 0.0, torch.float32
    )


@_nll_pixels.register_fake
def _(means, logstds, logweights, target, x_t_high, t_high, t_low, eps):
    return means.new_empty((*means.shape[:-4], *means.shape[-2:]), dtype=torch.float32)


@torch.library.custom_op("gmkernels::gm_nll_loss_pixels_backward", mutates_args=())
def _nll_pixels_backward(
    grad_loss: torch.Tensor,
    loss: torch.Tensor,
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    target: torch.Tensor,
    x_t_high: Optional[torch.Tensor],
    t_high: Optional[torch.Tensor],
    t_low: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_nll_pixels` for means, logstds, logweights (their dtypes)."""
    return _launch_nll_bwd(grad_loss, loss, means, logstds, logweights, target, x_t_high, t_high, t_low, eps)


@_nll_pixels_backward.register_fake
def _(grad_loss, loss, means, logstds, logweights, target, x_t_high, t_high, t_low, eps):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (means, logstds, logweights))


def _nll_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    means, logstds, logweights, target, x_t_high, t_high, t_low, eps = inputs
    ctx.save_for_backward(output, means, logstds, logweights, target, x_t_high, t_high, t_low)
    ctx.eps = eps


def _nll_backward(ctx: Any, grad_loss: torch.Tensor):
    loss, means, logstds, logweights, target, x_t_high, t_high, t_low = ctx.saved_tensors
    if x_t_high is not None and any(ctx.needs_input_grad[3:7]):
        raise NotImplementedError(
            "gmkernels::gm_nll_loss_pixels with the transition map differentiates the u-GM only; "
            "transition_loss takes the torch path when x_t_high or x_t_low require grad"
        )
    g_means, g_logstds, g_logweights = _nll_pixels_backward(
        grad_loss, loss, means, logstds, logweights, target, x_t_high, t_high, t_low, ctx.eps
    )
    # dL/dy = -sum_k dL/dmu_k: only when the target itself is being trained
    g_target = -g_means.sum(dim=-4, dtype=torch.float32).to(target.dtype) if ctx.needs_input_grad[3] else None
    return g_means, g_logstds, g_logweights, g_target, None, None, None, None


_nll_pixels.register_autograd(_nll_backward, setup_context=_nll_setup_context)


@torch.library.custom_op("gmkernels::gm_logprob", mutates_args=())
def _logprob(
    means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor, samples: torch.Tensor
) -> torch.Tensor:
    """``(*B, N, H, W)`` log-density in the dtype of ``means``."""
    shift = -0.5 * means.shape[-3] * LOG_2PI
    return _launch_loglik(means, logstds, logweights, samples, None, None, None, float("inf"), 1.0, shift, means.dtype)


@_logprob.register_fake
def _(means, logstds, logweights, samples):
    return means.new_empty((*samples.shape[:-3], *samples.shape[-2:]))


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _check_eps_reduction(eps: Any, reduction: Any) -> float:
    """``eps`` as a float (a finite Python number > 0), then ``reduction`` checked."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    eps = float(eps)
    if not 0.0 < eps < float("inf"):
        raise ValueError(f"eps must be a finite float > 0, got {eps}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return eps


#: ``(n, dtype) -> 0-d CPU tensor n`` for ``_reduce``'s mean (bounded: cleared when full)
_COUNTS: dict = {}


def _reduce(loss: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """Mean as ``sum / n``: the backward of ``sum`` is a stride-0 expand of the scalar gradient,
    so no per-pixel gradient tensor is allocated (``mean``'s backward would divide into one).
    Outside a trace it divides in place by ``n`` as a stored 0-d CPU tensor of the loss's dtype,
    which costs half of dividing by a Python number (wrapped into a tensor per call) and rounds
    the same. Cast to ``dtype`` (no op when it is the loss's)."""
    if reduction == "mean":
        n = max(loss.numel(), 1)
        if torch.compiler.is_compiling():
            loss = loss.sum() / n
        else:  # in place on the fresh sum (its backward does not need it)
            count = _COUNTS.get((n, loss.dtype))
            if count is None:
                if len(_COUNTS) >= 256:
                    _COUNTS.clear()
                count = _COUNTS[(n, loss.dtype)] = torch.tensor(n, dtype=loss.dtype)
            loss = loss.sum().div_(count)
    elif reduction == "sum":
        loss = loss.sum()
    return loss if loss.dtype == dtype else loss.to(dtype)


def gm_logprob(gm: dict, samples: torch.Tensor) -> torch.Tensor:
    """Log-density of ``N`` samples per pixel under the per-pixel GM.

    ``log p(y) = logsumexp_k(logweights_k + sum_c(-0.5 * ((y_c - mu_kc) / s)^2) - C * logstds
    - 0.5 * C * log(2 pi))`` (no clamp on the std).

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1), logweights (*B, K, 1, H, W)}``.
        samples: ``(*B, N, C, H, W)``.
    Returns:
        ``(*B, N, H, W)`` in the dtype of ``means``. The Triton kernel is forward only: inputs
        that require grad take the differentiable torch path (train with :func:`gm_nll_loss`).
    """
    s = check_gm(gm)
    check_state(samples, "samples", s, n_samples=True)
    means, logstds, logweights = gm["means"], gm["logstds"], gm["logweights"]
    if not kernels_wanted(means, logstds, logweights, samples):
        return run_reference(ref.gm_logprob, gm, samples, out_dtype=s.dtype)
    return _logprob(means, logstds, logweights, samples)


def gm_nll_loss(gm: dict, target: torch.Tensor, eps: float = 1e-4, reduction: str = "mean") -> torch.Tensor:
    """GM negative log-likelihood of ``target (*B, C, H, W)``, differentiable in the GM.

    Per pixel ``-logsumexp_k(logweights_k + sum_c(-0.5 * ((y_c - mu_kc) * istd)^2 - logstds))``
    with ``istd = min(exp(-logstds), 1 / eps)`` (no ``2 pi`` constant; with K = 1 this is
    ``0.5 * ||y - mu||^2 * istd^2 + C * logstds``, the L2 loss up to constants). Infinite
    log-stds and pixels without a live component: docs/numerics.md#likelihood.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1) | (*B, 1, 1, H, W),
            logweights (*B, K, 1, H, W)}``.
        target: ``(*B, C, H, W)``.
        eps: floor of the std in the clamp, > 0.
        reduction: ``"mean"`` / ``"sum"`` over the ``(*B, H, W)`` pixels, or ``"none"``.
    Returns:
        A scalar, or ``(*B, H, W)`` for ``"none"``, in the dtype of ``means`` (reduced in
        float32). On the Triton backend a fused forward saves only the per-pixel loss and a
        fused backward writes the gradients of means, logstds and logweights (and of
        ``target`` when it requires grad); nothing of size ``K * C * H * W`` is allocated
        besides those gradients.
    """
    s = check_gm(gm)
    check_state(target, "target", s)
    eps = _check_eps_reduction(eps, reduction)
    means, logstds, logweights = gm["means"], gm["logstds"], gm["logweights"]
    # the torch path where select_backend says so or an input is float64 (the kernels compute in
    # float32); a gradient does not change the path (the NLL kernels train)
    dtypes = (means.dtype, logstds.dtype, logweights.dtype, target.dtype)
    if select_backend(means) == "torch" or torch.float64 in dtypes:
        return run_reference(ref.gm_nll_loss, gm, target, eps, reduction, out_dtype=s.dtype)
    return _reduce(_nll_pixels(means, logstds, logweights, target, None, None, None, eps), reduction, s.dtype)


def transition_loss(
    gm_u: dict,
    x_t_high: torch.Tensor,
    t_high: Sigma,
    x_t_low: torch.Tensor,
    t_low: Sigma,
    eps: float = 1e-4,
    reduction: str = "mean",
) -> torch.Tensor:
    """GMFlow transition loss: the NLL of ``x_t_low`` under the exact reverse transition of the
    predicted GM from ``t_high`` to ``t_low``.

    With ``sigma = t / 1000`` (``T = 1000``):
    ``gm_x0 = u_to_x0(gm_u, x_t_high, sigma_high)``,
    ``gm_low = reverse_transition(gm_x0, x_t_high, sigma_high, sigma_low)`` (docs/ops.md#changes-of-variable-and-the-reverse-transition),
    ``loss = gm_nll_loss(gm_low, x_t_low, eps, reduction)`` (docs/ops.md#gm_nll_loss: per pixel, no ``2 pi``,
    ``"mean"``/``"sum"`` over ``(*B, H, W)``). ``t_low = 0`` gives the NLL of ``x0`` itself.
    Infinite log-stds and pixels without a live component: docs/numerics.md#likelihood.

    Args:
        gm_u: u-GM predicted at ``(x_t_high, t_high)``: ``{means (*B, K, C, H, W), logstds,
            logweights}``.
        x_t_high: ``(*B, C, H, W)``, the network input.
        t_high: timestep(s) of ``x_t_high`` in (0, 1000]: a float, a tensor ``(*B,)`` or one
            broadcastable to ``(*B, 1, 1, 1)``.
        x_t_low: ``(*B, C, H, W)``, the target, on the same noise path at ``t_low``.
        t_low: timestep(s) of ``x_t_low``, ``0 <= t_low <= t_high``.
        eps, reduction: as in :func:`gm_nll_loss`.
    Returns:
        A scalar, or ``(*B, H, W)`` for ``"none"``, in the dtype of ``gm_u["means"]``.
        Differentiable in ``gm_u`` on both backends; timesteps get no gradient on the Triton
        backend. On the Triton backend the two changes of variable are folded into the fused
        NLL kernels: each program computes the reverse transition's constants of its samples
        in float64 from the timesteps, and the GM means become
        ``(c1 + c2) * x_t_high - c2 * sigma_high * means_u`` on the fly (the residual
        ``x_t_low - x_t_high`` formed first) and its log-std
        ``0.5 * log(c2^2 sigma_high^2 exp(2 logstds_u) + c3)``; so, as for
        :func:`gm_nll_loss`, only the per-pixel loss is saved and nothing of size ``K*C*H*W``
        is allocated besides the gradients; states that require grad take the torch path.
        Timestep tensors on CUDA are range- and order-checked by a device-side assert (no
        host synchronisation), on CPU with a ``ValueError``.
    """
    s = check_gm(gm_u, "gm_u")
    check_state(x_t_high, "x_t_high", s)
    check_state(x_t_low, "x_t_low", s)
    # timesteps in [0, 1000], a per-sample (*B,) tensor allowed; values read once on CPU, one
    # device-side assert on CUDA
    t_high, t_low = check_sigma_pair(t_high, "t_high", t_low, "t_low", s, top=1000.0, per_sample=True)
    eps = _check_eps_reduction(eps, reduction)
    means, logstds, logweights = gm_u["means"], gm_u["logstds"], gm_u["logweights"]
    # the torch path as in gm_nll_loss, and where a state needs a gradient (the kernels give none)
    dtypes = (means.dtype, logstds.dtype, logweights.dtype, x_t_high.dtype, x_t_low.dtype)
    if (
        select_backend(means) == "torch"
        or torch.float64 in dtypes
        or (torch.is_grad_enabled() and (x_t_high.requires_grad or x_t_low.requires_grad))
    ):
        return run_reference(
            ref.transition_loss,
            gm_u,
            x_t_high,
            per_sample_view(t_high, s),
            x_t_low,
            per_sample_view(t_low, s),
            eps,
            reduction,
            out_dtype=s.dtype,
        )
    # one fused NLL of the reverse-transition GM, whose per-sample constants the kernels compute
    # from the timesteps (no small torch ops, no autograd node besides the NLL's); a timestep
    # gets no gradient there, a Python float becomes a 0-d float64 tensor
    f64 = {"dtype": torch.float64, "device": s.device}
    t_high = t_high.detach() if isinstance(t_high, torch.Tensor) else torch.full((), t_high, **f64)
    t_low = t_low.detach() if isinstance(t_low, torch.Tensor) else torch.full((), t_low, **f64)
    return _reduce(_nll_pixels(means, logstds, logweights, x_t_low, x_t_high, t_high, t_low, eps), reduction, s.dtype)
