"""Static report of every Triton kernel, compiled ahead of time for sm_80 and sm_90 (no GPU needed).

    python -m gmkernels_bench.compile_report                       # benchmark shapes
    python -m gmkernels_bench.compile_report --shapes users        # the shapes users run
    python -m gmkernels_bench.compile_report --shapes 2,8,16,96,170 1,16,64,32,32
    python -m gmkernels_bench.compile_report --check               # exit 1 on a compile error or a spill
    python -m gmkernels_bench.compile_report --filter guidance,mean_cfg --jobs 4
    python -m gmkernels_bench.compile_report --json gmkernels_bench/results/compile_report.json

Each kernel is compiled with the constexprs, ``num_warps`` and ``num_stages`` its launcher picks
for the shape (``B,K,C,H,W``: a GM ``(B, K, C, H, W)``, one sample per pixel, contiguous).
Columns: registers per thread, spill bytes (local memory), shared memory per program, bytes per
thread of the static global loads and the share of those bytes that 128-bit loads carry; then
the hottest loop of the SASS (the largest innermost loop): instructions, barriers, shuffles and
shared-memory accesses per iteration, and thread-instructions per pixel per iteration (loop
instructions x threads / pixels per program). Triton's interpreter must be off: this module
turns ``TRITON_INTERPRET`` off for itself before importing triton. The distinct specialisations
compile in parallel (``--jobs``, default one process per CPU); the table is printed in case order.
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


def cache_dir() -> str:
    """Where compile rows and counted traffic are cached: ``$GMKERNELS_BENCH_CACHE`` or
    ``~/.cache/gmkernels_bench``."""
    return os.environ.get("GMKERNELS_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gmkernels_bench")


def _source_hash(case) -> str:
    """The source a kernel's compile depends on: every module of its package and of the parent
    package (its jit helpers may come from a sibling module, e.g. ``gmkernels.ops.policy``)."""
    import hashlib
    from pathlib import Path

    fn = getattr(case.kernel, "fn", case.kernel)
    folder = Path(sys.modules[fn.__module__].__file__).resolve().parent
    h = hashlib.sha256()
    for d in (folder, folder.parent):
        for p in sorted(d.glob("*.py")):
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _row(case, r) -> dict:
    lp = r.loop
    return {"kernel": case.name, "arch": f"sm_{r.arch}", "registers": r.registers, "local_bytes": r.local_bytes,
            "shared_bytes": r.shared_bytes, "global_load_bytes": r.global_load_bytes,
            "share_128bit_load_bytes": r.share_128, "num_warps": case.num_warps,
            "num_stages": case.num_stages, "pixels_per_program": r.pixels,
            "constexprs": {k: v for k, v in case.constexprs.items() if k.isupper()},
            "loop_instructions": lp.instructions if lp else None, "loop_barriers": lp.barriers if lp else None,
            "loop_shuffles": lp.shuffles if lp else None, "loop_smem_ops": lp.smem_ops if lp else None,
            "thread_instructions_per_pixel": r.thread_instructions_per_pixel}  # fmt: skip


def _compile_entry(case, arch: int, with_profile: bool) -> tuple:
    """Compile ``case`` for ``sm_<arch>``: ``(entry, None)`` with the cache entry (``row``, and
    ``profile`` when asked), or ``(None, (message, traceback text))`` on a compile error. Text,
    not the exception: a worker process hands it back pickled."""
    from gmkernels_bench.aot import compile_case

    try:
        r = compile_case(case, arch)
        entry = {"row": _row(case, r)}
        if with_profile:
            from gmkernels_bench.perfmodel import sass_profile
            from gmkernels_bench.traffic import statement_line

            entry["profile"] = sass_profile(r.sass, statement_line)
        return entry, None
    except Exception as e:  # report every kernel, then fail
        return None, (str(e), traceback.format_exc())


#: the ``(case, arch)`` pairs a forked compile worker takes by index (set by ``_init_worker``)
_WORK: list = []


def _init_worker(work: list) -> None:
    global _WORK
    _WORK = work


def _compile_indexed(i: int, with_profile: bool) -> tuple:
    return _compile_entry(*_WORK[i], with_profile)


def default_jobs() -> int:
    """The CPUs this process may run on: compiling (MLIR passes, ``ptxas``, ``nvdisasm``) is
    CPU-bound, so one worker per CPU."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _compiled(work: list, with_profile: bool, jobs: int):
    """``_compile_entry`` of each ``(case, arch)`` of ``work``, yielded in ``work``'s order. With
    ``jobs > 1`` they compile in up to ``jobs`` worker processes, forked so the workers inherit
    the cases (a case holds its ``JITFunction``, which does not pickle) and are handed only
    indices."""
    if jobs <= 1 or len(work) <= 1:
        for case, arch in work:
            yield _compile_entry(case, arch, with_profile)
        return
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(min(jobs, len(work)), mp_context=ctx, initializer=_init_worker, initargs=(work,))
    try:
        yield from pool.map(functools.partial(_compile_indexed, with_profile=with_profile), range(len(work)))
    finally:  # closed early (the caller failed): drop the compiles not started
        pool.shutdown(cancel_futures=True)


def compile_rows(cases, archs=(80, 90), cache: bool = True, profile: bool = False, on_row=None, jobs=None):
    """Compile every case for every ``sm_<arch>`` (each distinct specialisation once) and return
    ``(rows, failures)``: one row per case and arch (the ``--json`` rows, plus ``grid`` and, with
    ``profile``, ``profile``: ``gmkernels_bench.perfmodel.sass_profile`` of its SASS). With
    ``cache`` a row is kept on disk (``cache_dir()``) under its specialisation, the source of
    its kernel's package (``_source_hash``), the triton version and the checkout, so a later call
    compiles only what changed. The specialisations to compile are compiled in ``jobs`` processes
    (default ``default_jobs()``). ``on_row(case, arch, row, error)`` is called in the order of
    ``cases`` and ``archs``, as rows come (``error``: the compile error's message, ``row`` then
    ``None``)."""
    import hashlib

    import triton

    folder = os.path.join(cache_dir(), "compile")
    with_profile = profile or cache
    order = [(case, arch, (_case_key(case), arch)) for case in cases for arch in archs]
    # every specialisation's cached entry, or its first (case, arch) to compile
    done: dict[tuple, dict] = {}
    paths: dict[tuple, str] = {}
    work: list[tuple] = []
    sources: dict[object, str] = {}
    for case, arch, key in order:
        if key in paths:
            continue
        fn = getattr(case.kernel, "fn", case.kernel)
        if fn not in sources:
            sources[fn] = _source_hash(case)
        digest = hashlib.sha256(
            repr((key, sources[fn], triton.__version__, os.path.dirname(os.path.abspath(__file__)))).encode()
        ).hexdigest()[:24]
        paths[key] = path = os.path.join(folder, f"{digest}.json")
        entry = None
        if cache and os.path.exists(path):
            try:
                with open(path) as f:
                    entry = json.load(f)
            except (OSError, ValueError):
                entry = None
        if entry is None or (profile and "profile" not in entry):
            work.append((case, arch))
        else:
            done[key] = entry

    rows, failures = [], []
    errors: dict[tuple, tuple[str, str]] = {}
    results = _compiled(work, with_profile, default_jobs() if jobs is None else jobs)
    try:
        for case, arch, key in order:
            if key not in done and key not in errors:  # the next result is this key's (work is in this order)
                entry, error = next(results)
                if error is not None:
                    errors[key] = error
                else:
                    done[key] = entry
                    if cache:
                        os.makedirs(folder, exist_ok=True)
                        tmp = f"{paths[key]}.{os.getpid()}.tmp"
                        with open(tmp, "w") as f:
                            json.dump(entry, f)
                        os.replace(tmp, paths[key])
            if key in errors:  # every case of a failing specialisation is reported
                message, trace = errors[key]
                failures.append(f"{case.name} sm_{arch}: compile error: {message}")
                sys.stderr.write(trace)
                if on_row:
                    on_row(case, arch, None, message)
                continue
            entry = done[key]
            row = dict(entry["row"], kernel=case.name, grid=list(case.grid))
            if profile:
                row["profile"] = entry["profile"]
            rows.append(row)
            if row["local_bytes"] > 0:
                failures.append(f"{case.name} sm_{arch}: {row['local_bytes']} bytes of local memory (register spills)")
            if on_row:
                on_row(case, arch, row, None)
    finally:
        results.close()  # a failure above stops the workers
    return rows, failures


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
    p.add_argument(
        "--filter", default="", help="only cases whose name contains this (or, comma-separated, any of these)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="compile in this many processes (default: the CPUs this process may use, %(default)s here)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows (and failures) as JSON to PATH")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="compile everything again (default: rows are cached on disk "
        "per specialisation and kernel source, see cache_dir())",
    )
    args = p.parse_args(argv)

    from gmkernels_bench.aot import all_cases, shape_cases

    if args.shapes:
        cases = [c for shape in _parse_shapes(args.shapes) for c in shape_cases(*shape)]
    else:
        cases = all_cases()
    parts = args.filter.split(",")
    cases = [c for c in cases if any(part in c.name for part in parts)]
    width = max([len(c.name) for c in cases] + [6])
    header = (
        f"{'kernel':<{width}} {'sm':>3} {'regs':>4} {'spill B':>7} {'smem B':>6} {'LDG B':>6} {'128b':>4} "
        f"{'loop':>5} {'BAR':>3} {'SHFL':>4} {'LDS/STS':>7} {'thr-ins/px':>10}"
    )
    print(LEGEND)
    print(header)
    print("-" * len(header))

    def show(case, arch, r, error):
        if r is None:
            print(f"{case.name:<{width}} {arch:>3}  COMPILE ERROR")
            return
        if r["loop_instructions"] is not None:
            loop = (f"{r['loop_instructions']:>5} {r['loop_barriers']:>3} {r['loop_shuffles']:>4} {r['loop_smem_ops']:>7} "
                    f"{r['thread_instructions_per_pixel']:>10.1f}")  # fmt: skip
        else:
            loop = f"{'-':>5} {'-':>3} {'-':>4} {'-':>7} {'-':>10}"
        print(f"{case.name:<{width}} {arch:>3} {r['registers']:>4} {r['local_bytes']:>7} {r['shared_bytes']:>6} "
              f"{r['global_load_bytes']:>6} {100 * r['share_128bit_load_bytes']:>3.0f}% {loop}")  # fmt: skip

    rows, failures = compile_rows(cases, args.arch, cache=not args.no_cache, on_row=show, jobs=args.jobs)
    done = {(_case_key(c), a) for c in cases for a in args.arch}
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
