"""``python -m gmkernels_bench.gpu_check`` on a CPU: the plan (``--dry-run``) fits the budget,
without CUDA it stops with a message (no traceback), and the pieces of the GPU run that do not
need a GPU: the storage mirroring of kernel launches and the pytest plugin's profile and budget stop."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gmkernels_bench import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gmkernels_bench.gpu_check", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_plans_every_part_within_the_budget(capsys):
    assert gpu_check.main(["--budget-s", "480", "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    for part in gpu_check.PARTS:
        assert any(line.split()[:1] == [part.name] for line in lines), (part.name, stdout)
    total = next(float(line.split()[1]) for line in lines if line.split()[:1] == ["total"])
    assert total <= 480


@pytest.mark.parametrize("budget", [60, 200, 480, 1200])
def test_plan_fills_the_budget_exactly(budget):
    shares = [e.share for e in gpu_check.plan(budget) if e.share > 0]
    assert shares
    assert sum(shares) + gpu_check.RESERVE_S == pytest.approx(budget)
    assert 2 <= gpu_check.default_examples(budget) <= 50
    if budget >= 480:  # every part fits
        assert len(shares) == len(gpu_check.PARTS)


def test_without_cuda_it_says_so_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert gpu_check.main(["--budget-s", "480", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_command_line_exits_without_a_traceback(tmp_path):
    proc = run_cli("--budget-s", "480", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [(["--budget-s", "10"], "--budget-s"), (["--parts", "tests,nope"], "nope"), (["--examples", "0"], "--examples")],
)
def test_bad_arguments_are_reported(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([*args, "--dry-run"])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_mirrored_launch_arguments_keep_layout_aliasing_and_write_back():
    base = torch.arange(60, dtype=torch.float32).view(3, 4, 5)
    strided = base[:, ::2, 1:]  # offset 1, strides (20, 10, 1)
    alias = base.view(-1)[5:15]  # the same storage
    other = torch.zeros(7, dtype=torch.bfloat16).t()
    args, kwargs, write_back = gpu_check._mirrored((strided, 3, "x"), {"a": alias, "b": other}, "cpu")
    m_strided, m_alias, m_other = args[0], kwargs["a"], kwargs["b"]
    assert args[1:] == (3, "x")
    for m, t in ((m_strided, strided), (m_alias, alias), (m_other, other)):
        assert m.data_ptr() != t.data_ptr()
        assert (m.shape, m.stride(), m.storage_offset(), m.dtype) == (t.shape, t.stride(), t.storage_offset(), t.dtype)
        assert torch.equal(m, t)
    assert m_strided.untyped_storage().data_ptr() == m_alias.untyped_storage().data_ptr()
    m_strided.fill_(-1.0)  # a kernel writing its output
    m_other.fill_(2.0)
    assert base.min() >= 0  # nothing reaches the CPU tensors before write_back
    write_back()
    assert (strided == -1).all() and (other == 2).all()
    assert torch.equal(alias, base.view(-1)[5:15])
    assert (base.view(-1)[:1] == 0).all()  # outside every mirrored view: unchanged


def test_pytest_plugin_sets_the_examples_and_stops_at_the_deadline(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        textwrap.dedent("""
        import os
        from hypothesis import given, strategies as st

        @given(st.integers())
        def test_count(n):
            with open(os.environ["PROBE_COUNT"], "a") as f:
                f.write("x")

        def test_second():
            pass
    """)
    )
    events = tmp_path / "tests.jsonl"

    def run(deadline):
        env = {
            **os.environ,
            "PYTHONPATH": REPO,
            "GMK_GPU_CHECK_EXAMPLES": "3",
            "GMK_GPU_CHECK_EVENTS": str(events),
            "GMK_GPU_CHECK_DEADLINE": str(deadline),
            "PROBE_COUNT": str(tmp_path / "count"),
        }
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "gmkernels_bench.gpu_check",
                "--hypothesis-profile=gpu-check",
                str(tmp_path / "test_probe.py"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    proc = run(deadline=1e12)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "count").read_text() == "xxx"
    assert [json.loads(line)["outcome"] for line in events.read_text().splitlines()] == ["passed", "passed"]
    events.unlink()
    proc = run(deadline=0)  # already past: the first test runs, then the session stops
    assert [json.loads(line)["nodeid"].split("::")[1] for line in events.read_text().splitlines()] == ["test_count"]
    assert (tmp_path / "tests.stopped").exists()


@pytest.mark.parametrize("budget", [60, 120, 200])
def test_a_small_budget_drops_parts_instead_of_shrinking_fixed_work(budget, capsys):
    """Issue 27 item 13: 20 training steps take what they take; a budget too small for a part
    drops it, and the plan says so (it used to plan the train part at 2 s of a 60 s budget)."""
    kept = {e.part.name: e for e in gpu_check.plan(budget) if e.share > 0}
    dropped = [e for e in gpu_check.plan(budget) if e.share == 0]
    for e in kept.values():
        assert e.share >= e.part.min_s, (e.part.name, e.share, e.part.min_s)
    assert sum(e.share for e in kept.values()) + gpu_check.RESERVE_S == pytest.approx(budget)
    assert dropped and all(e.reason for e in dropped)
    assert gpu_check.main(["--budget-s", str(budget), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for e in dropped:
        assert any(line.split()[:1] == [e.part.name] and "dropped" in line for line in out.splitlines()), out


def test_the_plan_covers_only_the_parts_asked_for(capsys):
    entries = gpu_check.plan(120, ["calibrate"])
    assert [e.part.name for e in entries] == ["calibrate"] and entries[0].share == pytest.approx(
        120 - gpu_check.RESERVE_S
    )
