"""The sampler's fused step (``fused_step``, the schedulers' Triton path; docs/solvers.md#steps-without-derived-gms).

One step on the network's u-GM with no GM-sized temporary. Every GM of the step is the network's
GM in its own dtype seen through per-sample coefficients and per-pixel means that the kernels
form as they load (``common``): ``x0_k = x - sigma u_k`` (std times ``sigma``, op 5); mean-CFG
shifts every mean by ``(scale - 1)(d - proj m_c)``; weight guidance combines the log-weights;
probabilistic guidance and the 2nd-order correction are Gaussian reweightings ``N(g, v)`` whose
centre ``g`` is a per-pixel combination of ``m_c``, ``d = m_c - m_u`` and ``mean_now - prev_mean``.

Launches of one step, all from the body of the custom op ``gmkernels::fused_step``:

* ``_step_stats_kernel`` (steps with guidance that needs ``m_u``, or at 2nd order): per-program
  partial sums of the per-sample statistics (the ``STAT_*`` columns of
  ``reference.solver_steps``), and ``m_u`` kept for the later launches (the unconditional GM is
  read once); then ``_step_coef_kernel`` sums them in float64 and writes the per-sample
  coefficients (the ``COEF_*`` slots) that the next launch reads, with no host read and no torch
  op in between. At 2nd order under probabilistic guidance or orthogonalised mean-CFG the exact
  bias power depends on the first pass's scalars: a second statistics pass (``MODE=2``) and
  coefficient launch give it.
* ``_step_kernel``: the step itself, a GM-ODE (``N`` substeps) or GM-SDE (one Philox draw, the
  stream of ``gm_sde_step``) move of the state with the GM ``A``, and, with ``POST``, the
  posterior mean of the first-order GM at the new state (the next step's 2nd-order input).

The plain GM-ODE step of a GM past one thread's registers runs the rollout kernel instead
(``ode.launch_ode_wide``, op 5 applied as it loads).
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import torch

import reference.solver_steps as ref
from reference.solver_steps import CA, CB, N_COEF, N_STAT, RHO_MIN
from reference.transition import transition_coefficients

from ..._validate import check_generator
from .._launch import I32_MAX, PlanCache, cdiv, needs_int64, next_pow2, planned_args
from ..policy import rollout_blocks
from . import common
from .common import flat_gm, fused_blocks
from .ode import launch_ode_wide, ode_path

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

if triton is not None:
    from .common import fs_load, fs_pass, fs_transfer, ode_substeps, philox_randn, program_state

    @triton.jit
    def _stat_store(ptr, v, pmask, PACK: tl.constexpr):
        """Store a statistic from its per-pixel terms ``v [BP]``: each lane's own (its sample's
        sum, ``ptr`` a per-lane vector) when ``PACK``, else their sum (the program's partial)."""
        if PACK:
            tl.store(ptr, v, mask=pmask)
        else:
            tl.store(ptr, tl.sum(v, axis=0))

    @triton.jit
    def _step_prologue(
        um_ptr,
        ul_ptr,
        uls_ptr,
        vl_ptr,
        x_ptr,
        sig_ptr,
        mu_ptr,
        coef_ptr,
        K,
        C,
        HW,
        NPB,
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
        s_vlb,
        s_vlk,
        s_vlp,
        wsc,
        eps,
        MU_IN: tl.constexpr,
        GUIDANCE: tl.constexpr,
        ORDER2: tl.constexpr,
        WITH_VAR: tl.constexpr,
        ONE_TILE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
        PACK: tl.constexpr,
    ):
        """What every launch of a step computes first, per pixel: the state ``x``, the x0-GM
        ``R = x - sigma u_k`` seen lazily (``lazy``; loaded once as ``(mu_all, l_all)`` with
        ``ONE_TILE``), its variance ``s2``, and, for heavy steps (guidance that
        needs ``m_u``, or 2nd order), its moments ``m_c``, ``var`` (``WITH_VAR``), the
        unconditional mean ``m_u`` (loaded from ``mu_ptr`` with ``MU_IN``; else the caller
        computes it), ``d = m_c - m_u`` and ``db = d - proj m_c``."""
        UNCOND: tl.constexpr = GUIDANCE == "probabilistic" or GUIDANCE == "mean-cfg"
        b, p, pmask, srow, c, kr, xmask, x, sb, ls = program_state(
            x_ptr,
            uls_ptr,
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
        a0 = -sb
        ls = ls + tl.log(tl.maximum(sb, eps))  # x0 log-std, op 5
        s2 = tl.exp(tl.minimum(2.0 * ls, 80.0))
        lu_base = 0  # only weight guidance reads unconditional log-weights (0, not None: a tuple entry needs a type)
        if GUIDANCE == "weight":
            lu_base = vl_ptr + b * s_vlb + p[None, :] * s_vlp
        src = (
            um_ptr + b * s_mb + c[None, :, None] * s_mc + p[None, None, :] * s_mp,
            ul_ptr + b * s_lb + p[None, :] * s_lp,
            lu_base,
            K,
            s_mk,
            s_lk,
            s_vlk,
        )
        lazy = (src, kr, xmask, pmask, x, a0, wsc)
        zero_v = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        zero_p = tl.zeros([BLOCK_P], tl.float32)
        mu_all = 0.0
        l_all = 0.0
        if ONE_TILE:
            mu_all, l_all = fs_load(lazy, 0, GUIDANCE == "weight")
        m_c = zero_v
        var = zero_p
        if UNCOND or ORDER2 or WITH_VAR:  # moments of R (and R' = R + o: same spread, mean shifted by o)
            m_c, var = fs_pass(
                mu_all,
                l_all,
                lazy,
                zero_p,
                zero_v,
                zero_p,
                zero_p,
                zero_v,
                ONE_TILE,
                GUIDANCE == "weight",
                False,
                False,
                WITH_VAR,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
            )
        d = zero_v
        db = zero_v
        o_off = b * (C * HW) + c[:, None] * HW + p[None, :]
        cf = 0  # plain steps read no coefficients
        if UNCOND or ORDER2:
            cf = coef_ptr + b * ref.N_COEF
        if UNCOND:  # m_u: from the unconditional GM in the first launch, which keeps it for the others
            if MU_IN:
                m_u = tl.load(mu_ptr + o_off, mask=xmask, other=0.0)
                d = tl.where(xmask, m_c - m_u, 0.0)
                db = d - tl.load(cf + ref.COEF_PROJ) * m_c
        return (
            b,
            p,
            pmask,
            srow,
            c,
            xmask,
            x,
            sb,
            a0,
            s2,
            lazy,
            mu_all,
            l_all,
            m_c,
            var,
            d,
            db,
            o_off,
            cf,
            zero_v,
            zero_p,
        )

    @triton.jit
    def _guided(
        x,
        s2,
        lazy,
        mu_all,
        l_all,
        m_c,
        db,
        cf,
        prev_ptr,
        o_off,
        xmask,
        eps,
        zero_v,
        zero_p,
        GUIDANCE: tl.constexpr,
        ORDER2: tl.constexpr,
        ONE_TILE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """The first-order guided GM and the 2nd-order difference: ``R'`` (``R`` shifted by
        ``o = (scale - 1) db`` under mean-CFG), ``F`` (``R'`` reweighted by ``N(g1, v1)`` under
        probabilistic guidance: ``kap1``, ``al1``, ``s2f`` its variance, ``betF``) and, at 2nd
        order, ``e = mean_now - prev`` with ``mean_now`` the mean of ``F``. Returns
        ``(lazy, mu_all, m_c, g1, kap1, al1, s2f, betF, e)`` with ``lazy`` and ``mu_all`` of ``R'``."""
        if GUIDANCE == "mean-cfg":
            o = tl.load(cf + ref.COEF_CFG) * db
            src, kr, xmask, pmask, xb, a0, wsc = lazy
            lazy = (src, kr, xmask, pmask, x + o, a0, wsc)
            m_c = m_c + o
            if ONE_TILE:
                mu_all = mu_all + o[None, :, :]
        g1 = zero_v
        kap1 = zero_p
        al1 = zero_p + 1.0
        s2f = s2
        betF = zero_v
        if GUIDANCE == "probabilistic":
            g1 = tl.load(cf + ref.COEF_G1_MC) * m_c + tl.load(cf + ref.COEF_G1_DB) * db
            v1 = tl.load(cf + ref.COEF_V1)
            n1 = tl.maximum(v1 + s2, eps)
            kap1 = 0.5 / n1
            al1 = v1 / n1
            s2f = s2 * al1
            betF = (s2 / n1)[None, :] * g1
        mean_now = m_c
        e = zero_v
        if ORDER2:
            if GUIDANCE == "probabilistic":
                mw, _ = fs_pass(
                    mu_all,
                    l_all,
                    lazy,
                    kap1,
                    -g1,
                    zero_p,
                    zero_p,
                    zero_v,
                    ONE_TILE,
                    False,
                    True,
                    False,
                    False,
                    BLOCK_K,
                    BLOCK_C,
                    BLOCK_P,
                )
                mean_now = al1[None, :] * mw + betF
            prev = tl.load(prev_ptr + o_off, mask=xmask, other=0.0)
            e = mean_now - prev
        return lazy, mu_all, m_c, g1, kap1, al1, s2f, betF, e

    @triton.jit(
        do_not_specialize=[
            "HW",
            "s_mb",
            "s_mk",
            "s_mc",
            "s_lb",
            "s_lk",
            "s_xb",
            "s_xc",
            "s_vlb",
            "s_vlk",
            "s_vb",
            "s_vk",
            "s_vc",
        ]
    )
    def _step_stats_kernel(
        um_ptr,
        ul_ptr,
        uls_ptr,
        vm_ptr,
        vl_ptr,
        x_ptr,
        prev_ptr,
        coef_ptr,
        sig_ptr,
        mu_ptr,
        stat_ptr,
        K,
        C,
        HW,
        NPB,
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
        s_vlb,
        s_vlk,
        s_vlp,
        KU,
        s_vb,
        s_vk,
        s_vc,
        s_vp,
        wsc,
        eps,
        MODE: tl.constexpr,
        GUIDANCE: tl.constexpr,
        ORDER2: tl.constexpr,
        ONE_TILE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
        PACK: tl.constexpr = False,
    ):
        """A statistics pass of the step for the pixels of ``program_state``: per-program partial
        sums (with ``PACK`` per-lane sums, the rows of ``stat_ptr`` then being samples).

        ``MODE=1``: the ``STAT_VAR``, ``STAT_D_MC``, ``STAT_MC_MC``, ``STAT_D_D`` and, at 2nd order
        when no bias-power pass follows, ``STAT_E_E`` columns, and ``m_u`` computed from the
        unconditional GM ``(vm, vl)`` and stored at ``mu_ptr`` for the later launches (the
        coefficients it reads are still 0, but for ``COEF_CFG`` of plain mean-CFG). ``MODE=2``,
        the bias-power pass at 2nd order: the power of ``damp e + alpha db`` (``STAT_BIAS``)."""
        b, p, pmask, srow, c, xmask, x, sb, a0, s2, lazy, mu_all, l_all, m_c, var, d, db, o_off, cf, zero_v, zero_p = (
            _step_prologue(
                um_ptr,
                ul_ptr,
                uls_ptr,
                vl_ptr,
                x_ptr,
                sig_ptr,
                mu_ptr,
                coef_ptr,
                K,
                C,
                HW,
                NPB,
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
                s_vlb,
                s_vlk,
                s_vlp,
                wsc,
                eps,
                MODE == 2,
                GUIDANCE,
                ORDER2,
                MODE == 1,
                ONE_TILE,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
                INT64,
                PACK,
            )
        )
        UNCOND: tl.constexpr = GUIDANCE == "probabilistic" or GUIDANCE == "mean-cfg"
        if MODE == 1:
            if UNCOND:
                vl_base = vl_ptr + b * s_vlb + p[None, :] * s_vlp
                src_u = (
                    vm_ptr + b * s_vb + c[None, :, None] * s_vc + p[None, None, :] * s_vp,
                    vl_base,
                    vl_base,
                    KU,
                    s_vk,
                    s_vlk,
                    s_vlk,
                )
                m_u, _ = fs_pass(
                    0.0,
                    0.0,
                    (src_u, lazy[1], xmask, pmask, x, a0, wsc),
                    zero_p,
                    zero_v,
                    zero_p,
                    zero_p,
                    zero_v,
                    False,
                    False,
                    False,
                    False,
                    False,
                    BLOCK_K,
                    BLOCK_C,
                    BLOCK_P,
                )
                tl.store(mu_ptr + o_off, m_u, mask=xmask)
                d = tl.where(xmask, m_c - m_u, 0.0)
                db = d - tl.load(cf + ref.COEF_PROJ) * m_c
            var = var / C + s2  # per-pixel variance of op 2
            e = zero_v
            if ORDER2:
                prev = tl.load(prev_ptr + o_off, mask=xmask, other=0.0)
                e = tl.where(xmask, m_c + tl.load(cf + ref.COEF_CFG) * db - prev, 0.0)
            mc0 = tl.where(xmask, m_c, 0.0)
            sp = stat_ptr + srow * ref.N_STAT
            _stat_store(sp + ref.STAT_VAR, tl.where(pmask, var, 0.0), pmask, PACK)
            _stat_store(sp + ref.STAT_D_MC, tl.sum(d * mc0, axis=0), pmask, PACK)
            _stat_store(sp + ref.STAT_MC_MC, tl.sum(mc0 * mc0, axis=0), pmask, PACK)
            _stat_store(sp + ref.STAT_D_D, tl.sum(d * d, axis=0), pmask, PACK)
            _stat_store(sp + ref.STAT_E_E, tl.sum(e * e, axis=0), pmask, PACK)
        else:  # exact power of the 2nd-order bias damp * e + alpha * db
            _, _, _, _, _, _, _, _, e = _guided(
                x,
                s2,
                lazy,
                mu_all,
                l_all,
                m_c,
                db,
                cf,
                prev_ptr,
                o_off,
                xmask,
                eps,
                zero_v,
                zero_p,
                GUIDANCE,
                True,
                ONE_TILE,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
            )
            bt = tl.where(xmask, tl.load(cf + ref.COEF_DAMP) * e + tl.load(cf + ref.COEF_ALPHA) * db, 0.0)
            _stat_store(stat_ptr + srow * ref.N_STAT + ref.STAT_BIAS, tl.sum(bt * bt, axis=0), pmask, PACK)

    @triton.jit(do_not_specialize=["HW", "s_mb", "s_mk", "s_mc", "s_lb", "s_lk", "s_xb", "s_xc", "s_vlb", "s_vlk"])
    def _step_kernel(
        um_ptr,
        ul_ptr,
        uls_ptr,
        vl_ptr,
        x_ptr,
        prev_ptr,
        coef_ptr,
        sig_ptr,
        mu_ptr,
        seed_ptr,
        out_ptr,
        post_ptr,
        K,
        C,
        HW,
        NPB,
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
        s_vlb,
        s_vlk,
        s_vlp,
        N,
        c1t,
        c2t,
        c3t,
        wsc,
        eps,
        SDE: tl.constexpr,
        GUIDANCE: tl.constexpr,
        ORDER2: tl.constexpr,
        POST: tl.constexpr,
        ONE_TILE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INT64: tl.constexpr,
        PACK: tl.constexpr = False,
    ):
        """The step for the pixels of ``program_state``, all channels (module docstring): ``A``,
        the GM that moves the state, is ``F`` (``_guided``) at first order and ``R'`` reweighted
        by ``N(gA, vA)`` at 2nd order; ``SDE`` draws from ``A`` (constants ``c1t, c2t, c3t``),
        else ``N`` GM-ODE substeps on it. ``POST`` also writes the posterior mean of ``F`` at the
        new state to ``post_ptr``, which may be ``mu_ptr`` (each element of ``m_u`` is read,
        earlier, by the thread that writes it). Pointers a variant does not read are None."""
        RW_A: tl.constexpr = GUIDANCE == "probabilistic" or ORDER2  # A is a reweighting
        b, p, pmask, _, c, xmask, x, sb, a0, s2, lazy, mu_all, l_all, m_c, _, _, db, o_off, cf, zero_v, zero_p = (
            _step_prologue(
                um_ptr,
                ul_ptr,
                uls_ptr,
                vl_ptr,
                x_ptr,
                sig_ptr,
                mu_ptr,
                coef_ptr,
                K,
                C,
                HW,
                NPB,
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
                s_vlb,
                s_vlk,
                s_vlp,
                wsc,
                eps,
                True,
                GUIDANCE,
                ORDER2,
                False,
                ONE_TILE,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
                INT64,
                PACK,
            )
        )
        x_base = x
        lazy, mu_all, m_c, g1, kap1, al1, s2f, betF, e = _guided(
            x,
            s2,
            lazy,
            mu_all,
            l_all,
            m_c,
            db,
            cf,
            prev_ptr,
            o_off,
            xmask,
            eps,
            zero_v,
            zero_p,
            GUIDANCE,
            ORDER2,
            ONE_TILE,
            BLOCK_K,
            BLOCK_C,
            BLOCK_P,
        )
        gA = g1
        kapA = kap1
        alA = al1
        s2A = s2f
        if ORDER2:
            gA = m_c + tl.load(cf + ref.COEF_GA_DB) * db + tl.load(cf + ref.COEF_GA_E) * e
            vA = tl.load(cf + ref.COEF_VA)
            nA = tl.maximum(vA + s2, eps)
            kapA = 0.5 / nA
            alA = vA / nA
            s2A = s2 * alA
        betA = zero_v
        if RW_A:
            betA = (s2 * kapA * 2.0)[None, :] * gA  # s2 / n * g
        if SDE:
            x = _sde_draw(
                x,
                b,
                p,
                c,
                xmask,
                seed_ptr,
                um_ptr,
                s_mb,
                s_mk,
                s_mc,
                s_mp,
                HW,
                C,
                NPIX,
                gA,
                kapA,
                alA,
                s2A,
                betA,
                c1t,
                c2t,
                c3t,
                zero_p,
                mu_all,
                l_all,
                lazy,
                RW_A,
                GUIDANCE == "weight",
                ONE_TILE,
                INT64,
                BLOCK_K,
                BLOCK_P,
            )
        else:
            x = ode_substeps(
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
                ONE_TILE,
                GUIDANCE == "weight",
                RW_A,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
            )
        tl.store(out_ptr + o_off, x.to(out_ptr.dtype.element_ty), mask=xmask)
        if POST:  # posterior mean of F at the new state
            s_end = tl.load(sig_ptr + N).to(tl.float32)
            gt, vt = fs_transfer(sb, s_end, x, x_base, eps)
            nt = tl.maximum(vt + s2f, eps)
            mw, _ = fs_pass(
                mu_all,
                l_all,
                lazy,
                kap1,
                -g1,
                0.5 / nt,
                al1,
                betF - gt,
                ONE_TILE,
                GUIDANCE == "weight",
                GUIDANCE == "probabilistic",
                True,
                False,
                BLOCK_K,
                BLOCK_C,
                BLOCK_P,
            )
            tt = tl.minimum(tl.maximum(tl.log(s2f) - tl.log(vt), -80.0), 80.0)
            r_v = 1.0 / (1.0 + tl.exp(tt))
            r_s = 1.0 / (1.0 + tl.exp(-tt))
            post = r_v[None, :] * (al1[None, :] * mw + betF) + r_s[None, :] * gt
            tl.store(post_ptr + o_off, post, mask=xmask)

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
    def _sde_draw(
        x,
        b,
        p,
        c,
        xmask,
        seed_ptr,
        um_ptr,
        s_mb,
        s_mk,
        s_mc,
        s_mp,
        HW,
        C,
        NPIX,
        gA,
        kapA,
        alA,
        s2A,
        betA,
        c1t,
        c2t,
        c3t,
        zero_p,
        mu_all,
        l_all,
        lazy,
        RW_A: tl.constexpr,
        WEIGHT: tl.constexpr,
        ONE_TILE: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """The GM-SDE move of ``x`` with ``A``: a component drawn from A's weights (the total, then
        the CDF walk; the means are read only when A reweights them), its mean gathered, and
        ``c1 x + c2 mu_sel + sqrt(c2^2 s2A + c3) z`` with the Philox stream of ``gm_sde_step``."""
        src, kr, _, _, xb, a0, _ = lazy
        K = src[3]
        seed = tl.load(seed_ptr)
        m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
        tot = tl.zeros([BLOCK_P], tl.float32)
        if ONE_TILE:
            m_run, tot = _fs_total(_fs_logits_a(mu_all, l_all, gA, kapA, RW_A), m_run, tot)
        else:
            for k0 in range(0, K, BLOCK_K):
                mu, lg = fs_load(lazy, k0, WEIGHT, RW_A)
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
                mu, lg = fs_load(lazy, k0, WEIGHT, RW_A)
                cum, sel, last = _fs_cdf(
                    _fs_logits_a(mu, lg, gA, kapA, RW_A), k0 + kr, K, m_fin, target, cum, sel, last
                )
        sel = tl.where(sel < 0, last, sel)
        if INT64:
            sel_off = sel.to(tl.int64) * s_mk
        else:
            sel_off = sel * s_mk
        u_sel = tl.load(
            um_ptr + b * s_mb + sel_off[None, :] + c[:, None] * s_mc + p[None, :] * s_mp, mask=xmask, other=0.0
        )
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
        z = philox_randn(seed, NPIX + (b * C + c[:, None]) * HW + p[None, :])
        return c1t * x + c2t * mu_sel + std[None, :] * z

    @triton.jit
    def _step_coef_kernel(
        stat_ptr,
        coef_ptr,
        B,
        NPB,
        HW,
        CHW,
        amount,
        scale,
        e_coef,
        inv_hp2,
        h_ratio,
        rho_min,
        MODE: tl.constexpr,
        GUIDANCE: tl.constexpr,
        ORDER2: tl.constexpr,
        BIAS_PASS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The step's per-sample coefficients from its statistics passes, in float64, for rows
        ``b < B``: the ``(B * NPB, N_STAT)`` float32 partial sums of ``_step_stats_kernel`` (``NPB``
        programs a row) are summed and turned into the ``coef (B, N_COEF)`` slots that the next
        launch reads (``reference.solver_steps.step_coefficients`` is the twin). ``MODE`` 1
        follows the first statistics pass, ``MODE`` 2 the bias-power pass (``BIAS_PASS``). Host
        scalars (``_coef_scalars``): ``e_coef = scale^2 CB^2 (probabilistic) + CA``,
        ``inv_hp2 = 1 / h_prev^2``, ``h_ratio = 0.5 h / h_prev``."""
        UNCOND: tl.constexpr = GUIDANCE == "probabilistic" or GUIDANCE == "mean-cfg"
        PROB: tl.constexpr = GUIDANCE == "probabilistic"
        b = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        bmask = b < B
        n = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float64)
        a_var = acc
        a_dm = acc
        a_mm = acc
        a_dd = acc
        a_p = acc
        p_col: tl.constexpr = ref.STAT_BIAS if MODE == 2 else ref.STAT_E_E
        USE_P: tl.constexpr = ORDER2 and not (MODE == 1 and BIAS_PASS)
        for j0 in tl.range(0, NPB, BLOCK_N):  # elementwise sums: one reduction after the loop
            j = j0 + n
            mask = bmask[:, None] & (j < NPB)[None, :]
            row = stat_ptr + (b[:, None] * NPB + j[None, :]) * ref.N_STAT
            a_var += tl.load(row + ref.STAT_VAR, mask=mask, other=0.0).to(tl.float64)
            a_dm += tl.load(row + ref.STAT_D_MC, mask=mask, other=0.0).to(tl.float64)
            a_mm += tl.load(row + ref.STAT_MC_MC, mask=mask, other=0.0).to(tl.float64)
            a_dd += tl.load(row + ref.STAT_D_D, mask=mask, other=0.0).to(tl.float64)
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
        cf = coef_ptr + b * ref.N_COEF
        if PROB:
            alpha = sc * tl.sqrt(V / tl.maximum(pg, floor))
        if MODE == 1:
            if UNCOND:
                tl.store(cf + ref.COEF_PROJ, proj.to(tl.float32), mask=bmask)
            if GUIDANCE == "mean-cfg":
                tl.store(cf + ref.COEF_CFG, (sc - one).to(tl.float32), mask=bmask)
            if PROB:
                vt = V * (one - sc * sc)  # op 4: target / cond
                n4 = tl.maximum(V - vt, floor)
                tl.store(cf + ref.COEF_G1_MC, ((V - vt) / n4).to(tl.float32), mask=bmask)
                tl.store(cf + ref.COEF_G1_DB, (V * alpha / n4).to(tl.float32), mask=bmask)
                tl.store(cf + ref.COEF_V1, (vt * V / n4).to(tl.float32), mask=bmask)
        if ORDER2:
            E = V * (zero + e_coef)
            damp = tl.sqrt(tl.maximum(one - E * (zero + inv_hp2), zero)) * (zero + h_ratio)
            if MODE == 1 and BIAS_PASS:  # the bias power needs these first: its own pass, then MODE 2
                tl.store(cf + ref.COEF_DAMP, damp.to(tl.float32), mask=bmask)
                tl.store(cf + ref.COEF_ALPHA, alpha.to(tl.float32), mask=bmask)
            else:
                P = s_p / chw
                if MODE == 1:
                    P = damp * damp * P
                cap = tl.sqrt(tl.minimum(V / tl.maximum(P, floor), one))
                rmin = zero + rho_min
                rho = tl.minimum(tl.maximum(P / tl.maximum(V, floor), rmin), one - rmin)
                tl.store(cf + ref.COEF_GA_DB, (cap * alpha / rho).to(tl.float32), mask=bmask)
                tl.store(cf + ref.COEF_GA_E, (cap * damp / rho).to(tl.float32), mask=bmask)
                tl.store(cf + ref.COEF_VA, (V * (one - rho) / rho).to(tl.float32), mask=bmask)


class _StepPlan(NamedTuple):
    """The launch plan of a step beyond the kernels' views, grid and integers: the options of the
    statistics and step kernels (blocks, ``ONE_TILE``, ``INT64``, ``PACK``, warps), the sizes
    ``(B, C, HW)``, the programs per batch row (statistics rows), the coefficient kernel's grid and options, and, for the
    plain GM-ODE step of a GM past one thread's registers, the rollout kernel's blocks."""

    options: dict
    BCHW: tuple
    npb: int
    coef_grid: tuple
    coef_options: dict
    wide: Optional[tuple]


def _step_args(
    means,
    logweights,
    logstds,
    u_means,
    u_logweights,
    x,
    sde: bool,
    heavy: bool,
    plain: bool,
    split_k1: bool,
    n_sigmas: int,
):
    """The step kernels' views of the conditional GM, the unconditional one (the conditional
    GM's own when there is none) and the state, the grid, the integer arguments ``(common,
    statistics only, step only)`` and the ``_StepPlan`` (``planned_args``). ``heavy``: the step
    has statistics passes (guidance that reads ``m_u``, or 2nd order); ``plain``: nor weight
    guidance, nor the posterior mean for the next step."""
    *_, K, C, H, W = means.shape
    HW = H * W
    m, lw, ls, s_lsb, s_lsp = flat_gm(means, logstds, logweights)
    KU = u_means.shape[-4]
    vm, vl = u_means.reshape(-1, KU, C, HW), u_logweights.reshape(-1, KU, HW)
    B = m.shape[0]
    xf = x.reshape(B, C, HW)
    views = (m, lw, ls, vm, vl, xf)
    if plain and not sde and ode_path(K, C, HW, split_k1) == "wide":
        return views, None, (), _StepPlan({}, (B, C, HW), 1, (), {}, rollout_blocks(K, C, HW))
    pack = (
        common.PACK_FUSED and HW == 1 and B > 1
    )  # point data: the batch rows fill the pixel lanes, one statistics row each
    bk, bc, bp, one, warps = fused_blocks(K, C, B if pack else HW, sde, heavy, split_k1)
    npb = 1 if pack else cdiv(HW, bp)
    ints = (K, C, HW, npb, B * HW, *m.stride(), *lw.stride(), s_lsb, s_lsp, *xf.stride(), *vl.stride())
    int64 = needs_int64(m, lw, vm, vl, xf) or B * HW * (C + 1) >= I32_MAX
    # a plain GM-SDE step reads the log-weights and gathers one component's mean: no one-tile load of all the means
    options = dict(
        ONE_TILE=one and (not sde or heavy), BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, INT64=int64, PACK=pack, num_warps=warps
    )
    block_r = min(next_pow2(B), 64)
    block_n = min(next_pow2(npb), max(1, 256 // block_r))  # float64 sums of 5 columns: 2 per thread
    plan = _StepPlan(
        options, (B, C, HW), npb, (cdiv(B, block_r),), dict(BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4), None
    )
    return views, (cdiv(B, bp) if pack else B * npb,), (ints, (KU, *vm.stride()), (n_sigmas - 1,)), plan


def _coef_scalars(guidance: str, order2: bool, amount: float, scale: float, h: float, h_prev: float) -> tuple:
    """The coefficient kernel's float arguments after its integers: ``(amount, scale, e_coef,
    inv_hp2, h_ratio, rho_min)``, computed in float64 on the host."""
    e_coef = ((scale * scale * CB * CB) if guidance == "probabilistic" else 0.0) + CA
    return (
        amount,
        scale,
        e_coef,
        1.0 / (h_prev * h_prev) if order2 else 0.0,
        0.5 * h / h_prev if order2 else 0.0,
        RHO_MIN,
    )


_PLANS = PlanCache()


def _step_launches(
    means: torch.Tensor,
    logstds: torch.Tensor,
    logweights: torch.Tensor,
    u_means: Optional[torch.Tensor],
    u_logweights: Optional[torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    prev_mean: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    guidance: str,
    post: bool,
    scale: float,
    amount: float,
    h: float,
    h_prev: float,
    sigma: float,
    sigma_next: float,
    eps: float,
) -> list[torch.Tensor]:
    """The body of ``gmkernels::fused_step`` (arguments as ``fused_step``'s; ``u_means``,
    ``u_logweights`` the unconditional GM's under guidance that reads it, ``seed`` the int64
    Philox seed of a GM-SDE step, None for GM-ODE, ``amount`` the orthogonalisation): every
    launch of the step.
    Returns ``[x_next]`` or, with ``post``, ``[x_next, post_mean]``."""
    order2, sde = prev_mean is not None, seed is not None
    prob, weight, meancfg = guidance == "probabilistic", guidance == "weight", guidance == "mean-cfg"
    has_uncond = prob or meancfg
    tensors = (
        means,
        logweights,
        logstds,
        means if u_means is None else u_means,
        logweights if u_logweights is None else u_logweights,
        x,
    )
    (m, lw, ls, vm, vl, xf), grid, ints, plan = planned_args(
        _PLANS,
        _step_args,
        tensors,
        sde,
        has_uncond or order2,
        not (has_uncond or order2 or weight or post),
        common.SPLIT_K1,
        sigmas.numel(),
    )
    dev = x.device
    out = torch.empty(x.shape, device=dev, dtype=x.dtype)
    if grid is None:
        return [launch_ode_wide(means, logstds, logweights, x, sigmas, out, eps, plan.wide, affine=True)]
    ints, stats_ints, step_ints = ints
    # m_u, kept by the first statistics pass, and then the new posterior mean in its storage
    m_u = torch.empty(x.shape, dtype=torch.float32, device=dev) if has_uncond or post else None
    coef = None
    prev = None
    if order2:  # the kernels address the memory as contiguous (B, C, HW), as the outputs
        prev = prev_mean if prev_mean.is_contiguous() else prev_mean.contiguous()
    if has_uncond or order2:
        B, C, HW = plan.BCHW
        coef = torch.zeros(B, N_COEF, dtype=torch.float32, device=dev)
        stats = torch.empty(B * plan.npb, N_STAT, dtype=torch.float32, device=dev)
        # the 2nd-order bias power from its own pass (it depends on the first pass's scalars): the
        # first pass then needs no 2nd-order memory
        bias_pass = order2 and (prob or (meancfg and amount > 0))
        if meancfg and amount == 0:  # read by the first pass at 2nd order, before the coefficient launch writes it
            coef[:, ref.COEF_CFG] = scale - 1
        floats = _coef_scalars(guidance, order2, amount, scale, h, h_prev)
        vl_1 = vl if has_uncond or weight else None
        _step_stats_kernel[grid](
            m,
            lw,
            ls,
            vm if has_uncond else None,
            vl_1,
            xf,
            None if bias_pass else prev,
            coef,
            sigmas,
            m_u if has_uncond else None,
            stats,
            *ints,
            *stats_ints,
            scale,
            eps,
            MODE=1,
            GUIDANCE=guidance,
            ORDER2=order2 and not bias_pass,
            **plan.options,
        )
        _step_coef_kernel[plan.coef_grid](
            stats,
            coef,
            B,
            plan.npb,
            HW,
            C * HW,
            *floats,
            MODE=1,
            GUIDANCE=guidance,
            ORDER2=order2,
            BIAS_PASS=bias_pass,
            **plan.coef_options,
        )
        if bias_pass:
            _step_stats_kernel[grid](
                m,
                lw,
                ls,
                None,
                vl_1,
                xf,
                prev,
                coef,
                sigmas,
                m_u if has_uncond else None,
                stats,
                *ints,
                *stats_ints,
                scale,
                eps,
                MODE=2,
                GUIDANCE=guidance,
                ORDER2=True,
                **plan.options,
            )
            _step_coef_kernel[plan.coef_grid](
                stats,
                coef,
                B,
                plan.npb,
                HW,
                C * HW,
                *floats,
                MODE=2,
                GUIDANCE=guidance,
                ORDER2=True,
                BIAS_PASS=True,
                **plan.coef_options,
            )
    c1 = c2 = c3 = 0.0
    if sde:  # the kernel's float32 scalars, rounded as a GPU launch rounds them (coefficients in [0, 1])
        c1, c2, c3 = struct.unpack("3f", struct.pack("3f", *transition_coefficients(sigma, sigma_next, eps)))
    _step_kernel[grid](
        m,
        lw,
        ls,
        vl if weight else None,
        xf,
        prev,
        coef,
        sigmas,
        m_u if has_uncond else None,
        seed,
        out,
        m_u if post else None,
        *ints,
        *step_ints,
        c1,
        c2,
        c3,
        scale,
        eps,
        SDE=sde,
        GUIDANCE=guidance,
        ORDER2=order2,
        POST=post,
        **plan.options,
    )
    return [out, m_u] if post else [out]


if triton is not None:
    _fused_step_op = torch.library.custom_op("gmkernels::fused_step", _step_launches, mutates_args=())

    @_fused_step_op.register_fake
    def _(means, logstds, logweights, u_means, u_logweights, x, sigmas, prev_mean, seed, guidance, post, *args):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return [out, torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)] if post else [out]


def fused_step(
    gm_u,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    levels: tuple[float, float],
    *,
    sde: bool,
    guidance: str = "none",
    scale: float = 0.0,
    orthogonal: float = 0.0,
    prev_mean: torch.Tensor | None = None,
    h: float = 0.0,
    h_prev: float = 0.0,
    post: bool = False,
    generator: torch.Generator | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One whole sampler step on the network's u-GM with no GM-sized temporary (the schedulers'
    Triton path; the eager composition of ops 5, 11, the 2nd-order rule of
    docs/solvers.md#2nd-order and ``gm_ode_substeps`` / ``gm_sde_step`` is its reference,
    ``schedulers._GMSchedulerBase._x0_gm``). How: the module docstring.

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
        post: also return that posterior mean at the new state for the next step.
    Returns:
        ``(x_next (*B, C, H, W) in x's dtype, post_mean (*B, C, H, W) float32 or None)``.
    """
    paired = isinstance(gm_u, (tuple, list))
    cond = gm_u[0] if paired else gm_u
    if scale == 0:
        guidance = "none"
    u_means = u_logweights = None
    if guidance != "none":
        uncond = gm_u[1] if paired else cond
        u_means, u_logweights = uncond["means"], uncond["logweights"]
        if guidance == "weight" and u_means.shape[-4] != cond["means"].shape[-4]:
            raise ValueError(
                f"weight guidance needs matching K: gm_cond has K={cond['means'].shape[-4]}, "
                f"gm_uncond has K={u_means.shape[-4]}"
            )
    has_uncond = guidance in ("probabilistic", "mean-cfg")
    amount = (orthogonal if guidance == "probabilistic" else (1.0 if orthogonal > 0 else 0.0)) if has_uncond else 0.0
    seed = None
    if sde:
        if generator is not None and not isinstance(generator, torch.Generator):
            check_generator(generator)  # raises: an int seed or another library's generator
        gen_device = x.device if generator is None else generator.device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).to(x.device)
    outs = _fused_step_op(
        cond["means"],
        cond["logstds"],
        cond["logweights"],
        u_means,
        u_logweights,
        x,
        sigmas,
        prev_mean,
        seed,
        guidance,
        post,
        float(scale),
        amount,
        h,
        h_prev,
        levels[0],
        levels[1],
        eps,
    )
    return outs[0], (outs[1] if post else None)
