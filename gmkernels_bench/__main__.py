"""Time every gmkernels op, the training loss and the sampling loop against the reference.

``python -m gmkernels_bench`` (console script ``gmkernels-bench``) runs on this device: gmkernels
(Triton on CUDA) vs the reference eager vs ``torch.compile`` of the reference.

    python -m gmkernels_bench --quick                       # all suites, small, fp32, < 2 min on a CPU
    python -m gmkernels_bench --suite ops --shapes imagenet large-k --dtype fp32,bf16
    python -m gmkernels_bench --suite ops --full-size       # on a CPU: the full shapes and timer (10+ min)
    python -m gmkernels_bench --suite train --shapes custom 8,16,4,32,32 --plot
    torchrun --nproc-per-node 8 -m gmkernels_bench --suite solvers   # data-parallel samples/s
    python -m gmkernels_bench --suite pipeline --dtype bf16          # GMDiTPipeline, DiT-XL/2, B=8
    python -m gmkernels_bench --suite policy                         # pi-Flow rollouts (ImageNet, FLUX GM heads)

On a CPU a run is small unless ``--full-size``: the named shapes at ``cases.CPU_SIZES`` (same K
and C), fewer timer repeats, one torch thread, ``torch.compile`` of a subset, fewer solver steps
and policy substeps; the run prints each reduction next to its full size.

Writes ``results.json`` (one record per case and backend), ``results.md`` (the table) and, with
``--plot``, ``results.png`` into ``--out``; prints the table last. How the timing is done:
``gmkernels_bench/timing.py``; what each case reads and writes: ``gmkernels_bench/cases.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

from .timing import TimerConfig

SUITES = ("ops", "solvers", "train", "policy", "all", "pipeline")  # "all" is the first four
BACKENDS = ("triton", "torch", "compile", "graph", "reduce-overhead")
GPU_ONLY = ("graph", "reduce-overhead")  # small batches on CUDA (cases.SMALL_BATCH); absent on a CPU
TRITON_ON_CPU = "triton: skipped on cpu: the Triton interpreter is a correctness tool, not a performance path"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gmkernels-bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("--suite", choices=SUITES, default="all", help="which cases (default: all)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16; fp32 with --quick)")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["imagenet", "large-k"],
        metavar="SHAPE",
        help="imagenet (B=256,K=8,C=4,32x32), large-k (B=32,K=256,C=4,32x32) and/or custom B,K,C,H,W "
        "(default: imagenet large-k; on a CPU the named ones shrink to B=4,16x16 and B=1,8x8 unless --full-size)",
    )
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma list of triton,torch,compile,graph,reduce-overhead (default: all; graph = the Triton op "
        "replayed from a CUDA graph, reduce-overhead = torch.compile(mode='reduce-overhead'): both on a GPU "
        "at batches <= 8 only)",
    )
    p.add_argument("--filter", default="", help="only cases whose op name contains this")
    p.add_argument(
        "--compile-solvers",
        action="store_true",
        help="also torch.compile the reference sampling loop (it unrolls steps x substeps: minutes per configuration)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats and solver steps, fp32 only (on a CPU also the default small shapes and compiled subset)",
    )
    size.add_argument(
        "--full-size",
        action="store_true",
        help="on a CPU: the full named shapes, timer, solver steps, policy rollouts and every op compiled "
        "(default there: a small run that finishes in minutes)",
    )
    p.add_argument("--out", default="bench-out", help="output directory (default: ./bench-out)")
    p.add_argument("--plot", action="store_true", help="also write results.png (matplotlib)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 in a small CPU run, without --full-size)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument(
        "--pipeline-model",
        choices=("xl2", "tiny"),
        default="xl2",
        help="--suite pipeline: random GM-DiT at DiT-XL/2 size (default) or a 2-layer one",
    )
    p.add_argument(
        "--pipeline-steps",
        default="32,4",
        metavar="STEPS,SUBSTEPS",
        help="--suite pipeline: network calls and GM-ODE substeps per call (default: 32,4)",
    )
    p.add_argument("--pipeline-batch", type=int, default=8, help="--suite pipeline: images per call (default: 8)")
    return p


def _dtypes(arg: str | None, quick: bool) -> list[torch.dtype]:
    from .runner import DTYPES

    names = (arg or ("fp32" if quick else "fp32,bf16")).split(",")
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise ValueError(f"--dtype: unknown {bad}; use a comma list of {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names]


def _backends(arg: str) -> list[str]:
    names = [b for b in arg.split(",") if b]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise ValueError(f"--backends: unknown {bad or names}; use a comma list of {', '.join(BACKENDS)}")
    return names


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="gmkernels-bench", unit="case", file=sys.stderr, dynamic_ncols=True, leave=False)


def _small_cpu_notes(
    args: argparse.Namespace, suites: tuple[str, ...], backends: list[str], cfg: TimerConfig
) -> list[str]:
    """What a small CPU run (``cases.small_run``: the default on a CPU) reduces, each next to its
    full size, for the suites and backends of this run; the first line says how to get the full run."""
    from .cases import CPU_COMPILE, cpu_size_notes, small_cpu_lines

    full = TimerConfig.for_run(torch.device("cpu"), False)
    notes = cpu_size_notes(args.shapes, suites)
    notes.append(
        f"timer {cfg.repeats} batches of >= {cfg.min_batch_s * 1e3:g} ms, <= {cfg.max_total_s:g} s a case "
        f"(full {full.repeats} of >= {full.min_batch_s * 1e3:g} ms, <= {full.max_total_s:g} s)"
    )
    if args.threads is None:
        notes.append("1 torch thread (full: torch's choice; --threads N to set)")
    if "compile" in backends and set(suites) & {"ops", "train"}:
        notes.append(
            f"torch.compile of {' and '.join(CPU_COMPILE)} at the first shape only "
            "(full: every op at every shape; it costs seconds per op, shape and dtype)"
        )
    return small_cpu_lines(notes)


def _finish(args: argparse.Namespace, meta: dict, records: list[dict], t0: float) -> int:
    from .report import add_speedups, markdown, plot, write_json

    add_speedups(records)
    env = {k: meta[k] for k in ("device", "torch_version", "triton_version", "git_commit")}
    for r in records:
        r.update(env)
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, "results.json"), os.path.join(args.out, "results.md")]
    write_json(paths[0], meta, records)
    table = markdown(meta, records)
    for t in meta.get("step_traffic", ()):  # the sampler-step traffic model (cases.step_traffic), per shape
        table += (
            "\nSampler-step traffic model (bytes per network call on the fused Triton path, not a measurement):\n\n"
            + t
            + "\n"
        )
    with open(paths[1], "w") as f:
        f.write(table)
    if args.plot:
        paths.append(os.path.join(args.out, "results.png"))
        plot(paths[2], records, meta)
    errors = sum(r["status"] != "ok" for r in records)
    print(f"wrote {', '.join(paths)}; {len(records)} records, {errors} errors, {time.perf_counter() - t0:.1f} s")
    print()
    print(table, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status. Torch's
    CPU thread count is restored on return."""
    threads = torch.get_num_threads()
    try:
        return _main(_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        dtypes = _dtypes(args.dtype, args.quick)
        backends = _backends(args.backends)
        from .cases import parse_shapes

        parse_shapes(args.shapes, torch.device("cpu"), args.quick)  # syntax errors before any work
    except ValueError as e:
        _parser().error(str(e))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        _parser().error("--plot needs matplotlib (pip install matplotlib)")

    from . import distributed
    from .report import environment

    if distributed.world_size() > 1:
        if args.suite != "solvers":
            _parser().error("under torchrun only --suite solvers runs (data-parallel sampling throughput)")
        repeats = 2 if args.quick else 5
        records, notes, device, rank = distributed.run_solvers(
            args.device, args.shapes, dtypes, args.quick, args.full_size, repeats, args.filter
        )
        if rank != 0:
            return 0
        meta = {**environment(device), "copy_gbps": None, "quick": args.quick, "notes": notes}
        for n in notes:
            print(n)
        return _finish(args, meta, records, t0)

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        _parser().error(f"--device: unknown device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            _parser().error(f"--device {args.device}: CUDA is not available here")
        torch.cuda.set_device(device)
    from .cases import (
        CPU_COMPILE,
        op_cases,
        policy_cases,
        sample_unavailable,
        small_run,
        solver_cases,
        traffic_table,
        train_cases,
    )
    from .runner import run_case
    from .timing import copy_bandwidth

    small = small_run(device, args.quick, args.full_size)
    small_cpu = small and device.type == "cpu"
    shapes = parse_shapes(args.shapes, device, small)
    cfg = TimerConfig.for_run(device, small)
    notes: list[str] = []
    if args.threads is None and small_cpu:
        torch.set_num_threads(1)  # OpenMP threads spin on busy cores and the timings scatter
    if args.suite == "pipeline":
        return _pipeline(args, device, dtypes, notes, t0)
    if "triton" in backends and device.type != "cuda":
        backends.remove("triton")
        notes.append(TRITON_ON_CPU)
    if device.type != "cuda":
        backends = [b for b in backends if b not in GPU_ONLY]
    suites = ("ops", "train", "solvers", "policy") if args.suite == "all" else (args.suite,)
    if "solvers" in suites:
        reason = sample_unavailable(device)
        if reason is not None:
            suites = tuple(s for s in suites if s != "solvers")
            notes.append(f"solvers: skipped: {reason}")
        elif "compile" in backends and not args.compile_solvers:
            notes.append(
                "solvers: torch.compile of the sampling loop is opt-in (--compile-solvers): it unrolls every step and substep"
            )
    if small_cpu:
        notes += _small_cpu_notes(args, suites, backends, cfg)

    meta = {**environment(device), "quick": args.quick, "notes": notes}
    if "solvers" in suites:
        meta["step_traffic"] = [traffic_table(s) for s in shapes]
    print(
        f"gmkernels-bench on {meta['device']} (torch {meta['torch_version']}, triton {meta['triton_version']}, commit {meta['git_commit']})"
    )
    for n in notes:
        print(n)
    copy_bw, probe_bytes = copy_bandwidth(device, cfg, small)
    meta.update(
        copy_gbps=copy_bw / 1e9,
        copy_probe_bytes=probe_bytes,
        backends=backends,
        timer={
            "repeats": cfg.repeats,
            "warmup_s": cfg.warmup_s,
            "min_batch_s": cfg.min_batch_s,
            "max_total_s": cfg.max_total_s,
        },
    )
    print(f"copy bandwidth probe: {copy_bw / 1e9:.1f} GB/s (dst.copy_(src), {probe_bytes >> 20} MiB buffers)")

    max_copies = 16 if small_cpu else 64
    cases = []
    for i, shape in enumerate(shapes):
        compile_ops = (CPU_COMPILE if i == 0 else ()) if small_cpu else None
        for dtype in dtypes:
            if "ops" in suites:
                cases += op_cases(shape, dtype, device, compile_ops)
            if "train" in suites:
                cases += train_cases(shape, dtype, device, compile_ops)
            if "solvers" in suites:
                cases += solver_cases(
                    shape, dtype, device, small, compile_loop=args.compile_solvers, max_copies=max_copies
                )
    if "policy" in suites:  # its own shapes (pi-Flow's ImageNet and FLUX GM heads)
        for dtype in dtypes:
            cases += policy_cases(dtype, device, small, compile_ok=not small_cpu)
    cases = [c for c in cases if args.filter in c.op]
    records: list[dict] = []
    for case in _progress(cases, not args.no_progress):
        records += run_case(case, backends, device, cfg, copy_bw, max_copies)
    return _finish(args, meta, records, t0)


def _pipeline(
    args: argparse.Namespace, device: torch.device, dtypes: list[torch.dtype], notes: list[str], t0: float
) -> int:
    """``--suite pipeline``: ``gmkernels_bench/pipeline.py``."""
    if importlib.util.find_spec("diffusers") is None:
        _parser().error("--suite pipeline needs diffusers (pip install 'gmkernels[diffusers]')")
    from .pipeline import parse_steps, pipeline_records
    from .report import environment

    try:
        steps, substeps = parse_steps(args.pipeline_steps)
    except ValueError as e:
        _parser().error(str(e))
    if args.pipeline_batch < 1:
        _parser().error(f"--pipeline-batch must be >= 1, got {args.pipeline_batch}")
    notes.append(
        "pipeline: random weights, output_type='latent' (VAE decode not timed); sampler = call time - transformer time"
    )
    meta = {**environment(device), "quick": args.quick, "notes": notes, "copy_gbps": None}
    print(
        f"gmkernels-bench on {meta['device']} (torch {meta['torch_version']}, triton {meta['triton_version']}, commit {meta['git_commit']})"
    )
    for n in notes:
        print(n)
    records = pipeline_records(
        device, dtypes, args.pipeline_model, steps, substeps, args.pipeline_batch, repeats=1 if args.quick else 3
    )
    return _finish(args, meta, records, t0)


if __name__ == "__main__":
    sys.exit(main())
