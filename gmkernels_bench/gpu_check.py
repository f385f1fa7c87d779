"""One prepared check of gmkernels on a CUDA GPU, within a time budget.

    PYTHONPATH=. python -m gmkernels_bench.gpu_check --budget-s 480 --out DIR
    PYTHONPATH=. python -m gmkernels_bench.gpu_check --dry-run        # the plan, on any machine
    PYTHONPATH=. python -m gmkernels_bench.gpu_check --parts calibrate --budget-s 90 --calibrate calibration.json

For a CUDA machine that has torch, triton, pytest and hypothesis but no network: run it from a
checkout, nothing to install (tqdm, matplotlib and scikit-learn are used when present). The parts
run in this order, each in its own process (a CUDA error in one cannot poison the next), each
until its point of a cumulative schedule (a part that ends early leaves its time to the later
ones), all within ``--budget-s``. A budget too small for every part drops the later ones (the
plan says which and why) rather than squeezing work that takes what it takes (``plan``):

0. ``calibrate`` (``gmkernels_bench.calibrate``, ~45 s): copy bandwidth, DRAM latency (a pointer
   chase), the launch cost and 10 representative launches timed by the profiler, written next
   to the stored estimates of ``gmkernels_bench.estimate``; the refitted device constants go to
   ``--calibrate FILE`` (default ``DIR/calibration.json``), which ``estimate --calibration FILE``
   reads.
1. ``tests``: the Triton kernel test files (``KERNEL_TESTS``) with the kernels compiled for and
   run on the GPU: the tests build their inputs on the CPU as always, and this module's pytest
   plugin mirrors each launch's CPU tensors byte for byte (same storage, offsets and strides) onto
   the GPU, launches the compiled kernel there and copies the results back, so every assertion
   compares the GPU's output with the float64 reference. Hypothesis draws from a fixed seed
   (``derandomize``), ``--examples`` per property (default sized to the budget). The compile
   report (``compile_report``, CPU-only) is not run.
2. ``graph``: ``gmkernels.sample`` (GM-ODE and GM-SDE, both guided) captured in a CUDA graph with
   the recipe of ``gmkernels/sampler.py`` and replayed; the replay must equal the eager call for
   the same seed and noise.
3. ``train``: 20 AdamW steps of the ``digits`` GM-DiT on CUDA with bf16 autocast and the fused
   Triton ``transition_loss``: every loss finite, the loss of a fixed held-out batch lower after
   the steps than before, and the Triton loss equal to the reference's on that batch.
4. ``bench-*``: ``python -m gmkernels_bench`` at the README's shapes (``imagenet``, ``large-k``),
   fp32 and bf16, backends ``triton`` and ``torch`` (``torch.compile`` costs minutes per op:
   left out): ``ops`` per shape, ``train``, ``solvers`` (the ``--quick`` solver configurations),
   each into ``DIR/bench/<part>/`` (``results.json``, ``results.md``, ``results.png`` with
   matplotlib).

``DIR/summary.json`` (device, driver, CUDA, torch / triton versions, commit, per part: status
``pass`` / ``fail`` / ``timeout`` / ``skipped``, seconds, details) is rewritten after every part,
so a run stopped at any point keeps what it has; each part's log is ``DIR/<part>.log``.
Exit status 0 when every part passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The test files that run Triton kernels (also what tools/matrix.py runs per torch x triton pair).
KERNEL_TESTS = (
    "tests/test_mixture.py",
    "tests/test_product.py",
    "tests/test_posterior.py",
    "tests/test_transition.py",
    "tests/test_guidance.py",
    "tests/test_likelihood.py",
    "tests/test_sampling.py",
    "tests/test_inverse_cdf.py",
    "tests/test_solver.py",
    "tests/test_policy.py",
)
BENCH_SHAPES = ("imagenet", "large-k")
BENCH_DTYPES = "fp32,bf16"
TRAIN_STEPS = 20
SEED = 0
REFERENCE_BUDGET_S = 480.0


@dataclass(frozen=True)
class Part:
    name: str
    estimate_s: float  # what it needs at --budget-s 480
    what: str
    #: 0: fixed work (training steps, a benchmark's cases, the calibration), which needs
    #: ``estimate_s`` or is dropped; else the least it is useful with (the tests: fewer
    #: hypothesis examples, stopped at their deadline)
    min_s: float = 0.0

    @property
    def need_s(self) -> float:
        return self.min_s or self.estimate_s


@dataclass(frozen=True)
class PlanEntry:
    part: Part
    share: float  # seconds of the budget; 0: dropped
    reason: str = ""  # why it is dropped


# Estimates for an H100/H200-class GPU. Nothing has been timed on a GPU yet: they are budgets
# from the work each part does (Triton compiles of ~1 s per kernel specialisation dominate the
# tests and the first benchmark calls), refined once a run's summary.json gives the real seconds.
# Run order is priority: when the budget cannot hold every part, the later ones are dropped.
PARTS = (
    Part(
        "calibrate",
        45,
        "copy bandwidth, DRAM latency (pointer chase), launch cost, 10 representative launches: "
        "estimated vs measured, device constants refitted (--calibrate FILE)",
    ),
    Part("tests", 145, f"{len(KERNEL_TESTS)} kernel test files on CUDA, fixed seeds", min_s=30),
    Part("graph", 25, "CUDA-graph capture + replay of guided GM-ODE and GM-SDE sampling vs eager"),
    Part("train", 35, f"{TRAIN_STEPS} steps of the digits GM-DiT, bf16 autocast, Triton transition loss"),
    Part("bench-ops-imagenet", 60, "benchmark, ops suite, imagenet shape, fp32+bf16"),
    Part("bench-ops-large-k", 60, "benchmark, ops suite, large-k shape, fp32+bf16"),
    Part("bench-train", 25, "benchmark, train suite (NLL fwd+bwd), both shapes, fp32+bf16"),
    Part("bench-solvers", 55, "benchmark, solvers suite (quick configurations), both shapes, fp32+bf16"),
)
RESERVE_S = 30  # process start-ups and the summary, outside every part's share
TESTS_REFERENCE_S = 145.0  # the tests' share at which they draw 8 examples per property


def plan(budget_s: float, wanted: list[str] | None = None) -> list[PlanEntry]:
    """Each part (of ``wanted``, default all) with its share of ``budget_s``. Parts are kept in
    run order while what they need fits (``Part.need_s``); a part that does not fit is dropped
    (share 0, with the reason), never squeezed below its fixed work. The kept parts get their
    estimates; what is left goes to the parts that scale (the tests), or to every kept part
    when none does (a part that ends early leaves its time to the later ones), so the shares
    and ``RESERVE_S`` fill the budget."""
    parts = [p for p in PARTS if not wanted or p.name in wanted]
    avail = budget_s - RESERVE_S
    kept: list[Part] = []
    entries: dict[str, PlanEntry] = {}
    need = 0.0
    for p in parts:
        if need + p.need_s <= avail + 1e-9:
            kept.append(p)
            need += p.need_s
        else:
            entries[p.name] = PlanEntry(
                p, 0.0, f"dropped: needs {p.need_s:.0f} s, {max(avail - need, 0):.0f} s of the budget left"
            )
    shares = {p.name: p.need_s for p in kept}
    left = avail - sum(shares.values())
    scalable = [p for p in kept if p.min_s]
    # scalable parts first up to their estimate, then everything left in proportion
    for p in scalable:
        add = min(left, p.estimate_s - shares[p.name])
        shares[p.name] += add
        left -= add
    grow = scalable or kept
    total = sum(p.estimate_s for p in grow)
    for p in grow:
        shares[p.name] += left * p.estimate_s / total if total else 0.0
    for p in kept:
        entries[p.name] = PlanEntry(p, shares[p.name])
    return [entries[p.name] for p in parts]


def default_examples(budget_s: float) -> int:
    """Hypothesis examples per property for the tests part: 8 at its 480 s share, in proportion
    to its share, 2 to 50."""
    share = next((e.share for e in plan(budget_s) if e.part.name == "tests"), 0.0)
    return int(min(50, max(2, round(8 * share / TESTS_REFERENCE_S))))


# ---------------------------------------------------------------------------------------------
# parent: the schedule, the summary


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _environment() -> dict:
    import torch

    from .report import environment

    env = environment(torch.device("cuda"))
    env.update(driver_version=_driver_version(), gpu_count=torch.cuda.device_count(), hostname=platform.node())
    return env


def _child_cmd(
    part: str, out: Path, deadline: float, examples: int, plot: bool, calibration: Path | None = None
) -> list[str]:
    if part.startswith("bench-"):
        suite, _, shape = part[len("bench-") :].partition("-")
        shapes = [shape] if shape else list(BENCH_SHAPES)
        cmd = [
            sys.executable,
            "-m",
            "gmkernels_bench",
            "--suite",
            suite,
            "--shapes",
            *shapes,
            "--dtype",
            BENCH_DTYPES,
            "--backends",
            "triton,torch",
            "--out",
            str(out / "bench" / part[len("bench-") :]),
            "--no-progress",
        ]
        if suite == "solvers":
            cmd.append("--quick")
        if plot:
            cmd.append("--plot")
        return cmd
    return [
        sys.executable,
        "-m",
        "gmkernels_bench.gpu_check",
        "--part",
        part,
        "--out",
        str(out),
        "--deadline",
        f"{deadline:.3f}",
        "--examples",
        str(examples),
    ] + (["--calibrate", str(calibration)] if calibration else [])


def _bench_details(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.exists():
        return {"records": 0, "errors": None, "note": "no results.json"}
    records = json.loads(path.read_text())["records"]
    errors = [
        f"{r['op']} {r['backend']} {r['dtype']} {r['shape']}: {r.get('reason', '')}"
        for r in records
        if r["status"] != "ok"
    ]
    return {"records": len(records), "errors": len(errors), "error_lines": errors[:20]}


def _run_part(
    part: Part, out: Path, deadline: float, examples: int, plot: bool, calibration: Path | None = None
) -> dict:
    """Run one part in a child process until ``deadline`` (epoch seconds); its summary entry."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = _child_cmd(part.name, out, deadline, examples, plot, calibration)
    log = out / f"{part.name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, timed_out = None, True
    entry = {
        "part": part.name,
        "what": part.what,
        "seconds": round(time.time() - t0, 1),
        "exit_status": rc,
        "log": log.name,
    }
    if part.name.startswith("bench-"):
        details = _bench_details(out / "bench" / part.name[len("bench-") :])
        ok = rc == 0 and details["errors"] == 0
    else:
        result = out / f"{part.name}.json"
        details = json.loads(result.read_text()) if result.exists() else {}
        if part.name == "tests" and not details:  # killed at the budget: what the plugin recorded
            details = _test_outcomes(out / "tests.jsonl")
        ok = rc == 0 and details.get("ok", False)
    entry["status"] = "timeout" if timed_out else ("pass" if ok else "fail")
    entry["details"] = details
    return entry


def _write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")


def _print_plan(budget_s: float, examples: int, wanted: list[str] | None = None) -> None:
    print(f"gpu_check plan for --budget-s {budget_s:g} (hypothesis: {examples} examples per property, fixed seed):")
    total = 0.0
    for e in plan(budget_s, wanted):
        total += e.share
        if e.share:
            print(f"  {e.part.name:<20} {e.share:6.0f} s   {e.part.what}")
        else:
            print(f"  {e.part.name:<20} {'-':>6}     {e.reason} ({e.part.what})")
    print(f"  {'(start-ups, summary)':<20} {RESERVE_S:6.0f} s")
    print(f"  {'total':<20} {total + RESERVE_S:6.0f} s   (estimates: no part has been timed on a GPU yet)")


def _print_calibration_plan() -> None:
    """What the calibrate part measures, and the stored estimates it compares with."""
    from . import calibrate

    print()
    print(calibrate.describe())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gmkernels_bench.gpu_check",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--budget-s", type=float, default=REFERENCE_BUDGET_S, help="wall-clock budget in seconds (default 480)"
    )
    p.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="output folder (default ./gpu-check-out)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with an estimate per part; run nothing")
    p.add_argument(
        "--parts", default="", help="comma list of parts to run (default: all): " + ",".join(x.name for x in PARTS)
    )
    p.add_argument(
        "--examples", type=int, default=None, help="hypothesis examples per property (default: sized to the budget)"
    )
    p.add_argument(
        "--calibrate",
        metavar="FILE",
        type=Path,
        default=None,
        help="the calibrate part writes the measured device constants here (default DIR/calibration.json); "
        "python -m gmkernels_bench.estimate --calibration FILE then uses them",
    )
    p.add_argument("--part", help=argparse.SUPPRESS)  # a child process: run one part
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s < RESERVE_S + 30:
        p.error(f"--budget-s must be at least {RESERVE_S + 30}, got {args.budget_s:g}")
    if args.examples is not None and args.examples < 1:
        p.error(f"--examples must be positive, got {args.examples}")
    examples = args.examples or default_examples(args.budget_s)
    calibration = args.calibrate or args.out / "calibration.json"
    if args.part:
        return _child(args.part, args.out, args.deadline, examples, calibration)
    wanted = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(wanted) - {x.name for x in PARTS})
    if unknown:
        p.error(f"--parts: unknown {unknown}; known: {[x.name for x in PARTS]}")
    if args.examples is None:
        share = next((e.share for e in plan(args.budget_s, wanted) if e.part.name == "tests"), 0.0)
        examples = int(min(50, max(2, round(8 * share / TESTS_REFERENCE_S))))

    if args.dry_run:
        _print_plan(args.budget_s, examples, wanted)
        if any(e.part.name == "calibrate" and e.share for e in plan(args.budget_s, wanted)):
            _print_calibration_plan()
        return 0
    import torch

    if not torch.cuda.is_available():
        cuda = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(
            f"gpu_check needs a CUDA GPU: torch.cuda.is_available() is False here (torch {torch.__version__}, {cuda}). "
            "Nothing was run. `--dry-run` prints the plan on any machine.",
            file=sys.stderr,
        )
        return 2

    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "budget_s": args.budget_s,
        "hypothesis_examples": examples,
        "environment": _environment(),
        "parts": [],
        "ok": False,
    }
    _print_plan(args.budget_s, examples, wanted)
    schedule = t_start
    end = t_start + args.budget_s - RESERVE_S / 2
    try:
        for e in plan(args.budget_s, wanted):
            part, share = e.part, e.share
            schedule += share
            if not share:
                entry = {
                    "part": part.name,
                    "what": part.what,
                    "status": "skipped",
                    "seconds": 0.0,
                    "details": {"reason": e.reason},
                }
                summary["parts"].append(entry)
                continue
            deadline = min(schedule, end)
            if deadline - time.time() < 5:
                entry = {
                    "part": part.name,
                    "what": part.what,
                    "status": "skipped",
                    "seconds": 0.0,
                    "details": {"reason": "budget spent by the earlier parts"},
                }
            else:
                print(f"[gpu_check] {part.name} (until +{deadline - t_start:.0f} s) ...", flush=True)
                entry = _run_part(part, args.out, deadline, examples, plot=_has("matplotlib"), calibration=calibration)
            summary["parts"].append(entry)
            summary["seconds"] = round(time.time() - t_start, 1)
            _write_summary(args.out, summary)
            print(f"[gpu_check] {part.name}: {entry['status']} ({entry['seconds']:.0f} s)", flush=True)
    except KeyboardInterrupt:
        summary["interrupted"] = True
    summary["seconds"] = round(time.time() - t_start, 1)
    ran = [
        e
        for e in summary["parts"]
        if e["status"] != "skipped" or e["details"].get("reason", "").startswith("budget spent")
    ]
    summary["ok"] = bool(ran) and all(e["status"] == "pass" for e in ran) and not summary.get("interrupted")
    _write_summary(args.out, summary)
    print(
        f"[gpu_check] {'PASS' if summary['ok'] else 'FAIL'} in {summary['seconds']:.0f} s; wrote {args.out / 'summary.json'}"
    )
    return 0 if summary["ok"] else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------
# children: one part each, writing DIR/<part>.json with "ok"


def _child(part: str, out: Path, deadline: float | None, examples: int, calibration: Path | None = None) -> int:
    fn = {"tests": _part_tests, "graph": _part_graph, "train": _part_train, "calibrate": _part_calibrate}.get(part)
    if fn is None:
        raise SystemExit(f"unknown part {part!r}")
    if part == "calibrate":
        result = fn(out, deadline or time.time() + 3600, examples, calibration)
    else:
        result = fn(out, deadline or time.time() + 3600, examples)
    (out / f"{part}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failing"}))
    return 0 if result["ok"] else 1


def _part_calibrate(out: Path, deadline: float, examples: int, calibration: Path | None = None) -> dict:
    """Measure the device constants and the representative launches (``calibrate.run``)."""
    from . import calibrate

    return calibrate.run(out, deadline, calibration or out / "calibration.json")


def _part_tests(out: Path, deadline: float, examples: int) -> dict:
    """The kernel test files under pytest with this module as a plugin (see ``pytest_configure``)."""
    events = out / "tests.jsonl"
    events.unlink(missing_ok=True)
    env = {
        **os.environ,
        "GMK_GPU_CHECK_EXAMPLES": str(examples),
        "GMK_GPU_CHECK_EVENTS": str(events),
        "GMK_GPU_CHECK_DEADLINE": f"{deadline - 15:.3f}",
    }
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "gmkernels_bench.gpu_check",
        "--hypothesis-profile=gpu-check",
        f"--junitxml={out / 'tests-junit.xml'}",
        *KERNEL_TESTS,
    ]
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    counts = _test_outcomes(events)
    stopped = (out / "tests.stopped").exists()
    return {
        "ok": rc == 0 and counts["failed"] == 0 and not stopped,
        "pytest_exit_status": rc,
        **counts,
        "stopped_at_budget": stopped,
        "examples": examples,
    }


def _test_outcomes(events: Path) -> dict:
    """Counts of passed / failed / skipped tests and the failing ids, from the plugin's events."""
    outcomes: dict[str, str] = {}
    if events.exists():
        for line in events.read_text().splitlines():
            ev = json.loads(line)
            if ev["outcome"] != "passed" or ev["nodeid"] not in outcomes:  # a failing phase wins
                outcomes[ev["nodeid"]] = ev["outcome"]
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    return {**counts, "failing": sorted(k for k, v in outcomes.items() if v == "failed")}


# pytest plugin hooks (``-p gmkernels_bench.gpu_check``); inert unless pytest loads this module so.


def pytest_load_initial_conftests(early_config, parser, args):
    """Register the ``gpu-check`` hypothesis profile before ``tests/conftest.py`` loads it."""
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "gpu-check",
        max_examples=int(os.environ.get("GMK_GPU_CHECK_EXAMPLES", "8")),
        derandomize=True,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def pytest_configure(config):
    """Run the kernels the tests launch on CPU tensors on the GPU instead (see ``_mirror_launches``)."""
    import gmkernels._dispatch as dispatch

    dispatch.interpreting = lambda: True  # forced "triton" on CPU tensors reaches the launchers
    _mirror_launches()


def pytest_runtest_logreport(report):
    path = os.environ.get("GMK_GPU_CHECK_EVENTS")
    if path and (report.when == "call" or report.outcome != "passed"):
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "nodeid": report.nodeid,
                        "when": report.when,
                        "outcome": report.outcome,
                        "seconds": round(report.duration, 3),
                    }
                )
                + "\n"
            )


def pytest_runtest_setup(item):
    deadline = float(os.environ.get("GMK_GPU_CHECK_DEADLINE", "inf"))
    if time.time() > deadline and not item.session.shouldstop:
        item.session.shouldstop = "gpu_check: the tests part reached its share of the budget"
        path = os.environ.get("GMK_GPU_CHECK_EVENTS")
        if path:
            Path(path).with_name("tests.stopped").write_text(item.nodeid + "\n")


def _mirrored(args: tuple, kwargs: dict, device: str):
    """``args`` and ``kwargs`` with every CPU tensor replaced by a tensor on ``device`` over a copy
    of its whole storage, with the same offset, sizes and strides (tensors sharing a storage
    share the copy, so aliasing is kept); and a function that writes every copied storage back."""
    import torch

    copies: dict[int, tuple] = {}

    def move(t):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return t
        st = t.untyped_storage()
        key = st.data_ptr() if st.nbytes() else -id(t)
        if key not in copies:
            cpu_bytes = torch.empty(0, dtype=torch.uint8).set_(st)
            copies[key] = (cpu_bytes, cpu_bytes.to(device, copy=True))
        return torch.empty(0, dtype=t.dtype, device=device).set_(
            copies[key][1].untyped_storage(), t.storage_offset(), t.shape, t.stride()
        )

    def write_back() -> None:
        for cpu_bytes, dev_bytes in copies.values():
            cpu_bytes.copy_(dev_bytes)

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}, write_back


def _mirror_launches() -> None:
    """Wrap ``JITFunction.run`` (what ``kernel[grid](...)`` calls) so that a launch with CPU
    tensors runs the compiled kernel on the GPU over mirrored copies of them (``_mirrored``),
    then writes the results (outputs and in-place updates) back into the CPU tensors."""
    import torch
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, **kwargs):
        args, kwargs, write_back = _mirrored(args, kwargs, "cuda")
        result = original(self, *args, **kwargs)
        torch.cuda.synchronize()
        write_back()
        return result

    JITFunction.run = run


class _Denoiser:
    """A capturable guided denoiser: a fixed random u-GM pair shifted by the state, so every call
    depends on ``x_t`` and ``t`` (static shapes, no host synchronisation)."""

    def __init__(self, B: int, K: int, C: int, H: int, W: int):
        import torch

        g = torch.Generator("cuda").manual_seed(SEED)

        def gm():
            return {
                "means": torch.randn(B, K, C, H, W, device="cuda", generator=g),
                "logstds": torch.full((B, 1, 1, 1, 1), -1.0, device="cuda"),
                "logweights": torch.randn(B, K, 1, H, W, device="cuda", generator=g).log_softmax(1),
            }

        self.cond, self.uncond = gm(), gm()

    def __call__(self, x_t, t):
        shift = 0.1 * x_t.unsqueeze(-4) + (t / 1000).view(-1, 1, 1, 1, 1)
        return tuple({**g, "means": g["means"] + shift} for g in (self.cond, self.uncond))


def _part_graph(out: Path, deadline: float, examples: int) -> dict:
    """Eager vs captured-and-replayed ``gmkernels.sample`` with the same seed and noise."""
    import torch

    import gmkernels

    B, K, C, H, W = 4, 8, 4, 16, 16
    denoiser = _Denoiser(B, K, C, H, W)
    configs = [
        dict(solver="gm-ode", substeps=4, order=2, guidance="probabilistic", guidance_scale=0.5),
        dict(solver="gm-sde", substeps=1, order=2, guidance="probabilistic", guidance_scale=0.5),
    ]
    results = []
    for cfg in configs:
        noise = torch.randn(B, C, H, W, device="cuda", generator=torch.Generator("cuda").manual_seed(SEED + 1))
        gen = torch.Generator("cuda")
        gen.manual_seed(SEED)
        eager = gmkernels.sample(denoiser, noise, 8, generator=gen, **cfg)
        static_noise = noise.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up: the Triton kernels compile outside the capture
            gmkernels.sample(denoiser, static_noise, 8, generator=gen, **cfg)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            static_out = gmkernels.sample(denoiser, static_noise, 8, generator=gen, **cfg)
        gen.manual_seed(SEED)
        graph.replay()
        torch.cuda.synchronize()
        first = static_out.clone()
        # a second replay with fresh noise must differ (the graph reads static_noise)
        static_noise.copy_(torch.randn_like(static_noise))
        graph.replay()
        torch.cuda.synchronize()
        diff = (first - eager).abs().max().item()
        results.append(
            {
                "config": cfg,
                "bitwise_equal": bool(torch.equal(first, eager)),
                "max_abs_diff": diff,
                "rel_err": diff / max(eager.abs().max().item(), 1e-30),
                "finite": bool(torch.isfinite(first).all()),
                "new_noise_changes_output": not torch.equal(static_out, first),
            }
        )
    ok = all(r["finite"] and r["rel_err"] <= 1e-6 and r["new_noise_changes_output"] for r in results)
    return {"ok": ok, "shape": [B, K, C, H, W], "num_steps": 8, "runs": results}


def _digits_data():
    """The digits train split when scikit-learn is installed; otherwise 8x8 class-conditional
    synthetic images (a bar per class) of the same shape, so the check still trains the network."""
    import torch

    if _has("sklearn"):
        from model.data import Digits

        return Digits(), "scikit-learn digits (train split)"

    from model.data import TensorSource

    g = torch.Generator().manual_seed(SEED)
    y = torch.arange(1000) % 10
    x = -torch.ones(1000, 1, 8, 8)
    for c in range(10):
        if c < 8:
            x[y == c, 0, c, :] = 1.0
        else:
            x[y == c, 0, :, (c - 8) * 4 : (c - 8) * 4 + 4] = 1.0
    x = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return TensorSource(x, y, num_classes=10), "synthetic 8x8 bars (scikit-learn not installed)"


def _part_train(out: Path, deadline: float, examples: int) -> dict:
    import math
    import types

    import torch

    import gmkernels

    if not _has("tqdm"):  # model.train imports tqdm at the top; training_loss never uses it
        sys.modules["tqdm"] = types.SimpleNamespace(tqdm=None)
    from model.networks import build_network
    from model.presets import get_preset
    from model.train import draw_training_pair, training_loss

    device = torch.device("cuda")
    cfg = get_preset("digits", ["warmup=1"])
    torch.manual_seed(cfg["seed"])
    net = build_network(cfg["net"], cfg["net_cfg"]).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]))
    data, data_name = _digits_data()
    gen = torch.Generator().manual_seed(cfg["seed"])
    held_x0, held_y = data.sample(cfg["batch"], torch.Generator().manual_seed(SEED + 99))
    held = [v.to(device) for v in draw_training_pair(held_x0, cfg, torch.Generator().manual_seed(SEED + 100))]

    def held_loss(backends=("auto",)) -> list[float]:
        """The held-out batch's loss with the network in eval mode, per backend."""
        x_high, s_high, x_low, s_low = held
        net.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            gm_u = net(x_high, 1000 * s_high.view(-1), held_y.to(device))
        gm_u = {k: v.float() for k, v in gm_u.items()}
        losses = []
        for backend in backends:
            with torch.no_grad(), gmkernels.use_backend(backend):
                losses.append(float(gmkernels.transition_loss(gm_u, x_high, 1000 * s_high, x_low, 1000 * s_low)))
        net.train()
        return losses

    before, before_ref = held_loss(("auto", "torch"))
    history = []
    t0 = time.time()
    for _ in range(TRAIN_STEPS):
        x0, y = data.sample(cfg["batch"], gen)
        loss, _, _ = training_loss(net, x0, y, cfg, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        opt.step()
        history.append(loss.item())
    seconds = time.time() - t0
    (after,) = held_loss()
    params_finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    triton_vs_torch = abs(before - before_ref) / max(abs(before_ref), 1e-12)
    finite = all(math.isfinite(v) for v in history + [before, after]) and params_finite
    ok = finite and after < before and triton_vs_torch < 1e-4
    return {
        "ok": ok,
        "data": data_name,
        "steps": TRAIN_STEPS,
        "batch": cfg["batch"],
        "lr": cfg["lr"],
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "held_out_loss_before_reference": before_ref,
        "triton_vs_reference_rel": triton_vs_torch,
        "finite": finite,
        "losses": history,
        "train_seconds": round(seconds, 2),
    }


if __name__ == "__main__":
    sys.exit(main())
