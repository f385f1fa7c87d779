"""AOT cases of ``gmkernels.ops.likelihood`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

import torch

from gmkernels.ops.likelihood import _launch_loglik, _launch_nll_bwd

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """The NLL forward and backward for a ``(B, K, C, H, W)`` GM and one target per pixel, plain
    and with the transition loss's map (per-sample float32 timesteps), fp32 and bf16; for fp32
    also with the 0-d float64 timesteps that Python floats become."""
    cases = []
    for dt in AOT_DTYPES:
        gm = meta_gm(B, K, C, H, W, dt)
        m, s, lw = gm["means"], gm["logstds"], gm["logweights"]
        y = m.new_empty((B, C, H, W))
        loss = torch.empty((B, H, W), device="meta")
        t = torch.empty((B,), device="meta")
        variants = [((None, None, None), ""), ((y, t, t), ",transition")]
        if dt == "fp32":
            t64 = torch.empty((), device="meta", dtype=torch.float64)
            variants.append(((y, t64, t64), ",transition,t64"))
        for tr, suffix in variants:  # (x_t_high, t_high, t_low)
            tag = shape_tag(B, K, C, H, W, dt) + suffix
            cases += launch_cases(
                f"likelihood.nll_fwd[{tag}]", _launch_loglik, m, s, lw, y, *tr, 1e4, -1.0, 0.0, torch.float32
            )
            cases += launch_cases(f"likelihood.nll_bwd[{tag}]", _launch_nll_bwd, loss, loss, m, s, lw, y, *tr, 1e-4)
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
