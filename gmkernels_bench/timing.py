"""How a case is timed: warm-up, rotated inputs, median over many repeats, a copy-bandwidth probe.

* **GPU**: CUDA events around a batch of calls; the median of the per-call time over the
  batches. Consecutive calls take different copies of the inputs (``rotation``) spanning at
  least four times the L2 cache, so no call finds its inputs in L2 from the call before.
* **CPU**: ``time.perf_counter_ns`` around a batch of calls with Python's garbage collector off, the
  same rotation over copies spanning 64 MiB (a last-level cache), the median over batches.
* Every batch is long enough (``min_batch_s``) that the clock's resolution and the launch of
  the timer do not matter; the warm-up runs every input copy at least once (and compiles).
* ``copy_bandwidth`` times ``dst.copy_(src)`` on buffers far larger than any cache with the
  same timer, in the same run, so each case's GB/s can be given as a fraction of it.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

CPU_ROTATE_BYTES = 64 << 20


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of one case: median, the 20th/80th percentiles, the quartiles, and how it
    was taken."""

    median_s: float
    p20_s: float
    p80_s: float
    repeats: int
    calls_per_repeat: int
    input_copies: int
    q1_s: float
    q3_s: float

    @property
    def iqr_rel(self) -> float:
        """Spread of the batches: interquartile range over the median (0.1: the middle half of
        the batches lies within a band 10% of the median wide)."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s > 0 else 0.0


@dataclass(frozen=True)
class TimerConfig:
    """``repeats`` batches after ``warmup_s`` of warm-up, each running ``>= min_batch_s``; fewer
    batches (never under 3) where ``repeats`` of them would take longer than ``max_total_s``."""

    repeats: int
    warmup_s: float
    min_batch_s: float
    max_total_s: float

    @classmethod
    def for_run(cls, device: torch.device, small: bool) -> "TimerConfig":
        """GPU: 100 batches of >= 2 ms (30 of >= 1 ms in a ``small`` run, ``cases.small_run``);
        CPU: 25 of >= 20 ms (7 of >= 5 ms)."""
        if device.type == "cuda":
            return (
                cls(repeats=30, warmup_s=0.025, min_batch_s=1e-3, max_total_s=1.0)
                if small
                else cls(repeats=100, warmup_s=0.1, min_batch_s=2e-3, max_total_s=5.0)
            )
        return (
            cls(repeats=7, warmup_s=0.02, min_batch_s=5e-3, max_total_s=0.4)
            if small
            else cls(repeats=25, warmup_s=0.1, min_batch_s=2e-2, max_total_s=5.0)
        )


def cache_bytes(device: torch.device) -> int:
    """Bytes the input copies of one case must span so none is served from cache: four times
    the L2 on a GPU (256 MiB when the size is not reported), 64 MiB on a CPU."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        return 4 * l2
    return CPU_ROTATE_BYTES


def input_copies(case_bytes: int, device: torch.device, max_copies: int = 64, max_bytes: int = 4 << 30) -> int:
    """How many copies of a case's inputs to rotate through: enough to span ``cache_bytes``,
    at least 2 (so two consecutive calls never share inputs), bounded by ``max_copies`` and
    by ``max_bytes`` of memory."""
    want = math.ceil(cache_bytes(device) / max(case_bytes, 1))
    fit = max(1, max_bytes // max(case_bytes, 1))
    return int(max(1, min(max(want, 2), max_copies, fit)))


class Clock:
    """Elapsed seconds of a callable: CUDA events on a GPU, ``perf_counter_ns`` on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self, fn: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e9


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """First and third quartile, linearly interpolated (``statistics.quantiles``, inclusive)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def measure(calls: Sequence[Callable[[], object]], device: torch.device, cfg: TimerConfig) -> Timing:
    """Time one case. ``calls[i]`` runs the op on input copy ``i``; batches cycle through them.

    Returns the per-call median over ``cfg.repeats`` batches (fewer when a call is so slow that
    ``cfg.max_total_s`` would be passed, but never fewer than 3) and the spread of the batches
    (quartiles; ``Timing.iqr_rel``), which the report flags when it is large.
    """
    clock = Clock(device)
    n = len(calls)
    pos = 0

    def batch(count: int) -> Callable[[], None]:
        def run() -> None:
            nonlocal pos
            for _ in range(count):
                calls[pos % n]()
                pos += 1

        return run

    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside a batch (a full gc.collect() here costs ~0.3 s)
    try:
        clock.sync()
        once = clock.elapsed(batch(n))  # first pass: every copy once (compiles, allocator warm-up)
        warm_end = time.perf_counter() + cfg.warmup_s
        per_call = once / n
        while time.perf_counter() < warm_end:
            per_call = clock.elapsed(batch(n)) / n
        count = max(1, math.ceil(cfg.min_batch_s / max(per_call, 1e-9)))
        repeats = max(3, min(cfg.repeats, int(cfg.max_total_s / max(per_call * count, 1e-9))))
        samples = [clock.elapsed(batch(count)) / count for _ in range(repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
    q1, q3 = _quartiles(samples)
    return Timing(
        median_s=statistics.median(samples),
        p20_s=_quantile(samples, 0.2),
        p80_s=_quantile(samples, 0.8),
        repeats=repeats,
        calls_per_repeat=count,
        input_copies=n,
        q1_s=q1,
        q3_s=q3,
    )


def copy_bandwidth(device: torch.device, cfg: TimerConfig, small: bool) -> tuple[float, int]:
    """Measured copy bandwidth in bytes/s (read + write) of ``dst.copy_(src)`` in float32, on
    buffers of 8x the cache span (at least 256 MiB each on a GPU; 32/128 MiB on a CPU in a
    ``small`` run or not). Returns ``(bytes_per_s, buffer_bytes)``."""
    if device.type == "cuda":
        nbytes = max(8 * cache_bytes(device) // 4, 256 << 20)
    else:
        nbytes = (32 << 20) if small else (128 << 20)
    numel = nbytes // 4
    src = torch.rand(numel, device=device) + 0.5
    dst = torch.empty_like(src)
    t = measure([lambda: dst.copy_(src)], device, cfg)
    return 2 * numel * 4 / t.median_s, numel * 4


def graph_replays(run: Callable[[object], object], inputs: Sequence[object]) -> list[Callable[[], None]]:
    """One CUDA graph per input copy of ``run(copy)``, captured after a warm-up call on a side
    stream (Triton compiles there); the returned callables replay them, so a timing holds the
    kernels alone, without Python, dispatch or launch costs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(inputs[0])
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for a in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run(a)
        graphs.append(g)
    return [g.replay for g in graphs]
