"""Named training/evaluation configurations and ``key=value`` overrides.

A preset is a flat dict; ``net_cfg``/``data_cfg``/``eval`` are nested dicts addressed with dotted
overrides (``net_cfg.K=1``). ``checkerboard`` and ``digits`` run on a 2-core CPU; the ImageNet
presets are for GPUs (``torchrun``) on a latent cache whose path the user gives (``data_cfg.path=...``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses

from .networks import DiTConfig, MLP2DConfig

_TRAIN_DEFAULTS = dict(
    seed=0,
    lr=1e-3,
    weight_decay=0.0,
    betas=(0.9, 0.99),
    warmup=100,
    grad_clip=1.0,
    ema=0.999,
    trans_ratio=0.5,  # sigma_low = sigma_high * (1 - trans_ratio * U(0, 1)); 0: sigma_low = 0, the x0-NLL
    logit_mean=0.0,  # logit-normal timestep sampling: sigma = sigmoid(N(logit_mean, logit_std))
    logit_std=1.0,
    min_sigma=1e-3,
    bf16=True,  # autocast on CUDA only
    log_every=250,
    ckpt_every=1000,
    out="runs/NAME",
    threads=0,  # torch CPU threads, 0: torch's default
)

# The public checkpoint's GM-DiT (model.networks.GMDiTOfficial, the class GMDiTPipeline loads), K=8 on
# 32x32x4 latents; the B/2 and XL/2 sizes are set per preset.
_GMDIT_IMAGENET = dict(
    num_gaussians=8,
    in_channels=4,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    logstd_inner_dim=1024,
    class_dropout=0.1,
)

_CHECKER_EVAL = dict(kind="2d", n=10000, nfe=[1, 2, 4, 8, 16, 32], projections=256, seed=1, ode_substeps=32)

PRESETS: dict[str, dict] = {
    # K=64 GMFlow MLP on the 2-D checkerboard
    "checkerboard": dict(
        _TRAIN_DEFAULTS,
        net="mlp2d",
        net_cfg=dict(K=64, hidden=256, depth=4),
        data="checkerboard",
        data_cfg=dict(cells=4, half=2.0),
        steps=2500,
        batch=1024,
        lr=1e-3,
        log_every=500,
        threads=1,
        eval=_CHECKER_EVAL,
    ),
    # its K=1 flow-matching baseline: same network, fixed std, L2 (x0-NLL at fixed std) loss
    "checkerboard-k1": dict(
        _TRAIN_DEFAULTS,
        net="mlp2d",
        net_cfg=dict(K=1, hidden=256, depth=4, fixed_logstd=0.0),
        data="checkerboard",
        data_cfg=dict(cells=4, half=2.0),
        steps=2500,
        batch=1024,
        lr=1e-3,
        trans_ratio=0.0,
        log_every=500,
        threads=1,
        eval=_CHECKER_EVAL,
    ),
    # tiny class-conditional GM-DiT (K=8) on sklearn's 8x8 digits
    "digits": dict(
        _TRAIN_DEFAULTS,
        net="dit",
        net_cfg=dict(
            K=8,
            in_channels=1,
            image_size=8,
            patch_size=2,
            hidden=128,
            depth=4,
            heads=4,
            num_classes=10,
            class_dropout=0.1,
            logstd_hidden=128,
        ),
        data="digits",
        data_cfg={},
        steps=2000,
        batch=128,
        lr=1e-3,
        log_every=250,
        threads=1,
        eval=dict(
            kind="digits",
            n_per_class=100,
            nfe=[1, 2, 4, 8, 16, 32],
            k=3,
            seed=1,
            n_seeds=1,
            guidance_nfe=8,
            ode_substeps=32,
            guidance_solver="gm-sde",
            guidance_order=2,
            guidance={
                "probabilistic": [0.05, 0.1, 0.2, 0.3, 0.45, 0.6],
                "mean-cfg": [1.25, 1.5, 2.0, 3.0, 4.5],
                "weight": [1.5, 2.0, 4.0],
            },
        ),
    ),
    # latent ImageNet 256 (32x32x4 SD-VAE latents), GPUs; give data_cfg.path=/path/to/latents.pt
    "imagenet-b2": dict(
        _TRAIN_DEFAULTS,
        net="gmdit",
        net_cfg=dict(_GMDIT_IMAGENET, num_attention_heads=12, attention_head_dim=64, num_layers=12),
        data="latents",
        data_cfg=dict(path=None, num_classes=1000),
        steps=400_000,
        batch=256,
        lr=2e-4,
        weight_decay=0.0,
        warmup=1000,
        ema=0.9999,
        log_every=1000,
        ckpt_every=10_000,
        eval=dict(kind="none"),
    ),
    "imagenet-xl2": dict(
        _TRAIN_DEFAULTS,
        net="gmdit",
        net_cfg=dict(
            _GMDIT_IMAGENET, num_attention_heads=16, attention_head_dim=72, num_layers=28, grad_checkpointing=True
        ),
        data="latents",
        data_cfg=dict(path=None, num_classes=1000),
        steps=800_000,
        batch=256,
        lr=2e-4,
        weight_decay=0.0,
        warmup=1000,
        ema=0.9999,
        log_every=1000,
        ckpt_every=10_000,
        eval=dict(kind="none"),
    ),
}


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def get_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A deep copy of preset ``name`` with ``key=value`` overrides applied (values parsed as Python
    literals, else kept as strings; dotted keys reach into nested dicts). ``out`` defaults to
    ``runs/<name>``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    cfg["preset"] = name
    cfg["out"] = cfg["out"].replace("NAME", name)
    return apply_overrides(cfg, overrides)


def _net_fields(cfg: dict) -> set[str]:
    """Every field of the network config dataclass of ``cfg["net"]`` (not only those the preset sets)."""
    kind = {"mlp2d": MLP2DConfig, "dit": DiTConfig}.get(cfg.get("net"))
    return {f.name for f in dataclasses.fields(kind)} if kind is not None else set()


def _typed(item: str, key: str, old, new):
    """``new`` if it has the type of the value it replaces (int for a float is widened, a list for
    a tuple is accepted); else a ValueError naming the key, both values and the expected type."""
    if old is None or new is None and key.rsplit(".", 1)[-1] in ("fixed_logstd", "path"):
        return new
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
        new = float(new) if ok else new
    elif isinstance(old, (list, tuple)):
        ok = isinstance(new, (list, tuple))
    else:
        ok = isinstance(new, type(old))
    if not ok:
        raise ValueError(
            f"override {item!r}: {key} must be {type(old).__name__} like its default {old!r}, "
            f"got {type(new).__name__} {new!r}"
        )
    return new


def apply_overrides(cfg: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key=value`` overrides to ``cfg`` in place (see :func:`get_preset`); returns it.

    Every key must exist (a typo, top-level or nested like ``eval.nn=3``, raises a ValueError
    listing the valid keys; ``net_cfg`` accepts every field of the network's config), and the
    value must have the type of the default it replaces (``steps=abc`` raises).
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        *parents, leaf = key.split(".")
        node, where = cfg, f"preset {cfg.get('preset')!r}"
        for i, p in enumerate(parents):
            if not isinstance(node.get(p), dict):
                nested = sorted(k for k, v in node.items() if isinstance(v, dict))
                raise ValueError(
                    f"override {item!r}: {'.'.join(parents[: i + 1])!r} is not a nested config of {where}; "
                    f"nested configs: {nested}"
                )
            node = node[p]
        valid = set(node) | (_net_fields(cfg) if parents == ["net_cfg"] else set())
        if leaf not in valid:
            scope = f"{'.'.join(parents)} of {where}" if parents else where
            raise ValueError(f"override {item!r}: {scope} has no key {leaf!r}; valid keys: {sorted(valid)}")
        node[leaf] = _typed(item, key, node.get(leaf), _parse_value(value))
    return cfg
