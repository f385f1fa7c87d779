"""Packaging: an editable install must import the real package from anywhere, including from the
folder that holds a checkout named ``gmkernels`` (there the checkout folder itself is a candidate
namespace package named ``gmkernels``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_editable_install_imports_from_the_checkouts_parent(tmp_path):
    checkout = tmp_path / "gmkernels"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", "runs", "bench-out", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", "*.pt"))
    venv = tmp_path / "venv"
    # --system-site-packages: torch, triton and the build backend come from the running
    # interpreter, so nothing is downloaded (pip runs from there too: --without-pip).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(checkout)],
                   check=True, cwd=checkout, env=env, capture_output=True)
    code = "import gmkernels; print(gmkernels.__file__); gmkernels.sample"
    for cwd in (tmp_path, checkout, tmp_path / "venv"):
        res = subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"import from {cwd}: {res.stderr}"
        assert Path(res.stdout.strip()) == checkout / "gmkernels" / "__init__.py"
