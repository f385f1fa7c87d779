"""Static report of every Triton kernel, compiled ahead of time for sm_80 and sm_90 (no GPU needed).

    python -m gmkernels_bench.compile_report                       # benchmark shapes
    python -m gmkernels_bench.compile_report --shapes users        # the shapes users run
    python -m gmkernels_bench.compile_report --shapes 2,8,16,96,170 1,16,64,32,32
    python -m gmkernels_bench.compile_report --check               # exit 1 on a compile error or a spill
    python -m gmkernels_bench.compile_report --json gmkernels_bench/results/compile_report.json

Each kernel is compiled with the constexprs, ``num_warps`` and ``num_stages`` its launcher picks
for the shape (``B,K,C,H,W``: a GM ``(B, K, C, H, W)``, one sample per pixel, contiguous).
Columns: registers per thread, spill bytes (local memory), shared memory per program, bytes per
thread of the static global loads and the share of those bytes that 128-bit loads carry; then
the hottest loop of the SASS (the largest innermost loop): instructions, barriers, shuffles and
shared-memory accesses per iteration, and thread-instructions per pixel per iteration (loop
instructions x threads / pixels per program). Triton's interpreter must be off: this module
turns ``TRITON_INTERPRET`` off for itself before importing triton.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

LEGEND = (
    "LDG B: bytes per thread of the static global loads; 128b: share of those BYTES moved by 128-bit loads; "
    "smem B: shared memory per program; loop: the hottest SASS loop per iteration: instructions, BAR barriers, "
    "SHFL shuffles, LDS/STS shared-memory accesses; thr-ins/px: loop instructions x threads / pixels per program"
)


def _parse_shapes(items: list[str]) -> list[tuple[int, ...]]:
    from gmkernels_bench.aot import SHAPE_SETS

    shapes: list[tuple[int, ...]] = []
    for item in items:
        if item in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[item])
            continue
        try:
            shape = tuple(int(v) for v in item.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 5 or min(shape) < 1:
            raise SystemExit(
                f"--shapes: {item!r} is neither B,K,C,H,W (five positive integers) nor one of {sorted(SHAPE_SETS)}"
            )
        shapes.append(shape)
    return shapes


def _case_key(case) -> tuple:
    """What the compiled code depends on (not the case name)."""
    return (
        case.kernel.fn.__qualname__ if hasattr(case.kernel, "fn") else case.kernel.__name__,
        tuple(case.signature.items()),
        tuple(sorted(case.constexprs.items())),
        case.num_warps,
        case.num_stages,
        tuple(sorted(case.divisible)),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmkernels_bench.compile_report", description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes",
        nargs="+",
        metavar="B,K,C,H,W",
        help="GM shapes to compile every kernel family at, or a named set ('users', 'bench'); "
        "default: each family's benchmark cases",
    )
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default: 80 90)")
    p.add_argument("--check", action="store_true", help="exit 1 on a compile error or register spills")
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--json", metavar="PATH", help="also write the rows (and failures) as JSON to PATH")
    args = p.parse_args(argv)

    from gmkernels_bench.aot import all_cases, compile_case, shape_cases

    if args.shapes:
        cases = [c for shape in _parse_shapes(args.shapes) for c in shape_cases(*shape)]
    else:
        cases = all_cases()
    cases = [c for c in cases if args.filter in c.name]
    width = max([len(c.name) for c in cases] + [6])
    header = (
        f"{'kernel':<{width}} {'sm':>3} {'regs':>4} {'spill B':>7} {'smem B':>6} {'LDG B':>6} {'128b':>4} "
        f"{'loop':>5} {'BAR':>3} {'SHFL':>4} {'LDS/STS':>7} {'thr-ins/px':>10}"
    )
    print(LEGEND)
    print(header)
    print("-" * len(header))
    failures = []
    rows = []
    done: dict[tuple, object] = {}
    for case in cases:
        for arch in args.arch:
            key = (_case_key(case), arch)
            try:
                r = done[key] if key in done else compile_case(case, arch)
            except Exception as e:  # report every kernel, then fail
                failures.append(f"{case.name} sm_{arch}: compile error: {e}")
                traceback.print_exc(file=sys.stderr)
                print(f"{case.name:<{width}} {arch:>3}  COMPILE ERROR")
                continue
            done[key] = r
            lp = r.loop
            rows.append(
                {
                    "kernel": case.name,
                    "arch": f"sm_{arch}",
                    "registers": r.registers,
                    "local_bytes": r.local_bytes,
                    "shared_bytes": r.shared_bytes,
                    "global_load_bytes": r.global_load_bytes,
                    "share_128bit_load_bytes": r.share_128,
                    "num_warps": case.num_warps,
                    "num_stages": case.num_stages,
                    "pixels_per_program": r.pixels,
                    "constexprs": {k: v for k, v in case.constexprs.items() if k.isupper()},
                    "loop_instructions": lp.instructions if lp else None,
                    "loop_barriers": lp.barriers if lp else None,
                    "loop_shuffles": lp.shuffles if lp else None,
                    "loop_smem_ops": lp.smem_ops if lp else None,
                    "thread_instructions_per_pixel": r.thread_instructions_per_pixel,
                }
            )
            loop = (
                f"{lp.instructions:>5} {lp.barriers:>3} {lp.shuffles:>4} {lp.smem_ops:>7} {r.thread_instructions_per_pixel:>10.1f}"
                if lp
                else f"{'-':>5} {'-':>3} {'-':>4} {'-':>7} {'-':>10}"
            )
            print(
                f"{case.name:<{width}} {arch:>3} {r.registers:>4} {r.local_bytes:>7} {r.shared_bytes:>6} "
                f"{r.global_load_bytes:>6} {100 * r.share_128:>3.0f}% {loop}"
            )
            if r.local_bytes > 0:
                failures.append(f"{case.name} sm_{arch}: {r.local_bytes} bytes of local memory (register spills)")
    print(f"{len(cases)} kernels x {len(args.arch)} targets ({len(done)} distinct compiles)")
    for f in failures:
        print("FAIL:", f)
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton_version": triton.__version__, "rows": rows, "failures": failures}, f, indent=1)
            f.write("\n")
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
