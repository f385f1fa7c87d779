"""Data-parallel sampling throughput under ``torchrun``:

    torchrun --nproc-per-node N -m gmkernels_bench --suite solvers [--quick | --full-size]

Every rank samples its own batch with ``gmkernels.sample`` and the stub denoiser (NCCL and one
GPU per rank on CUDA, gloo on CPU); the ranks start each timed window together (barrier) and the
elapsed times are gathered, giving samples/s per rank and in total (all ranks' samples over the
slowest rank's time). Rank 0 writes the records and prints the table; their ``median_ms`` is the
slowest rank's mean time per sampling call over the timed window, ``gbps`` the minimal traffic of
all ranks over it.
"""

from __future__ import annotations

import os
import time

import torch

from .cases import cpu_size_notes, parse_shapes, sample_unavailable, small_cpu_lines, small_run, solver_cases
from .runner import base_record


def world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_solvers(
    device_arg: str | None,
    shapes: list[str],
    dtypes: list[torch.dtype],
    quick: bool,
    full_size: bool,
    repeats: int,
    op_filter: str = "",
) -> tuple[list[dict], list[str], torch.device, int]:
    """Run the solver configurations (those whose label contains ``op_filter``) on every rank at
    the ``--shapes`` tokens ``shapes``, small or not as ``cases.small_run`` says for this rank's
    device; returns ``(records, notes, device, rank)`` (records only on rank 0)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = "triton" if use_cuda else "torch"
    records: list[dict] = []
    notes = [
        f"data-parallel over {world} ranks ({'nccl' if use_cuda else 'gloo'}), {repeats} timed sampling calls per rank per case"
    ]
    try:
        reason = sample_unavailable(device)
        if reason is not None:
            notes.append(f"solvers: skipped: {reason}")
            return records, notes, device, rank
        small = small_run(device, quick, full_size)
        if small and device.type == "cpu":
            notes += small_cpu_lines(cpu_size_notes(shapes, ("solvers",)))
        for shape in parse_shapes(shapes, device, small):
            for dtype in dtypes:
                for case in solver_cases(shape, dtype, device, small, compile_loop=False):
                    if op_filter not in case.op:
                        continue
                    run = case.runs["triton"]  # default dispatch: Triton on CUDA, the torch path on CPU
                    inputs = case.make()
                    run(inputs)  # warm-up
                    if use_cuda:
                        torch.cuda.synchronize(device)
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        run(inputs)
                    if use_cuda:
                        torch.cuda.synchronize(device)
                    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                    gathered = [torch.empty_like(elapsed) for _ in range(world)]
                    dist.all_gather(gathered, elapsed)
                    times = [float(t) for t in gathered]
                    per_rank = [repeats * case.batch / t for t in times]
                    total = world * repeats * case.batch / max(times)
                    if rank == 0:
                        step_s = max(times) / repeats
                        rec = base_record(case, backend)
                        rec.update(
                            {
                                "op": f"{case.op} dp{world}",
                                "status": "ok",
                                "median_ms": step_s * 1e3,
                                "ms_per_call": step_s * 1e3 / case.per_call,
                                "gbps": world * case.bytes / step_s / 1e9,
                                "fraction_of_peak": None,
                                "world_size": world,
                                "samples_per_s_per_rank": per_rank,
                                "samples_per_s": total,
                                "note": f"{total:.4g} samples/s total; per rank "
                                + ", ".join(f"{s:.4g}" for s in per_rank),
                            }
                        )
                        records.append(rec)
    finally:
        dist.destroy_process_group()
    return records, notes, device, rank
