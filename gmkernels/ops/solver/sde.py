"""``gm_sde_step`` (docs/solvers.md#fused-steps): one exact GM-SDE step in one kernel, which
draws the component and the Gaussian noise (Triton's Philox, seeded from the caller's
``torch.Generator``) and applies the reverse transition (op 7). The state keeps its dtype;
arithmetic is fp32.
"""

from __future__ import annotations

import struct

import torch

import reference.solver_steps as ref
from reference.transition import transition_coefficients

from ..._dispatch import run_reference
from ..._validate import check_generator, check_gm, check_power, check_sigma, check_state, pixel_shape
from .._launch import I32_MAX, PlanCache, cdiv, kernels_wanted, needs_int64, next_pow2, planned_args
from .common import flat_gm

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

_SDE_TILE = 512  # elements of the SDE kernel's (K, pixels) and (C, pixels) tiles

if triton is not None:
    from .common import philox_randn

    @triton.jit
    def _gm_sde_step_kernel(
        means_ptr,
        lw_ptr,
        ls_ptr,
        x_ptr,
        u_ptr,
        z_ptr,
        seed_ptr,
        out_ptr,
        K,
        C,
        HW,
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
        s_ub,
        s_up,
        s_zb,
        s_zc,
        s_zp,
        c1,
        c2,
        c3,
        power,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        GIVEN_NOISE: tl.constexpr,
        INT64: tl.constexpr,
        PACK: tl.constexpr = False,
    ):
        """One exact GM-SDE draw for the ``BLOCK_P`` pixels ``p`` of batch element ``b``, or with
        ``PACK`` (point data, ``HW == 1``) for ``BLOCK_P`` batch elements, one per lane (``b``
        a per-lane vector, ``p = 0``): the addresses and Philox offsets are the same functions
        of ``(b, c, p)`` either way, so packing leaves the random stream unchanged.

        Pass 1 over K tiles: running max and total of ``exp(power * l)``. The uniform ``u`` of
        the pixel (Philox at offset ``b * HW + p``, or loaded from ``u_ptr`` when
        ``GIVEN_NOISE``; else ``u_ptr`` and ``z_ptr`` are None, and ``seed_ptr`` is None when
        given) sets the target ``u * total``; pass 2 walks the CDF (``tl.cumsum`` per tile plus a
        carry) to the first component past it (the last live one if rounding runs past the end).
        Then per C tile: gather that component's mean, draw ``z`` (Philox at offset
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
            lw = tl.load(l_base + k[:, None] * s_lk, mask=(k < K)[:, None] & pmask[None, :], other=float("-inf")).to(
                tl.float32
            )
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
            lw = tl.load(l_base + k[:, None] * s_lk, mask=kmask[:, None] & pmask[None, :], other=float("-inf")).to(
                tl.float32
            )
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
            mu = tl.load(
                means_ptr + b * s_mb + sel_off[None, :] + c[:, None] * s_mc + p[None, :] * s_mp, mask=mask, other=0.0
            ).to(tl.float32)
            x = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + p[None, :] * s_xp, mask=mask, other=0.0).to(tl.float32)
            if GIVEN_NOISE:
                z = tl.load(z_ptr + b * s_zb + c[:, None] * s_zc + p[None, :] * s_zp, mask=mask, other=0.0).to(
                    tl.float32
                )
            else:
                z = philox_randn(seed, NPIX + (b * C + c[:, None]) * HW + p[None, :])
            out = c1 * x + c2 * mu + std[None, :] * z
            tl.store(out_ptr + b * (C * HW) + c[:, None] * HW + p[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _sde_blocks(K: int, C: int, HW: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P)`` of the SDE kernel: it streams K (log-weights only) and C in
    tiles of ``_SDE_TILE`` elements (larger K tiles put the bf16 sm_80 build of the CDF walk's
    ``tl.cumsum`` in local memory, and so did 16-channel tiles at C >= 16). At least 2 pixels: a
    one-pixel block (a single point: a batch of points packs its rows, ``HW`` is then ``B``)
    compiles to a stack frame at sm_80."""
    bp = min(max(next_pow2(HW), 2), 128)
    return min(next_pow2(K), max(1, _SDE_TILE // bp)), min(next_pow2(C), max(1, _SDE_TILE // bp)), bp


def _sde_args(means, logweights, logstds, x, out, u=None, z=None):
    """``_gm_sde_step_kernel``'s views ``(means, logweights, logstds, x, out[, u, z])`` (the noise
    when given), grid, integer arguments and options (``planned_args``)."""
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = flat_gm(means, logstds, logweights)
    B = m.shape[0]
    xf, of = x.reshape(B, C, HW), out.view(B, C, HW)
    given = u is not None
    views = (m, lw, ls, xf, of)
    noise_strides = (0,) * 5
    if given:
        uf, zf = u.reshape(B, HW), z.reshape(B, C, HW)
        views += (uf, zf)
        noise_strides = (uf.stride(0), uf.stride(-1), *zf.stride())
    pack = HW == 1 and B > 1  # point data: the batch elements fill the pixel lanes
    bk, bc, bp = _sde_blocks(K, C, B if pack else HW)
    grid = (cdiv(B, bp) if pack else B * cdiv(HW, bp),)
    ints = (K, C, HW, B * HW, *m.stride(), *lw.stride(), s_lsb, s_lsp, *xf.stride(), *noise_strides)
    options = dict(
        BLOCK_K=bk,
        BLOCK_C=bc,
        BLOCK_P=bp,
        GIVEN_NOISE=given,
        INT64=needs_int64(m, lw, xf, of) or B * HW * (C + 1) >= I32_MAX,
        PACK=pack,
        num_warps=4,
    )
    return views, grid, ints, options


_PLANS = PlanCache()


def _launch_sde(means, logstds, logweights, x, seed, u, z, c1, c2, c3, power):
    """Run ``_gm_sde_step_kernel``: Philox noise from the int64 ``seed`` tensor, or the given
    noise ``u (*B, 1, H, W)`` and ``z`` (like ``x``) when ``seed`` is None. The plan is stored
    per shape."""
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if u is None:
        (m, lw, ls, xf, of), grid, ints, options = planned_args(
            _PLANS, _sde_args, (means, logweights, logstds, x, out), n_key=4
        )
        uf = zf = None
    else:
        (m, lw, ls, xf, of, uf, zf), grid, ints, options = planned_args(
            _PLANS, _sde_args, (means, logweights, logstds, x, out, u, z)
        )
    # the kernel's float32 scalars, rounded here as a GPU launch rounds them (the interpreter keeps
    # float64, and a c3 far below float32's range then meets bf16 math as a NaN); a transition
    # between levels in [0, 1] has coefficients in [0, 1]
    c1, c2, c3 = struct.unpack("3f", struct.pack("3f", c1, c2, c3))
    _gm_sde_step_kernel[grid](m, lw, ls, xf, uf, zf, seed, of, *ints, c1, c2, c3, power, **options)
    return out


def _sde_step_launch(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    x: torch.Tensor,
    seed: torch.Tensor,
    sigma: float,
    sigma_next: float,
    power: float,
    eps: float,
) -> torch.Tensor:
    """The body of ``gmkernels::gm_sde_step``: the Philox draw seeded by ``seed`` (int64, one element)."""
    c1, c2, c3 = transition_coefficients(sigma, sigma_next, eps)
    return _launch_sde(means, logstds, logweights, x, seed, None, None, c1, c2, c3, power)


if triton is not None:
    _gm_sde_step_op = torch.library.custom_op("gmkernels::gm_sde_step", _sde_step_launch, mutates_args=())

    @_gm_sde_step_op.register_fake
    def _(means, logstds, logweights, x, seed, sigma, sigma_next, power, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def gm_sde_step(
    gm: dict,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    power: float = 1.0,
    generator: torch.Generator | None = None,
    eps: float = 1e-6,
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
        ``(*B, C, H, W)``, dtype of ``x``. Differentiable in ``gm`` and ``x`` for the drawn
        noise (on the torch path, which inputs that need a gradient take).
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
    if generator is not None and not isinstance(generator, torch.Generator):
        check_generator(generator)  # raises: an int seed or another library's generator
    tensors = (gm["means"], gm["logstds"], gm["logweights"], x)
    if kernels_wanted(*tensors):
        gen_device = s.device if generator is None else generator.device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).to(s.device)
        return _gm_sde_step_op(*tensors, seed, sigma, sigma_next, power, float(eps))
    u = torch.rand((*s.batch, 1, s.H, s.W), generator=generator, device=s.device)
    z = torch.randn(pixel_shape(s), generator=generator, device=s.device)
    return run_reference(ref.gm_sde_step, gm, x, sigma, sigma_next, u, z, power, eps, out_dtype=x.dtype)
