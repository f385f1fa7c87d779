"""The benchmark's spread per case, its noisy-case flag, the CPU warning and the PNG's title."""

from __future__ import annotations

import pytest
import torch

from gmkernels_bench import report
from gmkernels_bench.timing import TimerConfig, measure

CPU_META = {
    "device": "Some CPU (2 CPUs, 1 threads)",
    "device_type": "cpu",
    "torch_version": "2.13.0",
    "triton_version": "3.9.0",
    "gmkernels_version": "0.1.0",
    "git_commit": "abc",
    "quick": False,
    "copy_gbps": 10.0,
    "notes": [],
}


def _rec(backend: str, median: float, iqr_rel: float, dtype: str = "fp32") -> dict:
    return {
        "suite": "ops",
        "op": "gm_to_mean",
        "shape": "1x2x3x4x5",
        "dtype": dtype,
        "backend": backend,
        "status": "ok",
        "median_ms": median,
        "iqr_rel": iqr_rel,
        "gbps": 1.0,
        "fraction_of_peak": 0.1,
    }


def test_measure_reports_quartiles():
    t = measure(
        [lambda: sum(range(200))],
        torch.device("cpu"),
        TimerConfig(repeats=9, warmup_s=0.0, min_batch_s=1e-4, max_total_s=1.0),
    )
    assert t.q1_s <= t.median_s <= t.q3_s and t.iqr_rel == pytest.approx((t.q3_s - t.q1_s) / t.median_s)


def test_markdown_flags_noisy_cases_and_warns_on_cpu():
    recs = [_rec("torch", 12.0, 0.9), _rec("compile", 0.15, 0.02), _rec("torch", 0.04, 0.05, "bf16")]
    report.add_speedups(recs)
    md = report.markdown(CPU_META, recs)
    assert "CPU run: reference timings only" in md and "Triton skipped" in md
    assert "1 of 3 timings are noisy" in md
    rows = [line for line in md.splitlines() if line.startswith("| ops")]
    assert "NOISY: IQR 90% of the median" in rows[0] and "90.0" in rows[0]
    assert "NOISY" not in rows[1] + rows[2]
    gpu = report.markdown(dict(CPU_META, device_type="cuda"), [_rec("triton", 0.1, 0.01)])
    assert "CPU run" not in gpu and "noisy" not in gpu


def test_plot_title_legend_and_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    recs = [_rec("torch", 1.0, 0.5), _rec("compile", 0.5, 0.01)]
    report.add_speedups(recs)
    report.plot(str(tmp_path / "r.png"), recs, CPU_META)
    assert (tmp_path / "r.png").stat().st_size > 0
    fig = figs[0]
    title = fig._suptitle.get_text()
    assert (
        "Some CPU" in title
        and "torch 2.13.0" in title
        and "triton 3.9.0" in title
        and "reference only, Triton skipped" in title
    )
    assert "1 of 2 timings are noisy" in title
    ax_speed, ax_bw = fig.axes
    assert [t.get_text() for t in ax_bw.get_legend().get_texts()] == [
        "torch.compile (reference)",
        "torch eager (reference)",
    ]
    assert [t.get_text() for t in ax_speed.get_yticklabels()] == ["gm_to_mean  1x2x3x4x5  fp32  (noisy)"]
    plt.close(fig)


def test_plot_speedup_ticks_below_and_above_1x_and_legend_clear_of_bars(tmp_path, monkeypatch):
    """Speedups from 0.2x to 5x: the speedup axis labels ticks on both sides of 1x (not 1x
    alone), and the legend covers no bar of either panel."""
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    speedups = {"compile": (0.2, 0.5, 2.0, 5.0), "triton": (0.3, 0.8, 3.0, 4.5)}
    recs = []
    for i in range(4):
        base = dict(_rec("torch", 1.0, 0.01), op=f"op{i}", fraction_of_peak=0.9)
        recs += [base] + [dict(base, backend=b, median_ms=1.0 / s[i]) for b, s in speedups.items()]
    report.add_speedups(recs)
    report.plot(str(tmp_path / "r.png"), recs, dict(CPU_META, device_type="cuda"))
    fig = figs[0]
    fig.canvas.draw()
    ax_speed, ax_bw = fig.axes
    lo, hi = ax_speed.get_xlim()
    labelled = [
        (t.get_position()[0], t.get_text())
        for t in ax_speed.get_xticklabels()
        if t.get_text() and lo <= t.get_position()[0] <= hi
    ]
    assert len(labelled) >= 3, labelled
    assert min(x for x, _ in labelled) <= 0.2 and max(x for x, _ in labelled) >= 5, labelled
    assert "0.2x" in {s for _, s in labelled} and "1x" in {s for _, s in labelled}
    assert lo <= 0.2 and hi >= 5
    legend = ax_bw.get_legend().get_window_extent()
    bars = [p.get_window_extent() for ax in fig.axes for p in ax.patches]
    assert len(bars) == 4 * 2 + 4 * 3
    assert not [b for b in bars if legend.overlaps(b)]
    plt.close(fig)


@pytest.mark.parametrize("speedups", [[], [0.77], [0.2, 5.0], [0.01, 300.0], [1e-9, 2e3], [float("nan"), 40.0]])
def test_speedup_axis_labels_1x_and_both_sides(speedups):
    lo, hi, ticks = report.speedup_axis(speedups)
    finite = [s for s in speedups if s == s]
    assert lo <= min(finite + [0.5]) and hi >= max(finite + [2.0])
    assert 1.0 in ticks and min(ticks) < 1 < max(ticks) and all(lo <= t <= hi for t in ticks)
    assert 3 <= len(ticks) <= 12 and ticks == sorted(ticks)
