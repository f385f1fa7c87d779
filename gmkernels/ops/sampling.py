"""Ancestral GM sampling (docs/ops.md#gm_sample): ``gm_sample``.

Kernel ``_gm_sample_kernel``: one program owns ``BLOCK_P`` pixels of one sample row ``(r, n)``
(layout ``means (R, K, C, P)``, ``logweights (R, K, P)``, ``out (R, N, C, P)``). The component
is drawn by inverting the categorical CDF of ``softmax(power * logweights)`` at one uniform per
pixel (Triton's Philox, ``tl.rand``), as the torch reference does: two passes over the
log-weights (max and total, then the cumulative sum up to ``u * total``), no random number per
component; dead components (``-inf``) carry no weight and are never drawn. Only the chosen
component's means are read, per channel tile, and ``exp(logstds) * z`` is added. Two Philox seeds are drawn with ``torch.randint`` from the
caller's ``torch.Generator``, so a seeded generator reproduces the samples on one backend; the
Triton and torch backends draw different (equally distributed) numbers.
"""

from __future__ import annotations

import math

import torch

import reference.sampling as ref

from .._dispatch import run_reference
from .._validate import check_count, check_generator, check_gm, check_power
from ._launch import (
    LOG2E,
    PlanCache,
    cdiv,
    kernels_wanted,
    needs_int64,
    next_pow2,
    per_row,
    pixel_rows,
    planned_args,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None


def sample_blocks(K: int, C: int, P: int, programs_per_pblock: int) -> tuple[int, int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, num_warps)``: up to 128 pixels per program, halved down to
    32 while the grid has fewer than 1024 programs; ``BLOCK_K * BLOCK_P <= 1024`` (one
    log-weight tile and its cumulative weights in registers; 2048 spills) and up to 16 channels
    per store tile."""
    block_p = min(next_pow2(P), 128)
    while block_p > 32 and programs_per_pblock * cdiv(P, block_p) < 1024:
        block_p //= 2
    block_k = max(1, min(next_pow2(K), 1024 // block_p))
    return block_k, min(next_pow2(C), 16), block_p, 4


if triton is not None:

    @triton.jit
    def philox_normal(seed, ctr):
        """Standard normals from Philox by Box-Muller, ``sqrt(-2 log u1) * cos(2 pi u2)``, with the
        cosine as polynomials on ``[-pi/4, pi/4]`` after an exact quadrant split of ``u2`` (the
        libdevice ``cos`` keeps a large-argument reduction path that needs a local-memory table)."""
        r1, r2, _, _ = tl.randint4x(seed, ctr)
        u1 = tl.maximum(tl.uint_to_uniform_float(r1), 1.0e-30)
        t = 4.0 * tl.uint_to_uniform_float(r2)  # 2 pi u2 = (pi / 2) * t
        q = tl.floor(t + 0.5)
        phi = (t - q) * 1.5707963267948966  # in [-pi/4, pi/4]
        p2 = phi * phi
        sin_p = phi * (1.0 + p2 * (-1.0 / 6 + p2 * (1.0 / 120 + p2 * (-1.0 / 5040 + p2 * (1.0 / 362880)))))
        cos_p = 1.0 + p2 * (-0.5 + p2 * (1.0 / 24 + p2 * (-1.0 / 720 + p2 * (1.0 / 40320 - p2 * (1.0 / 3628800)))))
        quad = q.to(tl.int32) % 4  # cos(q pi/2 + phi): cos, -sin, -cos, sin
        cos_t = tl.where(quad == 0, cos_p, tl.where(quad == 1, -sin_p, tl.where(quad == 2, -cos_p, sin_p)))
        return tl.sqrt(-2.0 * tl.log(u1)) * cos_t

    @triton.jit
    def _gm_sample_kernel(
        means_ptr,
        lw_ptr,
        logstds_ptr,
        seeds_ptr,
        out_ptr,
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
        s_or,
        s_on,
        s_oc,
        s_op,
        power_log2e,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
    ):
        """``out (R, N, C, P) = mu_k + exp(logstds) * z`` with ``k ~ softmax(power * logweights)``
        per pixel and sample, drawn by inverting the categorical CDF at one uniform ``u`` per
        pixel and sample: pass 1 over the K tiles finds the running max ``m`` and the total
        ``S = sum_k 2^(l_k - m)``; pass 2 takes the first ``k`` whose cumulative weight exceeds
        ``u * S`` (the last live component if rounding leaves none; component 0 for a pixel with
        no live component). Philox offsets: ``rn * P + p`` for ``u`` (seed 0) and
        ``(rn * C + c) * P + p`` for ``z`` (seed 1), ``rn = r * N + n``.
        Grid: ``R * N * n_pblocks``, pixel block fastest."""
        pid = tl.program_id(0)
        pb = pid % n_pblocks
        rn = pid // n_pblocks
        row = rn // N
        n = rn % N
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        ar_k = tl.arange(0, BLOCK_K)
        ar_c = tl.arange(0, BLOCK_C)
        # Philox counters are 64-bit always (R * N * C * P can pass 2**31 with a small tensor)
        rn64 = rn.to(tl.int64)
        offs_p64 = offs_p.to(tl.int64)
        if INT64:
            row = row.to(tl.int64)
            n = n.to(tl.int64)
            offs_p = offs_p64
            ar_k = ar_k.to(tl.int64)
            ar_c = ar_c.to(tl.int64)
        mask_p = offs_p < P
        seed_u = tl.load(seeds_ptr)
        seed_z = tl.load(seeds_ptr + 1)
        l_base = lw_ptr + row * s_lr + offs_p[None, :] * s_lp
        # pass 1: max and total weight (online), and the last live component
        m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
        last = tl.zeros([BLOCK_P], dtype=ar_k.dtype)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + ar_k
            lw = tl.load(
                l_base + offs_k[:, None] * s_lk, mask=(offs_k < K)[:, None] & mask_p[None, :], other=float("-inf")
            )
            dead = lw == float("-inf")
            logit2 = tl.where(dead, float("-inf"), tl.where(dead, 0.0, lw.to(tl.float32)) * power_log2e)  # no -inf * 0
            m_new = tl.maximum(m, tl.max(logit2, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp2(m - m_ref) + tl.sum(tl.exp2(logit2 - m_ref[None, :]), axis=0)
            m = m_new
            last = tl.maximum(last, tl.max(tl.where(dead, 0, offs_k[:, None]), axis=0))
        # pass 2: the first component whose cumulative weight exceeds u * total
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        target = tl.rand(seed_u, rn64 * P + offs_p64) * total
        below = tl.zeros([BLOCK_P], dtype=tl.float32)
        idx = last
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + ar_k
            lw = tl.load(
                l_base + offs_k[:, None] * s_lk, mask=(offs_k < K)[:, None] & mask_p[None, :], other=float("-inf")
            )
            dead = lw == float("-inf")
            logit2 = tl.where(dead, float("-inf"), tl.where(dead, 0.0, lw.to(tl.float32)) * power_log2e)
            w = tl.exp2(logit2 - m_ref[None, :])
            cum = below[None, :] + tl.cumsum(w, axis=0)
            idx = tl.minimum(idx, tl.min(tl.where(cum > target[None, :], offs_k[:, None], K), axis=0))
            below += tl.sum(w, axis=0)
        std = tl.exp(tl.load(logstds_ptr + row * s_sr + offs_p * s_sp, mask=mask_p, other=0.0).to(tl.float32))
        mu_base = means_ptr + row * s_mr + idx[None, :] * s_mk + offs_p[None, :] * s_mp
        o_base = out_ptr + row * s_or + n * s_on + offs_p[None, :] * s_op
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            mask = (offs_c < C)[:, None] & mask_p[None, :]
            mu = tl.load(mu_base + offs_c[:, None] * s_mc, mask=mask, other=0.0).to(tl.float32)
            ctr = (rn64 * C + offs_c[:, None].to(tl.int64)) * P + offs_p64[None, :]
            x = mu + std[None, :] * philox_normal(seed_z, ctr)
            tl.store(o_base + offs_c[:, None] * s_oc, x.to(out_ptr.dtype.element_ty), mask=mask)


def _sample_args(
    means: torch.Tensor, logweights: torch.Tensor, logstds: torch.Tensor, seeds: torch.Tensor, out: torch.Tensor
) -> tuple:
    """The kernel's views (in the order of the arguments), grid, integer arguments and options."""
    *batch, K, C, H, W = means.shape
    n_samples = out.shape[-4]
    R, P = math.prod(batch), H * W
    m4, l3, s2, o4 = pixel_rows(
        means.reshape(R, K, C, P), logweights.reshape(R, K, P), per_row(logstds, R, P), out.view(R, n_samples, C, P)
    )
    R, P = m4.shape[0], m4.shape[-1]
    block_k, block_c, block_p, warps = sample_blocks(K, C, P, R * n_samples)
    n_pblocks = cdiv(P, block_p)
    ints = (K, C, P, n_samples, n_pblocks, *m4.stride(), *l3.stride(), *s2.stride(), *o4.stride())
    options = dict(BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_P=block_p, INT64=needs_int64(m4, l3, o4), num_warps=warps)
    return (m4, l3, s2, seeds, o4), (R * n_samples * n_pblocks,), ints, options


_PLANS = PlanCache()


def _launch_sample(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    seeds: torch.Tensor,
    n_samples: int,
    power: float,
) -> torch.Tensor:
    """Run ``_gm_sample_kernel``: ``(*B, N, C, H, W)`` in the dtype of ``means``. The launch
    plan is stored per shape (``planned_args``)."""
    *batch, K, C, H, W = means.shape
    out = torch.empty(*batch, n_samples, C, H, W, dtype=means.dtype, device=means.device)
    if out.numel() == 0:
        return out
    tensors, grid, ints, options = planned_args(_PLANS, _sample_args, (means, logweights, logstds, seeds, out))
    _gm_sample_kernel[grid](*tensors, *ints, power * LOG2E, **options)
    return out


if triton is not None:

    @torch.library.custom_op("gmkernels::gm_sample", mutates_args=())
    def _gm_sample_op(
        means: torch.Tensor,
        logstds: torch.Tensor,
        logweights: torch.Tensor,
        seeds: torch.Tensor,
        n_samples: int,
        power: float,
    ) -> torch.Tensor:
        """``seeds``: int64 ``(2,)`` Philox seeds on the device of ``means``."""
        return _launch_sample(means, logstds, logweights, seeds, n_samples, power)

    @_gm_sample_op.register_fake
    def _(means, logstds, logweights, seeds, n_samples, power):
        return means.new_empty((*means.shape[:-4], n_samples, *means.shape[-3:]))


def gm_sample(
    gm: dict, n_samples: int = 1, power: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n_samples`` independent draws per pixel: component ``k ~ softmax(power * logweights)``
    (dead components never drawn, for any power), then ``mu_k + exp(logstds) * z``, ``z ~ N(0, I)``.

    Args:
        gm: ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1), logweights (*B, K, 1, H, W)}``.
        n_samples: ``N >= 1``.
        power: weight temperature, >= 0.
        generator: source of randomness (on the Triton path: of two Philox seeds); the same
            seed reproduces the samples on the same backend.
    Returns:
        ``(*B, N, C, H, W)`` in the dtype of ``means``.
    """
    s = check_gm(gm)
    n_samples = check_count(n_samples, "n_samples", 1)
    power = check_power(power, "power")
    generator = check_generator(generator)
    if not kernels_wanted(gm["means"], gm["logstds"], gm["logweights"]):
        return run_reference(ref.gm_sample, gm, n_samples, power, generator, out_dtype=s.dtype)
    gen_device = generator.device if generator is not None else s.device
    seeds = torch.randint(0, 2**62, (2,), generator=generator, device=gen_device).to(s.device)
    return _gm_sample_op(gm["means"], gm["logstds"], gm["logweights"], seeds, n_samples, power)
