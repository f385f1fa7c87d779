"""AOT cases of ``gmkernels.ops.policy`` (see ``gmkernels_bench.aot``): its real launchers run on
``meta`` tensors at the pi-Flow benchmark shapes, so the cases are what a launch compiles."""

from __future__ import annotations

import torch

from gmkernels.ops._launch import cdiv
from gmkernels.ops.policy import _launch_backward, _launch_pi, _launch_rollout, checkpoint_stride

from . import AOT_DTYPES, AotCase, launch_cases, meta_gm

BENCH_SHAPES = {"imagenet": (64, 32, 4, 32, 32), "flux": (2, 8, 16, 96, 170)}  # (B, K, C, H, W)
N_SUBSTEPS = 128


def bench_cases() -> list[AotCase]:
    """The pi-Flow benchmark shapes (ImageNet K=32, C=4, 32x32; FLUX K=8, C=16, 96x170),
    contiguous inputs, fp32 and bf16 (GM and states in that dtype; variances, sigmas and saved
    states fp32): the velocity, the rollout of ``N_SUBSTEPS`` substeps (inference and training)
    and the backward of both."""
    cases = []
    N = N_SUBSTEPS
    for name, (B, K, C, H, W) in BENCH_SHAPES.items():
        for dt in AOT_DTYPES:
            gm = meta_gm(B, K, C, H, W, dt)
            m, lw = gm["means"], gm["logweights"]
            x = m.new_empty((B, C, H, W))
            per_sample = torch.empty((B,), device="meta")  # variances and sigmas, fp32
            table = torch.empty((B, N + 1), device="meta")
            ck = torch.empty((B, cdiv(N, checkpoint_stride(N)), C, H * W), device="meta")
            tag = f"{name},B{B},K{K},C{C},{H}x{W}"
            state = (m, per_sample, lw, x, per_sample, x)  # means_u, gm_vars, logweights, x_src, sigma_src, x
            cases += launch_cases(f"policy.pi[{tag},{dt}]", _launch_pi, *state, per_sample, 1e-6)
            for save in (False, True):
                cases += launch_cases(
                    f"policy.rollout[{tag},N{N},{'train' if save else 'infer'},{dt}]",
                    _launch_rollout,
                    *state,
                    table,
                    1e-6,
                    save,
                )
            cases += launch_cases(
                f"policy.backward[{tag},pi,{dt}]", _launch_backward, x, *state, per_sample.view(-1, 1), x, 1e-6, False
            )
            cases += launch_cases(
                f"policy.backward[{tag},rollout,{dt}]", _launch_backward, x, *state, table, ck, 1e-6, True
            )
    return cases


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """The policy kernels are compiled at their own benchmark shapes (``BENCH_SHAPES``) only."""
    return []
