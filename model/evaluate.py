"""Evaluate checkpoints: ``python -m model.evaluate CHECKPOINT [CHECKPOINT ...] [--out DIR]``.

Samples go through ``gmkernels.sample`` (docs/solvers.md) with the EMA weights. For every checkpoint an NFE
sweep (``eval.nfe``, default 1, 2, 4, 8, 16, 32) of GM-SDE and GM-ODE at orders 1 and 2 and
Euler; GM-ODE takes ``ode_substeps // NFE`` substeps per step (substeps cost no network call).

* 2-D (checkerboard): sliced W1 to held-out data (fresh draws), 2-D histogram PNG per solver/NFE.
* digits: improved precision/recall (k-NN manifolds, k = ``eval.k``) and the Fréchet distance
  (FD) against the digits train split in the feature space of a small classifier trained on that
  split, the classifier's accuracy on the class-conditional samples (the label asked for), and
  saturation (share of pixels beyond the data range, mean contrast relative to data); then a
  guidance sweep (probabilistic guidance, mean CFG, weight guidance) at ``eval.guidance_nfe``.
  Sample grid PNGs. ``eval.n_seeds=3`` repeats every setting over 3 noise seeds (mean ± std).

Writes ``<out>/results.md`` (markdown tables, appended per checkpoint, plus the target checks
when the checkerboard GM and K=1 checkpoints are evaluated together) and PNGs; prints the tables.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import gmkernels

from .data import build_data, load_digits_split
from .metrics import frechet_distance, precision_recall, saturation, sliced_w1, train_digits_classifier
from .presets import PRESETS, apply_overrides
from .train import load_network

SOLVERS = [("gm-sde", 1), ("gm-sde", 2), ("gm-ode", 1), ("gm-ode", 2), ("euler", 1)]


def make_denoiser(net, labels: torch.Tensor | None = None, guided: bool = False):
    """``denoiser(x_t, t) -> u-GM`` for ``gmkernels.sample``; for a class-conditional net with
    ``guided`` it returns ``(gm_cond, gm_uncond)`` from one batched pass (labels + null class)."""

    @torch.no_grad()
    def denoiser(x: torch.Tensor, t: torch.Tensor):
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if labels is None:
            return net(x, t)
        if not guided:
            return net(x, t, labels)
        null = torch.full_like(labels, net.null_class)
        gm = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond = {k: v[: x.shape[0]] for k, v in gm.items()}
        uncond = {k: v[x.shape[0] :] for k, v in gm.items()}
        return cond, uncond

    return denoiser


def run_sampler(
    denoiser, noise: torch.Tensor, nfe: int, solver: str, order: int, ecfg: dict, seed: int, **guidance
) -> torch.Tensor:
    substeps = max(1, ecfg.get("ode_substeps", 64) // nfe) if solver == "gm-ode" else 1
    return gmkernels.sample(
        denoiser,
        noise,
        nfe,
        solver=solver,
        substeps=substeps,
        order=order,
        shift=ecfg.get("shift", 1.0),
        generator=torch.Generator().manual_seed(seed),
        **guidance,
    )


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def evaluate_2d(net, cfg: dict, out: str, name: str) -> tuple[str, dict]:
    """NFE sweep on the checkerboard; returns (markdown, {(solver, order, nfe): sliced W1})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ecfg = cfg["eval"]
    n, seed = ecfg["n"], ecfg["seed"]
    data = build_data(cfg["data"], **cfg["data_cfg"])
    held_out = data.sample(n, torch.Generator().manual_seed(10_000 + seed))[0].view(n, -1)
    noise = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed))
    floor = sliced_w1(
        held_out,
        data.sample(n, torch.Generator().manual_seed(20_000 + seed))[0].view(n, -1),
        ecfg["projections"],
        torch.Generator().manual_seed(7),
    )
    res, rows = {}, []
    nfes = ecfg["nfe"]
    fig, axes = plt.subplots(len(SOLVERS), len(nfes), figsize=(2 * len(nfes), 2 * len(SOLVERS)), squeeze=False)
    half = cfg["data_cfg"].get("half", 2.0) * 1.25
    for i, (solver, order) in enumerate(SOLVERS):
        for j, nfe in enumerate(nfes):
            x = run_sampler(make_denoiser(net), noise, nfe, solver, order, ecfg, seed).view(n, -1)
            w = sliced_w1(x, held_out, ecfg["projections"], torch.Generator().manual_seed(7))
            res[(solver, order, nfe)] = w
            rows.append([name, solver, order, nfe, w])
            ax = axes[i][j]
            ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=96, range=[[-half, half], [-half, half]], cmap="magma")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{solver} o{order} NFE {nfe}\nSW1 {w:.4f}", fontsize=7)
    fig.suptitle(f"{name} (K={cfg['net_cfg']['K']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_samples.png"), dpi=80)
    plt.close(fig)
    md = f"### {name}: sliced W1 to held-out data (n={n}; floor between two data draws: {floor:.4f})\n\n" + _table(
        ["checkpoint", "solver", "order", "NFE", "sliced W1"], rows
    )
    return md, res


def _digits_grid(rows: list[tuple[str, torch.Tensor]], path: str, per_class: int = 2) -> None:
    """One row of ``per_class`` samples of each of the 10 classes per (label, samples (N, 1, 8, 8))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 0.75 * len(rows) + 0.3), squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], rows):
        n_per = x.shape[0] // 10
        tiles = [x[c * n_per + i, 0] for i in range(per_class) for c in range(10)]
        strip = torch.cat([torch.nn.functional.pad(t, (1, 1, 1, 1), value=-1) for t in tiles], dim=1)
        ax.imshow(strip.clamp(-1.5, 1.5).numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


METRICS = ["precision", "recall", "FD", "class acc", "saturated px", "contrast"]


def _mean_std(runs: list[list[float]]) -> tuple[list[float], list[float]]:
    t = torch.tensor(runs, dtype=torch.float64)
    return t.mean(0).tolist(), (t.std(0) if len(runs) > 1 else torch.zeros(t.shape[1])).tolist()


def _cells(mean: list[float], std: list[float], n_seeds: int) -> list[str]:
    digits = [3, 3, 2, 3, 4, 3]
    return [f"{m:.{d}f}" + (f" ± {s:.{d}f}" if n_seeds > 1 else "") for m, s, d in zip(mean, std, digits)]


def evaluate_digits(net, cfg: dict, out: str, name: str) -> tuple[str, dict]:
    """NFE and guidance sweeps on the class-conditional digits model.

    Metrics per setting (:data:`METRICS`): precision/recall and Fréchet distance (FD) against the
    train split in the classifier's features, the classifier's accuracy on the labels asked for,
    saturated pixels and contrast. With ``eval.n_seeds > 1`` every setting is sampled from noise
    seeds ``eval.seed, eval.seed + 1, ...`` and reported as mean ± std over them. Returns the
    markdown and ``{key: (mean metrics, std metrics)}``.
    """
    ecfg = cfg["eval"]
    seed, k, npc, n_seeds = ecfg["seed"], ecfg["k"], ecfg["n_per_class"], ecfg["n_seeds"]
    seeds = [seed + i for i in range(n_seeds)]
    clf, clf_acc = train_digits_classifier(seed=0)
    real_x, _ = load_digits_split("train")
    with torch.no_grad():
        real_f = clf.features(real_x)
        test_x = load_digits_split("test")[0]
        floor = frechet_distance(real_f, clf.features(test_x))
    labels = torch.arange(10).repeat_interleave(npc)
    noises = [torch.randn(labels.shape[0], 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds]

    def score(x):
        with torch.no_grad():
            f = clf.features(x)
            p, r = precision_recall(real_f, f, k)
            fd = frechet_distance(real_f, f)
            acc = (clf(x).argmax(1) == labels).float().mean().item()
        sat, con = saturation(x, real_x)
        return [p, r, fd, acc, sat, con]

    def sweep(denoiser, nfe, solver, order, **guidance):
        """Metrics over the seeds; also the samples of the first seed (for the grids)."""
        runs, first = [], None
        for s, noise in zip(seeds, noises):
            x = run_sampler(denoiser, noise, nfe, solver, order, ecfg, s, **guidance)
            first = x if first is None else first
            runs.append(score(x))
        return _mean_std(runs), first

    res, rows, grid = {}, [], []
    for solver, order in SOLVERS:
        for nfe in ecfg["nfe"]:
            (m, sd), x = sweep(make_denoiser(net, labels), nfe, solver, order)
            res[("nfe", solver, order, nfe)] = (m, sd)
            rows.append([solver, order, nfe, "none", 0.0, *_cells(m, sd, n_seeds)])
            if nfe in (2, 8, 32) or not {2, 8, 32} & set(
                ecfg["nfe"]
            ):  # the grid shows these NFEs (all, if none is run)
                grid.append((f"{solver} order {order}, NFE {nfe}", x))
    _digits_grid(grid, os.path.join(out, f"{name}_nfe.png"))
    g_rows, g_grid = [], []
    gs, go, gn = ecfg["guidance_solver"], ecfg["guidance_order"], ecfg["guidance_nfe"]
    for mode, scales in ecfg["guidance"].items():
        for scale in scales:
            (m, sd), x = sweep(
                make_denoiser(net, labels, guided=True), gn, gs, go, guidance=mode, guidance_scale=float(scale)
            )
            res[("guidance", mode, float(scale))] = (m, sd)
            g_rows.append([gs, go, gn, mode, float(scale), *_cells(m, sd, n_seeds)])
            g_grid.append((f"{mode} scale {scale} ({gs} order {go}, NFE {gn})", x))
    if g_grid:  # eval.guidance={} skips the sweep
        _digits_grid(g_grid, os.path.join(out, f"{name}_guidance.png"))
    header = ["solver", "order", "NFE", "guidance", "scale", *METRICS]
    spread = (
        f"mean ± std over {n_seeds} noise seeds ({', '.join(map(str, seeds))})" if n_seeds > 1 else f"noise seed {seed}"
    )
    md = (
        f"### {name}: digits, {labels.shape[0]} class-conditional samples, {spread}; precision/recall (k={k}) and "
        f"FD vs the {real_x.shape[0]}-image train split in classifier features (classifier test accuracy {clf_acc:.3f}; "
        f"FD of the {test_x.shape[0]}-image test split to the train split: {floor:.2f})\n\n"
        + _table(header, rows)
        + "\n\n#### guidance sweep\n\n"
        + _table(header, g_rows)
    )
    return md, res


def digits_targets(res: dict) -> str:
    """Check the digits targets (means over seeds): FD balances precision and recall, so the
    targets are on FD, with the precision checks kept beside them.

    * GMFlow few-step: FD at 8 NFE within 25% of FD at 32 NFE (GM-SDE and GM-ODE, order 2), and
      GM-SDE order 2 at 8 NFE below Euler at 8 NFE;
    * guidance: the lowest FD of probabilistic guidance over its scales at or below that of CFG.
    """
    P, R, FD, SAT = 0, 1, 2, 4
    get = lambda key: res[key][0] if key in res else None  # noqa: E731
    lines = ["### targets (digits)", ""]
    for solver in ("gm-sde", "gm-ode"):
        a, b = get(("nfe", solver, 2, 8)), get(("nfe", solver, 2, 32))
        if a and b:
            lines.append(
                f"- {solver} order 2: FD at 8 NFE {a[FD]:.2f} vs 32 NFE {b[FD]:.2f} (ratio {a[FD] / max(b[FD], 1e-9):.2f}, "
                f"target <= 1.25) -> {'MET' if a[FD] <= 1.25 * b[FD] else 'NOT MET'}; precision {a[P]:.3f} vs "
                f"{b[P]:.3f} (ratio {a[P] / max(b[P], 1e-9):.3f}, target >= 0.9) -> {'MET' if a[P] >= 0.9 * b[P] else 'NOT MET'}"
            )
    a, e = get(("nfe", "gm-sde", 2, 8)), get(("nfe", "euler", 1, 8))
    if a and e:
        lines.append(
            f"- 8 NFE: GM-SDE order 2 FD {a[FD]:.2f} (precision {a[P]:.3f}, recall {a[R]:.3f}) vs Euler FD {e[FD]:.2f} "
            f"(precision {e[P]:.3f}, recall {e[R]:.3f}) -> {'MET' if a[FD] < e[FD] else 'NOT MET'}"
        )

    def best(mode):
        """(FD, scale, metrics) of the lowest-FD scale of one guidance mode."""
        cands = [(v[0][FD], key[2], v[0]) for key, v in res.items() if key[0] == "guidance" and key[1] == mode]
        return min(cands) if cands else None

    pg, cfg = best("probabilistic"), best("mean-cfg")
    if pg and cfg:

        def desc(b):
            return f"FD {b[0]:.2f} at scale {b[1]} (precision {b[2][P]:.3f}, recall {b[2][R]:.3f}, saturated {b[2][SAT]:.4f})"

        lines.append(
            f"- lowest-FD probabilistic guidance: {desc(pg)}; lowest-FD CFG: {desc(cfg)} -> "
            f"{'MET' if pg[0] <= cfg[0] else 'NOT MET'}"
        )
    return "\n".join(lines)


def checkerboard_targets(gm: dict, base: dict) -> str:
    a, b = gm.get(("gm-sde", 2, 4)), base.get(("euler", 1, 32))
    if a is None or b is None:
        return ""
    return (
        f"### targets (checkerboard)\n\n- GM-SDE order 2 at 4 NFE (K=64): sliced W1 {a:.4f} vs K=1 Euler at 32 NFE: "
        f"{b:.4f} -> {'MET' if a < b else 'NOT MET'}"
    )


def _is_override(text: str) -> bool:
    """``key=value`` with a dotted identifier as key (a checkpoint path is never one)."""
    key, sep, _ = text.partition("=")
    return bool(sep) and all(part.replace("-", "_").isidentifier() for part in key.split("."))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line; overrides and checkpoints may come in either order."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT")
    ap.add_argument("--out", default=None, help="output folder (default: the first checkpoint's folder)")
    ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override the stored config, e.g. eval.n=2000 'eval.nfe=[4,32]'",
    )
    args = ap.parse_args(argv)
    # `--set k=v CKPT` (options first) leaves the checkpoint in --set's list: move it back
    args.checkpoints = [s for s in args.set if not _is_override(s)] + args.checkpoints
    args.set = [s for s in args.set if _is_override(s)]
    if not args.checkpoints:
        ap.error("give at least one CHECKPOINT")
    return ap, args


@torch.no_grad()  # a scoped switch: main() is also called in-process (tests), where a global one would leak
def main(argv: list[str] | None = None) -> None:
    ap, args = parse_args(argv)
    runs = []  # every checkpoint's config checked before the first (long) evaluation starts
    for path in args.checkpoints:
        net, cfg = load_network(path, ema=not args.raw)
        cfg["eval"] = {**PRESETS.get(cfg["preset"], {}).get("eval", {}), **cfg["eval"]}  # keys added since it was saved
        try:
            apply_overrides(cfg, args.set)
        except ValueError as e:
            ap.error(f"{path}: {e}")
        runs.append((path, net, cfg))
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoints[0]))
    os.makedirs(out, exist_ok=True)
    sections, by_k = [], {}
    for path, net, cfg in runs:
        t0 = time.time()
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        name = cfg["preset"]
        kind = cfg["eval"]["kind"]
        if kind == "2d":
            md, res = evaluate_2d(net, cfg, out, name)
            by_k[cfg["net_cfg"]["K"]] = res
        elif kind == "digits":
            md, res = evaluate_digits(net, cfg, out, name)
            md += "\n\n" + digits_targets(res)
        else:
            raise SystemExit(f"{path}: preset {name} has no CPU evaluation (eval.kind={kind!r})")
        md += f"\n\n(evaluated {path} at step {torch.load(path, map_location='cpu', weights_only=False)['step']} in {time.time() - t0:.0f}s)"
        print(md + "\n", flush=True)
        sections.append(md)
    if by_k.get(1) is not None and len(by_k) > 1:
        gm_k = max(by_k)
        md = checkerboard_targets(by_k[gm_k], by_k[1])
        print(md)
        sections.append(md)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
