"""Quality against cost: ``python -m model.evaluate CKPT --sweep``.

Runs every setting of ``eval.sweep`` — solver (``gm-sde-1``, ``gm-sde-2``, ``gm-ode-1``,
``gm-ode-2``, ``euler``) x NFE x guidance scale (0: unguided) — over ``n_seeds`` noise seeds and
writes one table (``<out>/<name>_sweep.md``, raw numbers in ``<name>_sweep.json``) and one plot
(``<name>_sweep.png``): quality against network calls and against wall time per image, with the
Pareto front of the quality metric marked (the settings no other setting beats at no higher cost).

A :class:`Runner` turns one setting and seed into metrics and seconds: :class:`DigitsRunner` (FD,
precision, recall and class accuracy in the digits classifier's features), :class:`PointsRunner`
(the checkerboard: sliced W1, and FD / precision / recall of the raw 2-D points), and
``model.imagenet.ImagenetRunner`` (FID, IS, precision, recall in Inception-v3 features, sharded
over ``torchrun`` ranks). GM-ODE takes ``ode_substeps // NFE`` substeps per call, as in the NFE
sweep of ``model.evaluate``. A guided call is one network pass on the batch doubled with the null
class: it counts as one call, and the time axis shows what it costs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Protocol

import torch

from .data import build_data, load_digits_split
from .metrics import frechet_distance, precision_recall, sliced_w1, train_digits_classifier
from .presets import SOLVERS

# What each clock of the time columns measures.
CLOCKS = {
    "wall": "wall: elapsed time (on CUDA after a synchronize)",
    "cpu": "cpu: this process's CPU time, the cost on an idle core of a one-thread run, unaffected by other jobs",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler configuration: ``solver`` a name of :data:`model.presets.SOLVERS`, ``nfe``
    network calls, ``guidance`` a mode or ``None`` (then ``scale`` is 0)."""

    solver: str
    nfe: int
    guidance: str | None = None
    scale: float = 0.0

    @property
    def family(self) -> str:
        """The curve this setting belongs to: the solver, and the guidance when there is one."""
        return self.solver if self.guidance is None else f"{self.solver} + {self.guidance} {self.scale:g}"

    def guidance_kwargs(self) -> dict:
        """The guidance arguments of ``gmkernels.sample`` (none when unguided)."""
        return {} if self.guidance is None else dict(guidance=self.guidance, guidance_scale=self.scale)


def settings(sweep: dict) -> list[Setting]:
    """Every solver x guidance x NFE of an ``eval.sweep`` dict (scale 0 of any mode: unguided, listed once)."""
    guides = [(None, 0.0)] if any(0 in s for s in sweep["guidance"].values()) else []
    guides += [(mode, float(s)) for mode, scales in sweep["guidance"].items() for s in scales if s > 0]
    return [
        Setting(solver, nfe, mode, scale)
        for solver in sweep["solvers"]
        for mode, scale in guides
        for nfe in sweep["nfe"]
    ]


class Runner(Protocol):
    """Samples and scores one setting. ``metrics``: the metric names, ``metrics[0]`` the quality
    axis of the Pareto front (lower is better), ``plotted`` those drawn; ``images``: samples per run."""

    metrics: list[str]
    plotted: list[str]
    images: int

    def run(self, setting: Setting, seed: int) -> tuple[list[float], dict]:
        """``(metric values, {clock: seconds spent sampling})`` of one setting and noise seed; clocks
        ``"wall"`` and, where it measures the cost (one CPU process), ``"cpu"``."""


def timed(fn):
    """``(fn(), {"wall": seconds, "cpu": seconds})``: wall time (on CUDA after a synchronize, so queued
    kernels are counted) and this process's CPU time (all its threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


class DigitsRunner(Runner):
    """The digits preset: ``eval.n_per_class`` samples of each class, scored like ``model.evaluate``."""

    metrics = ["FD", "precision", "recall", "class acc"]
    plotted = ["FD", "precision", "recall"]

    def __init__(self, net, cfg: dict):
        from .evaluate import make_denoiser

        self.ecfg = cfg["eval"]
        self.clf, _ = train_digits_classifier(seed=0)
        with torch.no_grad():
            self.real_f = self.clf.features(load_digits_split("train")[0])
        self.labels = torch.arange(10).repeat_interleave(self.ecfg["n_per_class"])
        self.images = self.labels.shape[0]
        self.denoisers = {False: make_denoiser(net, self.labels), True: make_denoiser(net, self.labels, guided=True)}

    @torch.no_grad()
    def run(self, setting: Setting, seed: int) -> tuple[list[float], dict]:
        from .evaluate import run_sampler

        noise = torch.randn(self.images, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        solver, order = SOLVERS[setting.solver]
        x, secs = timed(
            lambda: run_sampler(
                self.denoisers[setting.guidance is not None],
                noise,
                setting.nfe,
                solver,
                order,
                self.ecfg,
                seed,
                **setting.guidance_kwargs(),
            )
        )
        f = self.clf.features(x)
        p, r = precision_recall(self.real_f, f, self.ecfg["k"])
        acc = (self.clf(x).argmax(1) == self.labels).double().mean().item()
        return [frechet_distance(self.real_f, f), p, r, acc], secs


class PointsRunner(Runner):
    """The checkerboard preset: ``eval.n`` points against a held-out draw of the same size."""

    metrics = ["sliced W1", "FD", "precision", "recall"]
    plotted = ["sliced W1", "precision", "recall"]

    def __init__(self, net, cfg: dict):
        from .evaluate import make_denoiser

        self.ecfg = cfg["eval"]
        self.images = self.ecfg["n"]
        data = build_data(cfg["data"], **cfg["data_cfg"])
        self.held_out = data.sample(self.images, torch.Generator().manual_seed(10_000 + self.ecfg["seed"]))[0].view(
            self.images, -1
        )
        self.denoiser = make_denoiser(net)

    @torch.no_grad()
    def run(self, setting: Setting, seed: int) -> tuple[list[float], dict]:
        from .evaluate import run_sampler

        noise = torch.randn(self.images, 2, 1, 1, generator=torch.Generator().manual_seed(seed))
        solver, order = SOLVERS[setting.solver]
        x, secs = timed(lambda: run_sampler(self.denoiser, noise, setting.nfe, solver, order, self.ecfg, seed))
        x = x.view(self.images, -1)
        w = sliced_w1(x, self.held_out, self.ecfg["projections"], torch.Generator().manual_seed(7))
        p, r = precision_recall(self.held_out, x, self.ecfg["k"])
        return [w, frechet_distance(self.held_out, x), p, r], secs


def pareto_front(costs: list[float], quality: list[float]) -> list[bool]:
    """For each point, whether no other point has a cost and a quality (lower is better for both)
    at least as good and one of them strictly better."""
    return [
        not any(c2 <= c and q2 <= q and (c2 < c or q2 < q) for c2, q2 in zip(costs, quality))
        for c, q in zip(costs, quality)
    ]


def _fmt(v: float) -> str:
    """3 decimals below 10 (precision, recall, small FDs), else 3 significant digits, fixed notation."""
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.{max(0, 2 - int(math.log10(abs(v))))}f}"


def _cell(m: float, s: float, n_seeds: int) -> str:
    return _fmt(m) + (f" ± {_fmt(s)}" if n_seeds > 1 else "")


def run_sweep(
    runner: Runner, sweep: dict, seed: int, out: str, name: str, progress: bool = True, write: bool = True
) -> tuple[str, list[dict]]:
    """Run every setting of ``sweep`` over the seeds ``seed, seed + 1, ...``; write the table, the
    raw JSON and the plot under ``out`` (only where ``write``: rank 0 of a distributed run). Returns
    the markdown and one dict per setting (``setting``, ``mean``, ``std``, ``ms_per_image`` per
    clock, fronts). ``sweep["clock"]`` (``"wall"`` or ``"cpu"``) is the time of the front and the plot."""
    seeds = [seed + i for i in range(sweep["n_seeds"])]
    grid, clock = settings(sweep), sweep["clock"]
    rows, t_start, load_start = [], time.time(), os.getloadavg()[0]
    for i, st in enumerate(grid):
        runs, secs = [], {}
        for s in seeds:
            vals, dt = runner.run(st, s)
            runs.append(vals)
            secs = {k: secs.get(k, 0.0) + v for k, v in dt.items()}
        t = torch.tensor(runs, dtype=torch.float64)
        rows.append(
            dict(
                setting=dataclasses.asdict(st),
                family=st.family,
                mean=t.mean(0).tolist(),
                std=(t.std(0) if len(seeds) > 1 else torch.zeros(t.shape[1])).tolist(),
                ms_per_image={k: 1000 * v / (len(seeds) * runner.images) for k, v in secs.items()},
            )
        )
        if progress and write:
            print(
                f"[{i + 1}/{len(grid)}] {st.family} NFE {st.nfe}: {runner.metrics[0]} {rows[-1]['mean'][0]:.4g}, "
                f"{rows[-1]['ms_per_image'][clock]:.3f} {clock} ms/image ({time.time() - t_start:.0f}s)",
                flush=True,
            )
    quality = [r["mean"][0] for r in rows]
    for key, cost in (
        ("front_nfe", [r["setting"]["nfe"] for r in rows]),
        ("front_time", [r["ms_per_image"][clock] for r in rows]),
    ):
        for r, on in zip(rows, pareto_front(cost, quality)):
            r[key] = on
    md = _markdown(
        runner,
        rows,
        seeds,
        name,
        clock,
        f"{time.time() - t_start:.0f}s (1-minute load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs)",
    )
    if write:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}_sweep.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(out, f"{name}_sweep.json"), "w") as f:
            json.dump(
                dict(metrics=runner.metrics, seeds=seeds, images=runner.images, clock=clock, rows=rows), f, indent=1
            )
        plot_sweep(
            runner.metrics,
            runner.plotted,
            rows,
            clock,
            os.path.join(out, f"{name}_sweep.png"),
            f"{name}: {runner.images} samples per run, {CLOCKS[clock]}",
        )
    return md, rows


def _markdown(runner: Runner, rows: list[dict], seeds: list[int], name: str, clock: str, wall: str) -> str:
    q = runner.metrics[0]
    spread = (
        f"mean ± std over {len(seeds)} noise seeds ({', '.join(map(str, seeds))})"
        if len(seeds) > 1
        else f"noise seed {seeds[0]}"
    )
    clocks = list(rows[0]["ms_per_image"])
    header = [
        "solver",
        "guidance",
        "NFE",
        *runner.metrics,
        *(f"{c} ms / image" for c in clocks),
        f"front: {q} vs NFE",
        f"front: {q} vs {clock} time",
    ]
    lines = [
        f"### {name}: quality and speed, {runner.images} samples per run, {spread}",
        "",
        f"Lower {q} is better. ms / image: sampling (network and solver) per image, "
        + "; ".join(CLOCKS[c] for c in clocks)
        + f". A front mark: no other setting has a lower {q} at no more network calls (or {clock} time).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        st = r["setting"]
        cells = [_cell(m, s, len(seeds)) for m, s in zip(r["mean"], r["std"])]
        guide = "none" if st["guidance"] is None else f"{st['guidance']} {st['scale']:g}"
        lines.append(
            "| "
            + " | ".join(
                [
                    st["solver"],
                    guide,
                    str(st["nfe"]),
                    *cells,
                    *(f"{r['ms_per_image'][c]:.3f}" for c in clocks),
                    "●" if r["front_nfe"] else "",
                    "●" if r["front_time"] else "",
                ]
            )
            + " |"
        )
    lines += [
        "",
        *anchor_lines(rows, q, len(seeds)),
        "",
        f"(sweep of {len(rows)} settings x {len(seeds)} seeds in {wall})",
    ]
    return "\n".join(lines)


def anchor_lines(rows: list[dict], q: str, n_seeds: int) -> list[str]:
    """Whether the order-2 GM solvers at 4 and 8 NFE reach the quality of Euler at the sweep's
    largest NFE (the flow-matching anchor) under the same guidance, read with the spread over
    seeds: "reached" when the mean is at or below the anchor's, "within the spread" when above it
    by less than the two stds combined (``sqrt(s1^2 + s2^2)``), else "not reached"."""
    out = []
    for guide in dict.fromkeys((r["setting"]["guidance"], r["setting"]["scale"]) for r in rows):
        group = {
            (r["setting"]["solver"], r["setting"]["nfe"]): r
            for r in rows
            if (r["setting"]["guidance"], r["setting"]["scale"]) == guide
        }
        euler = [nfe for solver, nfe in group if solver == "euler"]
        if not euler:
            continue
        a = group[("euler", max(euler))]
        lines = []
        for solver in ("gm-sde-2", "gm-ode-2"):
            for nfe in (4, 8):
                r = group.get((solver, nfe))
                if r is None:
                    continue
                m, s = r["mean"][0], r["std"][0]
                gap, spread = m - a["mean"][0], math.hypot(s, a["std"][0])
                verdict = (
                    "reached"
                    if gap <= 0
                    else f"within the spread ({gap:+.3g}, spread {spread:.3g})"
                    if gap <= spread and n_seeds > 1
                    else f"not reached ({gap:+.3g}"
                    + (f", spread {spread:.3g})" if n_seeds > 1 else ", one seed: no spread)")
                )
                lines.append(f"- {solver} at {nfe} NFE: {q} {_cell(m, s, n_seeds)} -> {verdict}")
        with_guide = "" if guide[0] is None else f" with {guide[0]} guidance {guide[1]:g}"
        out += [
            f"**Anchor: Euler at {max(euler)} NFE{with_guide}, {q} {_cell(a['mean'][0], a['std'][0], n_seeds)}.**",
            "",
        ]
        out += [*lines, ""] if lines else []
    return out[:-1]


def plot_sweep(metrics: list[str], plotted: list[str], rows: list[dict], clock: str, path: str, title: str) -> None:
    """Rows: the ``plotted`` metrics; columns: against NFE and against ``clock`` ms per image (log axes).
    One line per solver (and guidance) with error bars (std over seeds); the Pareto front of
    ``metrics[0]`` drawn as a dashed black staircase with ringed points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    families = list(dict.fromkeys(r["family"] for r in rows))
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(len(plotted), 2, figsize=(10, 2.8 * len(plotted)), squeeze=False, sharex="col")
    for i, metric in enumerate(plotted):
        j = metrics.index(metric)
        for col, (xkey, xlabel, front) in enumerate(
            (("nfe", "network calls (NFE)", "front_nfe"), ("time", f"{clock} time per image (ms)", "front_time"))
        ):
            ax = axes[i][col]
            x_of = (lambda r: r["setting"]["nfe"]) if xkey == "nfe" else (lambda r: r["ms_per_image"][clock])  # noqa: E731
            for fam in families:
                pts = [r for r in rows if r["family"] == fam]
                xs = [x_of(r) for r in pts]
                ax.errorbar(
                    xs,
                    [r["mean"][j] for r in pts],
                    yerr=[r["std"][j] for r in pts],
                    marker="o",
                    ms=3,
                    lw=1,
                    capsize=2,
                    color=colours[fam],
                    label=fam,
                )
            if j == 0:
                on = sorted((x_of(r), r["mean"][0]) for r in rows if r[front])
                ax.step(
                    [p[0] for p in on],
                    [p[1] for p in on],
                    where="post",
                    ls="--",
                    color="black",
                    lw=1,
                    label="Pareto front",
                )
                ax.scatter(
                    [p[0] for p in on], [p[1] for p in on], s=60, facecolors="none", edgecolors="black", zorder=5
                )
                ax.set_yscale("log")
            ax.set_xscale("log", base=2 if xkey == "nfe" else 10)
            if xkey == "nfe":  # the NFEs themselves as ticks, not powers of 2
                ax.set_xticks(sorted({r["setting"]["nfe"] for r in rows}))
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, which="both")
            if i == len(plotted) - 1:
                ax.set_xlabel(xlabel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
