"""The calibrate part of ``gpu_check``: measure the device constants of the performance model and
10 representative launches, next to their stored estimates (docs/performance-model.md).

    PYTHONPATH=. python -m gmkernels_bench.gpu_check --parts calibrate --budget-s 90 --calibrate calibration.json
    PYTHONPATH=. python -m gmkernels_bench.estimate --calibration calibration.json       # estimates on measured constants

On the GPU (``run``, ~45 s, most of it Triton compiles):

* copy bandwidth: ``dst.copy_(src)`` of 256 and 512 MiB float32, best of 5 (read + write bytes);
* DRAM latency: a one-thread pointer chase (``_chase_kernel``) along a random cycle over 256 MiB
  of int64 (far beyond L2), 4096 and 16384 hops: the slope of time over hops;
* launch cost: 100 and 400 launches of an empty kernel captured in a CUDA graph and replayed:
  the slope (eager launches are reported too);
* the SM clock (``nvidia-smi``) after the copies;
* ``LAUNCHES``: 10 launches of the public ops and one sampler step at ``SHAPE`` in bf16, each
  kernel's device time from the profiler (median of 5 calls, after a warm-up call).

``perfmodel.refit`` turns the measurements into constants; the calibration file gets, per
device key (``a100``, ``h100``, ``h200``, else the GPU's name), ``{gpu, when, constants,
measurements, launches}`` where ``launches`` puts each launch's stored estimate (uncalibrated),
its estimate on the refitted constants and the measured time side by side. The stored estimates
(``STORED``) are made here, without a GPU: ``python -m gmkernels_bench.estimate --calibration-set``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from . import perfmodel as pm

SHAPE = (256, 8, 4, 32, 32)  # the ImageNet GM head
DTYPE = "bf16"
#: (label, kind, name): kind "op" calls ``gmkernels.<name>`` with the benchmark's arguments
#: (``cases._OPS``), kind "step" one first-order sampler step (``estimate.step_scenario``)
LAUNCHES = (
    ("gm_to_mean", "op", "gm_to_mean"),
    ("gm_mul_iso_gaussian", "op", "gm_mul_iso_gaussian"),
    ("gm_posterior_mean", "op", "gm_posterior_mean"),
    ("reverse_transition", "op", "reverse_transition"),
    ("gm_nll_loss", "op", "gm_nll_loss"),
    ("gm_sample", "op", "gm_sample"),
    ("probabilistic_guidance", "op", "probabilistic_guidance"),  # 3 launches: statistics, bias power, apply
    ("step gm-sde order 1", "step", "gm-sde"),
)
STORED = Path(__file__).resolve().parent / "results" / "calibration_estimate.json"
CHASE_BYTES = 256 << 20
CHASE_HOPS = (4096, 16384)
COPY_BYTES = (256 << 20, 512 << 20)
GRAPH_LAUNCHES = (100, 400)


def device_key(gpu_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; an unknown GPU keeps its name."""
    low = gpu_name.lower()
    return next((k for k in pm.DEVICES if k in low), low.replace(" ", "-"))


def stored() -> dict:
    return json.loads(STORED.read_text()) if STORED.exists() else {}


def describe() -> str:
    """The calibration plan and the stored estimates (what ``gpu_check --dry-run`` prints)."""
    lines = ["calibrate part (on the GPU, ~45 s):",
             f"  copy bandwidth     dst.copy_(src), {' and '.join(f'{b >> 20} MiB' for b in COPY_BYTES)} float32, best of 5",
             f"  DRAM latency       pointer chase over {CHASE_BYTES >> 20} MiB, {' and '.join(map(str, CHASE_HOPS))} hops (slope)",
             f"  launch cost        {' and '.join(map(str, GRAPH_LAUNCHES))} empty launches in a CUDA graph (slope)",
             f"  launches           10 launches of {len(LAUNCHES)} ops / steps at {SHAPE} {DTYPE}, profiler device times, median of 5"]  # fmt: skip
    data = stored()
    if not data:
        lines.append(f"  (no stored estimates: python -m gmkernels_bench.estimate --calibration-set {STORED})")
        return "\n".join(lines)
    devs = list(data["devices"])
    lines.append(f"  stored estimates ({STORED.name}, uncalibrated, µs per launch):")
    lines.append(f"    {'launch':<44}" + "".join(f"{d:>10}" for d in devs))
    first = data["devices"][devs[0]]
    for i, entry in enumerate(first):
        vals = "".join(f"{data['devices'][d][i]['us']:>10.1f}" for d in devs)
        lines.append(f"    {entry['label'] + ' ' + entry['kernel']:<44}{vals}")
    lines.append("  the refit: copy_gbs, dram_latency_ns, launch_us, clock_ghz from the measurements; "
                 "estimate --calibration FILE then labels them measured (where, when)")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# on the GPU


def _time_cuda(fn, reps: int) -> float:
    """Best of ``reps`` CUDA-event timings of ``fn()``, in µs."""
    import torch

    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3)
    return best


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _chase_kernel(ptr, out, hops):
        i = tl.load(ptr)
        for _ in range(hops):
            i = tl.load(ptr + i)
        tl.store(out, i)

    @triton.jit
    def _empty_kernel(out):
        pass

    return _chase_kernel, _empty_kernel


def measure_constants(deadline: float) -> dict:
    """The microbenchmarks of the module docstring: ``perfmodel.refit``'s ``measurements``."""
    import torch

    chase, empty = _kernels()
    meas: dict[str, Any] = {"copy": [], "chase": [], "empty": [], "eager_launch_us": None}
    for nbytes in COPY_BYTES:
        src = torch.empty(nbytes // 4, device="cuda").uniform_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        meas["copy"].append({"bytes": 2 * nbytes, "us": _time_cuda(lambda: dst.copy_(src), 5)})
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10)  # fmt: skip
        meas["clock_ghz"] = float(out.stdout.split()[0]) / 1e3 if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, ValueError, subprocess.SubprocessError):
        meas["clock_ghz"] = None
    n = CHASE_BYTES // 8
    perm = torch.randperm(n, device="cuda")
    nxt = torch.empty(n, dtype=torch.int64, device="cuda")
    nxt[perm] = torch.roll(perm, -1)  # one cycle through every slot, in random order
    res = torch.empty(1, dtype=torch.int64, device="cuda")
    chase[(1,)](nxt, res, 16, num_warps=1)
    for hops in CHASE_HOPS:
        meas["chase"].append({"hops": hops, "us": _time_cuda(lambda: chase[(1,)](nxt, res, hops, num_warps=1), 3)})
    empty[(1,)](res)
    torch.cuda.synchronize()
    for count in GRAPH_LAUNCHES:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            empty[(1,)](res)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(count):
                empty[(1,)](res)
        g.replay()
        meas["empty"].append({"launches": count, "us": _time_cuda(g.replay, 5)})
    eager = _time_cuda(lambda: [empty[(1,)](res) for _ in range(400)], 3)
    meas["eager_launch_us"] = eager / 400
    return meas


def measure_launches(deadline: float, reps: int = 5) -> list[dict]:
    """Device time of each kernel launch of ``LAUNCHES`` (profiler, median of ``reps`` calls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import gmkernels
    from gmkernels_bench.cases import _OPS, Inputs, Shape

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[DTYPE]
    out = []
    for label, kind, name in LAUNCHES:
        if time.time() > deadline - 5:
            out.append({"label": label, "skipped": "deadline"})
            continue
        inp = Inputs(Shape("cal", *SHAPE), dt, torch.device("cuda"), seed=3)
        if kind == "op":
            args = _OPS[name][1](inp)
            fn = getattr(gmkernels, name)

            def call(fn=fn, args=args):
                return fn(*args)
        else:
            gm, noise = inp.gm(), inp.state().float()

            def call(name=name, gm=gm, noise=noise):
                return gmkernels.sample(lambda x, t: gm, noise, 1, solver=name, order=1)

        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type.name == "CUDA" and e.name.startswith("_")]
        per_call = max(1, len(events) // reps)
        times: dict[int, list[float]] = {}
        names: dict[int, str] = {}
        for k, e in enumerate(events[: per_call * reps]):
            times.setdefault(k % per_call, []).append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
            names[k % per_call] = e.name
        for i in sorted(times):
            out.append({"label": label, "index": i, "kernel": names[i], "measured_us": statistics.median(times[i])})
    return out


def side_by_side(key: str, launches: list[dict], calibration: dict) -> list[dict]:
    """Each measured launch next to its stored estimate and its estimate on the refitted
    constants of ``calibration`` (matched by label and launch index)."""
    data = stored().get("devices", {}).get(key, [])
    est = {(e["label"], e["index"]): e for e in data}
    dev = pm.device(key, calibration) if key in pm.DEVICES else None
    rows = []
    for m in launches:
        if "measured_us" not in m:
            continue
        e = est.get((m["label"], m["index"]))
        row = {**m, "estimated_us": e["us"] if e else None, "estimated_limit": e["limit"] if e else None}
        if e and dev is not None:
            row["refit_us"], row["refit_limit"] = pm.reestimate(e["inputs"], dev)
            row["measured_over_refit"] = m["measured_us"] / row["refit_us"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'launch':<44} {'estimated':>9} {'refit':>9} {'measured':>9} {'meas/refit':>10}  limit (refit)"]
    for r in rows:
        est = f"{r['estimated_us']:9.1f}" if r.get("estimated_us") is not None else f"{'-':>9}"
        fit = f"{r['refit_us']:9.1f}" if r.get("refit_us") is not None else f"{'-':>9}"
        ratio = f"{r['measured_over_refit']:10.2f}" if r.get("measured_over_refit") is not None else f"{'-':>10}"
        lines.append(
            f"{r['label'] + ' ' + r['kernel']:<44} {est} {fit} {r['measured_us']:9.1f} {ratio}  {r.get('refit_limit', '')}"
        )
    return "\n".join(lines)


def run(out: Path, deadline: float, calibration_path: Path) -> dict:
    """The calibrate part: measure, refit, write ``calibration_path`` (merged with what it
    holds for other devices) and ``out/calibrate.md``."""
    import torch

    gpu = torch.cuda.get_device_name()
    key = device_key(gpu)
    meas = measure_constants(deadline)
    launches = measure_launches(deadline)
    entry = pm.refit(key, {k: v for k, v in meas.items() if k in ("copy", "chase", "empty", "clock_ghz")}, gpu=gpu)
    entry["measurements"]["eager_launch_us"] = meas["eager_launch_us"]
    cal = json.loads(calibration_path.read_text()) if calibration_path.exists() else {"devices": {}}
    cal.setdefault("devices", {})[key] = entry
    rows = side_by_side(key, launches, cal)
    entry["launches"] = rows
    calibration_path.parent.mkdir(parents=True, exist_ok=True)
    calibration_path.write_text(json.dumps(cal, indent=1) + "\n")
    text = f"# calibration on {gpu} ({entry['when']})\n\nconstants: {entry['constants']}\n\n```\n{table(rows)}\n```\n"
    (out / "calibrate.md").write_text(text)
    print(text)
    ok = bool(entry["constants"].get("copy_gbs")) and all("measured_us" in m for m in launches)
    return {"ok": ok, "gpu": gpu, "device_key": key, "calibration": str(calibration_path), "constants": entry["constants"],
            "launches": rows, "skipped": [m for m in launches if "skipped" in m]}  # fmt: skip
