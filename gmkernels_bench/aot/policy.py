"""AOT cases of ``gmkernels.ops.policy`` (see ``gmkernels_bench.aot``): built by hand at the pi-Flow
benchmark shapes, as the policy's launchers need a rollout table the meta recorder cannot fill."""

from __future__ import annotations

from gmkernels.ops.policy import (
    _TILE_BWD, _TILE_FWD, _WARPS_BWD, _blocks, _pi_blocks, _policy_backward_kernel, _policy_pi_kernel, _policy_rollout_kernel,
)

from . import AotCase

BENCH_SHAPES = {"imagenet": (64, 32, 4, 32, 32), "flux": (2, 8, 16, 96, 170)}  # (B, K, C, H, W)


def bench_cases() -> list[AotCase]:
    """The pi-Flow benchmark shapes (ImageNet K=32, C=4, 32x32; FLUX K=8, C=16, 96x170),
    contiguous inputs, fp32 and bf16 (GM and states in that dtype; variances, sigmas and saved
    states fp32): the velocity, the rollout (inference and training) and both backward kernels."""
    cases = []
    for name, (B, K, C, H, W) in BENCH_SHAPES.items():
        P = H * W
        for dt in ("fp32", "bf16"):
            strides = {
                "K": "i32", "C": "i32", "P": "i32",
                "s_mb": "i32", "s_mk": "i32", "s_mc": "i32", "s_mp": "constexpr", "s_lb": "i32", "s_lk": "i32", "s_lp": "constexpr",
                "s_sb": "i32", "s_sc": "i32", "s_sp": "constexpr", "s_xb": "i32", "s_xc": "i32", "s_xp": "constexpr",
            }
            unit = {"s_mp": 1, "s_lp": 1, "s_sp": 1, "s_xp": 1}
            div = ("means_ptr", "lw_ptr", "xs_ptr", "x_ptr", "s_mb", "s_mk", "s_mc", "s_lb", "s_lk", "s_sb", "s_sc", "s_xb", "s_xc")
            gm_ptrs = {"means_ptr": f"*{dt}", "lw_ptr": f"*{dt}", "xs_ptr": f"*{dt}", "x_ptr": f"*{dt}", "var_ptr": "*fp32", "ssrc_ptr": "*fp32"}
            bk, bc, bp = _pi_blocks(K, C, P)
            cases.append(AotCase(
                name=f"policy.pi[{name},B{B},K{K},C{C},{H}x{W},{dt}]",
                kernel=_policy_pi_kernel,
                signature={**gm_ptrs, "sig_ptr": "*fp32", "out_ptr": f"*{dt}", **strides, "NPB": "i32", "eps": "fp32",
                           "BLOCK_K": "constexpr", "BLOCK_C": "constexpr", "BLOCK_P": "constexpr", "INT64": "constexpr"},
                constexprs={**unit, "BLOCK_K": bk, "BLOCK_C": bc, "BLOCK_P": bp, "INT64": False},
                divisible=(*div, "out_ptr"),
            ))
            bk, bc, bp, one = _blocks(K, C, P, _TILE_FWD)
            for save in (False, True):
                cases.append(AotCase(
                    name=f"policy.rollout[{name},B{B},K{K},C{C},{H}x{W},N128,{'train' if save else 'infer'},{dt}]",
                    kernel=_policy_rollout_kernel,
                    signature={**gm_ptrs, "tab_ptr": "*fp32", "out_ptr": f"*{dt}", "ck_ptr": "*fp32", **strides, "N": "i32", "S": "i32",
                               "NPB": "i32", "s_tb": "i32", "s_vb": "constexpr", "s_ssb": "constexpr", "eps": "fp32", "BLOCK_K": "constexpr", "BLOCK_C": "constexpr",
                               "BLOCK_P": "constexpr", "ONE_TILE": "constexpr", "SAVE": "constexpr", "X0": "constexpr", "PIXEL_VAR": "constexpr",
                               "INT64": "constexpr"},
                    constexprs={**unit, "s_vb": 1, "s_ssb": 1, "BLOCK_K": bk, "BLOCK_C": bc, "BLOCK_P": bp, "ONE_TILE": one, "SAVE": save, "X0": False,
                                "PIXEL_VAR": False, "INT64": False},
                    divisible=(*div, "tab_ptr", "out_ptr", "ck_ptr"),
                ))
            bk, bc, bp, one = _blocks(K, C, P, _TILE_BWD)
            for rollout in (False, True):
                cases.append(AotCase(
                    name=f"policy.backward[{name},B{B},K{K},C{C},{H}x{W},{'rollout' if rollout else 'pi'},{dt}]",
                    kernel=_policy_backward_kernel,
                    signature={**gm_ptrs, "tab_ptr": "*fp32", "ck_ptr": "*fp32", "g_ptr": f"*{dt}", "gm_ptr": f"*{dt}", "gl_ptr": f"*{dt}",
                               "gxs_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "gv_ptr": "*fp32", **strides, "N": "i32", "S": "i32",
                               "s_tb": "i32", "eps": "fp32", "BLOCK_K": "constexpr", "BLOCK_C": "constexpr", "BLOCK_P": "constexpr",
                               "ROLLOUT": "constexpr", "INT64": "constexpr"},
                    constexprs={**unit, "BLOCK_K": bk, "BLOCK_C": bc, "BLOCK_P": bp, "ROLLOUT": rollout, "INT64": False},
                    num_warps=_WARPS_BWD,
                    divisible=(*div, "tab_ptr", "ck_ptr", "g_ptr", "gm_ptr", "gl_ptr", "gxs_ptr", "gx_ptr", "gv_ptr"),
                ))
    return cases



def aot_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """The policy kernels are compiled at their own benchmark shapes (``BENCH_SHAPES``) only."""
    return []
