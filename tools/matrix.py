"""The torch x triton support matrix: one virtualenv per pair, the Triton tests in each.

    python tools/matrix.py                          # every pair; builds or reuses the venvs
    python tools/matrix.py --pairs 2.11/3.6         # one pair
    python tools/matrix.py --install-only           # build the venvs, run nothing

Per pair it creates (or reuses: a venv whose torch and triton already match is left alone)
``<venvs>/t<torch major><minor>`` with ``python3.11 -m venv`` and installs the pinned torch and
triton from PyPI (plus numpy, pytest, hypothesis, pytest-benchmark), then runs from this checkout
with ``PYTHONPATH=<repo>``, no install of the repo:

* the test files that run Triton kernels under the interpreter (``TRITON_INTERPRET=1``, set by
  ``tests/conftest.py`` on a machine without a GPU; ``CI=true`` so hypothesis draws from a fixed
  seed and every pair sees the same examples);
* ``python -m gmkernels_bench.compile_report --check``: every kernel compiled ahead of time for
  sm_80 and sm_90 with that pair's triton, failing on a compile error or a register spill.

It prints a table (pair, tests passed / failed, kernels that spill, seconds) and writes
``<out>/matrix.json`` with the failing test ids and spilling kernels of each pair, and the logs.
Exit status 1 when a pair fails. Time on the 2-core CPU machine (measured 2026-12-02): 6-8 minutes
per venv to build the first time (the CUDA builds of torch are ~3-5 GB with their nvidia
packages; they run on CPU), then per pair 2-2.5 minutes of tests and 1-2 minutes of compile
report: 11 minutes for the three pairs, venvs built, on a quiet machine (up to an hour when other
jobs load it: 20 minutes of tests per pair were seen). CI runs only the pinned pair (``.ci/run``), not this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO))
from gmkernels_bench.gpu_check import KERNEL_TESTS  # noqa: E402  (the Triton test files; no torch import)

TEST_DEPS = ("pytest", "hypothesis", "pytest-benchmark")


@dataclass(frozen=True)
class Pair:
    torch: str  # exact release, e.g. "2.11.0"
    triton: str  # exact release, e.g. "3.6.0"
    why: str
    # Triton's interpreter before 3.7 turns a scalar argument (a 1-element array) into a Python
    # int with int(array), which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted
    # to Python scalars"): every kernel with a loop fails there. 3.7 squeezes the array first.
    numpy: str = "numpy"

    @property
    def label(self) -> str:
        return f"{_minor(self.torch)}/{_minor(self.triton)}"

    @property
    def venv_name(self) -> str:
        return "t" + _minor(self.torch).replace(".", "")


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


# Newest first. The floor is the oldest pair the kernels support (pyproject's lower bounds).
PAIRS = (
    Pair("2.13.0", "3.9.0", "newest releases"),
    Pair("2.11.0", "3.6.0", "the stack of the H200 test machines", numpy="numpy<2.4"),
    Pair("2.8.0", "3.4.0", "floor: pyproject's lower bounds", numpy="numpy<2.4"),
)


def _run(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> int:
    """Run ``cmd`` in the repo root, stdout+stderr to ``log``; the exit status (124 on timeout)."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(
                cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[matrix] timed out after {timeout:.0f} s\n")
            return 124


def _installed(python: Path, numpy_spec: str) -> tuple[str, str] | None:
    """(torch, triton) versions importable by ``python`` when numpy meets ``numpy_spec`` and the
    test tools import, else None."""
    if not python.exists():
        return None
    bound = numpy_spec.partition("<")[2]
    code = (
        "import torch, triton, numpy, pytest, hypothesis, pytest_benchmark\n"
        f"v = tuple(int(x) for x in numpy.__version__.split('.')[:2]); b = {bound!r}\n"
        "assert not b or v < tuple(int(x) for x in b.split('.')), numpy.__version__\n"
        "print(torch.__version__.split('+')[0], triton.__version__)"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode:
        return None
    torch_v, triton_v = proc.stdout.split()
    return torch_v, triton_v


def ensure_venv(pair: Pair, venvs: Path, base_python: str, log_dir: Path) -> Path:
    """Create or reuse the pair's venv; return its python. Raises RuntimeError on a failed install."""
    venv = venvs / pair.venv_name
    python = venv / "bin" / "python"
    if _installed(python, pair.numpy) == (pair.torch, pair.triton):
        return python
    if not python.exists():
        venvs.mkdir(parents=True, exist_ok=True)
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    log = log_dir / f"{pair.venv_name}-install.log"
    rc = _run(
        [str(python), "-m", "pip", "install", f"torch=={pair.torch}", f"triton=={pair.triton}", pair.numpy, *TEST_DEPS],
        log,
    )
    if rc or _installed(python, pair.numpy) != (pair.torch, pair.triton):
        raise RuntimeError(f"installing torch {pair.torch} + triton {pair.triton} into {venv} failed: see {log}")
    return python


def _junit_counts(path: Path) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, failing test ids) from a pytest junit XML file."""
    if not path.exists():
        return 0, 0, 0, []
    passed = failed = skipped = 0
    failing = []
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            failed += 1
            failing.append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, failing


def run_pair(
    pair: Pair,
    python: Path,
    out: Path,
    tests: list[str],
    pytest_args: list[str],
    timeout: float,
    parts: tuple[str, ...] = ("tests", "compile"),
) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(REPO), CI="true", PYTHONDONTWRITEBYTECODE="1")
    tag = pair.venv_name
    t0 = time.perf_counter()
    junit = out / f"{tag}-junit.xml"
    junit.unlink(missing_ok=True)
    test_rc = (
        0
        if "tests" not in parts
        else _run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args, *tests],
            out / f"{tag}-tests.log",
            env=env,
            timeout=timeout,
        )
    )
    t_tests = time.perf_counter() - t0
    passed, failed, skipped, failing = _junit_counts(junit)
    if test_rc not in (0, 1) and not failed:  # collection error, crash or timeout: no per-test verdict
        failing.append(f"pytest exit status {test_rc}: see {tag}-tests.log")
        failed = max(failed, 1)

    t1 = time.perf_counter()
    report = out / f"{tag}-compile_report.json"
    report.unlink(missing_ok=True)
    cr_rc = (
        0
        if "compile" not in parts
        else _run(
            [str(python), "-m", "gmkernels_bench.compile_report", "--check", "--json", str(report)],
            out / f"{tag}-compile_report.log",
            env={**env, "TRITON_INTERPRET": "0"},
            timeout=timeout,
        )
    )
    t_compile = time.perf_counter() - t1
    if "compile" not in parts:
        compile_failures = []
    elif report.exists():
        compile_failures = json.loads(report.read_text())["failures"]
    else:
        compile_failures = [f"compile_report exit status {cr_rc} without a report: see {tag}-compile_report.log"]
    spilling = [f for f in compile_failures if "local memory" in f]
    return {
        "pair": pair.label,
        "torch": pair.torch,
        "triton": pair.triton,
        "why": pair.why,
        "venv_python": str(python),
        "tests": {
            "passed": passed,
            "failed": failed,
            "skipped": skipped,
            "failing": failing,
            "exit_status": test_rc,
            "seconds": round(t_tests, 1),
        },
        "compile_report": {
            "exit_status": cr_rc,
            "failures": compile_failures,
            "spilling_kernels": len(spilling),
            "seconds": round(t_compile, 1),
        },
        "parts": list(parts),
        "ok": test_rc == 0 and failed == 0 and cr_rc == 0,
        "seconds": round(t_tests + t_compile, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| torch / triton | tests passed | failed | compile errors + spills | seconds | result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pair']} | - | - | - | - | not built: {r['error']} |")
            continue
        t, c = r["tests"], r["compile_report"]
        ran_tests, ran_compile = "tests" in r["parts"], "compile" in r["parts"]
        lines.append(
            f"| {r['torch']} / {r['triton']} | {t['passed'] if ran_tests else '-'} | {t['failed'] if ran_tests else '-'} "
            f"| {len(c['failures']) if ran_compile else '-'} | {r['seconds']:.0f} | {'pass' if r['ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--pairs",
        default="",
        help="comma-separated torch/triton minors to run, e.g. 2.11/3.6 (default: all: "
        + ", ".join(x.label for x in PAIRS)
        + ")",
    )
    p.add_argument(
        "--venvs",
        type=Path,
        default=Path(os.environ.get("GMK_VENVS", "/work/venvs")),
        help="where the venvs live (default $GMK_VENVS or /work/venvs)",
    )
    p.add_argument("--python", default="python3.11", help="interpreter the venvs are made from (default python3.11)")
    p.add_argument(
        "--out", type=Path, default=REPO / "out" / "matrix", help="logs and matrix.json (default out/matrix)"
    )
    p.add_argument("--install-only", action="store_true", help="build or check the venvs, run no test")
    p.add_argument("--only", choices=("tests", "compile"), help="run only the tests or only compile_report --check")
    p.add_argument("--tests", nargs="+", default=list(KERNEL_TESTS), help="test files (default: the Triton ones)")
    p.add_argument(
        "--timeout", type=float, default=3600, help="seconds per pytest or compile_report run (default 3600)"
    )
    p.add_argument("pytest_args", nargs="*", help="after --: passed to pytest, e.g. -- -x -k mixture")
    args = p.parse_args(argv)

    wanted = {s.strip() for s in args.pairs.split(",") if s.strip()}
    unknown = wanted - {x.label for x in PAIRS}
    if unknown:
        p.error(f"unknown pair(s) {sorted(unknown)}; known: {[x.label for x in PAIRS]}")
    if shutil.which(args.python) is None:
        p.error(f"--python {args.python} not found")
    pairs = [x for x in PAIRS if not wanted or x.label in wanted]
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for pair in pairs:
        print(f"[matrix] torch {pair.torch} + triton {pair.triton}: venv {args.venvs / pair.venv_name}", flush=True)
        try:
            python = ensure_venv(pair, args.venvs, args.python, args.out)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            rows.append({"pair": pair.label, "torch": pair.torch, "triton": pair.triton, "error": str(e), "ok": False})
            print(f"[matrix]   {e}", flush=True)
            continue
        if args.install_only:
            continue
        parts = (args.only,) if args.only else ("tests", "compile")
        row = run_pair(pair, python, args.out, args.tests, args.pytest_args, args.timeout, parts)
        rows.append(row)
        if "tests" in parts:
            print(
                f"[matrix]   tests {row['tests']['passed']} passed, {row['tests']['failed']} failed "
                f"({row['tests']['seconds']:.0f} s)",
                flush=True,
            )
        if "compile" in parts:
            print(
                f"[matrix]   compile report {len(row['compile_report']['failures'])} failures "
                f"({row['compile_report']['seconds']:.0f} s)",
                flush=True,
            )
        for name in row["tests"]["failing"] + row["compile_report"]["failures"]:
            print(f"[matrix]   FAIL {name}", flush=True)
    if args.install_only:
        print("[matrix] venvs ready" if not rows else "[matrix] some venvs could not be built")
        return 1 if rows else 0

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    record = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "tests": args.tests,
        "pytest_args": args.pytest_args,
        "pairs": rows,
    }
    (args.out / "matrix.json").write_text(json.dumps(record, indent=1) + "\n")
    print()
    print(table(rows))
    print(f"\n[matrix] wrote {args.out / 'matrix.json'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
