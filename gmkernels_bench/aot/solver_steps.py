"""AOT cases of the solver steps, ``gmkernels.ops.solver`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

import torch

from gmkernels.ops.solver.ode import _launch_ode
from gmkernels.ops.solver.sde import _sde_step_launch
from gmkernels.ops.solver.step import _step_launches

from . import AOT_DTYPES, SHAPE_SETS, AotCase, launch_cases, meta_gm, shape_tag

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
    sampler's fused step (the body of ``gmkernels::fused_step``) in each of ``variants`` for a
    ``(B, K, C, H, W)`` GM with per-sample stds, fp32 and bf16 (the step: network GM in that
    dtype, float32 state as the schedulers keep it). A step's launches are numbered ``#i`` in
    launch order (statistics pass and coefficients first, the step last)."""
    cases = []
    for dt in AOT_DTYPES:
        g = meta_gm(B, K, C, H, W, dt)
        m, ls, lw = g["means"], g["logstds"], g["logweights"]
        tag = shape_tag(B, K, C, H, W, dt)
        x = m.new_empty((B, C, H, W))
        sig = torch.empty(9, device="meta")
        cases += launch_cases(f"gm_ode_substeps[{tag}]", _launch_ode, m, ls, lw, x, sig, 1e-6)
        seed = torch.empty(1, dtype=torch.int64, device="meta")
        cases += launch_cases(f"gm_sde_step[{tag}]", _sde_step_launch, m, ls, lw, x, seed, 0.8, 0.6, 1.0, 1e-6)
        xf = torch.empty((B, C, H, W), device="meta")
        for solver, order, guidance in variants:
            sde = solver == "gm-sde"
            guided = guidance != "none"
            scale = 2.0 if guided else 0.0
            amount = 1.0 if guidance in ("probabilistic", "mean-cfg") else 0.0  # orthogonal 1.0
            sigmas = torch.empty(2 if sde else 9, device="meta")
            prev = torch.empty((B, C, H, W), device="meta") if order == 2 else None
            cases += launch_cases(
                f"fused_step[{solver},order{order},{guidance},{tag}]",
                _step_launches,
                m,
                ls,
                lw,
                m if guided else None,
                lw if guided else None,
                xf,
                sigmas,
                prev,
                seed if sde else None,
                guidance,
                order == 2,
                scale,
                amount,
                0.1,
                0.1,
                0.8,
                0.6,
                1e-6,
            )
    return cases


def bench_cases() -> list[AotCase]:
    return aot_cases(*SHAPE_SETS["bench"][0], variants=AOT_STEP_VARIANTS)
