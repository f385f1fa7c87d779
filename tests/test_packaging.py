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


def _running_packages() -> list[str]:
    """The folders the running interpreter imports packages from (its site-packages, wherever they
    are: a virtualenv's, the base interpreter's, a user site), less those that hold a ``gmkernels``
    package (this checkout, another one on the path): the copy must be the only one."""
    return [p for p in sys.path if p and os.path.isdir(p) and not os.path.isdir(os.path.join(p, "gmkernels"))]


@pytest.mark.slow
def test_editable_install_imports_from_the_checkouts_parent(tmp_path):
    checkout = tmp_path / "gmkernels"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "runs",
            "bench-out",
            "build",
            "*.egg-info",
            "__pycache__",
            ".hypothesis",
            ".pytest_cache",
            "*.pt",
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # pip, the build backend, torch and triton come from the running interpreter, so nothing is
    # downloaded: its package folders as plain path lines (their own .pth files, e.g. this
    # checkout's editable install, are not processed). `venv --system-site-packages` would give
    # the base interpreter's packages, not a running virtualenv's.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "zz_running_interpreter.pth").write_text("\n".join(_running_packages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    res = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(checkout)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    code = "import gmkernels; print(gmkernels.__file__); gmkernels.sample"
    for cwd in (tmp_path, checkout, tmp_path / "venv"):
        res = subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"import from {cwd}: {res.stderr}"
        assert Path(res.stdout.strip()) == checkout / "gmkernels" / "__init__.py"
