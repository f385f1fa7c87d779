"""AOT cases of ``gmkernels.ops.posterior`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

import torch

from gmkernels.ops.posterior import _launch_posterior

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """The launch of ``gm_posterior_mean`` for a ``(B, K, C, H, W)`` GM with per-sample sigmas,
    fp32 and bf16."""
    cases = []
    for dt in AOT_DTYPES:
        gm = meta_gm(B, K, C, H, W, dt)
        x = gm["means"].new_empty((B, C, H, W))
        sig = torch.empty((B, 1, 1, 1), device="meta")
        cases += launch_cases(
            f"gm_posterior_mean[{shape_tag(B, K, C, H, W, dt)}]",
            _launch_posterior,
            gm["means"],
            gm["logstds"],
            gm["logweights"],
            x,
            sig,
            x,
            sig,
            1e-6,
        )
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
