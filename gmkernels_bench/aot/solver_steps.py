"""AOT cases of ``gmkernels.ops.solver_steps`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

import torch

from gmkernels.ops.solver_steps import _launch_ode, _launch_sde, fused_step

from . import AOT_DTYPES, SHAPE_SETS, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag

#: the sampler's step variants (``schedulers``' launches, ``gmkernels_bench.cases.step_launches``):
#: solver x order x guidance mode (orthogonal 1.0 where the mode has it)
STEP_VARIANTS = tuple(
    (solver, order, guidance)
    for solver in ("gm-ode", "gm-sde")
    for order in (1, 2)
    for guidance in ("none", "probabilistic", "weight", "mean-cfg")
)
#: the variants in ``bench_cases()`` (the test suite's fast subset): the plain steps and the heaviest
AOT_STEP_VARIANTS = (("gm-ode", 1, "none"), ("gm-sde", 1, "none"), ("gm-ode", 2, "probabilistic"))


def aot_cases(B: int, K: int, C: int, H: int, W: int, variants=STEP_VARIANTS) -> list[AotCase]:
    """The launches of ``gm_ode_substeps`` (8 substeps), ``gm_sde_step`` (Philox) and the
    sampler's ``fused_step`` in each of ``variants`` for a ``(B, K, C, H, W)`` GM with per-sample
    stds, fp32 and bf16 (``fused_step``: network GM in that dtype, float32 state as the
    schedulers keep it). A step's launches are numbered ``#i`` in launch order (statistics
    passes first, the step last)."""
    cases = []
    for dt in AOT_DTYPES:
        g = meta_gm(B, K, C, H, W, dt)
        m, ls, lw = g["means"], g["logstds"], g["logweights"]
        tag = shape_tag(B, K, C, H, W, dt)
        x = m.new_empty((B, C, H, W))
        sig = torch.empty(9, device="meta")
        cases += launch_cases(f"gm_ode_substeps[{tag}]", _launch_ode, m, ls, lw, x, sig, 1e-6)
        seed = torch.empty(1, dtype=torch.int64, device="meta")
        cases += launch_cases(f"gm_sde_step[{tag}]", _launch_sde, m, ls, lw, x, seed, None, None, 0.5, 0.5, 0.1, 1.0)
        xf = torch.empty((B, C, H, W), device="meta")
        for solver, order, guidance in variants:
            sde = solver == "gm-sde"
            gm_u = g if guidance == "none" else (g, g)
            scale = 0.0 if guidance == "none" else 2.0
            sigmas = torch.empty(2 if sde else 9, device="meta")
            prev = torch.empty((B, C, H, W), device="meta") if order == 2 else None
            cases += launch_cases(f"fused_step[{solver},order{order},{guidance},{tag}]", fused_step, gm_u, xf, sigmas, (0.8, 0.6),
                                  sde=sde, guidance=guidance, scale=scale, orthogonal=1.0, prev_mean=prev, h=0.1, h_prev=0.1,
                                  post=order == 2)  # fmt: skip
    return cases


def bench_cases() -> list[AotCase]:
    return aot_cases(*SHAPE_SETS["bench"][0], variants=AOT_STEP_VARIANTS)
