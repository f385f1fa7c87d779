"""AOT cases of ``gmkernels.ops.transition`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

import torch

from gmkernels.ops.transition import REVERSE, U_TO_X0, X0_TO_U, _launch

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """The three transitions of a ``(B, K, C, H, W)`` GM with per-sample sigma tensors, fp32
    and bf16."""
    cases = []
    for dt in AOT_DTYPES:
        gm = meta_gm(B, K, C, H, W, dt)
        tag = shape_tag(B, K, C, H, W, dt)
        x = gm["means"].new_empty((B, C, H, W))
        sig = torch.empty((B, 1, 1, 1), device="meta")
        for mode, name in ((U_TO_X0, "u_to_x0"), (X0_TO_U, "x0_to_u"), (REVERSE, "reverse_transition")):
            sig_to = sig if mode == REVERSE else None
            cases += launch_cases(
                f"transition.{name}[{tag}]", _launch, mode, gm["means"], gm["logstds"], x, sig, 0.0, sig_to, 0.0, 1e-6
            )
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
