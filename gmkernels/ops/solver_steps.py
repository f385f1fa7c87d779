"""Fused sampler steps (docs/solvers.md): ``gm_ode_substeps`` and ``gm_sde_step``.

``gm_ode_substeps`` runs all N GM-ODE substeps of one main step in one kernel, writing only the
final state (legal because every substep of a pixel depends only on that pixel's GM and state).
The pixel's K means and log-weights are read once and kept on chip for the N posterior-mean +
Euler updates (``ode_path``): in one thread's registers on ``_fused_step_kernel`` (the sampler's
fused step, with the means taken as given) up to 64 ``K x C`` elements, or 128 for the plain
step with at most 32 components (sizes rounded up to powers of two); spread over a program's
threads on the pi-Flow rollout kernel (``policy``, x0 mode) up to 1024; larger GMs and point
data beyond the register bound stream K per substep from L1/L2 (DRAM still reads the GM once
per step). ``gm_sde_step`` draws the component, the Gaussian noise
and applies the exact reverse transition in one kernel, with Triton's Philox seeded from the
caller's ``torch.Generator``.

Both return the new state in the dtype of ``x`` (the state keeps its own precision; the GM may
be bf16), with fp32 arithmetic.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Sequence, Union

import torch

import reference.solver_steps as ref
from reference.transition import transition_coefficients

from .._dispatch import run_reference, select_backend
from .._validate import GMShape, check_float_tensor, check_generator, check_gm, check_power, check_sigma, check_state, pixel_shape
from ._launch import I32_MAX, THREADS_ALONG_K, PlanCache, call_op, cdiv, launch_plan, needs_int64, next_pow2, planned_args
from .policy import _policy_rollout_kernel, rollout_blocks


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

Sigmas = Union[Sequence[float], torch.Tensor]

# ----------------------------------------------------------------------------- kernels

_SDE_TILE = 512  # elements of the SDE kernel's (K, pixels) and (C, pixels) tiles


def _f32(v: float) -> float:
    """A launch scalar rounded to float32 as a GPU launch rounds it (the interpreter keeps float64;
    ``struct`` rounds to nearest like ``torch.tensor(v, dtype=float32)``, without a tensor)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # past float32's range: inf, as the tensor conversion gives
        return math.copysign(math.inf, v)


_REG_TILE = 64  # GM elements (K x C) of a pixel that the fused step keeps in one thread's registers
_REG_TILE_WIDE = 128  # the plain GM-ODE step's bound for at most 32 components (see ``_fused_blocks``)
# Triton before 3.9 (3.6 checked) orders a (K, C, pixels) tile K before C and puts the warps of a
# channel-split layout along K whenever BLOCK_K > 1: every channel in every thread (C = 64, fp32,
# triton 3.6: 8 to 1840 bytes of spills in 14 of the 16 step variants). There those layouts
# stream one component at a time (left: 32 bytes at sm_80 in the 2nd-order weight-guided step
# at C = 64, where that ptxas settles on 128 registers; 16 warps moved 8-24 bytes to three other
# launches, at 64 registers); triton 3.9 keeps the warps on C with K tiles.
# On those versions the heavy steps also stream quarter tiles, not halves, at <= 16 channels in
# one thread, and split 16 channels over 8 warps (3.6 spilled 8 bytes at sm_90 in the guided
# first-order step at K >= 32, C = 4 and C = 16; at C = 16 the 8 bytes move to sm_80).
_SPLIT_K1 = THREADS_ALONG_K


@launch_plan
def _fused_blocks(K: int, C: int, HW: int, sde: bool = False, heavy: bool = False) -> tuple[int, int, int, bool, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, ONE_TILE, num_warps)`` of ``_fused_step_kernel``.

    One pixel per thread for ``C <= 16``: the pixels are contiguous (their stride 1 is
    specialised, so the compiler orders the tiles pixels-fastest) but the row, component and
    channel strides and ``H * W`` are not specialised, so no load may assume an alignment and no
    thread gets a vector of pixels: the ``(K, C, pixels)`` tiles lie with K and C inside the
    thread and the warps along the pixels, on triton 3.6 and 3.9 alike: the K and C reductions of the substep loop
    need no shuffle or barrier. The pixel's whole GM stays in registers across the substeps when
    ``K * C <= _REG_TILE`` (``ONE_TILE``), or ``_REG_TILE_WIDE`` for the plain GM-ODE step with at
    most 32 components (K8C16 and K32C4: 224-255 registers, no spill on triton 3.6 or 3.9; K64C2
    spilled 144 bytes); above, K is streamed in tiles of ``_REG_TILE`` elements per substep
    (re-read from L1/L2: the step still reads the GM from DRAM once; ``ode_path`` sends the plain
    step of GMs up to 1024 elements to the rollout kernel instead). ``C > 16``:
    32 pixels per program, channels spread over the warps: 4 warps up to 32 channels, 8 at 64,
    so a thread holds at most 8 channels up to C = 64. At C = 64 on 4 warps (16 channels per
    thread) the 2nd-order probabilistic step spilled 64-88 bytes even with ``_fs_moments`` (1384
    at sm_90 before it); 16 warps (4 per thread) cap a thread at 128 registers and spilled 1656
    bytes there before ``_fs_moments`` (triton 3.9).
    Above 64 channels (no users shape) the layout stays at 4 warps. Triton < 3.9: see ``_SPLIT_K1``.
    The GM-SDE draw halves the tile: its in-thread ``tl.cumsum`` over 16 components went to local
    memory (32-40 bytes at sm_80/sm_90), over 8 it does not. ``heavy`` launches (guidance or 2nd
    order: a dozen more per-pixel C-vectors live) halve it, stream K in quarter tiles, and spread
    16 channels over the warps as well: one pixel per thread spilled there (8 bytes at K >= 32,
    C = 4, in half tiles; 200+ at C = 16).
    """
    bc = next_pow2(C)
    split = bc > 16 or (bc == 16 and heavy)
    reg_tile = _REG_TILE // 2 if (sde or heavy) else _REG_TILE
    stream_tile = reg_tile // (4 if _SPLIT_K1 else 2) if heavy and not split else reg_tile
    if split:
        bp, warps = 32, (8 if bc == 64 or (_SPLIT_K1 and bc == 16) else 4)
    else:
        bp = min(max(next_pow2(HW), 32), 128)
        warps = bp // 32
    per_thread_c = bc // warps if split else bc
    bk = next_pow2(K)
    if split and _SPLIT_K1:
        return 1, bc, bp, K == 1, warps
    if bk * per_thread_c <= reg_tile or (not (sde or heavy or split) and bk <= 32 and bk * per_thread_c <= _REG_TILE_WIDE):
        return bk, bc, bp, True, warps
    return max(1, stream_tile // per_thread_c), bc, bp, False, warps


@launch_plan
def _sde_blocks(K: int, C: int, HW: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P)`` of the SDE kernel: it streams K (log-weights only) and C.
    K and C tiles stay at 512 elements: larger K tiles made ptxas use local memory for the bf16
    sm_80 build of the CDF walk (``tl.cumsum``) at the benchmark shape, and 16-channel tiles
    (2048 elements) 32 bytes of it for bf16 at sm_80 when C >= 16. At least 2 pixels: a
    one-pixel block (a single point: a batch of points packs its rows, ``HW`` is then ``B``)
    compiled to a 32-byte stack frame at sm_80."""
    bp = min(max(next_pow2(HW), 2), 128)
    return min(next_pow2(K), max(1, _SDE_TILE // bp)), min(next_pow2(C), max(1, _SDE_TILE // bp)), bp


if triton is not None:

    @triton.jit
    def _philox_randn(seed, offset):
        """``tl.randn(seed, offset)`` (same Philox draws, same Box-Muller ``r * cos(2 pi u2)``) with
        the cosine evaluated here: libdevice's ``cosf`` carries a Payne-Hanek reduction for huge
        arguments whose 28-byte scratch array older ptxas (triton <= 3.6) leaves in local memory.
        The angle lies in [0, 2 pi), so a 3-part Cody-Waite reduction to [-pi/4, pi/4] and Taylor
        polynomials (truncation < 1e-9) give cos to about an ulp of ``tl.randn``'s."""
        i1, i2, _, _ = tl.randint4x(seed, offset)
        u1 = tl.maximum(1.0e-7, tl.random.uint_to_uniform_float(i1))
        th = 6.283185307179586 * tl.random.uint_to_uniform_float(i2)
        j = tl.floor(th * 0.6366197466850281 + 0.5)  # quadrant 0..4
        # pi/2 = 1.5707855224609375 + 1.0804273188114166e-05 + 6.077094383272197e-11; the first
        # two have 17 significant bits, so j * them and the first subtraction are exact.
        x = th - j * 1.5707855224609375
        x = x - j * 1.0804273188114166e-05
        x = x - j * 6.077094383272197e-11
        x2 = x * x
        sin_x = x + x * x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362880.0))))
        cos_x = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40320.0 + x2 * (-1.0 / 3628800.0)))))
        q = j.to(tl.int32) & 3  # cos(q pi/2 + x)
        c = tl.where((q & 1) == 0, cos_x, sin_x)
        c = tl.where((q == 1) | (q == 2), -c, c)
        return tl.sqrt(-2.0 * tl.log(u1)) * c

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
        PACK: tl.constexpr = False,
    ):
        """One exact GM-SDE draw for the ``BLOCK_P`` pixels ``p`` of batch element ``b``, or with
        ``PACK`` (point data, ``HW == 1``) for ``BLOCK_P`` batch elements, one per lane (``b``
        a per-lane vector, ``p = 0``): the addresses and Philox offsets are the same functions
        of ``(b, c, p)`` either way, so packing leaves the random stream unchanged.

        Pass 1 over K tiles: running max and total of ``exp(power * l)``. The uniform ``u`` of
        the pixel (Philox at offset ``b * HW + p``, or loaded when ``GIVEN_NOISE``) sets the
        target ``u * total``; pass 2 walks the CDF (``tl.cumsum`` per tile plus a carry) to the
        first component past it (the last live one if rounding runs past the end). Then per
        C tile: gather that component's mean, draw ``z`` (Philox at offset
        ``NPIX + (b * C + c) * HW + p``, disjoint from the uniforms), store
        ``c1 * x + c2 * mu + std * z``.
        """
        pid = tl.program_id(0)  # 1-D grid, pixel blocks fastest: any batch size fits CUDA's limits
        if PACK:  # lane i holds batch element pid * BLOCK_P + i (NPIX = B elements of one pixel)
            b = pid * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = b < NPIX
            p = tl.zeros([BLOCK_P], tl.int32)
        else:
            n_pblocks = tl.cdiv(HW, BLOCK_P)
            b = pid // n_pblocks
            pid_p = pid % n_pblocks
            p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = p < HW
        kr = tl.arange(0, BLOCK_K)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
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
                z = _philox_randn(seed, NPIX + (b * C + c[:, None]) * HW + p[None, :])
            out = c1 * x + c2 * mu + std[None, :] * z
            tl.store(out_ptr + b * (C * HW) + c[:, None] * HW + p[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


    # ------------------------------------------------------------------------- fused sampler step
    # One kernel for a whole sampler step on the network's u-GM (see ``fused_step``): the
    # u -> x0 map, the guidance and 2nd-order reweightings and the GM-ODE / GM-SDE consumer are
    # applied as the GM is loaded; per-sample coefficients come from its own statistics mode.

    @triton.jit
    def _fs_load(um_base, ul_base, lu_base, k0, kr, K, s_mk, s_lk, s_luk, xmask, pmask, xb, a0, wsc,
                 WEIGHT: tl.constexpr, LOAD_MU: tl.constexpr = True):  # fmt: skip
        """One K tile of the x0-GM ``R'``: means ``xb + a0 * u_k`` ``[BK, BC, BP]`` (``xb`` the
        state plus a mean-CFG offset, ``a0 = -sigma``) and logits ``[BK, BP]`` (weight-guided
        when ``WEIGHT``; ``-inf`` past K, 0 for pixels past the end). Without ``LOAD_MU`` the
        means are not read (0.0 stands for them)."""
        k = k0 + kr
        kmask = k < K
        mu = 0.0
        if LOAD_MU:
            u = tl.load(um_base + k[:, None, None] * s_mk, mask=kmask[:, None, None] & xmask[None, :, :], other=0.0)
            mu = xb[None, :, :] + a0 * u.to(tl.float32)
        lmask = kmask[:, None] & pmask[None, :]
        lc = tl.load(ul_base + k[:, None] * s_lk, mask=lmask, other=0.0).to(tl.float32)
        if WEIGHT:  # log_softmax(l_c + (scale - 1)(l_c - l_u)), dead clamped at -1e30 (normaliser irrelevant)
            lu = tl.load(lu_base + k[:, None] * s_luk, mask=lmask, other=0.0).to(tl.float32)
            lc = tl.maximum(lc, -1e30)
            lc = lc + (wsc - 1.0) * (lc - tl.maximum(lu, -1e30))
        lc = tl.where(kmask[:, None], lc, float("-inf"))
        return mu, tl.where(pmask[None, :], lc, 0.0)

    @triton.jit
    def _fs_tile(mu, lg, kap1, c1, kap2, al2, c2, m, w_sum, mean, m2,
                 Q1: tl.constexpr, Q2: tl.constexpr, WITH_VAR: tl.constexpr):  # fmt: skip
        """Merge a tile into the running moments of ``R'`` reweighted by up to two Gaussians:
        logits ``lg - kap1 |mu + c1|^2 - kap2 |al2 mu + c2|^2`` (``c = offset - centre``)."""
        if Q1:
            d1 = mu + c1[None, :, :]
            lg = lg - kap1[None, :] * tl.sum(d1 * d1, axis=1)
        if Q2:
            d2 = al2[None, None, :] * mu + c2[None, :, :]
            lg = lg - kap2[None, :] * tl.sum(d2 * d2, axis=1)
        return _fs_moments(lg * 1.4426950408889634, mu, m, w_sum, mean, m2, WITH_VAR)

    @triton.jit
    def _fs_moments(lw2, mu, m, w_sum, mean, m2, WITH_VAR: tl.constexpr):
        """``online_moments_update`` with the per-pixel state ``m``, ``w_sum`` kept ``[1, BP]``
        (K reductions with the channel axis kept): every per-pixel factor then shares the layout
        of the ``[BC, BP]`` moments. With ``[BP]`` factors the compiler laid the moments (and the
        ODE state) out as a K-reduced tile, every channel in every thread: 255 registers and 1 KB
        of spills at C = 64 with the channels split over 8 warps."""
        l3 = lw2[:, None, :]  # [BK, 1, BP]
        m_new = tl.maximum(m, tl.max(l3, axis=0))  # [1, BP]
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)  # 0 while nothing was alive
        p = tl.exp2(l3 - m_ref[None, :, :])  # [BK, 1, BP]
        w_t = tl.sum(p, axis=0)
        w_old = w_sum * alpha
        w_new = w_old + w_t
        mean_t = tl.sum(p * mu, axis=0) / tl.where(w_t > 0, w_t, 1.0)
        frac = w_t / tl.where(w_new > 0, w_new, 1.0)
        delta = mean_t - mean
        mean = mean + delta * frac
        if WITH_VAR:
            dev = mu - mean_t[None, :, :]
            m2_t = tl.sum(p * dev * dev, axis=0)
            m2 = m2 * alpha + m2_t + delta * delta * (w_old * frac)
        return m_new, w_new, mean, m2

    @triton.jit
    def _fs_pass(mu_all, l_all, um_base, ul_base, lu_base, K, s_mk, s_lk, s_luk, kr, xmask, pmask, xb, a0, wsc,
                 kap1, c1, kap2, al2, c2,
                 ONE_TILE: tl.constexpr, WEIGHT: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr,
                 WITH_VAR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
        """Softmax-weighted mean ``[BC, BP]`` of the (reweighted) means over all K and, with
        ``WITH_VAR``, the weighted squared deviation summed over channels ``[BP]``."""
        m = tl.full([1, BLOCK_P], float("-inf"), tl.float32)
        w_sum = tl.zeros([1, BLOCK_P], tl.float32)
        mean = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        m2 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        if ONE_TILE:
            m, w_sum, mean, m2 = _fs_tile(mu_all, l_all, kap1, c1, kap2, al2, c2, m, w_sum, mean, m2, Q1, Q2, WITH_VAR)
        else:
            for k0 in range(0, K, BLOCK_K):
                mu, lg = _fs_load(um_base, ul_base, lu_base, k0, kr, K, s_mk, s_lk, s_luk, xmask, pmask, xb, a0, wsc, WEIGHT)
                m, w_sum, mean, m2 = _fs_tile(mu, lg, kap1, c1, kap2, al2, c2, m, w_sum, mean, m2, Q1, Q2, WITH_VAR)
        var = tl.sum(m2, axis=0) / tl.sum(tl.where(w_sum > 0, w_sum, 1.0), axis=0)
        return mean, var

    @triton.jit
    def _fs_logits_a(mu, lg, gA, kapA, RW_A: tl.constexpr):
        """Logits of A: ``lg - kapA |mu - gA|^2`` when A reweights ``R'`` (``RW_A``), else ``lg``."""
        if RW_A:
            dA = mu - gA[None, :, :]
            lg = lg - kapA[None, :] * tl.sum(dA * dA, axis=1)
        return lg

    @triton.jit
    def _fs_total(lg, m_run, tot):
        """Running max and total of ``exp(lg)`` over K tiles (an all-dead tile gives no NaN)."""
        m_new = tl.maximum(m_run, tl.max(lg, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        tot = tot * tl.exp(m_run - m_safe) + tl.sum(tl.exp(lg - m_safe[None, :]), axis=0)
        return m_new, tot

    @triton.jit
    def _fs_cdf(lg, k, K, m_fin, target, cum, sel, last):
        """One K tile of the CDF walk of ``gm_sde_step``'s kernel: the first component whose
        cumulative weight passes ``target``, and the last live one (taken if rounding runs past)."""
        w = tl.exp(lg - m_fin[None, :])
        cdf = cum[None, :] + tl.cumsum(w, axis=0)
        hit = (cdf > target[None, :]) & (k < K)[:, None]
        first = tl.min(tl.where(hit, k[:, None], K), axis=0).to(tl.int32)
        sel = tl.where((sel < 0) & (first < K), first, sel)
        last = tl.maximum(last, tl.max(tl.where(w > 0, k[:, None], 0), axis=0).to(tl.int32))
        return cum + tl.sum(w, axis=0), sel, last

    @triton.jit
    def _fs_transfer(sb, st, x, x_base, eps):
        """Transfer Gaussian of op 6 from ``(x_base, sb)`` to ``(x, st)``: ``g [BC, BP]``, ``v``."""
        a_b = 1.0 - sb
        a_t = 1.0 - st
        d = tl.maximum((a_t * sb) * (a_t * sb) - (a_b * st) * (a_b * st), eps)
        g = (a_t * sb * sb * x - a_b * st * st * x_base) / d
        v = (st * sb) * (st * sb) / d
        return g, v

    @triton.jit
    def _stat_store(ptr, v, pmask, PACK: tl.constexpr):
        """Store a statistic from its per-pixel terms ``v [BP]``: each lane's own (its sample's
        sum, ``ptr`` a per-lane vector) when ``PACK``, else their sum (the program's partial)."""
        if PACK:
            tl.store(ptr, v, mask=pmask)
        else:
            tl.store(ptr, tl.sum(v, axis=0))

    @triton.jit(do_not_specialize=["HW", "s_mb", "s_mk", "s_mc", "s_lb", "s_lk", "s_vb", "s_vk", "s_vc", "s_vlb", "s_vlk", "s_xb", "s_xc"])
    def _fused_step_kernel(
        um_ptr, ul_ptr, uls_ptr, vm_ptr, vl_ptr, x_ptr, prev_ptr, coef_ptr, sig_ptr, seed_ptr,
        out_ptr, post_ptr, stat_ptr, mu_ptr,
        K, KU, C, HW, NPB, N, NCOEF, NPIX,
        s_mb, s_mk, s_mc, s_mp, s_lb, s_lk, s_lp, s_lsb, s_lsp,
        s_vb, s_vk, s_vc, s_vp, s_vlb, s_vlk, s_vlp,
        s_xb, s_xc, s_xp, s_op,
        c1t, c2t, c3t, wsc, eps,
        SDE: tl.constexpr, WEIGHT: tl.constexpr, UNCOND: tl.constexpr, MEANCFG: tl.constexpr,
        PROB: tl.constexpr, ORDER2: tl.constexpr, POST: tl.constexpr, STATS: tl.constexpr,
        ONE_TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        NEED_MC: tl.constexpr, RW_A: tl.constexpr, MU_IN: tl.constexpr, AFFINE: tl.constexpr, INT64: tl.constexpr,
        PACK: tl.constexpr = False,
    ):  # fmt: skip
        """A sampler step for ``BLOCK_P`` pixels of batch row ``b``, all channels (see ``fused_step``);
        with ``PACK`` (point data, ``HW == 1``) for ``BLOCK_P`` batch rows, one per lane: ``b`` is
        a per-lane vector (``p = 0``), so are the per-sample coefficients, and the statistics
        modes write each lane's values as its sample's sums (``stat_ptr`` rows are samples).

        Per pixel: ``R`` is the x0-GM ``x - sigma u_k`` (std times ``sigma``); its moments
        ``m_c``, ``var``; the unconditional mean ``m_u`` (``UNCOND``); ``db = d - proj m_c`` with
        ``d = m_c - m_u``; the mean-CFG offset ``o = coef[1] db`` (``MEANCFG``) gives ``R'``;
        ``F`` is ``R'`` reweighted by ``N(g1, v1)`` (``PROB``), ``A`` the GM that moves the state:
        ``F`` at order 1, ``R'`` reweighted by ``N(gA, vA)`` at order 2. ``STATS`` 1 and 2 write
        per-program partial sums instead of a state; ``POST`` also writes the posterior mean of
        ``F`` at the new state (the next step's 2nd-order input).
        """
        pid = tl.program_id(0)
        if PACK:  # lane i holds batch row pid * BLOCK_P + i (NPIX = B rows of one pixel)
            q = pid * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = q < NPIX
            b = tl.minimum(q, NPIX - 1)  # lanes past the end alias the last row: the unmasked coef loads stay in bounds
            p = tl.zeros([BLOCK_P], tl.int32)
            srow = b  # statistics row: the lane's sample
        else:
            b = pid // NPB
            pb = pid % NPB
            p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = p < HW
            srow = pid  # statistics row: the program's partial sums
        c = tl.arange(0, BLOCK_C)
        kr = tl.arange(0, BLOCK_K)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
        cmask = c < C
        xmask = cmask[:, None] & pmask[None, :]
        x = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + p[None, :] * s_xp, mask=xmask, other=0.0).to(tl.float32)
        x_base = x
        sb = tl.load(sig_ptr).to(tl.float32)
        a0 = -sb
        if not AFFINE:  # an x0-GM given as such (the public gm_ode_substeps): means as loaded
            a0 = 1.0
        ls = tl.load(uls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)
        if AFFINE:
            ls = ls + tl.log(tl.maximum(sb, eps))  # x0 log-std, op 5
        s2 = tl.exp(tl.minimum(2.0 * ls, 80.0))
        cf = coef_ptr + b * NCOEF
        um_base = um_ptr + b * s_mb + c[None, :, None] * s_mc + p[None, None, :] * s_mp
        ul_base = ul_ptr + b * s_lb + p[None, :] * s_lp
        lu_base = vl_ptr + b * s_vlb + p[None, :] * s_vlp
        zero_v = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        zero_p = tl.zeros([BLOCK_P], tl.float32)
        mu_all = 0.0
        l_all = 0.0
        xb = x
        if not AFFINE:
            xb = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        if ONE_TILE:
            mu_all, l_all = _fs_load(um_base, ul_base, lu_base, 0, kr, K, s_mk, s_lk, s_vlk, xmask, pmask, xb, a0, wsc, WEIGHT)
        # moments of R (and R' = R + o: same spread, mean shifted by o)
        m_c = zero_v
        var = zero_p
        if NEED_MC:
            m_c, var = _fs_pass(mu_all, l_all, um_base, ul_base, lu_base, K, s_mk, s_lk, s_vlk, kr, xmask, pmask, xb, a0, wsc,
                                zero_p, zero_v, zero_p, zero_p, zero_v,
                                ONE_TILE, WEIGHT, False, False, STATS == 1, BLOCK_K, BLOCK_C, BLOCK_P)
        d = zero_v
        db = zero_v
        o_off = b * (C * HW) + c[:, None] * HW + p[None, :] * s_op
        if UNCOND:  # m_u: from the unconditional GM in the first launch, which keeps it for the others
            if MU_IN:
                m_u = tl.load(mu_ptr + o_off, mask=xmask, other=0.0)
            else:
                vm_base = vm_ptr + b * s_vb + c[None, :, None] * s_vc + p[None, None, :] * s_vp
                vl_base = vl_ptr + b * s_vlb + p[None, :] * s_vlp
                m_u, _ = _fs_pass(0.0, 0.0, vm_base, vl_base, vl_base, KU, s_vk, s_vlk, s_vlk, kr, xmask, pmask, x, a0, wsc,
                                  zero_p, zero_v, zero_p, zero_p, zero_v,
                                  False, False, False, False, False, BLOCK_K, BLOCK_C, BLOCK_P)
                tl.store(mu_ptr + o_off, m_u, mask=xmask)
            d = tl.where(xmask, m_c - m_u, 0.0)
            db = d - tl.load(cf + 0) * m_c
        if STATS == 1:
            var = var / C + s2  # per-pixel variance of op 2
            e = zero_v
            if ORDER2:
                prev = tl.load(prev_ptr + o_off, mask=xmask, other=0.0)
                e = tl.where(xmask, m_c + tl.load(cf + 1) * db - prev, 0.0)
            mc0 = tl.where(xmask, m_c, 0.0)
            sp = stat_ptr + srow * 8
            _stat_store(sp + 0, tl.where(pmask, var, 0.0), pmask, PACK)
            _stat_store(sp + 1, tl.sum(d * mc0, axis=0), pmask, PACK)
            _stat_store(sp + 2, tl.sum(mc0 * mc0, axis=0), pmask, PACK)
            _stat_store(sp + 3, tl.sum(d * d, axis=0), pmask, PACK)
            _stat_store(sp + 4, tl.sum(e * e, axis=0), pmask, PACK)
        else:
            if MEANCFG:
                o = tl.load(cf + 1) * db
                xb = x + o
                m_c = m_c + o
                if ONE_TILE:
                    mu_all = mu_all + o[None, :, :]
            # F = R' reweighted by N(g1, v1) under probabilistic guidance
            g1 = zero_v
            kap1 = zero_p
            al1 = zero_p + 1.0
            s2f = s2
            betF = zero_v
            if PROB:
                g1 = tl.load(cf + 6) * m_c + tl.load(cf + 7) * db
                v1 = tl.load(cf + 8)
                n1 = tl.maximum(v1 + s2, eps)
                kap1 = 0.5 / n1
                al1 = v1 / n1
                s2f = s2 * al1
                betF = (s2 / n1)[None, :] * g1
            mean_now = m_c
            e = zero_v
            if ORDER2:
                if PROB:
                    mw, _ = _fs_pass(mu_all, l_all, um_base, ul_base, lu_base, K, s_mk, s_lk, s_vlk, kr, xmask, pmask, xb, a0, wsc,
                                     kap1, -g1, zero_p, zero_p, zero_v,
                                     ONE_TILE, WEIGHT, True, False, False, BLOCK_K, BLOCK_C, BLOCK_P)
                    mean_now = al1[None, :] * mw + betF
                prev = tl.load(prev_ptr + o_off, mask=xmask, other=0.0)
                e = mean_now - prev
            if STATS == 2:  # exact power of the 2nd-order bias damp * e + cfg
                bt = tl.where(xmask, tl.load(cf + 9) * e + tl.load(cf + 10) * db, 0.0)
                _stat_store(stat_ptr + srow * 8 + 5, tl.sum(bt * bt, axis=0), pmask, PACK)
            else:
                # A: the GM that moves the state (RW_A: PROB or ORDER2)
                gA = g1
                kapA = kap1
                alA = al1
                s2A = s2f
                if ORDER2:
                    gA = m_c + tl.load(cf + 3) * db + tl.load(cf + 4) * e
                    vA = tl.load(cf + 5)
                    nA = tl.maximum(vA + s2, eps)
                    kapA = 0.5 / nA
                    alA = vA / nA
                    s2A = s2 * alA
                betA = zero_v
                if RW_A:
                    betA = (s2 * kapA * 2.0)[None, :] * gA  # s2 / n * g
                if SDE:
                    # component draw from A's weights: total, then the CDF walk
                    seed = tl.load(seed_ptr)
                    m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
                    tot = tl.zeros([BLOCK_P], tl.float32)
                    if ONE_TILE:
                        m_run, tot = _fs_total(_fs_logits_a(mu_all, l_all, gA, kapA, RW_A), m_run, tot)
                    else:  # the means only when A reweights them
                        for k0 in range(0, K, BLOCK_K):
                            mu, lg = _fs_load(um_base, ul_base, lu_base, k0, kr, K, s_mk, s_lk, s_vlk, xmask, pmask, xb, a0, wsc, WEIGHT, RW_A)
                            m_run, tot = _fs_total(_fs_logits_a(mu, lg, gA, kapA, RW_A), m_run, tot)
                    m_fin = tl.where(m_run == float("-inf"), 0.0, m_run)
                    target = tl.rand(seed, b * HW + p) * tot
                    cum = tl.zeros([BLOCK_P], tl.float32)
                    sel = tl.full([BLOCK_P], -1, tl.int32)
                    last = tl.zeros([BLOCK_P], tl.int32)
                    if ONE_TILE:
                        cum, sel, last = _fs_cdf(_fs_logits_a(mu_all, l_all, gA, kapA, RW_A), kr, K, m_fin, target, cum, sel, last)
                    else:
                        for k0 in range(0, K, BLOCK_K):
                            mu, lg = _fs_load(um_base, ul_base, lu_base, k0, kr, K, s_mk, s_lk, s_vlk, xmask, pmask, xb, a0, wsc, WEIGHT, RW_A)
                            cum, sel, last = _fs_cdf(_fs_logits_a(mu, lg, gA, kapA, RW_A), k0 + kr, K, m_fin, target, cum, sel, last)
                    sel = tl.where(sel < 0, last, sel)
                    if INT64:
                        sel_off = sel.to(tl.int64) * s_mk
                    else:
                        sel_off = sel * s_mk
                    u_sel = tl.load(um_ptr + b * s_mb + sel_off[None, :] + c[:, None] * s_mc + p[None, :] * s_mp, mask=xmask, other=0.0)
                    mu_sel = xb + a0 * u_sel.to(tl.float32)
                    if RW_A:
                        mu_sel = alA[None, :] * mu_sel + betA
                    # sqrt(c2^2 s2A + c3) as hi * sqrt(1 + (lo / hi)^2)
                    pa = tl.abs(c2t) * tl.sqrt(s2A)
                    qa = tl.sqrt(tl.maximum(c3t, 0.0)) + zero_p
                    hi = tl.maximum(pa, qa)
                    lo = tl.minimum(pa, qa)
                    ratio = tl.where(hi > 0, lo / tl.where(hi > 0, hi, 1.0), 0.0)
                    std = hi * tl.sqrt(1.0 + ratio * ratio)
                    z = _philox_randn(seed, NPIX + (b * C + c[:, None]) * HW + p[None, :])
                    x = c1t * x + c2t * mu_sel + std[None, :] * z
                else:
                    for j in range(N):
                        s_j = tl.load(sig_ptr + j).to(tl.float32)
                        s_n = tl.load(sig_ptr + j + 1).to(tl.float32)
                        gt, vt = _fs_transfer(sb, s_j, x, x_base, eps)
                        nt = tl.maximum(vt + s2A, eps)
                        first = j == 0  # substep 0: the plain mixture mean of A
                        kapt = tl.where(first, 0.0, 0.5 / nt)
                        mw, _ = _fs_pass(mu_all, l_all, um_base, ul_base, lu_base, K, s_mk, s_lk, s_vlk, kr, xmask, pmask, xb, a0, wsc,
                                         kapA, -gA, kapt, alA, betA - gt,
                                         ONE_TILE, WEIGHT, RW_A, True, False, BLOCK_K, BLOCK_C, BLOCK_P)
                        mA = alA[None, :] * mw + betA
                        # r_v = vt / (vt + s2A), r_s = s2A / (vt + s2A) as sigmoids (no inf / inf)
                        tt = tl.minimum(tl.maximum(tl.log(s2A) - tl.log(vt), -80.0), 80.0)
                        r_v = tl.where(first, 1.0, 1.0 / (1.0 + tl.exp(tt)))
                        r_s = tl.where(first, 0.0, 1.0 / (1.0 + tl.exp(-tt)))
                        x0 = r_v[None, :] * mA + r_s[None, :] * gt
                        x = x + (x - x0) * ((s_n - s_j) / tl.maximum(s_j, eps))
                tl.store(out_ptr + o_off, x.to(out_ptr.dtype.element_ty), mask=xmask)
                if POST:  # posterior mean of F at the new state, for the next step's 2nd-order rule;
                    # at 2nd order it overwrites ``prev`` in place: both accesses use the pointers
                    # ``o_off``, so every element is read and later written by the same thread
                    s_end = tl.load(sig_ptr + N).to(tl.float32)
                    gt, vt = _fs_transfer(sb, s_end, x, x_base, eps)
                    nt = tl.maximum(vt + s2f, eps)
                    mw, _ = _fs_pass(mu_all, l_all, um_base, ul_base, lu_base, K, s_mk, s_lk, s_vlk, kr, xmask, pmask, xb, a0, wsc,
                                     kap1, -g1, 0.5 / nt, al1, betF - gt,
                                     ONE_TILE, WEIGHT, PROB, True, False, BLOCK_K, BLOCK_C, BLOCK_P)
                    tt = tl.minimum(tl.maximum(tl.log(s2f) - tl.log(vt), -80.0), 80.0)
                    r_v = 1.0 / (1.0 + tl.exp(tt))
                    r_s = 1.0 / (1.0 + tl.exp(-tt))
                    post = r_v[None, :] * (al1[None, :] * mw + betF) + r_s[None, :] * gt
                    tl.store(post_ptr + o_off, post, mask=xmask)


if triton is not None:

    @triton.jit
    def _step_coef_kernel(
        stat_ptr, coef_ptr, B, NPB, HW, CHW,
        amount, scale, e_coef, inv_hp2, h_ratio, rho_min,
        MODE: tl.constexpr, UNCOND: tl.constexpr, MEANCFG: tl.constexpr, PROB: tl.constexpr, ORDER2: tl.constexpr,
        BIAS_PASS: tl.constexpr, NCOEF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """The fused step's per-sample coefficients from its statistics passes, in float64, for
        rows ``b < B``: the ``(B * NPB, 8)`` float32 partial sums of ``_fused_step_kernel``
        (``NPB`` programs a row) are summed and turned into the ``coef (B, NCOEF)`` entries that
        the next launch reads (``reference.solver_steps.step_coefficients`` is the twin; the
        formulas are those of ``fused_step``). ``MODE`` 1 follows the first statistics pass,
        ``MODE`` 2 the 2nd-order bias-power pass (``BIAS_PASS``). Host scalars: ``e_coef =
        scale^2 cb^2 (probabilistic) + ca``, ``inv_hp2 = 1 / h_prev^2``, ``h_ratio = 0.5 h / h_prev``."""
        b = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        bmask = b < B
        n = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float64)
        a_var = acc
        a_dm = acc
        a_mm = acc
        a_dd = acc
        a_p = acc
        p_col: tl.constexpr = 5 if MODE == 2 else 4
        USE_P: tl.constexpr = ORDER2 and not (MODE == 1 and BIAS_PASS)
        for j0 in tl.range(0, NPB, BLOCK_N):  # elementwise sums: one reduction after the loop
            j = j0 + n
            mask = bmask[:, None] & (j < NPB)[None, :]
            row = stat_ptr + (b[:, None] * NPB + j[None, :]) * 8
            a_var += tl.load(row + 0, mask=mask, other=0.0).to(tl.float64)
            a_dm += tl.load(row + 1, mask=mask, other=0.0).to(tl.float64)
            a_mm += tl.load(row + 2, mask=mask, other=0.0).to(tl.float64)
            a_dd += tl.load(row + 3, mask=mask, other=0.0).to(tl.float64)
            if USE_P:
                a_p += tl.load(row + p_col, mask=mask, other=0.0).to(tl.float64)
        s_var = tl.sum(a_var, axis=1)
        s_dm = tl.sum(a_dm, axis=1)
        s_mm = tl.sum(a_mm, axis=1)
        s_dd = tl.sum(a_dd, axis=1)
        s_p = tl.sum(a_p, axis=1)
        zero = s_var * 0.0
        one = zero + 1.0
        floor = zero + 1e-6  # float64 constants: a literal would be float32
        V = s_var / (zero + HW)  # scalars widened by a float64 tensor (an int argument of 1 is a constexpr)
        chw = zero + CHW
        dm = s_dm / chw
        mm = s_mm / chw
        dd = s_dd / chw
        sc = zero + scale
        proj = (zero + amount) * dm / tl.maximum(mm, floor)
        pg = tl.maximum(dd - 2.0 * proj * dm + proj * proj * mm, zero)  # <db, db>, db = d - proj m_c
        alpha = zero
        cf = coef_ptr + b * NCOEF
        if PROB:
            alpha = sc * tl.sqrt(V / tl.maximum(pg, floor))
        if MODE == 1:
            if UNCOND:
                tl.store(cf + 0, proj.to(tl.float32), mask=bmask)
            if MEANCFG:
                tl.store(cf + 1, (sc - one).to(tl.float32), mask=bmask)
            if PROB:
                vt = V * (one - sc * sc)  # op 4: target / cond
                n4 = tl.maximum(V - vt, floor)
                tl.store(cf + 6, ((V - vt) / n4).to(tl.float32), mask=bmask)
                tl.store(cf + 7, (V * alpha / n4).to(tl.float32), mask=bmask)
                tl.store(cf + 8, (vt * V / n4).to(tl.float32), mask=bmask)
        if ORDER2:
            E = V * (zero + e_coef)
            damp = tl.sqrt(tl.maximum(one - E * (zero + inv_hp2), zero)) * (zero + h_ratio)
            if MODE == 1 and BIAS_PASS:  # the bias power needs these first: its own pass, then MODE 2
                tl.store(cf + 9, damp.to(tl.float32), mask=bmask)
                tl.store(cf + 10, alpha.to(tl.float32), mask=bmask)
            else:
                P = s_p / chw
                if MODE == 1:
                    P = damp * damp * P
                cap = tl.sqrt(tl.minimum(V / tl.maximum(P, floor), one))
                rmin = zero + rho_min
                rho = tl.minimum(tl.maximum(P / tl.maximum(V, floor), rmin), one - rmin)
                tl.store(cf + 3, (cap * alpha / rho).to(tl.float32), mask=bmask)
                tl.store(cf + 4, (cap * damp / rho).to(tl.float32), mask=bmask)
                tl.store(cf + 5, (V * (one - rho) / rho).to(tl.float32), mask=bmask)


#: Point data packs its rows into the fused step's lanes only where the compiler keeps the lanes on
#: them: the packed tiles have no contiguous axis, and triton 3.6's coalescing then puts the lanes
#: along K (cross-thread reductions, 2-3 KB of spills at sm_80/sm_90 for K = 64, C = 2), where
#: triton 3.9 keeps one row per thread (0 spills). Below 3.9 the fused step runs one row per program.
_PACK_FUSED = triton is not None and not THREADS_ALONG_K


def _flat_gm(means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor):
    """``(B, K, C, HW)`` means, ``(B, K, HW)`` log-weights, ``(B, 1|HW)`` log-stds (views when
    the strides allow) and the log-std strides (pixel stride 0 for a per-sample std)."""
    *_, K, C, H, W = means.shape
    m = means.reshape(-1, K, C, H * W)
    lw = logweights.reshape(-1, K, H * W)
    ls = logstds.reshape(-1, logstds.shape[-2] * logstds.shape[-1])
    return m, lw, ls, ls.stride(0), (ls.stride(1) if ls.shape[1] > 1 else 0)


@launch_plan
def ode_path(K: int, C: int, HW: int) -> str:
    """How ``gm_ode_substeps`` keeps a pixel's GM across the substeps: ``"registers"`` (one
    thread's registers, ``_fused_blocks``' one-tile case), ``"wide"`` (loaded once, spread over
    the program's threads: ``_launch_ode_wide``, for GMs up to 1024 ``K x C`` elements after
    rounding each up to a power of two, more than one pixel per sample) or
    ``"streamed"`` (K tiles re-read from L1/L2 at every substep: DRAM still reads the GM once
    per step)."""
    if _fused_blocks(K, C, HW)[3]:
        return "registers"
    if HW > 1 and rollout_blocks(K, C, HW) is not None:
        return "wide"
    return "streamed"


def _ode_args(means, logweights, logstds, x, sig, out):
    """``_fused_step_kernel``'s arguments for ``gm_ode_substeps`` (plain first-order GM-ODE on an
    x0-GM): the views ``(means, logweights, logstds, x, sigmas, out)`` (the launcher places
    them in the kernel's tensor slots), grid, integer arguments and options (``planned_args``)."""
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = _flat_gm(means, logstds, logweights)
    B = m.shape[0]
    xf, of = x.reshape(B, C, HW), out.view(B, C, HW)
    pack = _PACK_FUSED and HW == 1 and B > 1  # point data: the batch rows fill the pixel lanes
    bk, bc, bp, one, warps = _fused_blocks(K, C, B if pack else HW)
    npb = cdiv(HW, bp)
    ints = (K, K, C, HW, npb, sig.numel() - 1, 0, B * HW,
            *m.stride(), *lw.stride(), s_lsb, s_lsp, *m.stride(), *lw.stride(), *xf.stride(), 1)  # fmt: skip
    options = dict(SDE=False, WEIGHT=False, UNCOND=False, MEANCFG=False, PROB=False, ORDER2=False, POST=False, STATS=0,
                   ONE_TILE=one, BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, NEED_MC=False, RW_A=False, MU_IN=True,
                   AFFINE=False, INT64=needs_int64(m, lw, xf, of), PACK=pack, num_warps=warps)  # fmt: skip
    return (m, lw, ls, xf, sig, of), (cdiv(B, bp) if pack else B * npb,), ints, options


_ODE_PLANS = PlanCache()
_SDE_PLANS = PlanCache()


def _launch_ode(means, logstds, logweights, x, sigmas, eps):
    """``gm_ode_substeps`` on an x0-GM: ``_fused_step_kernel`` with the means taken as loaded
    (``AFFINE=False``), no guidance, first order; GMs past one thread's registers but within
    ``rollout_blocks`` take ``_launch_ode_wide``. The fused kernel's launch plan is stored per
    shape (``planned_args``)."""
    *_, K, C, H, W = means.shape
    out = torch.empty(*x.shape, device=x.device, dtype=x.dtype)
    sig = sigmas.to(torch.float32).contiguous()
    if ode_path(K, C, H * W) == "wide":
        m, lw, ls, _, s_lsp = _flat_gm(means, logstds, logweights)
        xf = x.reshape(m.shape[0], C, H * W)
        return _launch_ode_wide(m, lw, ls, s_lsp, xf, sig, out.view(xf.shape), eps, rollout_blocks(K, C, H * W)).view(x.shape)
    tensors, grid, ints, options = planned_args(_ODE_PLANS, _ode_args, (means, logweights, logstds, x, sig, out), n_key=5)
    m, lw, ls, xf, sig, of = tensors
    _fused_step_kernel[grid](m, lw, ls, m, lw, xf, xf, sig, sig, sig, of, of, sig, sig, *ints, 0.0, 0.0, 0.0, 1.0, eps, **options)
    return out


def _launch_ode_wide(m, lw, ls, s_lsp, xf, sig, out, eps, blocks, affine=False):
    """The GM-ODE substeps of a GM too large for one thread's registers (``K * C`` above
    ``_REG_TILE``) but within ``policy.rollout_blocks``' one-tile bound: the pi-Flow rollout
    kernel from ``(xf, sig[0])`` along the shared ``sig``, on an x0-GM (``gm_ode_substeps``) or,
    ``affine``, on the network's u-GM (the sampler's plain step: the kernel applies op 5 as it
    loads); per-pixel variance when ``s_lsp``. Each pixel's GM is loaded once and kept in
    registers spread over the program's threads (Triton's layout, with cross-thread reductions)
    for all N substeps."""
    B, K, C, HW = m.shape
    bk, bc, bp, warps = blocks
    var = torch.exp(2.0 * (ls if s_lsp else ls[:, :1]).to(torch.float32))  # (B, HW | 1) variance
    if affine:
        var = var * sig[:1].square()  # x0 stds are the u stds times sigma (a device op: no host read)
    npb = cdiv(HW, bp)
    _policy_rollout_kernel[(B * npb,)](
        m, lw, xf, xf, var, sig, sig, out, out, K, C, HW, sig.numel() - 1, 1, npb,
        *m.stride(), *lw.stride(), *xf.stride(), *xf.stride(), 0, var.stride(0), 0, eps,
        BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, ONE_TILE=True, SAVE=False, X0=not affine, PIXEL_VAR=bool(s_lsp),
        INT64=needs_int64(m, lw, xf, out), num_warps=warps,
    )
    return out


def _sde_args(means, logweights, logstds, x, u, z, seed, out, given: bool):
    """``_gm_sde_step_kernel``'s views (in its order; ``u`` and ``z`` stand for ``x`` when the
    kernel draws its own noise), grid, integer arguments and options (``planned_args``)."""
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = _flat_gm(means, logstds, logweights)
    B = m.shape[0]
    xf, of = x.reshape(B, C, HW), out.view(B, C, HW)
    uf = u.reshape(B, HW) if given else xf
    zf = z.reshape(B, C, HW) if given else xf
    pack = HW == 1 and B > 1  # point data: the batch elements fill the pixel lanes
    bk, bc, bp = _sde_blocks(K, C, B if pack else HW)
    grid = (cdiv(B, bp) if pack else B * cdiv(HW, bp),)
    ints = (K, C, HW, B * HW, *m.stride(), *lw.stride(), s_lsb, s_lsp, *xf.stride(),
            uf.stride(0), uf.stride(-1), zf.stride(0), zf.stride(1), zf.stride(2))  # fmt: skip
    options = dict(BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, GIVEN_NOISE=given,
                   INT64=needs_int64(m, lw, xf, of) or B * HW * (C + 1) >= I32_MAX, PACK=pack, num_warps=4)  # fmt: skip
    return (m, lw, ls, xf, uf, zf, seed, of), grid, ints, options


def _launch_sde(means, logstds, logweights, x, seed, u, z, c1, c2, c3, power):
    """Run ``_gm_sde_step_kernel`` (noise ``u (*B, 1, H, W)``, ``z`` like ``x`` when given, else
    Philox from ``seed``); the launch plan is stored per shape (``planned_args``)."""
    out = torch.empty(*x.shape, device=x.device, dtype=x.dtype)
    given = u is not None
    tensors = (means, logweights, logstds, x, u if given else x, z if given else x, seed if seed is not None else x, out)
    tensors, grid, ints, options = planned_args(_SDE_PLANS, _sde_args, tensors, given, n_key=7)
    # the kernel's float32 scalars, rounded here as a GPU launch rounds them (the interpreter keeps
    # float64, and a c3 far below float32's range then meets bf16 math as a NaN)
    _gm_sde_step_kernel[grid](*tensors, *ints, _f32(c1), _f32(c2), _f32(c3), power, **options)
    return out


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
    z = torch.randn(pixel_shape(s), generator=generator, device=s.device)
    return run_reference(ref.gm_sde_step, gm, x, sigma, sigma_next, u, z, power, eps, out_dtype=x.dtype)


# ----------------------------------------------------------------------------- fused sampler step

_NCOEF = 11  # per-sample coefficients of ``_fused_step_kernel`` (see ``fused_step``)
_NSTAT = 8  # per-program partial sums of its statistics modes
# Coefficients of the 2nd-order error estimate E = V * (scale^2 * cb^2 + ca) (docs/solvers.md).
CA, CB = 0.005, 1.0
# Floor of the relative variance reduction of a Gaussian reweighting (schedulers._reweight).
RHO_MIN = 1e-6




def _step_args(means, logweights, logstds, u_means, u_logweights, x, sde: bool, heavy: bool, one_ok: bool, n_sigmas: int):
    """``_fused_step_kernel``'s views of the conditional GM, the unconditional one (the same GM
    when there is none) and the state, grid, integer arguments and the options that follow from
    the shapes (``planned_args``): blocks, one-tile mode (``one_ok``: the variant may keep the GM
    in one thread), packing, int64."""
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = _flat_gm(means, logstds, logweights)
    KU = u_means.shape[-4]
    vm, vl = u_means.reshape(-1, KU, C, HW), u_logweights.reshape(-1, KU, HW)
    B = m.shape[0]
    xf = x.reshape(B, C, HW)
    pack = _PACK_FUSED and HW == 1 and B > 1  # point data: the batch rows fill the pixel lanes, one statistics row each
    bk, bc, bp, one, warps = _fused_blocks(K, C, B if pack else HW, sde, heavy=heavy)
    npb = 1 if pack else cdiv(HW, bp)
    ints = (K, KU, C, HW, npb, n_sigmas - 1, _NCOEF, B * HW,
            *m.stride(), *lw.stride(), s_lsb, s_lsp, *vm.stride(), *vl.stride(), *xf.stride(), 1)  # fmt: skip
    int64 = needs_int64(m, lw, vm, vl, xf) or B * HW * (C + 1) >= I32_MAX
    options = dict(ONE_TILE=one and one_ok, BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, INT64=int64, PACK=pack, num_warps=warps)
    return (m, lw, ls, vm, vl, xf), (cdiv(B, bp) if pack else B * npb,), ints, options


_STEP_PLANS = PlanCache()


def _launch_step_coefficients(
    stats: torch.Tensor, coef: torch.Tensor, npb: int, HW: int, C: int, mode: int, *, uncond: bool, meancfg: bool,
    prob: bool, order2: bool, bias_pass: bool, amount: float, scale: float, h: float, h_prev: float,
) -> None:  # fmt: skip
    """Run ``_step_coef_kernel``: ``coef (B, _NCOEF)`` from the statistics partials ``stats
    (B * npb, _NSTAT)`` after pass ``mode`` (arguments as ``reference.solver_steps.step_coefficients``)."""
    B = coef.shape[0]
    block_r = min(next_pow2(B), 64)
    block_n = min(next_pow2(npb), max(1, 256 // block_r))  # float64 sums of 5 columns: 2 per thread
    _step_coef_kernel[(cdiv(B, block_r),)](
        stats, coef, B, npb, HW, C * HW, amount, scale, ((scale * scale * CB * CB) if prob else 0.0) + CA,
        1.0 / (h_prev * h_prev) if order2 else 0.0, 0.5 * h / h_prev if order2 else 0.0, RHO_MIN,
        MODE=mode, UNCOND=uncond, MEANCFG=meancfg, PROB=prob, ORDER2=order2, BIAS_PASS=bias_pass,
        NCOEF=_NCOEF, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
    )


def fused_step(
    gm_u, x: torch.Tensor, sigmas: torch.Tensor, levels: tuple[float, float], *, sde: bool, guidance: str = "none", scale: float = 0.0,
    orthogonal: float = 0.0, prev_mean: torch.Tensor | None = None, h: float = 0.0, h_prev: float = 0.0,
    post: bool = False, generator: torch.Generator | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One whole sampler step on the network's u-GM, with no GM-sized temporary (the schedulers'
    Triton path; the eager composition of ops 5, 11, the 2nd-order rule of docs/solvers.md#2nd-order and
    ``gm_ode_substeps`` / ``gm_sde_step`` is its reference, ``schedulers._GMSchedulerBase._x0_gm``).

    Every GM of the step is the network's GM in its own dtype seen through per-sample
    coefficients and per-pixel means that the kernel forms as it loads: ``x0_k = x - sigma u_k``
    (std times ``sigma``); mean-CFG shifts every mean by ``(scale - 1)(d - proj m_c)``; weight
    guidance combines the log-weights; probabilistic guidance and the 2nd-order correction are
    Gaussian reweightings ``N(g, v)`` whose centre ``g`` is a per-pixel combination of ``m_c``,
    ``d = m_c - m_u``, and ``mean_now - prev_mean``. Statistics launches of the same kernel
    (``STATS=1``: variance, ``<d, m_c>``, ``<m_c, m_c>``, ``<d, d>``, ``<e, e>``; ``STATS=2``: the
    exact power of the 2nd-order bias when it depends on the first pass) give the per-sample
    scalars as ``(B, programs, 8)`` partials, which ``_step_coef_kernel`` sums in float64 and turns
    into the next launch's coefficients (one launch, no host read, no torch op in between). The first
    launch also keeps ``m_u`` (``(*B, C, H, W)`` float32), so the unconditional GM is read once.

    Args:
        gm_u: u-GM ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1|H, 1|W), logweights}`` or the
            pair ``(gm_cond, gm_uncond)`` when ``scale > 0``.
        x: ``(*B, C, H, W)`` state at ``sigmas[0]``.
        sigmas: 1-D float32 device tensor, the ``N + 1`` levels of the step (``N = 1`` for SDE).
        levels: ``(sigmas[0], sigmas[N])`` as Python floats (the SDE's transition constants).
        sde: GM-SDE draw (Philox seeded from ``generator`` as ``gm_sde_step``) instead of
            ``N`` GM-ODE substeps.
        guidance: ``"none"``, ``"probabilistic"``, ``"weight"`` or ``"mean-cfg"``.
        prev_mean: ``(*B, C, H, W)`` float32, the previous step's first-order GM's posterior
            mean at ``(x, sigmas[0])``: turns on the 2nd-order rule with step sizes ``h``, ``h_prev``.
        post: also return that posterior mean at the new state for the next step (written into
            ``prev_mean``'s storage when given: the scheduler's own buffer, read before it is
            overwritten).
    Returns:
        ``(x_next (*B, C, H, W) in x's dtype, post_mean (*B, C, H, W) float32 or None)``.
    """
    paired = isinstance(gm_u, (tuple, list))
    cond = gm_u[0] if paired else gm_u
    uncond = gm_u[1] if paired else cond
    if scale == 0:
        guidance = "none"
    prob, weight, meancfg = guidance == "probabilistic", guidance == "weight", guidance == "mean-cfg"
    has_uncond = prob or meancfg
    order2 = prev_mean is not None
    *_, K, C, H, W = cond["means"].shape
    HW = H * W
    KU = uncond["means"].shape[-4]
    if weight and KU != K:
        raise ValueError(f"weight guidance needs matching K: gm_cond has K={K}, gm_uncond has K={KU}")
    if not (sde or has_uncond or weight or order2 or post) and ode_path(K, C, HW) == "wide":
        m, lw, ls, _, s_lsp = _flat_gm(cond["means"], cond["logstds"], cond["logweights"])
        xf = x.reshape(m.shape[0], C, HW)
        out = torch.empty(*xf.shape, device=x.device, dtype=x.dtype)
        return _launch_ode_wide(m, lw, ls, s_lsp, xf, sigmas, out, eps, rollout_blocks(K, C, HW), affine=True).view(x.shape), None
    heavy = has_uncond or order2
    tensors = (cond["means"], cond["logweights"], cond["logstds"], uncond["means"], uncond["logweights"], x)
    (m, lw, ls, vm, vl, xf), grid, ints, options = planned_args(
        _STEP_PLANS, _step_args, tensors, sde, heavy, not sde or heavy or prob, sigmas.numel()
    )
    B = math.prod(x.shape[:-3])
    npb = 1 if options["PACK"] else cdiv(HW, options["BLOCK_P"])  # programs (statistics rows) per batch row
    dev = x.device
    # per-sample coefficients and statistics only for the steps that read them (a plain step's
    # kernel reads neither: the float32 schedule stands in for the unused pointers)
    coef = torch.zeros(B, _NCOEF, dtype=torch.float32, device=dev) if heavy else sigmas
    stats = torch.empty(B * npb, _NSTAT, dtype=torch.float32, device=dev) if heavy else coef
    m_u = torch.empty(*x.shape, dtype=torch.float32, device=dev) if has_uncond else coef
    # the kernel addresses the memory, the outputs and m_u as contiguous (B, C, HW)
    prev = (prev_mean if prev_mean.is_contiguous() else prev_mean.contiguous()) if order2 else x
    out = torch.empty(*x.shape, device=dev, dtype=x.dtype)
    # the new posterior mean overwrites the previous one in place (see the kernel's POST store)
    postbuf = (prev if order2 else torch.empty(*x.shape, device=dev, dtype=torch.float32)) if post else out
    seed = coef
    c1 = c2 = c3 = 0.0
    if sde:
        gen_device = dev if generator is None else generator.device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).to(dev)
        c1, c2, c3 = (_f32(v) for v in transition_coefficients(levels[0], levels[1], eps))
    amount = (orthogonal if prob else (1.0 if orthogonal > 0 else 0.0)) if has_uncond else 0.0
    # the 2nd-order bias power from its own pass (it depends on the first pass's scalars): the
    # first pass then needs no 2nd-order memory
    bias_pass = order2 and (prob or (meancfg and amount > 0))

    def launch(mode: int) -> None:
        _fused_step_kernel[grid](
            m, lw, ls, vm, vl, xf, prev, coef, sigmas, seed, out, postbuf, stats, m_u, *ints, c1, c2, c3, float(scale), eps,
            SDE=sde, WEIGHT=weight, UNCOND=has_uncond, MEANCFG=meancfg, PROB=prob, ORDER2=order2 and not (mode == 1 and bias_pass),
            POST=post and mode == 0, STATS=mode, NEED_MC=heavy or mode > 0, RW_A=prob or order2, MU_IN=mode != 1, AFFINE=True,
            **options,
        )

    if has_uncond or order2:
        if meancfg and amount == 0:
            coef[:, 1] = scale - 1
        kw = dict(uncond=has_uncond, meancfg=meancfg, prob=prob, order2=order2, bias_pass=bias_pass, amount=amount,
                  scale=float(scale), h=h, h_prev=h_prev)  # fmt: skip
        launch(1)
        _launch_step_coefficients(stats, coef, npb, HW, C, 1, **kw)  # one launch, no torch op between the passes
        if bias_pass:
            launch(2)
            _launch_step_coefficients(stats, coef, npb, HW, C, 2, **kw)
    launch(0)
    return out, (postbuf if post else None)
