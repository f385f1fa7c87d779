"""AOT cases of ``gmkernels.ops.guidance`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

from gmkernels.ops.guidance import _launch_mean_cfg, _launch_probabilistic, _launch_weight

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """The launches of the three guidance ops for a pair of ``(B, K, C, H, W)`` GMs with
    per-sample stds, fp32 and bf16: probabilistic guidance (statistics ``#0``, apply ``#1``),
    weight guidance, mean-CFG plain and orthogonal (statistics ``#0``, apply ``#1``)."""
    cases = []
    for dt in AOT_DTYPES:
        g = meta_gm(B, K, C, H, W, dt)
        m, ls, lw = g["means"], g["logstds"], g["logweights"]
        tag = shape_tag(B, K, C, H, W, dt)
        cases += launch_cases(f"probabilistic_guidance[{tag}]", _launch_probabilistic, m, ls, lw, m, lw, 2.0, 1.0)
        cases += launch_cases(f"weight_guidance[{tag}]", _launch_weight, lw, lw, 2.0)
        for ortho in (False, True):
            cases += launch_cases(f"mean_cfg[ortho={ortho},{tag}]", _launch_mean_cfg, m, lw, m, lw, 2.0, ortho)
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
