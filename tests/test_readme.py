"""Every ```python and ```bash block of README.md and docs/*.md runs as written, and every link
between them resolves.

* A python block runs as its own script (a fresh interpreter, the checkout on ``PYTHONPATH``).
* A bash block runs command by command (lines joined at ``\\``, commands split at ``&&``) in one
  scratch folder per block, so a block that trains and then evaluates sees its own checkpoint.
  Each command must match a rule below: ``SMALL`` runs it with small settings appended (argparse
  keeps the last value of an option, and a later ``key=value`` override wins), ``SKIP`` names why
  it is not run. A command matching neither fails the test: add a rule with a reason.
* A block preceded by ``<!-- not run: REASON -->`` is skipped as a whole; the reason must be given.
* Pages repeat commands (``python -m model.train --preset digits`` is in three blocks). A command
  that already ran in this session with the same inputs is not run again: the files its first
  run wrote are copied into the block's folder (``_Runs``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->", re.S)

SKIP = [
    (r"^python -m venv\b|^\. \S+/bin/activate$", "makes a virtualenv for the install below (.ci/run runs both lines)"),
    (
        r"^pip install\b",
        "installs into the running environment; tests/test_packaging.py installs the checkout into a fresh venv",
    ),
    (r"^torchrun\b", "starts one process per GPU"),
    (r"--preset imagenet", "needs GPUs and a latent cache of ImageNet"),
    (r"^(python -m )?pytest\b", "the test suite itself"),
    (
        r"gmkernels_bench\.compile_report",
        "compiles every kernel for sm_80 and sm_90 (minutes); tests/test_aot.py compiles the same cases",
    ),
]
_DIGITS_EVAL = "--set eval.n_per_class=2 'eval.nfe=[1]' 'eval.guidance={\"probabilistic\": [0.3], \"mean-cfg\": [1.5]}'"
SMALL = [
    (r"^python -m model\.train --preset (checkerboard|checkerboard-k1|digits)\b", "steps=2 batch=16 log_every=1"),
    (
        r"^python -m model\.evaluate .*digits.*--sweep",
        "--set eval.n_per_class=2 'eval.sweep.nfe=[1,2]' eval.sweep.n_seeds=1",
    ),
    (r"^python -m model\.evaluate .*digits", _DIGITS_EVAL),
    (r"^python -m model\.evaluate ", "--set eval.n=64 'eval.nfe=[1]' eval.projections=8"),
    (r"^python -m model\.sample ", "--n 4 --steps 2"),
    (r"^python -m gmkernels_bench(\s|$)", "--quick --backends torch --no-progress"),
    (r"^python -m gmkernels_bench\.host_cost\b", "--calls 5 --repeat 1 --filter gm_to_mean"),
]


def _blocks():
    """(page, line, language, code, reason-not-run or None) for every python/bash block."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1]
            skip = NOT_RUN.search(before)
            out.append((page, line, m.group(1), m.group(2), skip.group(1) if skip else None))
    return out


BLOCKS = _blocks()


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)  # as a user runs them: CPU tensors take the reference path
    return env


def _commands(code: str) -> list[str]:
    cmds = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            cmds += [c.strip() for c in line.split("&&")]
    return cmds


def _plan(cmd: str) -> tuple[str | None, str]:
    """(command to run or None, how it is run / why not)."""
    for pat, extra in SMALL:
        if re.search(pat, cmd):
            return f"{cmd} {extra}", f"small settings: {extra}"
    for pat, why in SKIP:
        if re.search(pat, cmd):
            return None, why
    raise AssertionError(
        f"no rule for the README command {cmd!r}: add it to SMALL (with small settings) or SKIP (with a reason) "
        "in tests/test_readme.py"
    )


def _id(b):
    return f"{b[0].relative_to(ROOT)}:{b[1]}"


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with the hash of its content."""
    return {str(f.relative_to(folder)): _hash(f) for f in sorted(folder.rglob("*")) if f.is_file()}


class _Runs:
    """The bash commands run so far in this session, to run each distinct one once.

    A command's run is reused for the same argv when the files and folders it names (its
    checkpoints) have the same content and none of the files its first run wrote exist yet in
    the new folder (a training run would resume from its own checkpoint): the commands read only
    what they name and their own outputs. Reusing copies the written files (kept aside right
    after the first run) into the new folder, so the block's later commands see them as if the
    command had run there."""

    def __init__(self, store: Path):
        self.store = store
        self.runs: dict[tuple, tuple[Path, list[str]]] = {}  # key -> (kept copy, files written)

    @staticmethod
    def key(argv: list[str], cwd: Path) -> tuple:
        """``argv`` with the content of every existing path it names, relative to ``cwd``."""
        named = [(a, cwd / a) for a in argv[1:] if not os.path.isabs(a) and (cwd / a).exists()]
        return tuple(argv), tuple((a, _hash(p) if p.is_file() else tuple(_files(p).items())) for a, p in named)

    def reuse(self, key: tuple, cwd: Path) -> bool:
        """Copy the files of an earlier run of ``key`` into ``cwd``; False when there is none."""
        if key not in self.runs:
            return False
        kept, written = self.runs[key]
        if any((cwd / f).exists() for f in written):
            return False
        shutil.copytree(kept, cwd, dirs_exist_ok=True)
        return True

    def record(self, key: tuple, cwd: Path, before: dict[str, str]) -> None:
        """Keep the files the run of ``key`` in ``cwd`` wrote (new or changed since ``before``)."""
        written = [f for f, h in _files(cwd).items() if before.get(f) != h]
        kept = self.store / str(len(self.runs))
        kept.mkdir()
        for f in written:
            (kept / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cwd / f, kept / f)
        self.runs[key] = (kept, written)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> _Runs:
    """The bash commands run by this module's tests, shared between the blocks."""
    return _Runs(tmp_path_factory.mktemp("readme_runs"))


def test_blocks_found():
    assert any(b[2] == "python" for b in BLOCKS) and any(b[2] == "bash" for b in BLOCKS)
    for b in BLOCKS:
        assert b[4] is None or b[4], f"{_id(b)}: '<!-- not run: -->' needs a reason"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b[2] == "python"], ids=_id)
def test_python_block_runs(block, tmp_path):
    page, line, _, code, reason = block
    if reason:
        pytest.skip(reason)
    res = subprocess.run(
        [sys.executable, "-"], input=code, text=True, cwd=tmp_path, env=_env(), capture_output=True, timeout=600
    )
    assert res.returncode == 0, f"{_id(block)} failed:\n{code}\n{res.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b[2] == "bash"], ids=_id)
def test_bash_block_runs(block, tmp_path, runs):
    page, line, _, code, reason = block
    if reason:
        pytest.skip(reason)
    ran = 0
    for cmd in _commands(code):
        run, how = _plan(cmd)
        if run is None:
            continue
        ran += 1
        argv = shlex.split(run)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        key = runs.key(argv, tmp_path)
        if runs.reuse(key, tmp_path):  # ran earlier in this session, on the same inputs
            continue
        before = _files(tmp_path)
        res = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{_id(block)}: {run!r} failed:\n{res.stderr[-3000:]}"
        runs.record(key, tmp_path, before)
    if not ran:
        pytest.skip("every command of this block is skipped: " + "; ".join(_plan(c)[1] for c in _commands(code)))


def test_rules_cover_every_bash_command():
    """Cheap and not slow: a README command without a rule fails here in the fast subset too."""
    for block in BLOCKS:
        if block[2] == "bash" and not block[4]:
            for cmd in _commands(block[3]):
                _plan(cmd)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    heads = re.findall(r"^#+\s+(.*)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(ROOT)}: link {target!r}: {dest} does not exist"
            if anchor:
                assert anchor in _anchors(dest), (
                    f"{page.relative_to(ROOT)}: link {target!r}: no heading with that anchor"
                )


def test_user_docs_do_not_cite_the_internal_spec():
    for page in PAGES:
        assert "SPEC" not in page.read_text(), (
            f"{page.relative_to(ROOT)} cites SPEC, which does not ship: link docs/ instead"
        )
