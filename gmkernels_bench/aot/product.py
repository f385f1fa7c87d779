"""AOT cases of ``gmkernels.ops.product`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

from gmkernels.ops.product import _launch_gauss_mul, _launch_gm_mul

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """Both products for a ``(B, K, C, H, W)`` GM and a Gaussian with a per-pixel variance, fp32
    and bf16."""
    cases = []
    for dt in AOT_DTYPES:
        gm = meta_gm(B, K, C, H, W, dt)
        tag = shape_tag(B, K, C, H, W, dt)
        mean = gm["means"].new_empty((B, C, H, W))
        var = gm["means"].new_empty((B, 1, H, W))
        cases += launch_cases(
            f"gm_mul_iso_gaussian[{tag}]",
            _launch_gm_mul,
            gm["means"],
            gm["logstds"],
            gm["logweights"],
            mean,
            var,
            1.0,
            1e-6,
        )
        cases += launch_cases(
            f"iso_gaussian_mul_iso_gaussian[{tag}]", _launch_gauss_mul, mean, var, mean, var, 1.0, 1.0, 1e-6
        )
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
