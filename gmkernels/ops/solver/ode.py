"""``gm_ode_substeps`` (docs/solvers.md#fused-steps): all N GM-ODE substeps of one main step in
one kernel, writing only the final state (every substep of a pixel depends only on that pixel's
GM and state).

The pixel's K means and log-weights are read once and kept on chip for the N posterior-mean +
Euler updates (``ode_path``): in one thread's registers (``_gm_ode_kernel``) up to ``REG_TILE``
``K x C`` elements, or ``REG_TILE_WIDE`` with at most 32 components (sizes rounded up to powers
of two); spread over a program's threads on the pi-Flow rollout kernel (``policy``, x0 mode) up
to 1024; larger GMs and point data past the register bound stream K per substep from L1/L2
(DRAM still reads the GM once per step). The state keeps its dtype (the GM may be bf16);
arithmetic is fp32.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

import reference.solver_steps as ref

from ..._dispatch import run_reference
from ..._validate import GMShape, check_float_tensor, check_gm, check_sigma, check_state
from .._launch import PlanCache, cdiv, kernels_wanted, needs_int64, planned_args
from ..policy import _policy_rollout_kernel, rollout_blocks
from . import common
from .common import flat_gm, fused_blocks

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

Sigmas = Union[Sequence[float], torch.Tensor]

if triton is not None:
    from .common import fs_load, ode_substeps, program_state

    @triton.jit(do_not_specialize=["HW", "s_mb", "s_mk", "s_mc", "s_lb", "s_lk", "s_xb", "s_xc"])
    def _gm_ode_kernel(
        m_ptr,
        lw_ptr,
        ls_ptr,
        x_ptr,
        sig_ptr,
        out_ptr,
        K,
        C,
        HW,
        NPB,
        N,
        NPIX,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        s_lb,
        s_lk,
        s_lp,
        s_lsb,
        s_lsp,
        s_xb,
        s_xc,
        s_xp,
        eps,
        ONE_TILE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
        PACK: tl.constexpr = False,
    ):
        """``N`` GM-ODE substeps (``ode_substeps``) of the x0-GM ``(m, lw, ls)`` for the pixels of
        ``program_state``, all channels: the state ``x (B, C, HW)`` from ``sig[0]`` to ``sig[N]``,
        written to ``out`` (contiguous). The means are taken as loaded (``0 + 1 * mu``)."""
        b, p, pmask, _, c, kr, xmask, x, sb, ls = program_state(
            x_ptr,
            ls_ptr,
            sig_ptr,
            NPIX,
            HW,
            NPB,
            C,
            s_xb,
            s_xc,
            s_xp,
            s_lsb,
            s_lsp,
            BLOCK_K,
            BLOCK_C,
            BLOCK_P,
            INT64,
            PACK,
        )
        s2 = tl.exp(tl.minimum(2.0 * ls, 80.0))
        # the GM as stored (no unconditional log-weights: 0)
        src = (
            m_ptr + b * s_mb + c[None, :, None] * s_mc + p[None, None, :] * s_mp,
            lw_ptr + b * s_lb + p[None, :] * s_lp,
            0,
            K,
            s_mk,
            s_lk,
            0,
        )
        zero_v = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        zero_p = tl.zeros([BLOCK_P], tl.float32)
        lazy = (src, kr, xmask, pmask, tl.zeros([BLOCK_C, BLOCK_P], tl.float32), 1.0, 1.0)
        mu_all = 0.0
        l_all = 0.0
        if ONE_TILE:
            mu_all, l_all = fs_load(lazy, 0, False)
        x = ode_substeps(
            x,
            sb,
            sig_ptr,
            N,
            eps,
            s2,
            zero_p,
            zero_v,
            zero_p + 1.0,
            zero_v,
            mu_all,
            l_all,
            lazy,
            ONE_TILE,
            False,
            False,
            BLOCK_K,
            BLOCK_C,
            BLOCK_P,
        )
        tl.store(out_ptr + b * (C * HW) + c[:, None] * HW + p[None, :], x.to(out_ptr.dtype.element_ty), mask=xmask)


def ode_path(K: int, C: int, HW: int, split_k1: bool | None = None) -> str:
    """How ``gm_ode_substeps`` keeps a pixel's GM across the substeps: ``"registers"`` (one
    thread's registers, ``fused_blocks``' one-tile case), ``"wide"`` (loaded once, spread over
    the program's threads: ``launch_ode_wide``, for GMs up to 1024 ``K x C`` elements after
    rounding each up to a power of two, more than one pixel per sample) or ``"streamed"`` (K
    tiles re-read from L1/L2 at every substep: DRAM still reads the GM once per step)."""
    if fused_blocks(K, C, HW, split_k1=split_k1)[3]:
        return "registers"
    if HW > 1 and rollout_blocks(K, C, HW) is not None:
        return "wide"
    return "streamed"


def _ode_args(means, logweights, logstds, x, out, split_k1: bool, n_sigmas: int):
    """``_gm_ode_kernel``'s views ``(means, logweights, logstds, x, out)``, grid, integer
    arguments and options (``planned_args``); for a GM that takes ``launch_ode_wide`` the grid
    is None and the options are its blocks."""
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = flat_gm(means, logstds, logweights)
    B = m.shape[0]
    xf, of = x.reshape(B, C, HW), out.view(B, C, HW)
    if ode_path(K, C, HW, split_k1) == "wide":
        return (m, lw, ls, xf, of), None, (), rollout_blocks(K, C, HW)
    pack = common.PACK_FUSED and HW == 1 and B > 1  # point data: the batch rows fill the pixel lanes
    bk, bc, bp, one, warps = fused_blocks(K, C, B if pack else HW, split_k1=split_k1)
    npb = cdiv(HW, bp)
    ints = (K, C, HW, npb, n_sigmas - 1, B * HW, *m.stride(), *lw.stride(), s_lsb, s_lsp, *xf.stride())
    options = dict(
        ONE_TILE=one, BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, INT64=needs_int64(m, lw, xf, of), PACK=pack, num_warps=warps
    )
    return (m, lw, ls, xf, of), (cdiv(B, bp) if pack else B * npb,), ints, options


_PLANS = PlanCache()


def _launch_ode(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``gm_ode_substeps`` on the Triton path: ``_gm_ode_kernel``, or ``launch_ode_wide`` for GMs
    past one thread's registers but within ``rollout_blocks``. The plan is stored per shape."""
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    sig = sigmas.to(torch.float32).contiguous()
    (m, lw, ls, xf, of), grid, ints, options = planned_args(
        _PLANS, _ode_args, (means, logweights, logstds, x, out), common.SPLIT_K1, sig.numel(), n_key=4
    )
    if grid is None:
        return launch_ode_wide(means, logstds, logweights, x, sig, out, eps, options)
    _gm_ode_kernel[grid](m, lw, ls, xf, sig, of, *ints, eps, **options)
    return out


def launch_ode_wide(means, logstds, logweights, x, sig, out, eps, blocks, affine=False):
    """The GM-ODE substeps of a GM too large for one thread's registers (``K * C`` above
    ``REG_TILE``) but within ``policy.rollout_blocks``' one-tile bound: the pi-Flow rollout
    kernel from ``(xf, sig[0])`` along the shared ``sig``, on an x0-GM (``gm_ode_substeps``) or,
    ``affine``, on the network's u-GM (the sampler's plain step: the kernel applies op 5 as it
    loads); per-pixel variance when ``s_lsp``. Each pixel's GM is loaded once and kept in
    registers spread over the program's threads for all N substeps. Writes ``out`` (contiguous,
    shaped as ``x``) and returns it."""
    m, lw, ls, _, s_lsp = flat_gm(means, logstds, logweights)
    B, K, C, HW = m.shape
    xf, of = x.reshape(B, C, HW), out.view(B, C, HW)
    bk, bc, bp, warps = blocks
    var = torch.exp(2.0 * (ls if s_lsp else ls[:, :1]).to(torch.float32))  # (B, HW | 1) variance
    if affine:
        var = var * sig[:1].square()  # x0 stds are the u stds times sigma (a device op: no host read)
    npb = cdiv(HW, bp)
    _policy_rollout_kernel[(B * npb,)](
        m,
        lw,
        xf,
        xf,
        var,
        sig,
        sig,
        of,
        of,
        K,
        C,
        HW,
        sig.numel() - 1,
        1,
        npb,
        *m.stride(),
        *lw.stride(),
        *xf.stride(),
        *xf.stride(),
        0,
        var.stride(0),
        0,
        eps,
        BLOCK_K=bk,
        BLOCK_C=bc,
        BLOCK_P=bp,
        ONE_TILE=True,
        SAVE=False,
        X0=not affine,
        PIXEL_VAR=bool(s_lsp),
        INT64=needs_int64(m, lw, xf, of),
        num_warps=warps,
    )
    return out


if triton is not None:
    _gm_ode_substeps_op = torch.library.custom_op("gmkernels::gm_ode_substeps", _launch_ode, mutates_args=())

    @_gm_ode_substeps_op.register_fake
    def _(means, logstds, logweights, x, sigmas, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)


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
        ``(*B, C, H, W)``: the state at ``sigmas[N]``, dtype of ``x``. Differentiable (on the
        torch path, which inputs that need a gradient take).
    """
    s = check_gm(gm)
    check_state(x, "x", s)
    sigmas = _check_sigmas(sigmas, s)
    tensors = (gm["means"], gm["logstds"], gm["logweights"], x)
    if not (kernels_wanted(*tensors, sigmas) if isinstance(sigmas, torch.Tensor) else kernels_wanted(*tensors)):
        levels = list(sigmas.unbind()) if isinstance(sigmas, torch.Tensor) else sigmas
        return run_reference(ref.gm_ode_substeps, gm, x, levels, eps, out_dtype=x.dtype)
    if not isinstance(sigmas, torch.Tensor):  # a host-to-device copy: pass a device tensor in loops
        sigmas = torch.tensor(sigmas, dtype=torch.float32, device=s.device)
    return _gm_ode_substeps_op(*tensors, sigmas, float(eps))
