"""Times one case on each backend and turns the timings into records."""

from __future__ import annotations

import time
from typing import Any

import torch

from .cases import Case, clone_tree, has_triton_kernels
from .timing import Clock, TimerConfig, cache_bytes, graph_replays, input_copies, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def base_record(case: Case, backend: str) -> dict[str, Any]:
    """The fields of a record that describe the case (no timing)."""
    s = case.shape
    return {
        "suite": case.suite,
        "op": case.op,
        "backend": backend,
        "shape": s.label,
        "shape_name": s.name,
        "B": s.B,
        "K": s.K,
        "C": s.C,
        "H": s.H,
        "W": s.W,
        "dtype": DTYPE_NAMES[case.dtype],
        "bytes": case.bytes,
        "per_call": case.per_call,
        "params": case.params,
        "note": "",
    }


def _peak_extra_bytes(run: Any, inputs: Any, device: torch.device) -> tuple[int, int]:
    """Peak CUDA memory of one call above what was allocated before it and above its outputs
    (the gradients), and the outputs' size."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = run(inputs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    out_bytes = sum(t.numel() * t.element_size() for t in out)
    return peak - before - out_bytes, out_bytes


def run_case(
    case: Case, backends: list[str], device: torch.device, cfg: TimerConfig, copy_bw: float, max_copies: int
) -> list[dict]:
    """Time ``case`` on each of ``backends`` (those it has) in this process, same inputs for all.

    Every record has ``status`` ``"ok"`` or ``"error"`` (with a one-line ``reason``: a backend
    that fails does not stop the run)."""
    n = input_copies(case.bytes, device, max_copies) if case.rotate else 1
    first = case.make()
    inputs = [first] + [clone_tree(first) for _ in range(n - 1)]
    clock = Clock(device)
    records = []
    for backend in backends:
        run = case.runs.get(backend)
        if run is None:
            continue
        rec = base_record(case, backend)
        notes = []
        if backend == "triton" and device.type == "cuda" and not has_triton_kernels(case.family):
            notes.append(f"gmkernels.ops.{case.family} has no Triton kernel yet: this row is its torch path")
        if case.rotate and n * case.bytes < cache_bytes(device):
            notes.append(f"in cache ({n} input copies, {n * case.bytes / 2**20:.2g} MiB)")
        if case.measure_memory and device.type != "cuda":
            notes.append("peak memory measured on CUDA only")
        rec["note"] = "; ".join(notes)
        try:
            if backend == "compile":
                clock.sync()
                t0 = time.perf_counter()
                run(inputs[0])
                clock.sync()
                rec["compile_s"] = round(time.perf_counter() - t0, 3)
            calls = graph_replays(run, inputs) if backend == "graph" else [lambda a=a: run(a) for a in inputs]
            t = measure(calls, device, cfg)
            if case.measure_memory and device.type == "cuda":
                extra, grads = _peak_extra_bytes(run, inputs[0], device)
                rec["peak_extra_mb"] = extra / 2**20
                rec["peak_extra_vs_grads"] = extra / grads
            elif case.measure_memory:
                rec["peak_extra_mb"] = None
        except Exception as e:  # one failing backend is reported, the run goes on
            rec.update(status="error", reason=_one_line(e), median_ms=None, gbps=None, fraction_of_peak=None)
            records.append(rec)
            continue
        bw = case.bytes / t.median_s
        rec.update(
            status="ok",
            median_ms=t.median_s * 1e3,
            p20_ms=t.p20_s * 1e3,
            p80_ms=t.p80_s * 1e3,
            iqr_ms=(t.q3_s - t.q1_s) * 1e3,
            iqr_rel=t.iqr_rel,
            ms_per_call=t.median_s * 1e3 / case.per_call,
            repeats=t.repeats,
            calls_per_repeat=t.calls_per_repeat,
            input_copies=t.input_copies,
            gbps=bw / 1e9,
            fraction_of_peak=bw / copy_bw,
        )
        if case.batch:
            rec["samples_per_s"] = case.batch / t.median_s
        records.append(rec)
    return records
