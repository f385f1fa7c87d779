"""AOT cases of ``gmkernels.ops.sampling`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

import torch

from gmkernels.ops.sampling import _launch_sample

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """One sample per pixel of a ``(B, K, C, H, W)`` GM, fp32 and bf16."""
    cases = []
    for dt in AOT_DTYPES:
        gm = meta_gm(B, K, C, H, W, dt)
        seeds = torch.empty(2, dtype=torch.int64, device="meta")
        cases += launch_cases(
            f"gm_sample[{shape_tag(B, K, C, H, W, dt)}]",
            _launch_sample,
            gm["means"],
            gm["logstds"],
            gm["logweights"],
            seeds,
            1,
            1.0,
        )
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
