"""Affine GM changes of variable (docs/ops.md#changes-of-variable-and-the-reverse-transition): ``u_to_x0``, ``x0_to_u``, ``reverse_transition``.

All three are ``means' = alpha * x_t + beta * means`` with per-batch-element ``alpha, beta``
(functions of the sigmas) and a per-batch-element shift of ``logstds``; log-weights pass
through unchanged. One Triton kernel does all three: it reads ``means`` once (``x_t`` is
re-read K times from cache), writes ``means'`` once, and the programs holding component 0,
channel 0 also write ``logstds'``. Nothing else is read or written.

Kernel layout: the means are viewed as ``(B, K, C, H*W)`` (a view when strides allow) and as
rows ``r = (b, k, c)`` of ``H*W`` pixels; a program owns a ``BLOCK_R x BLOCK_P`` tile with the
pixels fastest, so loads coalesce and vectorise when the pixel stride is 1.
Block sizes come from a fixed heuristic (about 2048 elements per program, 4 warps), not from
autotuning, so launches are deterministic and safe inside CUDA-graph capture.
"""

from __future__ import annotations

from typing import Optional

import torch

import reference.transition as ref

from .._dispatch import run_reference
from .._validate import Sigma, check_gm, check_sigma, check_sigma_pair, check_state
from ._launch import PlanCache, cdiv, kernels_wanted, needs_int64, next_pow2, planned_args

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

U_TO_X0, X0_TO_U, REVERSE = 0, 1, 2
_TILE = 2048  # elements per program


# ----------------------------------------------------------------------------- kernel

if triton is not None:

    @triton.jit
    def _transition_kernel(
        means_ptr,
        x_ptr,
        ls_ptr,
        sig_ptr,
        sigto_ptr,
        out_means_ptr,
        out_ls_ptr,
        R,
        K,
        C,
        HW,
        LS_HW,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        s_xb,
        s_xc,
        s_xp,
        s_lsb,
        s_lsp,
        s_sig,
        s_sigto,
        sig_f,
        sigto_f,
        eps,
        MODE: tl.constexpr,
        SIG_T: tl.constexpr,
        SIGTO_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """``out[b,k,c,p] = alpha_b * x[b,c,p] + beta_b * means[b,k,c,p]`` over rows ``r = (b, k, c)``
        of ``R = B*K*C`` rows and ``HW`` pixels; ``logstds'`` from the lanes with ``k = c = 0``."""
        pid = tl.program_id(0)
        n_pb = tl.cdiv(HW, BLOCK_P)
        pid_r = pid // n_pb
        pid_p = pid % n_pb
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        if INT64:
            r = r.to(tl.int64)
            p = p.to(tl.int64)
        rmask = r < R
        pmask = p < HW
        mask = rmask[:, None] & pmask[None, :]
        c = r % C
        k = (r // C) % K
        b = r // (C * K)

        if SIG_T:
            sig = tl.load(sig_ptr + b * s_sig, mask=rmask, other=0.0).to(tl.float32)
        else:
            sig = tl.full([BLOCK_R], sig_f, tl.float32)
        if MODE == 0:  # u_to_x0: x_t - sigma * mu
            alpha = tl.full([BLOCK_R], 1.0, tl.float32)
            beta = -sig
            ls_shift = tl.log(tl.maximum(sig, eps))
        elif MODE == 1:  # x0_to_u: (x_t - mu) / max(sigma, eps)
            alpha = 1.0 / tl.maximum(sig, eps)
            beta = -alpha
            ls_shift = -tl.log(tl.maximum(sig, eps))
        else:  # reverse transition to sigma_to
            if SIGTO_T:
                sig_to = tl.load(sigto_ptr + b * s_sigto, mask=rmask, other=0.0).to(tl.float32)
            else:
                sig_to = tl.full([BLOCK_R], sigto_f, tl.float32)
            a = 1.0 - sig
            a_to = 1.0 - sig_to
            s_c = tl.maximum(sig, eps)
            a_to_c = tl.maximum(a_to, eps)
            qp = (sig_to * a) / (s_c * a_to_c)
            # 1 - q*p without cancellation: (S*A_to - sigma_to*a) / (S*A_to) with S = sigma + dS,
            # A_to = a_to + dA expands to ((sigma - sigma_to) + sigma*dA + dS*A_to) / (S*A_to).
            one_m_qp = ((sig - sig_to) + sig * (a_to_c - a_to) + (s_c - sig) * a_to_c) / (s_c * a_to_c)
            beta_t = one_m_qp * (1.0 + qp)
            alpha = qp * sig_to / s_c  # c1 = q^2 p
            beta = beta_t * a_to  # c2
            c3 = beta_t * sig_to * sig_to
            log_c2 = tl.log(tl.abs(beta))
            log_c3 = tl.log(tl.maximum(c3, eps * eps))

        m_off = b * s_mb + k * s_mk + c * s_mc
        x_off = b * s_xb + c * s_xc
        mu = tl.load(means_ptr + m_off[:, None] + p[None, :] * s_mp, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + x_off[:, None] + p[None, :] * s_xp, mask=mask, other=0.0).to(tl.float32)
        out = alpha[:, None] * x + beta[:, None] * mu
        tl.store(out_means_ptr + r[:, None] * HW + p[None, :], out.to(out_means_ptr.dtype.element_ty), mask=mask)

        # logstds' (per sample or per pixel) from the rows of component 0, channel 0.
        lmask = (rmask & (k == 0) & (c == 0))[:, None] & (p < LS_HW)[None, :]
        ls = tl.load(ls_ptr + (b * s_lsb)[:, None] + p[None, :] * s_lsp, mask=lmask, other=0.0).to(tl.float32)
        if MODE == 2:
            # 0.5 * logaddexp(2 log|c2| + 2 ls, log c3); the second term is finite (>= 2 log eps).
            u = 2.0 * log_c2[:, None] + 2.0 * ls
            v = log_c3[:, None] + tl.zeros_like(ls)
            hi = tl.maximum(u, v)
            ls_out = 0.5 * (hi + tl.log(1.0 + tl.exp(tl.minimum(u, v) - hi)))
        else:
            ls_out = ls + ls_shift[:, None]
        tl.store(out_ls_ptr + (b * LS_HW)[:, None] + p[None, :], ls_out.to(out_ls_ptr.dtype.element_ty), mask=lmask)


def _transition_args(means, x_t, logstds, sigma_t, sigma_to_t, out_m, out_ls, mode: int, sig_t: bool, sigto_t: bool):
    """The kernel's views (in the order of the arguments), grid, integer arguments and options.
    ``means (*B, K, C, H, W) -> (B, K, C, H*W)``, ``x_t -> (B, C, H*W)`` and ``logstds -> (B,
    LS_HW)`` (``LS_HW`` 1 per sample or ``H*W`` per pixel) are views whenever the strides allow;
    a sigma tensor is indexed ``sigma[b * stride]`` over the flattened batch (stride 0 for a
    broadcast scalar), and a Python-float sigma's pointer is ``means``, unread (stride 0)."""
    *batch, K, C, H, W = means.shape
    HW = H * W
    m = means.reshape(-1, K, C, HW)
    B = m.shape[0]
    x = x_t.reshape(B, C, HW)
    ls_hw = logstds.shape[-1] * logstds.shape[-2]
    ls = logstds.reshape(-1, ls_hw)
    sig = sigma_t.expand(*batch, 1, 1, 1).reshape(-1) if sig_t else means
    sig_to = sigma_to_t.expand(*batch, 1, 1, 1).reshape(-1) if sigto_t else means
    om, ols = out_m.view(B, K, C, HW), out_ls.view(B, ls_hw)
    R = B * K * C
    block_p = min(next_pow2(HW), 1024)
    # point data (one pixel): every row element carries its own sigma and log-std math; half the
    # tile (the full one needs more registers than a thread has on triton 3.6)
    block_r = min(next_pow2(R), max(1, (_TILE if block_p > 1 else _TILE // 2) // block_p))
    ints = (
        R,
        K,
        C,
        HW,
        ls_hw,
        *m.stride(),
        *x.stride(),
        ls.stride(0),
        ls.stride(1) if ls_hw > 1 else 0,
        sig.stride(0) if sig_t else 0,
        sig_to.stride(0) if sigto_t else 0,
    )
    options = dict(
        MODE=mode,
        SIG_T=sig_t,
        SIGTO_T=sigto_t,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        INT64=needs_int64(m, x, om),
        num_warps=4,
    )
    return (m, x, ls, sig, sig_to, om, ols), (cdiv(R, block_r) * cdiv(HW, block_p),), ints, options


_PLANS = PlanCache()


def _launch(mode: int, means, logstds, x_t, sigma_t, sigma_f, sigma_to_t, sigma_to_f, eps):
    """Run ``_transition_kernel``: new ``(means, logstds)`` in the dtype of ``means``, ``logstds``
    of the input's shape. The launch plan is stored per shape (``planned_args``)."""
    out_m = torch.empty(*means.shape, device=means.device, dtype=means.dtype)
    out_ls = torch.empty(*logstds.shape, device=means.device, dtype=means.dtype)
    if out_m.numel() == 0:
        return out_m, out_ls
    sig_t, sigto_t = sigma_t is not None, sigma_to_t is not None
    tensors = (means, x_t, logstds, sigma_t if sig_t else means, sigma_to_t if sigto_t else means, out_m, out_ls)
    tensors, grid, ints, options = planned_args(_PLANS, _transition_args, tensors, mode, sig_t, sigto_t, n_key=5)
    _transition_kernel[grid](*tensors, *ints, sigma_f, sigma_to_f, eps, **options)
    return out_m, out_ls


# ----------------------------------------------------------------------------- torch.library ops

if triton is not None:

    @torch.library.custom_op("gmkernels::u_to_x0", mutates_args=())
    def _u_to_x0_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        x_t: torch.Tensor,
        sigma_t: Optional[torch.Tensor],
        sigma_f: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(U_TO_X0, means, logstds, x_t, sigma_t, sigma_f, None, 0.0, eps)

    @torch.library.custom_op("gmkernels::x0_to_u", mutates_args=())
    def _x0_to_u_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        x_t: torch.Tensor,
        sigma_t: Optional[torch.Tensor],
        sigma_f: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(X0_TO_U, means, logstds, x_t, sigma_t, sigma_f, None, 0.0, eps)

    @torch.library.custom_op("gmkernels::reverse_transition", mutates_args=())
    def _reverse_transition_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        x_t: torch.Tensor,
        sigma_t: Optional[torch.Tensor],
        sigma_f: float,
        sigma_to_t: Optional[torch.Tensor],
        sigma_to_f: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(REVERSE, means, logstds, x_t, sigma_t, sigma_f, sigma_to_t, sigma_to_f, eps)

    def _fake(means, logstds, *args):
        return means.new_empty(means.shape), logstds.new_empty(logstds.shape, dtype=means.dtype)

    _u_to_x0_op.register_fake(_fake)
    _x0_to_u_op.register_fake(_fake)
    _reverse_transition_op.register_fake(_fake)


# ----------------------------------------------------------------------------- public ops


def u_to_x0(gm_u: dict, x_t: torch.Tensor, sigma: Sigma, eps: float = 1e-6) -> dict:
    """Velocity GM -> x0-GM at state ``x_t`` and noise level ``sigma``.

    The Triton kernel runs for CUDA inputs (inference: float64 inputs or inputs that need a
    gradient take the differentiable torch path); it computes in float32, Python-float sigmas
    included.

    ``means = x_t - sigma * means_u``, ``logstds = logstds_u + log(max(sigma, eps))``, same
    log-weights (returned as given, cast to the dtype of ``means``).

    Args:
        gm_u: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1) | (*B, 1, 1, H, W), logweights (*B, K, 1, H, W)}``.
        x_t: ``(*B, C, H, W)``.
        sigma: float in [0, 1] or tensor broadcastable to ``(*B, 1, 1, 1)``.
    Returns:
        The x0-GM, ``means (*B, K, C, H, W)`` and ``logstds`` of the input's shape.
    """
    s = check_gm(gm_u, "gm_u")
    check_state(x_t, "x_t", s)
    sigma = check_sigma(sigma, "sigma", s)
    means, logstds = gm_u["means"], gm_u["logstds"]
    sigma_t = sigma if isinstance(sigma, torch.Tensor) else None  # the op takes a tensor or a float
    if not kernels_wanted(means, logstds, x_t, means if sigma_t is None else sigma_t):
        return run_reference(ref.u_to_x0, gm_u, x_t, sigma, eps, out_dtype=s.dtype)
    means, logstds = _u_to_x0_op(means, logstds, x_t, sigma_t, 0.0 if sigma_t is not None else sigma, float(eps))
    return {"means": means, "logstds": logstds, "logweights": gm_u["logweights"].to(s.dtype)}


def x0_to_u(gm_x0: dict, x_t: torch.Tensor, sigma: Sigma, eps: float = 1e-6) -> dict:
    """x0-GM -> velocity GM, the inverse of :func:`u_to_x0`:
    ``means_u = (x_t - means_x0) / max(sigma, eps)``, ``logstds_u = logstds_x0 - log(max(sigma, eps))``.
    Shapes as in :func:`u_to_x0`."""
    s = check_gm(gm_x0, "gm_x0")
    check_state(x_t, "x_t", s)
    sigma = check_sigma(sigma, "sigma", s)
    means, logstds = gm_x0["means"], gm_x0["logstds"]
    sigma_t = sigma if isinstance(sigma, torch.Tensor) else None
    if not kernels_wanted(means, logstds, x_t, means if sigma_t is None else sigma_t):
        return run_reference(ref.x0_to_u, gm_x0, x_t, sigma, eps, out_dtype=s.dtype)
    means, logstds = _x0_to_u_op(means, logstds, x_t, sigma_t, 0.0 if sigma_t is not None else sigma, float(eps))
    return {"means": means, "logstds": logstds, "logweights": gm_x0["logweights"].to(s.dtype)}


def reverse_transition(gm_x0: dict, x_t: torch.Tensor, sigma: Sigma, sigma_to: Sigma, eps: float = 1e-6) -> dict:
    """GM of ``x_{sigma_to}`` given ``x_t`` at ``sigma`` (``sigma_to <= sigma``), from the x0-GM.

    With ``c1, c2, c3`` of ``reference.transition.transition_coefficients``: means
    ``c1 * x_t + c2 * mu_k``, ``logstds = 0.5 * logaddexp(2 log|c2| + 2 logstds, log max(c3, eps^2))``,
    same log-weights. The kernel evaluates ``beta = 1 - (q p)^2`` as ``(1 - q p)(1 + q p)`` with
    ``1 - q p`` formed from ``sigma - sigma_to`` (no cancellation when the sigmas are close).

    Args:
        gm_x0: x0-GM, shapes as in :func:`u_to_x0`.
        x_t: ``(*B, C, H, W)``.
        sigma, sigma_to: floats in [0, 1] or tensors broadcastable to ``(*B, 1, 1, 1)``.
    """
    s = check_gm(gm_x0, "gm_x0")
    check_state(x_t, "x_t", s)
    sigma, sigma_to = check_sigma_pair(sigma, "sigma", sigma_to, "sigma_to", s)
    means, logstds = gm_x0["means"], gm_x0["logstds"]
    sigma_t = sigma if isinstance(sigma, torch.Tensor) else None
    sigma_to_t = sigma_to if isinstance(sigma_to, torch.Tensor) else None
    if not kernels_wanted(
        means, logstds, x_t, means if sigma_t is None else sigma_t, means if sigma_to_t is None else sigma_to_t
    ):
        return run_reference(ref.reverse_transition, gm_x0, x_t, sigma, sigma_to, eps, out_dtype=s.dtype)
    means, logstds = _reverse_transition_op(
        means,
        logstds,
        x_t,
        sigma_t,
        0.0 if sigma_t is not None else sigma,
        sigma_to_t,
        0.0 if sigma_to_t is not None else sigma_to,
        float(eps),
    )
    return {"means": means, "logstds": logstds, "logweights": gm_x0["logweights"].to(s.dtype)}
