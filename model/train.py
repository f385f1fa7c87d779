"""Train a GMFlow denoiser: ``python -m model.train --preset NAME [key=value ...]``.

Loss: the GMFlow transition loss. For each data point, ``sigma_high`` is drawn logit-normal,
``sigma_low = sigma_high * (1 - trans_ratio * U(0, 1))`` (``trans_ratio = 0``: ``sigma_low = 0``,
the x0-NLL); ``x_low`` is drawn from the forward
path at ``sigma_low`` and ``x_high`` from the forward transition ``x_low -> x_high``. The network
predicts the u-GM at ``(x_high, t_high)``; the loss is the NLL of ``x_low`` under the exact
reverse-transition GM (``gmkernels.transition_loss``: ``u_to_x0``, ``reverse_transition``,
``gm_nll_loss``; Triton on CUDA, the reference on CPU). ``trans_ratio=0`` is the x0-NLL, and with
K = 1 and a fixed std that is plain flow matching's L2 loss.

AdamW with linear warm-up, gradient clipping, EMA, bf16 autocast on CUDA, optional gradient
checkpointing (``net_cfg.grad_checkpointing=True``). All randomness of a step (data, timesteps,
noise, class dropout) comes from one ``torch.Generator`` saved in the checkpoint, so a run killed
mid-way and resumed reproduces the loss curve of an uninterrupted run (on CPU; bit-exact with the
same thread count). Multi-GPU: ``torchrun --nproc_per_node=N -m model.train --preset ...`` (DDP;
``batch`` is the global batch).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import gmkernels

from .data import build_data
from .networks import build_network
from .presets import PRESETS, check_train_config, get_preset


def call_net(net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """Run either network kind: the DiT takes labels (and the class-dropout generator), the MLP not."""
    inner = net.module if isinstance(net, DistributedDataParallel) else net
    if getattr(inner, "cfg", None) is not None and hasattr(inner.cfg, "num_classes"):
        return net(x, t, y, generator=generator)
    return net(x, t)


def draw_training_pair(x0: torch.Tensor, cfg: dict, gen: torch.Generator):
    """``x0 (B, C, H, W)`` -> ``(x_high, sigma_high, x_low, sigma_low)``, sigmas ``(B, 1, 1, 1)``,
    all drawn from ``gen`` on the CPU (so resumed runs are identical)."""
    B = x0.shape[0]
    s_high = torch.sigmoid(cfg["logit_mean"] + cfg["logit_std"] * torch.randn(B, generator=gen))
    s_high = s_high.clamp(cfg["min_sigma"], 1.0).view(B, 1, 1, 1)
    u = torch.rand(B, 1, 1, 1, generator=gen)
    s_low = s_high * (1 - cfg["trans_ratio"] * u) if cfg["trans_ratio"] > 0 else torch.zeros_like(s_high)
    n0 = torch.randn(x0.shape, generator=gen)
    n1 = torch.randn(x0.shape, generator=gen)
    x0 = x0.cpu()
    x_low = (1 - s_low) * x0 + s_low * n0
    # forward transition: x_high = (a_h / a_l) x_low + sqrt(s_h^2 - (a_h s_l / a_l)^2) n1
    ratio = (1 - s_high) / (1 - s_low).clamp_min(1e-6)
    x_high = ratio * x_low + (s_high.square() - (ratio * s_low).square()).clamp_min(0).sqrt() * n1
    return x_high, s_high, x_low, s_low


def training_loss(net, x0: torch.Tensor, y: torch.Tensor, cfg: dict, gen: torch.Generator, device: torch.device):
    """Mean transition NLL of one batch; also returns per-sample losses and ``sigma_high (B,)``."""
    x_high, s_high, x_low, s_low = (v.to(device) for v in draw_training_pair(x0, cfg, gen))
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg["bf16"]):
        gm_u = call_net(net, x_high, 1000 * s_high.view(-1), y.to(device), generator=gen)
    gm_u = {k: v.float() for k, v in gm_u.items()}
    per_pixel = gmkernels.transition_loss(gm_u, x_high, 1000 * s_high, x_low, 1000 * s_low, reduction="none")
    per_sample = per_pixel.flatten(1).mean(1)
    return per_sample.mean(), per_sample.detach(), s_high.view(-1).detach()


def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return dist.get_rank(), world, torch.device("cpu")


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (a killed run never leaves a half-written checkpoint)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_network(path: str, ema: bool = True, device: str | torch.device = "cpu"):
    """Checkpoint -> ``(network in eval mode, cfg)``, the EMA weights unless ``ema=False``."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    net = build_network(ck["cfg"]["net"], ck["cfg"]["net_cfg"])
    net.load_state_dict(ck["ema" if ema else "net"])
    return net.to(device).eval(), ck["cfg"]


def check_resumable(path: str, saved: dict, cfg: dict) -> None:
    """Raise a ValueError when the checkpoint at ``path`` holds another network than ``cfg`` asks
    for (``net`` or any ``net_cfg`` entry differs), instead of a state-dict size mismatch."""
    diff = [f"net: {saved['net']!r} there, {cfg['net']!r} asked"] if saved["net"] != cfg["net"] else []
    a, b = saved["net_cfg"], cfg["net_cfg"]
    diff += [
        f"net_cfg.{k}: {a.get(k)!r} there, {b.get(k)!r} asked" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]
    if diff:
        raise ValueError(
            f"{path} holds a run of another network ({'; '.join(diff)}); resuming needs the same network: "
            f"pass another out= for a new run, or remove that checkpoint"
        )


def train(cfg: dict, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train with ``cfg`` (a preset dict), resuming from ``<out>/ckpt.pt`` when it exists.

    ``stop_after`` ends the run after that many steps of this call (to test resumption).
    Returns ``{"history": [loss per step], "step": int, "path": checkpoint path}``. A setting
    outside its range (:func:`model.presets.check_train_config`) raises a ValueError first.
    """
    check_train_config(cfg)
    rank, world, device = _dist_setup()
    out = cfg["out"]
    path = os.path.join(out, "ckpt.pt")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])  # network init only; training draws come from `gen`
    net = build_network(cfg["net"], cfg["net_cfg"]).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]))
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    data = build_data(cfg["data"], **cfg["data_cfg"])
    step, history = 0, []
    if os.path.exists(path):
        ck = torch.load(path, map_location="cpu", weights_only=False)
        check_resumable(path, ck["cfg"], cfg)
        net.load_state_dict(ck["net"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen_state"][rank] if world == ck.get("world", 1) else ck["gen_state"][0])
        step, history = ck["step"], list(ck["history"])
        if rank == 0:
            print(f"resumed {path} at step {step}", file=sys.stderr)
    model = (
        DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    )
    if cfg["batch"] % world:
        raise ValueError(f"batch {cfg['batch']} must divide by the number of processes {world}")
    local_batch = cfg["batch"] // world

    def checkpoint_now():
        states = [gen.get_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, gen.get_state())
        if rank == 0:
            save_checkpoint(
                path,
                dict(
                    cfg=cfg,
                    step=step,
                    net=net.state_dict(),
                    ema=ema.state_dict(),
                    opt=opt.state_dict(),
                    gen_state=states,
                    world=world,
                    history=history,
                ),
            )

    end = cfg["steps"] if stop_after is None else min(cfg["steps"], step + stop_after)
    bins = torch.zeros(2, 4)  # (sum, count) of the loss per quartile of sigma_high
    bar = tqdm(total=cfg["steps"], initial=step, disable=not progress or rank != 0, mininterval=10, dynamic_ncols=True)
    t0 = time.time()
    model.train()
    while step < end:
        x0, y = data.sample(local_batch, gen)
        loss, per_sample, sig = training_loss(model, x0, y, cfg, gen, device)
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        history.append(loss.item())
        q = (sig.cpu() * 4).long().clamp(0, 3)
        bins[0].index_add_(0, q, per_sample.cpu().float())
        bins[1].index_add_(0, q, torch.ones_like(sig.cpu()))
        bar.update(1)
        if rank == 0 and (step % cfg["log_every"] == 0 or step == end):
            quart = " ".join(
                f"{v:+.3f}" if c > 0 else "   n/a"
                for v, c in zip((bins[0] / bins[1].clamp_min(1)).tolist(), bins[1].tolist())
            )
            bar.write(
                f"step {step:6d}  loss {sum(history[-cfg['log_every'] :]) / len(history[-cfg['log_every'] :]):+.4f}  "
                f"by sigma quartile [0,.25) [.25,.5) [.5,.75) [.75,1]: {quart}  ({time.time() - t0:.0f}s)"
            )
            bins.zero_()
        if step % cfg["ckpt_every"] == 0 or step == end:
            checkpoint_now()
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return dict(history=history, step=step, path=path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (loss lines are still printed)")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. steps=500 net_cfg.K=16 out=runs/x")
    args = ap.parse_args(argv)
    try:
        cfg = get_preset(args.preset, args.overrides)
        check_train_config(cfg)
    except ValueError as e:
        ap.error(str(e))
    if cfg["data"] == "latents" and not cfg["data_cfg"].get("path"):
        ap.error(f"preset {args.preset} trains on a latent cache: pass data_cfg.path=/path/to/latents.pt")
    t0 = time.time()
    try:
        res = train(cfg, progress=not args.no_progress)
    except ValueError as e:  # a checkpoint in out= of another network
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        last = res["history"][-min(len(res["history"]), cfg["log_every"]) :]
        print(
            json.dumps(
                dict(
                    preset=cfg["preset"],
                    steps=res["step"],
                    final_loss=sum(last) / max(1, len(last)),
                    checkpoint=res["path"],
                    wall_s=round(time.time() - t0, 1),
                )
            )
        )


if __name__ == "__main__":
    main()
