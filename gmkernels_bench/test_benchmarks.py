"""pytest-benchmark twins of the ``python -m gmkernels_bench`` cases:

    pytest gmkernels_bench --benchmark-only                       # this device, every case
    pytest gmkernels_bench --benchmark-only -k "gm_posterior_mean and bf16"
    pytest gmkernels_bench --benchmark-only --benchmark-json out.json

Without ``--benchmark-only`` every test here is skipped (the normal run, ``python -m pytest``,
collects ``tests/`` only anyway). The shapes are the named presets on CUDA and the CLI's small
CPU run on a CPU (``cases.CPU_SIZES``, one torch thread, the compiled subset); ``extra_info`` of
each benchmark carries the minimal-traffic bytes, so GB/s is ``bytes / median``. The CLI adds the
copy-bandwidth probe and the ratios.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from gmkernels_bench.cases import (  # noqa: E402
    CPU_COMPILE,
    clone_tree,
    op_cases,
    parse_shapes,
    policy_cases,
    sample_unavailable,
    solver_cases,
    train_cases,
)
from gmkernels_bench.runner import DTYPE_NAMES  # noqa: E402
from gmkernels_bench.timing import input_copies  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"
SHAPES = parse_shapes(["imagenet", "large-k"], DEVICE, small=ON_CPU)
DTYPES = [torch.float32] if ON_CPU else [torch.float32, torch.bfloat16]
BACKENDS = ("torch", "compile") if ON_CPU else ("triton", "torch", "compile")
SOLVERS_SKIPPED = sample_unavailable(DEVICE)


def _cases() -> list:
    cases = []
    for shape in SHAPES:
        for dtype in DTYPES:
            cases += op_cases(shape, dtype, DEVICE, CPU_COMPILE if ON_CPU else None)
            cases += train_cases(shape, dtype, DEVICE, CPU_COMPILE if ON_CPU else None)
            if SOLVERS_SKIPPED is None:
                cases += solver_cases(shape, dtype, DEVICE, small=ON_CPU, compile_loop=False)
    for dtype in DTYPES:  # pi-Flow policies: their own shapes
        cases += policy_cases(dtype, DEVICE, small=ON_CPU, compile_ok=not ON_CPU)
    return [
        pytest.param(
            case,
            backend,
            id=f"{case.suite}-{case.op.replace(' ', '_')}-{case.shape.label}-{DTYPE_NAMES[case.dtype]}-{backend}",
        )
        for case in cases
        for backend in BACKENDS
        if backend in case.runs
    ]


@pytest.fixture(autouse=True)
def _only_with_benchmark_only(request):
    """Skip unless ``--benchmark-only``; on a CPU run torch with 1 thread, as ``--quick`` does
    (``OMP_NUM_THREADS`` set in the environment wins)."""
    if not request.config.getoption("benchmark_only", False):
        pytest.skip("timing runs only with --benchmark-only (pytest gmkernels_bench --benchmark-only)")
    threads = torch.get_num_threads()
    if ON_CPU and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case, backend", _cases())
def test_case(benchmark, case, backend):
    first = case.make()
    copies = [first]
    if case.rotate:
        n = input_copies(case.bytes, DEVICE, max_copies=4 if ON_CPU else 64)
        copies += [clone_tree(first) for _ in range(n - 1)]
    run, rotation = case.runs[backend], itertools.cycle(copies)
    for a in copies:  # warm-up, and compilation for the compile backend
        run(a)
    benchmark.extra_info.update(
        op=case.op,
        shape=case.shape.label,
        dtype=DTYPE_NAMES[case.dtype],
        backend=backend,
        bytes=case.bytes,
        per_call=case.per_call,
        device=str(DEVICE),
    )
    if DEVICE.type == "cuda":

        def call():
            run(next(rotation))
            torch.cuda.synchronize(DEVICE)
    else:

        def call():
            run(next(rotation))

    benchmark(call)


def test_solvers_available():
    """Says why the solver cases are missing while ``gmkernels.sample`` cannot run."""
    if SOLVERS_SKIPPED is not None:
        pytest.skip(f"solvers: {SOLVERS_SKIPPED}")
