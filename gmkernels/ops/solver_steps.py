"""Fused sampler steps (SPEC §4): ``gm_ode_substeps`` and ``gm_sde_step``.

``gm_ode_substeps`` runs all N GM-ODE substeps of one main step; the Triton kernel reads each
pixel's K means and log-weights once and keeps them in registers for the N posterior-mean +
Euler updates (legal because every substep of a pixel depends only on that pixel's GM and
state), writing only the final state. ``gm_sde_step`` draws the component, the Gaussian noise
and applies the exact reverse transition in one kernel, with Triton's Philox seeded from the
caller's ``torch.Generator``.

Both return the new state in the dtype of ``x`` (the state keeps its own precision; the GM may
be bf16), with fp32 arithmetic.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

import reference.solver_steps as ref
from reference.transition import transition_coefficients

from .._aot import AotCase
from .._dispatch import run_reference, select_backend
from .._validate import GMShape, check_float_tensor, check_generator, check_gm, check_power, check_sigma, check_state
from ._launch import I32_MAX, call_op, cdiv, launch_plan, needs_int64

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

Sigmas = Union[Sequence[float], torch.Tensor]

# ----------------------------------------------------------------------------- kernels

_TILE = 2048  # elements of the (K, C, pixels) tile a program keeps in registers


def _np2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@launch_plan
def _ode_blocks(K: int, C: int, HW: int) -> tuple[int, int, int, bool]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, ONE_TILE)``: all K components in registers when the
    ``(K, C, 16 pixels)`` tile fits ``_TILE``, else K tiles streamed per substep."""
    bc = _np2(C)
    bk = _np2(K)
    if bk * bc * 16 <= _TILE:
        bp = min(_np2(HW), max(16, _TILE // (bk * bc)), 128)
        return bk, bc, bp, True
    bp = min(_np2(HW), 32)
    return max(1, min(bk, _TILE // (bc * bp))), bc, bp, False


@launch_plan
def _sde_blocks(K: int, C: int, HW: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P)`` of the SDE kernel: it streams K (log-weights only) and C.
    K tiles stay at 512 elements: larger ones made ptxas use local memory for the bf16 sm_80
    build of the CDF walk (``tl.cumsum``) at the benchmark shape."""
    bp = min(_np2(HW), 128)
    return min(_np2(K), max(1, 512 // bp)), min(_np2(C), max(1, _TILE // bp)), bp


if triton is not None:

    @triton.jit
    def _gm_ode_substeps_kernel(
        means_ptr, lw_ptr, ls_ptr, x_ptr, sig_ptr, out_ptr,
        K, C, HW, N,
        s_mb, s_mk, s_mc, s_mp,
        s_lb, s_lk, s_lp,
        s_lsb, s_lsp,
        s_xb, s_xc, s_xp,
        s_sig, eps,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        ONE_TILE: tl.constexpr, INT64: tl.constexpr,
    ):
        """N GM-ODE substeps for the ``BLOCK_P`` pixels ``p`` of batch element ``b``, all channels.

        Per substep ``j``: ``x0 = r_v * sum_k w'_k mu_k + r_s * g`` with the transfer Gaussian
        ``(g, v)`` of op 6, ``r_v = v / (v + s2)``, ``r_s = s2 / (v + s2)`` (as sigmoids of
        ``2 logstd - log v``, so huge or tiny stds give no inf/inf) and
        ``w' = softmax_k(l_k - 0.5 / max(v + s2, eps) * |mu_k - g|^2)``; substep 0 is the plain
        mixture mean. Then the Euler update. Only the final state is stored.
        """
        pid_p = tl.program_id(0)
        b = tl.program_id(1)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        kr = tl.arange(0, BLOCK_K)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
        pmask = p < HW
        cmask = c < C
        xmask = cmask[:, None] & pmask[None, :]
        x_off = b * s_xb + c[:, None] * s_xc + p[None, :] * s_xp
        x = tl.load(x_ptr + x_off, mask=xmask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_P)
        x_base = x
        ls = tl.load(ls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)  # (BLOCK_P,)
        m_base = means_ptr + b * s_mb + c[None, :, None] * s_mc + p[None, None, :] * s_mp
        l_base = lw_ptr + b * s_lb + p[None, :] * s_lp
        if ONE_TILE:  # the whole GM of these pixels, loaded once for all N substeps
            kmask = kr < K
            mu_all = tl.load(m_base + kr[:, None, None] * s_mk, mask=kmask[:, None, None] & xmask[None, :, :], other=0.0).to(tl.float32)
            l_all = tl.load(l_base + kr[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")).to(tl.float32)
            l_all = tl.where(pmask[None, :], l_all, 0.0)  # pixels past HW: finite, never stored
        s_b = tl.load(sig_ptr).to(tl.float32)
        a_b = 1.0 - s_b
        for j in range(N):
            s_j = tl.load(sig_ptr + j * s_sig).to(tl.float32)
            s_n = tl.load(sig_ptr + (j + 1) * s_sig).to(tl.float32)
            a_j = 1.0 - s_j
            d = tl.maximum((a_j * s_b) * (a_j * s_b) - (a_b * s_j) * (a_b * s_j), eps)
            g = (a_j * s_b * s_b * x - a_b * s_j * s_j * x_base) / d  # (BLOCK_C, BLOCK_P)
            v = (s_j * s_b) * (s_j * s_b) / d
            # log(s2 / v), clamped where the sigmoids are 0 or 1 to fp32 precision anyway
            # (v = 0 gives +inf; the clamp keeps exp finite)
            tt = tl.minimum(tl.maximum(2.0 * ls - tl.log(v), -80.0), 80.0)
            r_v = 1.0 / (1.0 + tl.exp(tt))
            r_s = 1.0 / (1.0 + tl.exp(-tt))
            kap = 0.5 / tl.maximum(v + tl.exp(tl.minimum(2.0 * ls, 80.0)), eps)
            first = j == 0  # substep 0: the plain mixture mean
            r_v = tl.where(first, 1.0, r_v)
            r_s = tl.where(first, 0.0, r_s)
            kap = tl.where(first, 0.0, kap)
            if ONE_TILE:
                diff = mu_all - g[None, :, :]
                logit = l_all - kap[None, :] * tl.sum(diff * diff, axis=1)  # (BLOCK_K, BLOCK_P)
                mx = tl.max(logit, axis=0)
                e = tl.exp(logit - mx[None, :])
                acc = tl.sum(e[:, None, :] * mu_all, axis=0) / tl.sum(e, axis=0)[None, :]
            else:  # online softmax over K tiles, re-read per substep (from L2)
                m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
                s_run = tl.zeros([BLOCK_P], tl.float32)
                acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + kr
                    kmask = k < K
                    mu = tl.load(m_base + k[:, None, None] * s_mk, mask=kmask[:, None, None] & xmask[None, :, :], other=0.0).to(tl.float32)
                    lw = tl.load(l_base + k[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")).to(tl.float32)
                    lw = tl.where(pmask[None, :], lw, 0.0)
                    diff = mu - g[None, :, :]
                    logit = lw - kap[None, :] * tl.sum(diff * diff, axis=1)
                    m_new = tl.maximum(m_run, tl.max(logit, axis=0))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully dead tile so far
                    scale = tl.exp(m_run - m_safe)
                    e = tl.exp(logit - m_safe[None, :])
                    s_run = s_run * scale + tl.sum(e, axis=0)
                    acc = acc * scale[None, :] + tl.sum(e[:, None, :] * mu, axis=0)
                    m_run = m_new
                acc = acc / s_run[None, :]
            x0 = r_v[None, :] * acc + r_s[None, :] * g
            x = x + (x - x0) * ((s_n - s_j) / tl.maximum(s_j, eps))
        tl.store(out_ptr + b * (C * HW) + c[:, None] * HW + p[None, :], x.to(out_ptr.dtype.element_ty), mask=xmask)

    @triton.jit
    def _gm_sde_step_kernel(
        means_ptr, lw_ptr, ls_ptr, x_ptr, u_ptr, z_ptr, seed_ptr, out_ptr,
        K, C, HW, NPIX,
        s_mb, s_mk, s_mc, s_mp,
        s_lb, s_lk, s_lp,
        s_lsb, s_lsp,
        s_xb, s_xc, s_xp,
        s_ub, s_up, s_zb, s_zc, s_zp,
        c1, c2, c3, power,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        GIVEN_NOISE: tl.constexpr, INT64: tl.constexpr,
    ):
        """One exact GM-SDE draw for the ``BLOCK_P`` pixels ``p`` of batch element ``b``.

        Pass 1 over K tiles: running max and total of ``exp(power * l)``. The uniform ``u`` of
        the pixel (Philox at offset ``b * HW + p``, or loaded when ``GIVEN_NOISE``) sets the
        target ``u * total``; pass 2 walks the CDF (``tl.cumsum`` per tile plus a carry) to the
        first component past it (the last live one if rounding runs past the end). Then per
        C tile: gather that component's mean, draw ``z`` (Philox at offset
        ``NPIX + (b * C + c) * HW + p``, disjoint from the uniforms), store
        ``c1 * x + c2 * mu + std * z``.
        """
        pid_p = tl.program_id(0)
        b = tl.program_id(1)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        kr = tl.arange(0, BLOCK_K)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
        pmask = p < HW
        l_base = lw_ptr + b * s_lb + p[None, :] * s_lp

        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        tot = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kr
            lw = tl.load(l_base + k[:, None] * s_lk, mask=(k < K)[:, None] & pmask[None, :], other=float("-inf")).to(tl.float32)
            dead = lw == float("-inf")  # dead stays dead for power 0 (and no -inf * 0)
            lw = tl.where(dead, lw, tl.where(dead, 0.0, lw) * power)
            m_new = tl.maximum(m_run, tl.max(lw, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            tot = tot * tl.exp(m_run - m_safe) + tl.sum(tl.exp(lw - m_safe[None, :]), axis=0)
            m_run = m_new
        m_fin = tl.where(m_run == float("-inf"), 0.0, m_run)

        if GIVEN_NOISE:
            u = tl.load(u_ptr + b * s_ub + p * s_up, mask=pmask, other=0.0).to(tl.float32)
        else:
            seed = tl.load(seed_ptr)
            u = tl.rand(seed, b * HW + p)
        target = u * tot

        cum = tl.zeros([BLOCK_P], tl.float32)
        sel = tl.full([BLOCK_P], -1, tl.int32)
        last = tl.zeros([BLOCK_P], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kr
            kmask = k < K
            lw = tl.load(l_base + k[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")).to(tl.float32)
            dead = lw == float("-inf")
            lw = tl.where(dead, lw, tl.where(dead, 0.0, lw) * power)
            w = tl.exp(lw - m_fin[None, :])  # (BLOCK_K, BLOCK_P)
            cdf = cum[None, :] + tl.cumsum(w, axis=0)
            hit = (cdf > target[None, :]) & kmask[:, None]
            first = tl.min(tl.where(hit, k[:, None], K), axis=0).to(tl.int32)
            sel = tl.where((sel < 0) & (first < K), first, sel)
            last = tl.maximum(last, tl.max(tl.where(w > 0, k[:, None], 0), axis=0).to(tl.int32))
            cum = cum + tl.sum(w, axis=0)
        sel = tl.where(sel < 0, last, sel)

        # sqrt(c2^2 * s2 + c3) as hi * sqrt(1 + (lo / hi)^2): no overflow for huge stds.
        ls = tl.load(ls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)
        pa = tl.abs(c2) * tl.exp(ls)
        qa = tl.sqrt(tl.maximum(c3, 0.0)) + tl.zeros_like(pa)
        hi = tl.maximum(pa, qa)
        lo = tl.minimum(pa, qa)
        ratio = tl.where(hi > 0, lo / tl.where(hi > 0, hi, 1.0), 0.0)
        std = hi * tl.sqrt(1.0 + ratio * ratio)

        if INT64:
            sel_off = sel.to(tl.int64) * s_mk
        else:
            sel_off = sel * s_mk
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = (c < C)[:, None] & pmask[None, :]
            mu = tl.load(means_ptr + b * s_mb + sel_off[None, :] + c[:, None] * s_mc + p[None, :] * s_mp, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + p[None, :] * s_xp, mask=mask, other=0.0).to(tl.float32)
            if GIVEN_NOISE:
                z = tl.load(z_ptr + b * s_zb + c[:, None] * s_zc + p[None, :] * s_zp, mask=mask, other=0.0).to(tl.float32)
            else:
                z = tl.randn(seed, NPIX + (b * C + c[:, None]) * HW + p[None, :])
            out = c1 * x + c2 * mu + std[None, :] * z
            tl.store(out_ptr + b * (C * HW) + c[:, None] * HW + p[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _flat_gm(means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor):
    """``(B, K, C, HW)`` means, ``(B, K, HW)`` log-weights, ``(B, 1|HW)`` log-stds (views when
    the strides allow) and the log-std strides (pixel stride 0 for a per-sample std)."""
    *_, K, C, H, W = means.shape
    m = means.reshape(-1, K, C, H * W)
    lw = logweights.reshape(-1, K, H * W)
    ls = logstds.reshape(-1, logstds.shape[-2] * logstds.shape[-1])
    return m, lw, ls, ls.stride(0), (ls.stride(1) if ls.shape[1] > 1 else 0)


def _launch_ode(means, logstds, logweights, x, sigmas, eps):
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = _flat_gm(means, logstds, logweights)
    B = m.shape[0]
    xf = x.reshape(B, C, HW)
    out = torch.empty((B, C, HW), device=x.device, dtype=x.dtype)
    bk, bc, bp, one = _ode_blocks(K, C, HW)
    grid = (cdiv(HW, bp), B)
    _gm_ode_substeps_kernel[grid](
        m, lw, ls, xf, sigmas, out,
        K, C, HW, sigmas.numel() - 1,
        *m.stride(), *lw.stride(), s_lsb, s_lsp, *xf.stride(), sigmas.stride(0), eps,
        BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, ONE_TILE=one, INT64=needs_int64(m, lw, xf, out), num_warps=4,
    )
    return out.view(x.shape)


def _launch_sde(means, logstds, logweights, x, seed, u, z, c1, c2, c3, power):
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = _flat_gm(means, logstds, logweights)
    B = m.shape[0]
    xf = x.reshape(B, C, HW)
    out = torch.empty((B, C, HW), device=x.device, dtype=x.dtype)
    given = u is not None
    uf = u.reshape(B, HW) if given else xf
    zf = z.reshape(B, C, HW) if given else xf
    bk, bc, bp = _sde_blocks(K, C, HW)
    grid = (cdiv(HW, bp), B)
    # the kernel's float32 scalars, rounded here as a GPU launch rounds them (the interpreter keeps
    # float64, and a c3 far below float32's range then meets bf16 math as a NaN)
    c1, c2, c3 = (torch.tensor(c, dtype=torch.float32).item() for c in (c1, c2, c3))
    _gm_sde_step_kernel[grid](
        m, lw, ls, xf, uf, zf, seed, out,
        K, C, HW, B * HW,
        *m.stride(), *lw.stride(), s_lsb, s_lsp, *xf.stride(),
        uf.stride(0), uf.stride(-1), zf.stride(0), zf.stride(1), zf.stride(2),
        c1, c2, c3, power,
        BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, GIVEN_NOISE=given,
        INT64=needs_int64(m, lw, xf, out) or B * HW * (C + 1) >= I32_MAX, num_warps=4,
    )
    return out.view(x.shape)


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("gmkernels::gm_ode_substeps", mutates_args=())
def _gm_ode_substeps_op(
    means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor, x: torch.Tensor, sigmas: torch.Tensor, eps: float
) -> torch.Tensor:
    if select_backend(means) == "triton":
        return _launch_ode(means, logstds, logweights, x, sigmas, eps)
    gm = {"means": means, "logstds": logstds, "logweights": logweights}
    return run_reference(ref.gm_ode_substeps, gm, x, list(sigmas.unbind()), eps, out_dtype=x.dtype)


@torch.library.custom_op("gmkernels::gm_sde_step", mutates_args=())
def _gm_sde_step_op(
    means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor, x: torch.Tensor, seed: torch.Tensor,
    sigma: float, sigma_next: float, power: float, eps: float,
) -> torch.Tensor:
    c1, c2, c3 = transition_coefficients(sigma, sigma_next, eps)
    if select_backend(means) == "triton":
        return _launch_sde(means, logstds, logweights, x, seed, None, None, c1, c2, c3, power)
    # Off the kernel path (torch.library.opcheck on CPU): the same draw from a torch generator
    # seeded with ``seed``, so the op stays a deterministic function of its inputs.
    g = torch.Generator(device=x.device).manual_seed(int(seed.reshape(-1)[0]))
    u = torch.rand((*x.shape[:-3], 1, *x.shape[-2:]), generator=g, device=x.device)
    z = torch.randn(x.shape, generator=g, device=x.device)
    gm = {"means": means, "logstds": logstds, "logweights": logweights}
    return run_reference(ref.gm_sde_step, gm, x, sigma, sigma_next, u, z, power, eps, out_dtype=x.dtype)


def _fake(means, logstds, logweights, x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_gm_ode_substeps_op.register_fake(_fake)
_gm_sde_step_op.register_fake(_fake)


# ----------------------------------------------------------------------------- public ops


def _check_sigmas(sigmas: Sigmas, s: GMShape) -> Sigmas:
    """``N + 1 >= 2`` non-increasing noise levels in [0, 1]: Python floats, or a 1-D float tensor
    on the GM's device (its values are trusted: checking them would synchronise the host)."""
    if isinstance(sigmas, torch.Tensor):
        check_float_tensor(sigmas, "sigmas", s.device)
        if sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D tensor of N + 1 >= 2 noise levels, got shape {tuple(sigmas.shape)}")
        return sigmas
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence) or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a sequence of N + 1 >= 2 floats or a 1-D tensor, got {sigmas!r}")
    out = [check_sigma(v, f"sigmas[{i}]", s) for i, v in enumerate(sigmas)]
    if any(isinstance(v, torch.Tensor) for v in out):
        raise TypeError("sigmas must be all Python floats or one 1-D tensor, not a list of tensors")
    if any(b > a for a, b in zip(out, out[1:])):
        raise ValueError(f"sigmas must be non-increasing, got {out}")
    return out


def gm_ode_substeps(gm: dict, x: torch.Tensor, sigmas: Sigmas, eps: float = 1e-6) -> torch.Tensor:
    """All ``N = len(sigmas) - 1`` GM-ODE substeps of one main step, fused.

    Substep 0 takes ``x0 = gm_to_mean(gm)``, substep ``j > 0`` the posterior mean of ``gm``
    carried from ``(x, sigmas[0])`` to ``(x_j, sigmas[j])`` (op 6); each is an Euler step
    ``x <- x + (x - x0) / sigma_j * (sigma_{j+1} - sigma_j)``. ``N = 1`` is the plain Euler step.

    Args:
        gm: x0-GM ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1|H, 1|W), logweights (*B, K, 1, H, W)}``
            predicted at ``(x, sigmas[0])``.
        x: ``(*B, C, H, W)`` state at ``sigmas[0]``.
        sigmas: ``N + 1`` non-increasing noise levels in [0, 1] shared by the batch: Python
            floats, or a 1-D float tensor on the GM's device (no host synchronisation, usable
            inside a CUDA graph; its values are not checked).
    Returns:
        ``(*B, C, H, W)``: the state at ``sigmas[N]``, dtype of ``x``.
    """
    s = check_gm(gm)
    check_state(x, "x", s)
    sigmas = _check_sigmas(sigmas, s)
    if select_backend(gm["means"]) == "torch":
        levels = list(sigmas.unbind()) if isinstance(sigmas, torch.Tensor) else sigmas
        return run_reference(ref.gm_ode_substeps, gm, x, levels, eps, out_dtype=x.dtype)
    if not isinstance(sigmas, torch.Tensor):  # a host-to-device copy: pass a device tensor in loops
        sigmas = torch.tensor(sigmas, dtype=torch.float32, device=s.device)
    return call_op(torch.ops.gmkernels.gm_ode_substeps, gm["means"], gm["logstds"], gm["logweights"], x, sigmas, float(eps))


def gm_sde_step(
    gm: dict, x: torch.Tensor, sigma: float, sigma_next: float, power: float = 1.0,
    generator: torch.Generator | None = None, eps: float = 1e-6,
) -> torch.Tensor:
    """One GM-SDE step from ``sigma`` to ``sigma_next``: an exact draw from the GM reverse
    transition (op 7), fused: component ``k ~ softmax(power * logweights)`` per pixel, Gaussian
    noise ``z``, ``x_next = c1 * x + c2 * mu_k + sqrt(c2^2 * s2 + c3) * z``.

    Random numbers: the torch backend draws ``u`` and ``z`` with ``torch.rand/randn`` from
    ``generator``; the Triton kernel draws them with Philox seeded by one ``torch.randint`` from
    ``generator`` (a device tensor, no host synchronisation). The same seed gives the same
    samples on one backend; the two backends' streams differ.

    Args:
        gm: x0-GM predicted at ``(x, sigma)``.
        x: ``(*B, C, H, W)``.
        sigma, sigma_next: Python floats, ``0 <= sigma_next <= sigma <= 1``.
        power: weight temperature of the component draw.
    Returns:
        ``(*B, C, H, W)``, dtype of ``x``.
    """
    s = check_gm(gm)
    check_state(x, "x", s)
    for name, v in (("sigma", sigma), ("sigma_next", sigma_next)):
        if isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a Python float (a schedule value), got a tensor of shape {tuple(v.shape)}")
    sigma = check_sigma(sigma, "sigma", s)
    sigma_next = check_sigma(sigma_next, "sigma_next", s)
    if sigma_next > sigma:
        raise ValueError(f"sigma_next ({sigma_next}) must not exceed sigma ({sigma})")
    power = check_power(power, "power")
    generator = check_generator(generator)
    if select_backend(gm["means"]) == "triton":
        gen_device = s.device if generator is None else generator.device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).to(s.device)
        return call_op(torch.ops.gmkernels.gm_sde_step,
            gm["means"], gm["logstds"], gm["logweights"], x, seed, sigma, sigma_next, power, float(eps)
        )
    u = torch.rand((*s.batch, 1, s.H, s.W), generator=generator, device=s.device)
    z = torch.randn(s.pixel_shape, generator=generator, device=s.device)
    return run_reference(ref.gm_sde_step, gm, x, sigma, sigma_next, u, z, power, eps, out_dtype=x.dtype)


# ----------------------------------------------------------------------------- AOT cases


def _aot_cases() -> list[AotCase]:
    """The benchmark shape B=125, K=8, C=4, 32x32 with a per-sample std, contiguous. The substep
    count is a runtime argument, so 4 and 8 substeps share one ODE specialisation; the SDE case
    is the Philox variant. fp32 and bf16 (GM, state and output all in that dtype)."""
    if triton is None:
        return []
    K, C, HW = 8, 4, 32 * 32
    bk, bc, bp, one = _ode_blocks(K, C, HW)
    sk, sc, sp = _sde_blocks(K, C, HW)
    cases = []
    for dt in ("fp32", "bf16"):
        gm_sig = {
            "means_ptr": f"*{dt}", "lw_ptr": f"*{dt}", "ls_ptr": f"*{dt}", "x_ptr": f"*{dt}",
        }
        strides = {
            "s_mb": "i32", "s_mk": "i32", "s_mc": "i32", "s_mp": "constexpr",
            "s_lb": "i32", "s_lk": "i32", "s_lp": "constexpr",
            "s_lsb": "constexpr", "s_lsp": "constexpr",
            "s_xb": "i32", "s_xc": "i32", "s_xp": "constexpr",
        }
        unit = {"s_mp": 1, "s_lp": 1, "s_lsb": 1, "s_lsp": 0, "s_xp": 1}
        ode_sig = {**gm_sig, "sig_ptr": "*fp32", "out_ptr": f"*{dt}", "K": "i32", "C": "i32", "HW": "i32", "N": "i32",
                   **strides, "s_sig": "constexpr", "eps": "fp32",
                   "BLOCK_K": "constexpr", "BLOCK_C": "constexpr", "BLOCK_P": "constexpr", "ONE_TILE": "constexpr", "INT64": "constexpr"}
        cases.append(AotCase(
            name=f"solver_steps.gm_ode_substeps[B125,K8,C4,32x32,N4|N8,{dt}]",
            kernel=_gm_ode_substeps_kernel,
            signature=ode_sig,
            constexprs={**unit, "s_sig": 1, "BLOCK_K": bk, "BLOCK_C": bc, "BLOCK_P": bp, "ONE_TILE": one, "INT64": False},
            num_warps=4,
            divisible=("means_ptr", "lw_ptr", "ls_ptr", "x_ptr", "sig_ptr", "out_ptr", "HW", "s_mb", "s_mk", "s_mc", "s_lb", "s_lk", "s_xb", "s_xc"),
        ))
        sde_sig = {**gm_sig, "u_ptr": f"*{dt}", "z_ptr": f"*{dt}", "seed_ptr": "*i64", "out_ptr": f"*{dt}",
                   "K": "i32", "C": "i32", "HW": "i32", "NPIX": "i32", **strides,
                   "s_ub": "i32", "s_up": "constexpr", "s_zb": "i32", "s_zc": "i32", "s_zp": "constexpr",
                   "c1": "fp32", "c2": "fp32", "c3": "fp32", "power": "fp32",
                   "BLOCK_K": "constexpr", "BLOCK_C": "constexpr", "BLOCK_P": "constexpr", "GIVEN_NOISE": "constexpr", "INT64": "constexpr"}
        cases.append(AotCase(
            name=f"solver_steps.gm_sde_step[B125,K8,C4,32x32,philox,{dt}]",
            kernel=_gm_sde_step_kernel,
            signature=sde_sig,
            constexprs={**unit, "s_up": 1, "s_zp": 1, "BLOCK_K": sk, "BLOCK_C": sc, "BLOCK_P": sp, "GIVEN_NOISE": False, "INT64": False},
            num_warps=4,
            divisible=("means_ptr", "lw_ptr", "ls_ptr", "x_ptr", "out_ptr", "HW", "NPIX", "s_mb", "s_mk", "s_mc", "s_lb", "s_lk", "s_xb", "s_xc"),
        ))
    return cases


AOT_CASES = _aot_cases()
