"""AOT cases of ``gmkernels.ops.mixture`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

from gmkernels.ops.mixture import _launch_moments

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """Both launches (mean; mean and variance) for a ``(B, K, C, H, W)`` GM, fp32 and bf16."""
    cases = []
    for dt in AOT_DTYPES:
        gm = meta_gm(B, K, C, H, W, dt)
        tag = shape_tag(B, K, C, H, W, dt)
        cases += launch_cases(f"gm_to_mean[{tag}]", _launch_moments, gm["means"], gm["logweights"], None, 1.0)
        cases += launch_cases(
            f"gm_to_iso_gaussian[{tag}]", _launch_moments, gm["means"], gm["logweights"], gm["logstds"], 1.0
        )
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
