"""The benchmark command at a tiny custom shape on the CPU: it runs, skips Triton with its reason,
and writes JSON records with every field the README promises, a markdown table and a plot."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import reference
from gmkernels_bench.__main__ import TRITON_ON_CPU, main
from gmkernels_bench.cases import OP_NAMES, counts, op_cases, parse_shapes, solver_cases
from gmkernels_bench.report import add_speedups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {
    "suite",
    "op",
    "backend",
    "shape",
    "dtype",
    "median_ms",
    "gbps",
    "fraction_of_peak",
    "speedups",
    "speedup_vs_torch",
    "speedup_vs_compile",
    "device",
    "torch_version",
    "triton_version",
    "git_commit",
    "bytes",
}


def _run(tmp_path, capsys, *argv: str) -> tuple[dict, str]:
    out = tmp_path / "out"
    assert (
        main(
            [*argv, "--shapes", "custom", "2,3,2,4,5", "--quick", "--no-progress", "--threads", "1", "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    with open(out / "results.json") as f:
        data = json.load(f)
    assert (out / "results.md").read_text().strip() in printed
    return data, printed


def test_ops_cli_writes_every_field(tmp_path, capsys):
    plot = importlib.util.find_spec("matplotlib") is not None  # an optional dependency
    data, printed = _run(
        tmp_path, capsys, "--suite", "ops", "--backends", "triton,torch", "--dtype", "fp32,bf16", *["--plot"] * plot
    )
    assert TRITON_ON_CPU in printed
    assert printed.rstrip().splitlines()[-1].startswith("| ops ")  # the table comes last
    assert not plot or (tmp_path / "out" / "results.png").stat().st_size > 0
    recs = data["records"]
    assert {r["backend"] for r in recs} == {"torch"}
    assert {r["dtype"] for r in recs} == {"fp32", "bf16"}
    assert {r["op"] for r in recs} == set(OP_NAMES) and len(OP_NAMES) == 17
    c = counts(parse_shapes(["custom", "2,3,2,4,5"], torch.device("cpu"), True)[0])
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["status"] == "ok", r
        assert r["shape"] == "2x3x2x4x5" and r["device"] == data["meta"]["device"]
        assert r["median_ms"] > 0 and math.isclose(r["gbps"], r["bytes"] / r["median_ms"] / 1e6, rel_tol=1e-9)
        assert math.isclose(r["fraction_of_peak"], r["gbps"] / data["meta"]["copy_gbps"], rel_tol=1e-9)
        assert r["torch_version"] == torch.__version__
    mean = next(r for r in recs if r["op"] == "gm_to_mean" and r["dtype"] == "bf16")
    assert mean["bytes"] == 2 * (c["G"] + c["L"] + c["X"])  # means + log-weights read, the mean written


@pytest.mark.slow  # torch.compile of the reference
def test_train_and_solvers_with_compile(tmp_path, capsys):
    data, _ = _run(tmp_path, capsys, "--suite", "all", "--backends", "torch,compile", "--filter", "fwd+bwd")
    recs = data["records"]
    assert [(r["suite"], r["backend"]) for r in recs] == [("train", "torch"), ("train", "compile")]
    assert all(r["status"] == "ok" for r in recs), recs
    eager, comp = recs
    assert comp["compile_s"] > 0 and "peak_extra_mb" in eager
    assert math.isclose(eager["speedup_vs_compile"] * comp["speedup_vs_torch"], 1.0, rel_tol=1e-9)


def test_solver_suite(tmp_path, capsys):
    data, _ = _run(tmp_path, capsys, "--suite", "solvers", "--backends", "torch", "--filter", "gm-ode 4x2 guided")
    (rec,) = data["records"]
    assert rec["status"] == "ok", rec
    assert rec["params"] == {"solver": "gm-ode", "num_steps": 4, "substeps": 2, "guidance_scale": 0.5}
    assert math.isclose(rec["ms_per_call"] * 4, rec["median_ms"]) and rec["samples_per_s"] > 0
    md = (tmp_path / "out" / "results.md").read_text()  # the step traffic model rides along with the solvers
    assert "Sampler-step traffic model" in md and "| gm-sde order 2 probabilistic |" in md
    assert data["meta"]["step_traffic"] and "ratio" in data["meta"]["step_traffic"][0]


def test_cpu_runs_small_by_default_and_says_so(tmp_path, capsys):
    """On a CPU a named shape runs at its CPU size with the short timer unless --full-size, and
    the run prints each reduction next to its full size and how to get the full run."""
    out = tmp_path / "out"
    argv = ["--suite", "ops", "--shapes", "imagenet", "--backends", "torch", "--filter", "gm_to_mean"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert [r["shape"] for r in data["records"]] == ["4x8x4x16x16", "4x8x4x16x16"]  # fp32, bf16
    assert data["meta"]["timer"]["repeats"] == 7
    notes = data["meta"]["notes"]
    (head,) = [n for n in notes if n.startswith("small cpu run (the default on a cpu; --full-size for the full sizes")]
    assert head.endswith(": shapes imagenet 4x8x4x16x16 (full 256x8x4x32x32)")
    assert "small cpu run: timer 7 batches of >= 5 ms, <= 0.4 s a case (full 25 of >= 20 ms, <= 5 s)" in notes
    assert all(n in printed for n in notes)
    full = parse_shapes(["imagenet", "large-k"], torch.device("cpu"), False)
    assert [s.label for s in full] == ["256x8x4x32x32", "32x256x4x32x32"]


def test_small_cpu_notes_name_every_reduction():
    from gmkernels_bench.__main__ import _parser, _small_cpu_notes
    from gmkernels_bench.timing import TimerConfig

    args = _parser().parse_args(["--shapes", "imagenet", "large-k", "custom", "1,2,3,4,5"])
    cfg = TimerConfig.for_run(torch.device("cpu"), True)
    notes = _small_cpu_notes(args, ("ops", "train", "solvers", "policy"), ["torch", "compile"], cfg)
    text = "\n".join(notes)
    assert "imagenet 4x8x4x16x16 (full 256x8x4x32x32), large-k 1x256x4x8x8 (full 32x256x4x32x32)" in text
    assert "custom" not in text  # custom shapes never shrink
    assert "sampling loops of 4x2 steps x substeps (full 32x4 and 16x8, imagenet at B=125)" in text
    assert "policy rollouts of 16 substeps at 2x32x4x8x8 and 1x8x16x8x12" in text
    assert "torch.compile of gm_posterior_mean and gm_nll_loss fwd+bwd at the first shape only" in text
    assert "1 torch thread" in text
    assert notes[0].startswith("small cpu run (the default on a cpu; --full-size") and len(notes) == 6


def test_speedups_are_ratios_within_a_case():
    recs = [
        {"suite": "ops", "op": "a", "shape": "s", "dtype": "fp32", "backend": b, "status": "ok", "median_ms": t}
        for b, t in (("torch", 6.0), ("compile", 3.0), ("triton", 1.5))
    ] + [
        {"suite": "ops", "op": "a", "shape": "s", "dtype": "bf16", "backend": "torch", "status": "ok", "median_ms": 1.0}
    ]
    add_speedups(recs)
    assert recs[2]["speedup_vs_torch"] == 4.0 and recs[2]["speedup_vs_compile"] == 2.0
    assert recs[0]["speedups"] == {"vs_compile": 0.5, "vs_triton": 0.25}
    assert recs[3]["speedups"] == {}


@pytest.mark.parametrize(
    "argv",
    [
        ["--shapes", "custom", "2,3"],
        ["--dtype", "fp64"],
        ["--backends", "cuda"],
        ["--shapes", "tiny"],
        ["--device", "gpu0"],
        ["--quick", "--full-size"],
    ],
)
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert argv[1].split(",")[0] in capsys.readouterr().err


def test_pytest_benchmark_file_skips_without_benchmark_only():
    pytest.importorskip("pytest_benchmark")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "gmkernels_bench", "-k", "gm_to_mean"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" not in r.stdout.splitlines()[-1] and "skipped" in r.stdout.splitlines()[-1], r.stdout


@pytest.mark.slow  # starts torchrun processes
def test_torchrun_data_parallel_solvers(tmp_path):
    """Two gloo ranks sample together; rank 0 reports samples/s per rank and in total."""
    out = tmp_path / "dp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "gmkernels_bench",
        "--suite",
        "solvers",
        "--quick",
        "--shapes",
        "custom",
        "1,2,1,4,4",
        "--filter",
        "gm-sde 4x1",
        "--out",
        str(out),
    ]
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stdout + r.stderr
    records = json.loads((out / "results.json").read_text())["records"]
    assert [rec["op"] for rec in records] == ["sample gm-sde 4x1 dp2", "sample gm-sde 4x1 guided 0.5 dp2"]
    for rec in records:
        assert rec["world_size"] == 2 and len(rec["samples_per_s_per_rank"]) == 2
        assert (
            min(rec["samples_per_s_per_rank"]) * 2
            <= rec["samples_per_s"] * (1 + 1e-9)
            <= sum(rec["samples_per_s_per_rank"]) * (1 + 1e-9)
        )
        assert FIELDS <= set(rec), FIELDS - set(rec)


def test_gpu_only_backends_absent_on_cpu(tmp_path, capsys):
    """The CUDA-graph replay and reduce-overhead rows exist on a GPU only: on a CPU they are
    absent (not zero), even when asked for, and the op cases do not offer them."""
    from gmkernels_bench.cases import op_cases

    data, _ = _run(
        tmp_path, capsys, "--suite", "ops", "--filter", "gm_to_mean", "--backends", "torch,graph,reduce-overhead"
    )
    assert {r["backend"] for r in data["records"]} == {"torch"}
    shape = parse_shapes(["custom", "1,3,2,4,5"], torch.device("cpu"), True)[0]
    assert not any(
        {"graph", "reduce-overhead"} & set(c.runs) for c in op_cases(shape, torch.float32, torch.device("cpu"), None)
    )


def _graphs(fn, *args) -> int:
    """How many graphs ``torch.compile(fn, dynamic=False)`` (as ``cases.compiled`` compiles the
    reference) captures on ``args``: each graph break adds one."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()  # a cached compile of fn from another test would capture nothing here
    torch.compile(fn, backend=count, dynamic=False)(*args)
    torch.compiler.reset()
    return len(graphs)


def test_reference_log_of_a_float_is_a_float_as_tensor_log():
    from reference._util import log

    for x in (2.5, 1e-30, 1, 0.0, -1.0, math.inf):
        got, want = log(x), torch.tensor(x, dtype=torch.float64).log().item()
        assert isinstance(got, float) and (got == want or (math.isnan(got) and math.isnan(want))), (x, got, want)


FLOAT_OPS = ["u_to_x0", "x0_to_u", "reverse_transition", "gm_posterior_mean", "probabilistic_guidance", "mean_cfg"]


@pytest.mark.parametrize("op", FLOAT_OPS)
def test_compile_baseline_is_one_graph_with_a_float_sigma(op):
    """The ``compile`` backend compiles the reference with Python-float sigmas and scales (the op
    cases' arguments): one graph each, no break (a ``Tensor.item()`` would split it)."""
    shape = parse_shapes(["custom", "2,3,2,4,4"], torch.device("cpu"), True)[0]
    case = next(c for c in op_cases(shape, torch.float32, torch.device("cpu"), None) if c.op == op)
    args = case.make()
    assert any(isinstance(a, float) for a in args)
    assert _graphs(getattr(reference, op), *args) == 1


def test_compiled_sampling_loop_is_one_graph():
    """``--compile-solvers`` compiles the reference sampling loop (float sigmas from the
    scheduler): one unrolled graph, no break per step."""
    shape = parse_shapes(["custom", "1,2,1,2,2"], torch.device("cpu"), True)[0]
    case = next(
        c
        for c in solver_cases(shape, torch.float32, torch.device("cpu"), True, False)
        if c.op.startswith("sample gm-ode")
    )
    assert _graphs(case.runs["torch"], case.make()) == 1
