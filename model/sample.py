"""Sample from a trained checkpoint: ``python -m model.sample CKPT --n 64 --solver gm-sde --steps 8 --out grid.png``.

Images (the digits or an image-folder preset): the network works in data space scaled to
[-1, 1], so a sample value ``v`` becomes the 8-bit pixel ``round(255 * clip((v + 1) / 2, 0, 1))``
(-1 black, +1 white; for digits -1 is grey level 0 and +1 is 16). Values beyond [-1, 1] are
clipped in the PNG only; ``--out x.pt`` saves the raw ``(n, C, H, W)`` tensor (and the labels).
The PNG is a grid, row-major, ``--cols`` per row (default: one column per class when the labels
cycle through every class, else a square), sample ``i`` with label ``labels[i]``.
2-D checkpoints (checkerboard) write a 2-D histogram of the points instead. Latent checkpoints
(ImageNet presets) give latents, which need the VAE that made the cache: use ``--out x.pt``.

Class labels (class-conditional networks): ``--labels 3`` (all one class), ``--labels 0,1,2``
(cycled over the n samples); the default cycles through every class. ``--guidance`` with
``--scale`` runs one batched pass of the labels and the null class per step. The noise is drawn
from ``--seed`` on the CPU, so a seed gives the same samples on any device up to rounding.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

import gmkernels

from .evaluate import make_denoiser
from .train import load_network


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] ``(n, C, H, W)`` -> uint8 pixels ``(n, C, H, W)`` (clipped, rounded)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(pixels: torch.Tensor, cols: int, zoom: int = 1, pad: int = 1, pad_value: int = 128) -> torch.Tensor:
    """uint8 ``(n, C, H, W)`` with C = 1 or 3 -> one ``(rows*(H*zoom+pad)-pad, cols*(W*zoom+pad)-pad, C)``
    image, row-major, tiles separated by ``pad`` pixels of grey ``pad_value``, each pixel repeated
    ``zoom`` times."""
    n, C, H, W = pixels.shape
    if C not in (1, 3):
        raise ValueError(f"image_grid: pixels must have 1 or 3 channels, got shape {tuple(pixels.shape)}")
    tiles = pixels.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    h, w = H * zoom, W * zoom
    rows = math.ceil(n / cols)
    grid = torch.full((rows * (h + pad) - pad, cols * (w + pad) - pad, C), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = tiles[i].permute(1, 2, 0)
    return grid


def parse_labels(text: str | None, n: int, num_classes: int) -> torch.Tensor:
    """``None`` -> ``0, 1, ..., num_classes-1, 0, ...``; ``"3"`` or ``"0,4,7"`` -> cycled to n labels."""
    if text is None:
        return torch.arange(n) % num_classes
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated class indices, got {text!r}") from None
    if not vals or any(not 0 <= v < num_classes for v in vals):
        raise ValueError(f"--labels must be class indices in [0, {num_classes}), got {text!r}")
    return torch.tensor(vals).repeat(math.ceil(n / len(vals)))[:n]


def sample_checkpoint(
    path: str,
    n: int = 64,
    solver: str = "gm-sde",
    steps: int = 8,
    order: int = 2,
    substeps: int = 4,
    labels: str | None = None,
    guidance: str = "probabilistic",
    scale: float = 0.0,
    seed: int = 0,
    shift: float = 1.0,
    raw: bool = False,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Samples ``(n, C, H, W)`` (CPU, float32, data scale [-1, 1]), their labels ``(n,)`` (None for an
    unconditional network) and the checkpoint's config."""
    net, cfg = load_network(path, ema=not raw, device=device)
    c = cfg["net_cfg"]
    if cfg["net"] == "dit":
        shape = (c.get("in_channels", 1), c.get("image_size", 8), c.get("image_size", 8))
        y = parse_labels(labels, n, c.get("num_classes", 10)).to(device)
    else:
        if labels is not None or scale > 0:
            raise ValueError(f"{path}: a {cfg['net']!r} network is unconditional: drop --labels and --scale")
        shape, y = (c.get("dim", 2), 1, 1), None
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    denoiser = make_denoiser(net, y, guided=scale > 0)
    with torch.no_grad():
        x = gmkernels.sample(
            denoiser,
            noise,
            steps,
            solver=solver,
            order=order,
            substeps=substeps if solver == "gm-ode" else 1,
            shift=shift,
            guidance=guidance,
            guidance_scale=scale,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
    return x.float().cpu(), None if y is None else y.cpu(), cfg


def _write_png(x: torch.Tensor, labels: torch.Tensor | None, cfg: dict, path: str, cols: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cfg["net"] != "dit":
        pts = x.view(x.shape[0], -1)
        half = cfg.get("data_cfg", {}).get("half", 2.0) * 1.25
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=96, range=[[-half, half], [-half, half]], cmap="magma")
        ax.set_aspect("equal")
        ax.set_title(f"{x.shape[0]} samples")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return
    if cfg["data"] == "latents":
        raise ValueError(
            f"{cfg['preset']!r} samples are VAE latents, not pixels: write them with --out x.pt and decode them"
        )
    if cols is None:  # one column per class when the labels cycle through every class, else square
        n_cls = cfg["net_cfg"].get("num_classes", 10)
        cycling = labels is not None and torch.equal(labels, torch.arange(labels.shape[0]) % n_cls)
        cols = min(x.shape[0], n_cls) if cycling else math.ceil(math.sqrt(x.shape[0]))
    grid = image_grid(to_pixels(x), cols, zoom=max(1, 32 // x.shape[-1]))
    plt.imsave(path, grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy(), cmap="gray", vmin=0, vmax=255)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    ap.add_argument("--solver", default="gm-sde", choices=["gm-sde", "gm-ode", "euler"])
    ap.add_argument("--steps", type=int, default=8, help="network calls (NFE), default 8")
    ap.add_argument("--order", type=int, default=None, choices=[1, 2], help="solver order (default 2; 1 for euler)")
    ap.add_argument("--substeps", type=int, default=4, help="GM-ODE substeps per network call (default 4)")
    ap.add_argument(
        "--labels", default=None, help="class index or comma-separated indices (default: every class in turn)"
    )
    ap.add_argument("--guidance", default="probabilistic", choices=["probabilistic", "mean-cfg", "weight"])
    ap.add_argument("--scale", type=float, default=0.0, help="guidance scale; 0 (default): no guidance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=float, default=1.0, help="timestep shift (default 1)")
    ap.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    ap.add_argument("--cols", type=int, default=None, help="grid columns (default: a square grid)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--out", default="samples.png", help="a .png grid, or .pt for the raw tensors (default samples.png)"
    )
    args = ap.parse_args(argv)
    for flag, value in (
        ("--n", args.n),
        ("--steps", args.steps),
        ("--substeps", args.substeps),
        ("--cols", args.cols or 1),
    ):
        if value < 1:
            ap.error(f"{flag} must be an int >= 1, got {value}")
    if args.seed < 0:
        ap.error(f"--seed must be an int >= 0, got {args.seed}")
    if not (args.shift > 0 and math.isfinite(args.shift)):
        ap.error(f"--shift must be a number > 0, got {args.shift}")
    if not (0 <= args.scale < (1 if args.guidance == "probabilistic" else math.inf)):
        ap.error(
            f"--scale must lie in {'[0, 1)' if args.guidance == 'probabilistic' else '[0, inf)'} for --guidance "
            f"{args.guidance} (0: no guidance), got {args.scale}"
        )
    if args.order is None:
        args.order = 1 if args.solver == "euler" else 2
    if args.solver == "euler" and args.order != 1:
        ap.error(f"--order must be 1 with --solver euler, got {args.order}")
    if not os.path.isfile(args.checkpoint):
        ap.error(f"checkpoint {args.checkpoint!r} does not exist (train one with python -m model.train --preset NAME)")
    try:
        x, y, cfg = sample_checkpoint(
            args.checkpoint,
            args.n,
            args.solver,
            args.steps,
            args.order,
            args.substeps,
            args.labels,
            args.guidance,
            args.scale,
            args.seed,
            args.shift,
            args.raw,
            args.device,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.out.endswith(".pt"):
            torch.save({"x": x, "y": y}, args.out)
        else:
            _write_png(x, y, cfg, args.out, args.cols)
    except ValueError as e:
        ap.error(str(e))
    print(
        f"wrote {args.n} samples ({args.solver}, order {args.order}, {args.steps} steps, seed {args.seed}) to {args.out}"
    )


if __name__ == "__main__":
    main()
