"""What the solver-step kernels share: the ``@triton.jit`` helpers that stream a (lazily mapped)
GM through a pixel-per-thread program, the GM-ODE substep loop and Philox normals, and the host
side's block heuristic and GM views.

A program of the GM-ODE and fused-step kernels owns ``BLOCK_P`` pixels of one batch row (with
``PACK``, point data: ``BLOCK_P`` batch rows of one pixel, one per lane) and all channels. It
sees the GM it works on lazily, as the tuple ``lazy = (src, kr, xmask, pmask, xb, a0, wsc)``:
``src = (means_base, logweights_base, uncond_logweights_base, K, s_mk, s_lk, s_luk)`` addresses
the tensors as stored (``uncond_logweights_base`` 0 without weight guidance), and a K tile of the GM is ``xb + a0 * means`` with the log-weights,
weight-guided when the kernel says so (``_fs_load``). The fused step reads the network's u-GM
that way (``a0 = -sigma``, ``xb`` the state: op 5 as it loads), ``gm_ode_substeps`` an x0-GM
(``a0 = 1``, ``xb = 0``). Where a GM of ``K * C`` elements fits one thread's registers
(``ONE_TILE``) it is loaded once as ``(mu_all, l_all)`` and every pass reuses it; otherwise
each pass streams K tiles (re-read from L1/L2).
"""

from __future__ import annotations

import torch

from .._launch import THREADS_ALONG_K, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

#: GM elements (``K x C``) of a pixel that the fused step keeps in one thread's registers
REG_TILE = 64
#: the plain GM-ODE step's bound for at most 32 components (see ``fused_blocks``)
REG_TILE_WIDE = 128
#: Triton before 3.9 orders a ``(K, C, pixels)`` tile K before C and puts the warps of a
#: channel-split layout along K whenever ``BLOCK_K > 1`` (every channel in every thread, spills):
#: there those layouts stream one component at a time, the heavy steps stream quarter tiles at
#: <= 16 channels in one thread and split 16 channels over 8 warps. Read by the launchers at each
#: call (tests switch it) and part of their stored plans' keys.
SPLIT_K1 = THREADS_ALONG_K
#: Point data packs its batch rows into the lanes of a program only where the compiler keeps the
#: lanes on them: the packed tiles have no contiguous axis, and triton before 3.9 then puts the
#: lanes along K (cross-thread reductions, spills). There each program runs one row.
PACK_FUSED = triton is not None and not THREADS_ALONG_K


def fused_blocks(
    K: int, C: int, HW: int, sde: bool = False, heavy: bool = False, split_k1: bool | None = None
) -> tuple[int, int, int, bool, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_P, ONE_TILE, num_warps)`` of the GM-ODE and fused-step kernels.

    Up to 16 channels: one pixel per thread. The pixels are contiguous but the row, component
    and channel strides and ``H * W`` are not specialised, so no load may assume an alignment
    and no thread gets a vector of pixels: the ``(K, C, pixels)`` tiles lie with K and C inside
    the thread and the warps along the pixels, and the K and C reductions of the substep loop
    need no shuffle or barrier. The pixel's whole GM stays in registers across the substeps when
    ``K * C <= REG_TILE`` (``ONE_TILE``), or ``REG_TILE_WIDE`` for the plain GM-ODE step with at
    most 32 components; above, K is streamed in tiles of ``REG_TILE`` elements per substep
    (``ode_path`` sends the plain step of GMs up to 1024 elements to the rollout kernel instead).
    More than 16 channels: 32 pixels per program, channels spread over the warps (4 warps up to
    32 channels, 8 at 64), so a thread holds at most 8 channels up to C = 64. The GM-SDE draw
    halves the tile (its in-thread ``tl.cumsum`` over 16 components goes to local memory, over 8
    it does not). ``heavy`` launches (guidance or 2nd order: a dozen more per-pixel C-vectors
    live) halve it, stream K in half tiles (quarter tiles with ``split_k1``), and spread 16
    channels over the warps as well. ``split_k1``: see ``SPLIT_K1`` (its value when None).
    """
    if split_k1 is None:
        split_k1 = SPLIT_K1
    bc = next_pow2(C)
    split = bc > 16 or (bc == 16 and heavy)
    reg_tile = REG_TILE // 2 if (sde or heavy) else REG_TILE
    stream_tile = reg_tile // (4 if split_k1 else 2) if heavy and not split else reg_tile
    if split:
        bp, warps = 32, (8 if bc == 64 or (split_k1 and bc == 16) else 4)
    else:
        bp = min(max(next_pow2(HW), 32), 128)
        warps = bp // 32
    per_thread_c = bc // warps if split else bc
    bk = next_pow2(K)
    if split and split_k1:
        return 1, bc, bp, K == 1, warps
    if bk * per_thread_c <= reg_tile or (
        not (sde or heavy or split) and bk <= 32 and bk * per_thread_c <= REG_TILE_WIDE
    ):
        return bk, bc, bp, True, warps
    return max(1, stream_tile // per_thread_c), bc, bp, False, warps


def flat_gm(means: torch.Tensor, logstds: torch.Tensor, logweights: torch.Tensor):
    """``(B, K, C, HW)`` means, ``(B, K, HW)`` log-weights, ``(B, 1|HW)`` log-stds (views when
    the strides allow) and the log-std strides (pixel stride 0 for a per-sample std)."""
    *_, K, C, H, W = means.shape
    m = means.reshape(-1, K, C, H * W)
    lw = logweights.reshape(-1, K, H * W)
    ls = logstds.reshape(-1, logstds.shape[-2] * logstds.shape[-1])
    return m, lw, ls, ls.stride(0), (ls.stride(1) if ls.shape[1] > 1 else 0)


if triton is not None:

    @triton.jit
    def program_state(
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
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
        PACK: tl.constexpr,
    ):
        """What a GM-ODE or fused-step program owns and loads first: its batch row ``b``, pixels
        ``p [BP]`` and their mask, its statistics row, the channel and K ranges, the mask of its
        ``[BC, BP]`` tile, the state ``x`` there (float32), ``sigmas[0]`` and the log-stds ``[BP]``.

        A grid of ``B * NPB`` programs, pixel blocks fastest (any batch size fits CUDA's limits);
        with ``PACK`` (``HW == 1``, ``NPIX = B`` rows of one pixel) lane ``i`` holds row
        ``pid * BLOCK_P + i``: ``b`` is then a per-lane vector (lanes past the end alias the last
        row, so unmasked per-row loads stay in bounds), ``p = 0`` and the statistics row is the
        lane's sample. Offsets in int64 when ``INT64``."""
        pid = tl.program_id(0)
        if PACK:
            q = pid * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = q < NPIX
            b = tl.minimum(q, NPIX - 1)
            p = tl.zeros([BLOCK_P], tl.int32)
            srow = b
        else:
            b = pid // NPB
            pb = pid % NPB
            p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = p < HW
            srow = pid
        c = tl.arange(0, BLOCK_C)
        kr = tl.arange(0, BLOCK_K)
        if INT64:
            b = b.to(tl.int64)
            p = p.to(tl.int64)
        cmask = c < C
        xmask = cmask[:, None] & pmask[None, :]
        x = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + p[None, :] * s_xp, mask=xmask, other=0.0).to(tl.float32)
        sb = tl.load(sig_ptr).to(tl.float32)
        ls = tl.load(ls_ptr + b * s_lsb + p * s_lsp, mask=pmask, other=0.0).to(tl.float32)
        return b, p, pmask, srow, c, kr, xmask, x, sb, ls

    @triton.jit
    def philox_randn(seed, offset):
        """``tl.randn(seed, offset)`` (same Philox draws, same Box-Muller ``r * cos(2 pi u2)``) with
        the cosine evaluated here: libdevice's ``cosf`` carries a Payne-Hanek reduction for huge
        arguments whose scratch array older ptxas (triton <= 3.6) leaves in local memory. The
        angle lies in [0, 2 pi), so a 3-part Cody-Waite reduction to [-pi/4, pi/4] and Taylor
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
        cos_x = 1.0 + x2 * (
            -0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40320.0 + x2 * (-1.0 / 3628800.0))))
        )
        q = j.to(tl.int32) & 3  # cos(q pi/2 + x)
        c = tl.where((q & 1) == 0, cos_x, sin_x)
        c = tl.where((q == 1) | (q == 2), -c, c)
        return tl.sqrt(-2.0 * tl.log(u1)) * c

    @triton.jit
    def fs_load(lazy, k0, WEIGHT: tl.constexpr, LOAD_MU: tl.constexpr = True):
        """One K tile of the lazily mapped GM (module docstring): means ``xb + a0 * mu_k``
        ``[BK, BC, BP]`` and logits ``[BK, BP]`` (weight-guided when ``WEIGHT``; ``-inf`` past K,
        0 for pixels past the end). Without ``LOAD_MU`` the means are not read (0.0 stands for them)."""
        src, kr, xmask, pmask, xb, a0, wsc = lazy
        um_base, ul_base, lu_base, K, s_mk, s_lk, s_luk = src
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
    def fs_moments(lw2, mu, m, w_sum, mean, m2, WITH_VAR: tl.constexpr):
        """Merge one K tile (logits in base 2 ``lw2 [BK, BP]``, means ``mu [BK, BC, BP]``) into the
        running softmax-weighted moments: max ``m`` and weight sum ``w_sum`` kept ``[1, BP]`` (K
        reductions with the channel axis kept, so every per-pixel factor shares the layout of the
        ``[BC, BP]`` moments: with ``[BP]`` factors the compiler laid the moments out as a
        K-reduced tile, every channel in every thread), mean ``[BC, BP]`` and, ``WITH_VAR``, the
        weighted squared deviations ``m2 [BC, BP]``. An all-dead tile gives no NaN."""
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
    def fs_tile(
        mu, lg, kap1, c1, kap2, al2, c2, m, w_sum, mean, m2, Q1: tl.constexpr, Q2: tl.constexpr, WITH_VAR: tl.constexpr
    ):
        """Merge a tile into the running moments of the GM reweighted by up to two Gaussians:
        logits ``lg - kap1 |mu + c1|^2 - kap2 |al2 mu + c2|^2`` (``c = offset - centre``)."""
        if Q1:
            d1 = mu + c1[None, :, :]
            lg = lg - kap1[None, :] * tl.sum(d1 * d1, axis=1)
        if Q2:
            d2 = al2[None, None, :] * mu + c2[None, :, :]
            lg = lg - kap2[None, :] * tl.sum(d2 * d2, axis=1)
        return fs_moments(lg * 1.4426950408889634, mu, m, w_sum, mean, m2, WITH_VAR)

    @triton.jit
    def fs_pass(
        mu_all,
        l_all,
        lazy,
        kap1,
        c1,
        kap2,
        al2,
        c2,
        ONE_TILE: tl.constexpr,
        WEIGHT: tl.constexpr,
        Q1: tl.constexpr,
        Q2: tl.constexpr,
        WITH_VAR: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Softmax-weighted mean ``[BC, BP]`` of the (reweighted, ``fs_tile``) GM over all K and,
        with ``WITH_VAR``, the weighted squared deviation summed over channels ``[BP]``."""
        m = tl.full([1, BLOCK_P], float("-inf"), tl.float32)
        w_sum = tl.zeros([1, BLOCK_P], tl.float32)
        mean = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        m2 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        if ONE_TILE:
            m, w_sum, mean, m2 = fs_tile(mu_all, l_all, kap1, c1, kap2, al2, c2, m, w_sum, mean, m2, Q1, Q2, WITH_VAR)
        else:
            src = lazy[0]
            K = src[3]
            for k0 in range(0, K, BLOCK_K):
                mu, lg = fs_load(lazy, k0, WEIGHT)
                m, w_sum, mean, m2 = fs_tile(mu, lg, kap1, c1, kap2, al2, c2, m, w_sum, mean, m2, Q1, Q2, WITH_VAR)
        var = tl.sum(m2, axis=0) / tl.sum(tl.where(w_sum > 0, w_sum, 1.0), axis=0)
        return mean, var

    @triton.jit
    def fs_transfer(sb, st, x, x_base, eps):
        """Transfer Gaussian of op 6 from ``(x_base, sb)`` to ``(x, st)``: ``g [BC, BP]``, ``v``."""
        a_b = 1.0 - sb
        a_t = 1.0 - st
        d = tl.maximum((a_t * sb) * (a_t * sb) - (a_b * st) * (a_b * st), eps)
        g = (a_t * sb * sb * x - a_b * st * st * x_base) / d
        v = (st * sb) * (st * sb) / d
        return g, v

    @triton.jit
    def ode_substeps(
        x,
        sb,
        sig_ptr,
        N,
        eps,
        s2A,
        kapA,
        gA,
        alA,
        betA,
        mu_all,
        l_all,
        lazy,
        ONE_TILE: tl.constexpr,
        WEIGHT: tl.constexpr,
        RW_A: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """``N`` GM-ODE substeps of the state ``x [BC, BP]`` from ``sigmas[0] = sb`` along
        ``sig_ptr``, on the GM ``A`` (the lazy GM, reweighted by ``N(gA, vA)`` when ``RW_A``:
        ``kapA = 1 / (2 (vA + s2))``, ``alA = vA / (vA + s2)``, ``betA = s2 / (vA + s2) gA``;
        ``s2A`` its per-pixel variance). Substep 0 steps with A's mixture mean, substep ``j``
        with A's posterior mean at ``(x_j, sigmas[j])`` seen from ``(x, sb)`` (op 6)."""
        x_base = x
        for j in range(N):
            s_j = tl.load(sig_ptr + j).to(tl.float32)
            s_n = tl.load(sig_ptr + j + 1).to(tl.float32)
            gt, vt = fs_transfer(sb, s_j, x, x_base, eps)
            nt = tl.maximum(vt + s2A, eps)
            first = j == 0  # substep 0: the plain mixture mean of A
            kapt = tl.where(first, 0.0, 0.5 / nt)
            mw, _ = fs_pass(
                mu_all,
                l_all,
                lazy,
                kapA,
                -gA,
                kapt,
                alA,
                betA - gt,
                ONE_TILE,
                WEIGHT,
                RW_A,
                True,
                False,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
            )
            mA = alA[None, :] * mw + betA
            # r_v = vt / (vt + s2A), r_s = s2A / (vt + s2A) as sigmoids (no inf / inf)
            tt = tl.minimum(tl.maximum(tl.log(s2A) - tl.log(vt), -80.0), 80.0)
            r_v = tl.where(first, 1.0, 1.0 / (1.0 + tl.exp(tt)))
            r_s = tl.where(first, 0.0, 1.0 / (1.0 + tl.exp(-tt)))
            x0 = r_v[None, :] * mA + r_s[None, :] * gt
            x = x + (x - x0) * ((s_n - s_j) / tl.maximum(s_j, eps))
        return x
