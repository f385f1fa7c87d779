"""The static performance model (``gmkernels_bench.perfmodel``): SASS reading (pipes, loops, waits
on global loads), residency, the terms of a launch, L2 reuse, the torch-op counter of the
reference, and the calibration refit on synthetic measurements (no GPU needed)."""

import math
import os
import subprocess
import sys

import pytest

from gmkernels_bench import calibrate
from gmkernels_bench import perfmodel as pm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A loop whose two loads are used in the iteration that issues them (one wait per iteration),
# one that also issues a load for the next iteration before it waits on this one's (the early
# load costs no wait of its own: still one), and a gather (a load whose address is a loaded
# value: two waits). Line comments as nvdisasm -gi writes them.
_SASS = """
	//## File "k.py", line 10
        /*0000*/                   LDG.E R2, desc[UR4][R8.64] ;
        /*0010*/                   FADD R3, R2, R2 ;
.L_x_0:
	//## File "k.py", line 20
        /*0020*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0030*/                   LDG.E.128 R12, desc[UR4][R10.64] ;
	//## File "k.py", line 21
        /*0040*/                   FFMA R3, R4, R12, R3 ;
        /*0050*/                   MUFU.EX2 R7, R7 ;
        /*0060*/              @P0 BRA `(.L_x_0) ;
.L_x_1:
	//## File "k.py", line 30
        /*0070*/                   FADD R3, R20, R3 ;
        /*0080*/                   LDG.E R20, desc[UR4][R8.64] ;
        /*0090*/                   LDG.E R26, desc[UR4][R10.64] ;
        /*00a0*/                   FFMA R3, R26, R3, R3 ;
        /*00b0*/              @P1 BRA `(.L_x_1) ;
.L_x_2:
	//## File "k.py", line 40
        /*00c0*/                   LDG.E.64 R22, desc[UR4][R8.64] ;
        /*00d0*/                   LDG.E R24, desc[UR4][R22.64] ;
        /*00e0*/                   FADD R3, R24, R3 ;
        /*00f0*/              @P2 BRA `(.L_x_2) ;
        /*0100*/                   STG.E desc[UR4][R8.64], R3 ;
        /*0110*/                   EXIT ;
"""


def test_sass_profile_reads_pipes_loops_and_waits():
    p = pm.sass_profile(_SASS)
    assert [lp[:2] for lp in p["loops"]] == [[2, 6], [7, 11], [12, 15]]
    assert p["waits"] == [1, 1, 1, 2]  # outside loops, then each loop per iteration
    by_line = {(g[0], g[1][0][1]): g for g in p["groups"]}
    loop0 = by_line[(0, 20)][2]
    assert loop0["lsu"] == 2 * 4  # two 128-bit loads: 512 B per warp each, 4 wavefronts of 128 B
    assert by_line[(0, 21)][2] == {"fma": 1, "mufu": 1}
    assert by_line[(0, 21)][3] == 3  # FFMA, MUFU, BRA take issue slots


def test_loop_executions_come_from_the_counted_statements():
    p = pm.sass_profile(_SASS)
    lines = {(("k.py", 20),): 40, (("k.py", 21),): 40, (("k.py", 30),): 8}  # two programs
    ex = pm.loop_executions(p, lines, programs=2)
    assert ex == [20.0, 4.0, 1.0]  # loop 2 was not counted: as often as its parent (the program)
    pipes, issue, waits = pm.dynamic_counts(p, ex)
    assert waits == 1 + 20 * 1 + 4 * 1 + 1 * 2
    assert pipes["mufu"] == 20 and pipes["fma"] == 1 + 20 + 4 * 2 + 1


@pytest.mark.parametrize("regs, warps, smem, expect", [
    (32, 4, 0, (16, "warps")),       # 64 warps per SM
    (128, 4, 0, (4, "registers")),   # 65536 / (128 x 128)
    (166, 2, 0, (6, "registers")),   # 168 a thread: 4 partitions x 16384 // (168 x 32) = 12 warps
    (32, 1, 100 * 1024, (1, "shared memory")),  # 164 KiB // (100 + 1) KiB
])  # fmt: skip
def test_residency(regs, warps, smem, expect):
    assert pm.residency(pm.DEVICES["a100"], regs, warps, smem) == expect


def _profile(loads_per_iteration_waits: int, instructions: int = 10) -> dict:
    return {"loops": [[0, 9, -1]], "groups": [[0, None, {"fma": instructions}, instructions]],
            "waits": [0.0, float(loads_per_iteration_waits)], "instructions": instructions}  # fmt: skip


def test_a_launch_is_bound_by_its_largest_term():
    dev = pm.DEVICES["h100"]
    common = dict(programs=dev.sms * 8, warps=4, registers=64, shared_bytes=0)
    big = pm.estimate_launch(dev, dram_bytes=1e9, profile=_profile(1), executions=[4.0], **common)
    assert big["limit"] == "dram" and big["copy_share"] == pytest.approx(1.0)
    assert big["us"] == pytest.approx(1e9 / (dev.copy_gbs * 1e3))
    # the same bytes behind 2000 dependent waits per program: Little's law
    slow = pm.estimate_launch(dev, dram_bytes=1e9, profile=_profile(1), executions=[2000.0], **common)
    assert slow["limit"] == "latency" and slow["copy_share"] < 0.5
    waves = math.ceil(common["programs"] / (dev.sms * slow["programs_per_sm"]))
    assert slow["us"] == pytest.approx(waves * 2000 * dev.dram_latency_ns / 1e3)
    tiny = pm.estimate_launch(dev, dram_bytes=1e3, profile=_profile(1), executions=[1.0], **common)
    assert tiny["limit"] == "launch" and tiny["us"] == dev.launch_us
    # the stored inputs recompute the same time
    assert pm.reestimate(slow["inputs"], dev) == (pytest.approx(slow["us"]), "latency")


def test_l2_reuse_counts_a_second_read_within_the_cache():
    dev = pm.DEVICES["h100"]
    small, huge = 10e6, 200e6
    steps = [pm.Step("a", {"gm": (small, 0), "out": (0, small)}), pm.Step("b", {"gm": (small, 0), "out": (small, 0)}),
             pm.Step("c", {"x": (huge, 0)}), pm.Step("d", {"gm": (small, 0)})]  # fmt: skip
    assert pm.l2_reuse(dev, steps) == [0.0, 2 * small, 0.0, 0.0]  # after 200 MB in between, gm is gone


def test_torch_ops_count_the_reference_composition_on_meta_tensors():
    import reference
    from gmkernels_bench.aot import meta_gm

    gm = meta_gm(4, 8, 4, 16, 16, "fp32")
    ops = pm.TorchOps()
    with ops:
        reference.gm_to_mean(gm)
    assert len(ops.ops) >= 3  # softmax, product, sum at least: one launch each
    G = 4 * 8 * 4 * 16 * 16 * 4
    read = sum(r for st in ops.ops for r, _ in st.storages.values())
    assert read >= G  # the means are read at least once
    est = [pm.torch_op_estimate(pm.DEVICES["h100"], st) for st in ops.ops]
    assert all(e["us"] >= pm.DEVICES["h100"].launch_us for e in est)


def test_refit_recovers_constants_from_synthetic_measurements():
    meas = {"copy": [{"bytes": 2 * 256 << 20, "us": (2 * 256 << 20) / 2.9e6}, {"bytes": 1 << 30, "us": (1 << 30) / 3.0e6}],
            "chase": [{"hops": h, "us": 0.61 * h + 7.0} for h in (4096, 16384)],
            "empty": [{"launches": n, "us": 1.8 * n + 4.0} for n in (100, 400)], "clock_ghz": 1.98}  # fmt: skip
    entry = pm.refit("h100", meas, gpu="NVIDIA H100 80GB HBM3", when="2025-01-01T00:00:00Z")
    c = entry["constants"]
    assert c["copy_gbs"] == pytest.approx(3000, rel=1e-3) and c["dram_latency_ns"] == pytest.approx(610)
    assert c["launch_us"] == pytest.approx(1.8) and c["clock_ghz"] == 1.98
    dev = pm.device("h100", {"devices": {"h100": entry}})
    assert dev.copy_gbs == pytest.approx(3000, rel=1e-3) and dev.dram_latency_ns == pytest.approx(610)
    assert {k for k, _ in dev.measured} == {"copy_gbs", "dram_latency_ns", "launch_us", "clock_ghz"}
    assert "NVIDIA H100" in dev.measured[0][1] and "2025-01-01" in dev.measured[0][1]
    assert "calibrated" in dev.label() and "uncalibrated" in pm.DEVICES["h100"].label()
    assert pm.device("a100", {"devices": {"h100": entry}}) == pm.DEVICES["a100"]  # other devices untouched


def test_side_by_side_recomputes_the_stored_estimates(monkeypatch):
    inputs = {
        "dram_bytes": 30e6,
        "l2_bytes": 0,
        "l2_hit_share": 0.0,
        "issue_cycles": None,
        "issue_pipe": None,
        "latency_waits": None,
    }
    monkeypatch.setattr(
        calibrate,
        "stored",
        lambda: {
            "devices": {
                "h100": [
                    {
                        "label": "gm_to_mean",
                        "index": 0,
                        "kernel": "_gm_moments_kernel",
                        "us": 10.0,
                        "limit": "dram",
                        "inputs": inputs,
                    }
                ]
            }
        },
    )
    entry = pm.refit("h100", {"copy": [{"bytes": 30e6, "us": 15.0}]})  # 2000 GB/s measured
    rows = calibrate.side_by_side("h100", [{"label": "gm_to_mean", "index": 0, "kernel": "_gm_moments_kernel",
                                            "measured_us": 16.0}], {"devices": {"h100": entry}})  # fmt: skip
    (row,) = rows
    assert row["estimated_us"] == 10.0 and row["refit_us"] == pytest.approx(15.0) and row["refit_limit"] == "dram"
    assert row["measured_over_refit"] == pytest.approx(16 / 15)
    assert "gm_to_mean" in calibrate.table(rows)


def test_device_keys_and_tables():
    assert calibrate.device_key("NVIDIA H100 80GB HBM3") == "h100"
    assert calibrate.device_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert calibrate.device_key("NVIDIA H200") == "h200"
    assert calibrate.device_key("Tesla T4") == "tesla-t4"
    table = pm.device_table(pm.DEVICES.values())
    assert "copy bandwidth" in table and "H100" in table


def test_the_dry_run_shows_the_calibration():
    proc = subprocess.run([sys.executable, "-m", "gmkernels_bench.gpu_check", "--dry-run", "--parts", "calibrate", "--budget-s", "90"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "calibrate part" in proc.stdout and "pointer chase" in proc.stdout and "calibrate " in proc.stdout


@pytest.mark.slow
def test_the_estimate_command_line_end_to_end(tmp_path):
    """Records, counts, compiles (child process) and estimates one op family at a tiny shape."""
    import json

    out = tmp_path / "est.json"
    env = {**os.environ, "PYTHONPATH": REPO, "GMKERNELS_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "gmkernels_bench.estimate", "--shapes", "2,3,3,5,7", "--filter", "gm_to_mean",
                           "--device", "a100,h100", "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["device"], r["dtype"]) for r in rows} == {
        (d, t) for d in ("A100-SXM4-80GB", "H100-SXM5-80GB") for t in ("fp32", "bf16")
    }
    for r in rows:
        assert r["us"] >= 2.5 and r["limit"] and r["programs_per_sm"] >= 1 and r["dram_bytes"] > 0
        assert set(r) >= {
            "kernel",
            "shape",
            "dtype",
            "device",
            "us",
            "limit",
            "dram_bytes",
            "copy_share",
            "programs_per_sm",
            "waves",
        }
    assert "uncalibrated estimate" in proc.stdout


def test_the_stored_calibration_estimates_cover_every_launch_on_every_device():
    """``gpu_check``'s calibrate part compares its measurements with this committed file: every
    representative launch has an estimate on every device (an empty file compares nothing)."""
    stored = calibrate.stored()
    assert stored["shape"] == list(calibrate.SHAPE) and stored["dtype"] == calibrate.DTYPE
    for dev in pm.DEVICES:
        entries = stored["devices"][dev]
        assert {e["label"] for e in entries} == {label for label, _, _ in calibrate.LAUNCHES}
        assert len(entries) >= 10 and all(e["us"] >= 2.5 and e["limit"] for e in entries)
