"""A tiny random checkpoint directory in the layout of the public GMFlow ImageNet checkpoint, written
without ``gmkernels.models``: parameter names and shapes follow the official
``lib/models/architecture/gmflow.py`` (``_GMDiTTransformer2DModel``, ``_SpectrumMLP``), and
``model_index.json`` names the official classes, so loading it tests our mapping, not a round trip.

``official_forward`` is an independent functional forward of that transformer from the raw
state dict (no diffusers blocks), the reference of the transformer test.
"""

from __future__ import annotations

import json
import math
import os

import torch

TINY = dict(
    num_gaussians=3,
    in_channels=4,
    sample_size=8,
    patch_size=2,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_embeds_ada_norm=10,
    logstd_inner_dim=16,
)
SPECTRUM = dict(base_size=[4, 8, 8], layers=[16, 4])
ID2LABEL = {
    str(i): name
    for i, name in enumerate(
        [
            "tench, Tinca tinca",
            "goldfish",
            "jay",
            "magpie",
            "robin, American robin",
            "ostrich",
            "hen",
            "cock",
            "brambling",
            "goldfinch",
        ]
    )
}
DIFFUSERS_VERSION = "0.32.2"


def transformer_config(**kw) -> dict:
    """The official transformer config keys with the tiny sizes."""
    cfg = dict(
        num_gaussians=16,
        constant_logstd=None,
        logstd_inner_dim=1024,
        gm_num_logstd_layers=2,
        class_dropout_prob=0.0,
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=None,
        num_layers=28,
        dropout=0.0,
        norm_num_groups=32,
        attention_bias=True,
        sample_size=32,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-5,
    )
    cfg.update(TINY)
    cfg.update(kw)
    return cfg


def transformer_shapes(cfg: dict) -> dict:
    """Official parameter name -> shape of ``_GMDiTTransformer2DModel``."""
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    K, C, p = cfg["num_gaussians"], cfg["in_channels"], cfg["patch_size"]
    L = cfg["logstd_inner_dim"]
    shapes = {
        "pos_embed.proj.weight": (D, C, p, p),
        "pos_embed.proj.bias": (D,),
        "emb.timestep_embedder.linear_1.weight": (D, 256),
        "emb.timestep_embedder.linear_1.bias": (D,),
        "emb.timestep_embedder.linear_2.weight": (D, D),
        "emb.timestep_embedder.linear_2.bias": (D,),
        "emb.class_embedder.embedding_table.weight": (cfg["num_embeds_ada_norm"] + 1, D),
        "proj_out_1.weight": (2 * D, D),
        "proj_out_1.bias": (2 * D,),
        "proj_out_2.weight": (p * p * K * (C + 1), D),
        "proj_out_2.bias": (p * p * K * (C + 1),),
    }
    if cfg["constant_logstd"] is None:  # (SiLU, Linear) pairs: Linear i sits at index 2 * i + 1
        dims = [D] + [L] * (cfg["gm_num_logstd_layers"] - 1) + [1]
        for i in range(len(dims) - 1):
            n = f"gm_out.logstd_layers.{2 * i + 1}."
            shapes.update({n + "weight": (dims[i + 1], dims[i]), n + "bias": (dims[i + 1],)})
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        shapes.update(
            {
                b + "norm1.linear.weight": (6 * D, D),
                b + "norm1.linear.bias": (6 * D,),
                b + "ff.net.0.proj.weight": (4 * D, D),
                b + "ff.net.0.proj.bias": (4 * D,),
                b + "ff.net.2.weight": (D, 4 * D),
                b + "ff.net.2.bias": (D,),
            }
        )
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes.update({b + f"attn1.{name}.weight": (D, D), b + f"attn1.{name}.bias": (D,)})
    return shapes


def spectrum_shapes(cfg: dict) -> dict:
    c, h, w = cfg["base_size"]
    dims = [2, *cfg["layers"], c * h * w]
    return {
        f"mlp.{2 * i}.{kind}": ((dims[i + 1], dims[i]) if kind == "weight" else (dims[i + 1],))
        for i in range(len(dims) - 1)
        for kind in ("weight", "bias")
    }


def random_state(shapes: dict, generator: torch.Generator, scale: float = 0.3) -> dict:
    """Random weights: ``N(0, scale^2 / fan_in)`` matrices, ``N(0, 0.1^2)`` biases."""
    out = {}
    for name, shape in sorted(shapes.items()):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        std = scale / math.sqrt(fan_in) if len(shape) > 1 else 0.1
        if name.endswith("embedding_table.weight"):
            std = 0.5
        out[name] = torch.randn(shape, generator=generator) * std
    return out


def _write_model(folder: str, class_name: str, config: dict, state: dict, weights: str) -> None:
    """config.json and the weights, fp32 and the ``bf16`` variant, as safetensors or torch ``.bin``."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}, f, indent=2)
    for variant, dtype in (("", torch.float32), (".bf16", torch.bfloat16)):
        tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
        if weights == "safetensors":
            save_file(tensors, os.path.join(folder, f"diffusion_pytorch_model{variant}.safetensors"))
        else:
            torch.save(tensors, os.path.join(folder, f"diffusion_pytorch_model{variant}.bin"))


def write_checkpoint(
    path: str, seed: int = 0, scheduler: str = "GMFlowSDEScheduler", shift: float = 1.0, weights: str = "safetensors"
) -> dict:
    """Write the tiny checkpoint to ``path`` (network weights as ``"safetensors"`` or ``"bin"``);
    returns ``{"transformer": state, "spectrum_net": state}``."""
    from diffusers import AutoencoderKL

    g = torch.Generator().manual_seed(seed)
    t_cfg = transformer_config()
    t_state = random_state(transformer_shapes(t_cfg), g)
    s_state = random_state(spectrum_shapes(SPECTRUM), g)
    _write_model(os.path.join(path, "transformer"), "_GMDiTTransformer2DModel", t_cfg, t_state, weights)
    _write_model(os.path.join(path, "spectrum_net"), "_SpectrumMLP", SPECTRUM, s_state, weights)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=t_cfg["in_channels"],
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(os.path.join(path, "vae"))
    vae.to(torch.bfloat16).save_pretrained(os.path.join(path, "vae"), variant="bf16")
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(
            {
                "_class_name": scheduler,
                "_diffusers_version": DIFFUSERS_VERSION,
                "num_train_timesteps": 1000,
                "shift": shift,
                "use_dynamic_shifting": False,
                "base_seq_len": 256,
                "max_seq_len": 4096,
                "base_logshift": 0.5,
                "max_logshift": 1.15,
                "terminal_sigma": None,
            },
            f,
            indent=2,
        )
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(
            {
                "_class_name": "GMDiTPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "transformer": ["lib.models.architecture.gmflow", "_GMDiTTransformer2DModel"],
                "spectrum_net": ["lib.models.architecture.gmflow", "_SpectrumMLP"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["lib.models.diffusions.schedulers", scheduler],
                "id2label": ID2LABEL,
            },
            f,
            indent=2,
        )
    return {"transformer": t_state, "spectrum_net": s_state}


# ------------------------------------------------------------------------- independent forward


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000^(-i / (dim/2))``."""
    w = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    a = pos.double()[:, None] * w[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


def official_forward(sd: dict, cfg: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict:
    """The GM-DiT forward written from the parameter layout with plain tensor ops (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    B, C, H, W = x.shape
    p, heads, hd = cfg["patch_size"], cfg["num_attention_heads"], cfg["attention_head_dim"]
    K, D = cfg["num_gaussians"], heads * hd
    lin = lambda v, n: v @ sd[n + ".weight"].T + sd[n + ".bias"]  # noqa: E731
    ln = lambda v, eps: (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + eps)  # noqa: E731
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731
    # patches: token n = row * (W/p) + col, features (c, i, j) of the p x p patch
    gh, gw = H // p, W // p
    patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    h = patches @ sd["pos_embed.proj.weight"].reshape(D, -1).T + sd["pos_embed.proj.bias"]
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    h = h + torch.cat([_sincos_1d(D // 2, cols), _sincos_1d(D // 2, rows)], dim=1)[None]  # column half first
    # conditioning: cos/sin timestep features at 10000^(-i/128), MLP, plus the class embedding
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    a = t.double()[:, None] * freqs[None]
    temb = lin(
        silu(lin(torch.cat([a.cos(), a.sin()], dim=1), "emb.timestep_embedder.linear_1")),
        "emb.timestep_embedder.linear_2",
    )
    c = temb + sd["emb.class_embedder.embedding_table.weight"][y]
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(silu(c), b + "norm1.linear").chunk(6, dim=1)
        z = ln(h, 1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = (lin(z, b + f"attn1.{n}").reshape(B, -1, heads, hd).transpose(1, 2) for n in ("to_q", "to_k", "to_v"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(B, -1, D), b + "attn1.to_out.0")
        z = ln(h, cfg["norm_eps"]) * (1 + sc2[:, None]) + sh2[:, None]
        u = lin(z, b + "ff.net.0.proj")
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        h = h + g2[:, None] * lin(u, b + "ff.net.2")
    shift, scale = lin(silu(c), "proj_out_1").chunk(2, dim=1)
    out = lin(ln(h, 1e-6) * (1 + scale[:, None]) + shift[:, None], "proj_out_2")  # (B, N, p*p*K*(C+1)) as (i, j, ch)
    ch = K * (C + 1)
    out = out.reshape(B, gh, gw, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(B, ch, H, W)
    if cfg["constant_logstd"] is None:
        logstds = c
        for i in range(cfg["gm_num_logstd_layers"]):
            logstds = lin(silu(logstds), f"gm_out.logstd_layers.{2 * i + 1}")
    else:
        logstds = torch.full((B, 1), float(cfg["constant_logstd"]), dtype=torch.float64)
    return {
        "means": out[:, : K * C].reshape(B, K, C, H, W),
        "logstds": logstds.reshape(B, 1, 1, 1, 1),
        "logweights": torch.log_softmax(out[:, K * C :].reshape(B, K, 1, H, W), dim=1),
    }
