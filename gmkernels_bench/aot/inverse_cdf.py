"""AOT cases of ``gmkernels.ops.inverse_cdf`` (see ``gmkernels_bench.aot``)."""

from __future__ import annotations

from gmkernels.ops.inverse_cdf import _launch_gm1d_inverse, _launch_kr_cdf, _launch_kr_inverse

from . import AOT_DTYPES, AotCase, bench_shape_cases, launch_cases, meta_gm, shape_tag


def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """For a ``(B, K, C, H, W)`` GM and one sample per pixel, fp32 and bf16: the KR transport
    both ways (``gaussian_samples_to_gm_samples``, ``gm_samples_to_gaussian_samples``) and the
    1-D inverse CDF (``gm1d_inverse_cdf``, the same GM with one channel)."""
    cases = []
    for dt in AOT_DTYPES:
        gm = meta_gm(B, K, C, H, W, dt)
        tag = shape_tag(B, K, C, H, W, dt)
        z = gm["means"].new_empty((B, 1, C, H, W))
        cases += launch_cases(
            f"kr_inverse[{tag}]",
            _launch_kr_inverse,
            gm["means"],
            gm["logstds"],
            gm["logweights"],
            z,
            None,
            2,
            1e-6,
            1.0,
        )
        cases += launch_cases(f"kr_cdf[{tag}]", _launch_kr_cdf, gm["means"], gm["logstds"], gm["logweights"], z)
        gm1 = {k: v.squeeze(-3) for k, v in meta_gm(B, K, 1, H, W, dt).items()}
        u1 = z[:, :, 0].contiguous()
        cases += launch_cases(
            f"kr_inverse_1d[{shape_tag(B, K, 1, H, W, dt)}]",
            _launch_gm1d_inverse,
            gm1["means"],
            gm1["logstds"],
            gm1["logweights"],
            u1,
            u1,
            2,
            1e-6,
            1.0,
        )
    return cases


def bench_cases() -> list[AotCase]:
    return bench_shape_cases(aot_cases)
