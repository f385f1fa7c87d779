"""Run environment, and the JSON / markdown / PNG outputs of a benchmark run."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from typing import Any

import torch

import gmkernels

BACKEND_ORDER = ("triton", "compile", "torch", "graph", "reduce-overhead")
# A case whose batches' interquartile range exceeds this share of the median is flagged "noisy":
# its median, and every speedup computed from it, may be off by more than that.
SPREAD_FLAG = 0.10


def git_commit() -> str:
    """``git describe``-style commit of the checkout this package runs from: the short hash,
    with ``-dirty`` when tracked files differ from it; ``"unknown"`` outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return (
                        line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"
                    )
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "gmkernels_version": gmkernels.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
    }


def add_speedups(records: list[dict]) -> None:
    """For every record, ``speedup_vs_<backend> = time(backend) / time(record)`` against the
    other backends of the same case (same op, shape, dtype) in this run."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["suite"], r["op"], r["shape"], r["dtype"]), {})[r["backend"]] = r["median_ms"]
    for r in records:
        times = groups.get((r["suite"], r["op"], r["shape"], r["dtype"]), {})
        mine = r.get("median_ms")
        r["speedups"] = {
            f"vs_{b}": (t / mine if r["status"] == "ok" and mine else None)
            for b, t in times.items()
            if b != r["backend"]
        }
        r["speedup_vs_torch"] = r["speedups"].get("vs_torch")
        r["speedup_vs_compile"] = r["speedups"].get("vs_compile")


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def noisy(record: dict) -> bool:
    """Whether a timed record's spread (IQR / median) exceeds :data:`SPREAD_FLAG`."""
    return record.get("status") == "ok" and (record.get("iqr_rel") or 0.0) > SPREAD_FLAG


def headline(meta: dict, records: list[dict]) -> list[str]:
    """Warnings that belong above any table or plot of this run: CPU runs time the reference only,
    and how many cases were too noisy to compare."""
    lines = []
    if meta.get("device_type") == "cpu":
        lines.append(
            "CPU run: reference timings only (torch eager and torch.compile of the reference; Triton skipped). "
            "They say nothing about the speed of the kernels."
        )
    ok = [r for r in records if r["status"] == "ok"]
    bad = [r for r in ok if noisy(r)]
    if bad:
        lines.append(
            f"{len(bad)} of {len(ok)} timings are noisy (IQR over {100 * SPREAD_FLAG:.0f}% of the median, flagged in the "
            "table): the machine was busy or the case too short; compare them, and speedups built on them, with care."
        )
    return lines


def markdown(meta: dict, records: list[dict]) -> str:
    """The markdown report: one line on the run, the probe, then a table of every record."""
    lines = [
        f"**{meta['device']}** · torch {meta['torch_version']} · triton {meta['triton_version']} · "
        f"commit `{meta['git_commit']}` · copy bandwidth probe "
        + (f"{meta['copy_gbps']:.1f} GB/s" if meta.get("copy_gbps") else "not measured")
        + (" · --quick" if meta.get("quick") else ""),
        "",
    ]
    warn = headline(meta, records)
    lines += [f"**{w}**" for w in warn] + ([""] if warn else [])
    lines += [f"- {note}" for note in meta.get("notes", [])]
    if meta.get("notes"):
        lines.append("")
    head = [
        "suite",
        "op",
        "shape BxKxCxHxW",
        "dtype",
        "backend",
        "median ms",
        "IQR %",
        "ms/call",
        "GB/s",
        "% of copy",
        "vs torch",
        "vs compile",
        "note",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        ok = r["status"] == "ok"
        note = r.get("note", "") if ok else f"{r['status']}: {r.get('reason', '')}"
        if noisy(r):
            note = "; ".join(x for x in (f"NOISY: IQR {100 * r['iqr_rel']:.0f}% of the median", note) if x)
        row = [
            r["suite"],
            r["op"],
            r["shape"],
            r["dtype"],
            r["backend"],
            _fmt(r.get("median_ms"), ".4g"),
            _fmt(None if r.get("iqr_rel") is None else 100 * r["iqr_rel"], ".1f"),
            _fmt(r.get("ms_per_call"), ".4g") if r.get("per_call", 1) > 1 else "",
            _fmt(r.get("gbps"), ".3g"),
            _fmt(None if r.get("fraction_of_peak") is None else 100 * r["fraction_of_peak"], ".1f"),
            _fmt(r.get("speedup_vs_torch"), ".2f"),
            _fmt(r.get("speedup_vs_compile"), ".2f"),
            note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str, meta: dict, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
        f.write("\n")


def speedup_axis(speedups: list[float]) -> tuple[float, float, list[float]]:
    """Limits and ticks of the log speedup axis: the data and 1x with a margin (at least 0.5x to
    2x, so 1x always has a labelled tick either side), ticks at 1, 2, 5 per decade (1 and 3 over
    more than 3 decades, every k-th decade, 1x among them, over more than 6). Returns
    ``(lo, hi, ticks)``."""
    finite = [v for v in speedups if v > 0 and math.isfinite(v)]
    lo = min([0.5, *(v / 1.5 for v in finite)])
    hi = max([2.0, *(v * 1.5 for v in finite)])
    e_lo, e_hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = e_hi - e_lo
    subs, step = ((1, 2, 5), 1) if decades <= 3 else ((1, 3), 1) if decades <= 6 else ((1,), math.ceil(decades / 6))
    ticks = [m * 10.0**e for e in range(e_lo - e_lo % step, e_hi + 1, step) for m in subs]
    return lo, hi, [t for t in ticks if lo <= t <= hi]


def plot(path: str, records: list[dict], meta: dict | None = None) -> None:
    """PNG of each backend's speedup over torch eager (bars from 1x: right is faster; ticks from
    :func:`speedup_axis`) and of the fraction of the copy bandwidth, per case (matplotlib,
    imported here only). The title names the device and versions (and, on a CPU, that these are
    reference timings with Triton skipped); noisy cases (see :func:`noisy`) are hatched and marked
    in their label. The legend sits above the bandwidth panel, outside both, so it hides no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    meta = meta or {}
    nan = float("nan")
    ok = [r for r in records if r["status"] == "ok"]
    key = lambda r: f"{r['op']}  {r['shape']}  {r['dtype']}"  # noqa: E731
    cases = list(dict.fromkeys(key(r) for r in ok))
    shaky = {key(r) for r in ok if noisy(r)}
    backends = [b for b in BACKEND_ORDER if any(r["backend"] == b for r in ok)]
    lo, hi, ticks = speedup_axis([r.get("speedup_vs_torch") or nan for r in ok])
    height = max(4.5, 0.32 * len(cases) * max(len(backends), 1) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(15, height), sharey=True)
    width = 0.8 / max(len(backends), 1)
    for j, b in enumerate(backends):
        by_case = {key(r): r for r in ok if r["backend"] == b}
        ys = [i + j * width for i in range(len(cases))]
        speed = [(by_case[c].get("speedup_vs_torch") or nan) if c in by_case else nan for c in cases]
        frac = [100 * (by_case[c].get("fraction_of_peak") or nan) if c in by_case else nan for c in cases]
        hatch = ["//" if c in by_case and noisy(by_case[c]) else "" for c in cases]
        color = f"C{BACKEND_ORDER.index(b)}"
        label = {
            "torch": "torch eager (reference)",
            "compile": "torch.compile (reference)",
            "triton": "gmkernels (Triton)",
        }[b]
        if b != "torch":
            axes[0].barh(ys, [x - 1 for x in speed], left=1.0, height=width, label=label, color=color, hatch=hatch)
        axes[1].barh(ys, frac, height=width, label=label, color=color, hatch=hatch)
    labels = [c + ("  (noisy)" if c in shaky else "") for c in cases]
    axes[0].set_yticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, fontsize=9)
    axes[0].set_ylabel("case: op  shape BxKxCxHxW  dtype", fontsize=10)
    axes[0].invert_yaxis()
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlim(lo, hi)
    axes[0].set_xticks(ticks)
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_xlabel("speedup over torch eager (log scale; right of 1x is faster)", fontsize=10)
    axes[1].set_xlabel("% of the copy bandwidth measured in this run (minimal-traffic bytes)", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=9)
        ax.grid(axis="x", alpha=0.3)
    if backends:  # one legend for both panels (same colours), above the bandwidth one: no bar under it
        axes[1].legend(
            fontsize=9, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=len(backends), frameon=False, borderaxespad=0
        )
    title = [
        f"gmkernels benchmark on {meta.get('device', 'unknown device')}",
        f"torch {meta.get('torch_version')} · triton {meta.get('triton_version')} · gmkernels {meta.get('gmkernels_version')}"
        f" · commit {meta.get('git_commit')}" + (" · --quick" if meta.get("quick") else ""),
    ]
    title += [w for w in headline(meta, records) if not w.startswith("CPU run")]  # that one is the suffix below
    if meta.get("device_type") == "cpu":
        title[0] += " — reference only, Triton skipped"
    fig.suptitle("\n".join(title), fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
