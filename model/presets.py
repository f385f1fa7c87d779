"""Named training/evaluation configurations and ``key=value`` overrides.

A preset is a flat dict; ``net_cfg``/``data_cfg``/``eval`` are nested dicts addressed with dotted
overrides (``net_cfg.K=1``). ``checkerboard`` and ``digits`` run on a 2-core CPU; the ImageNet
presets are for GPUs (``torchrun``) on a latent cache whose path the user gives (``data_cfg.path=...``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math

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

# Solvers of the NFE sweeps and `--sweep`, by name: GM-SDE / GM-ODE at order 1 or 2, and Euler (order 1 only).
SOLVERS = {
    "gm-sde-1": ("gm-sde", 1),
    "gm-sde-2": ("gm-sde", 2),
    "gm-ode-1": ("gm-ode", 1),
    "gm-ode-2": ("gm-ode", 2),
    "euler": ("euler", 1),
}
GUIDANCE_MODES = ("probabilistic", "mean-cfg", "weight")

# `python -m model.evaluate CKPT --sweep` (model/sweep.py): every solver x NFE x guidance scale (0: unguided), each
# over n_seeds noise seeds. Guided settings cost two network passes per call, so the CPU presets sweep unguided only
# by default ('eval.sweep.guidance={"probabilistic": [0.0, 0.05]}' adds a scale).
# clock: the time of the Pareto front and the plot ("wall", or "cpu": the process's CPU time, which on a shared CPU
# box measures a one-thread run's cost without the other jobs' load; the table shows both).
_SWEEP = dict(
    solvers=list(SOLVERS), nfe=[1, 2, 4, 8, 16, 32], guidance={"probabilistic": [0.0]}, n_seeds=3, clock="cpu"
)

_CHECKER_EVAL = dict(
    kind="2d", n=10000, nfe=[1, 2, 4, 8, 16, 32], projections=256, seed=1, ode_substeps=32, k=3, sweep=dict(_SWEEP)
)

# The ImageNet protocol (`--protocol imagenet`, model/imagenet.py) and its `--sweep`, for a GMDiTPipeline checkpoint
# (the public GM-DiT) or a model.train checkpoint of images: `per_class` images of each class, in chunks of `batch`,
# FID / IS / precision / recall (k-NN, k) in Inception-v3 features against an ADM reference batch. Defaults: the
# public pipeline's sampler (GM-ODE order 2, 32 calls x 4 substeps, probabilistic guidance 0.45, shift 1).
IMAGENET_EVAL = dict(
    kind="imagenet",
    per_class=50,
    batch=125,
    seed=0,
    solver="gm-ode-2",
    steps=32,
    ode_substeps=128,
    guidance_scale=0.45,
    orthogonal=1.0,
    k=3,
    inception_batch=250,
    sweep=dict(
        solvers=list(SOLVERS),
        nfe=[1, 2, 4, 8, 16, 32],
        guidance={"probabilistic": [0.45]},
        n_seeds=1,
        per_class=10,
        clock="wall",
    ),
)

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
            sweep=dict(_SWEEP),
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


# ------------------------------------------------------------------------------------ value checks
# The override parser checks names and types; these check ranges, before any work starts, so a bad value stops a
# command with one line naming the setting and its valid range instead of a traceback (or a silent no-op) later.


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int):
    return (lambda v: _is_int(v) and v >= lo), f"an int >= {lo}"


def _num_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def ok(v):
        return _is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


_POSITIVE = (lambda v: _is_num(v) and v > 0), "a number > 0"
_NON_NEGATIVE = (lambda v: _is_num(v) and v >= 0), "a number >= 0"
_NFE_LIST = (
    lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(n) and n >= 1 for n in v),
    "a non-empty list of ints >= 1 (network calls)",
)
_SOLVER_LIST = (
    lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(s in SOLVERS for s in v),
    f"a non-empty list of solver names from {list(SOLVERS)}",
)

TRAIN_RULES = {
    "seed": _int_at_least(0),
    "steps": _int_at_least(1),
    "batch": _int_at_least(1),
    "lr": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "betas": (
        (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)),
        "two numbers in [0, 1)",
    ),
    "warmup": _int_at_least(0),
    "grad_clip": (_NON_NEGATIVE[0], "a number >= 0 (0: no clipping)"),
    "ema": _num_in(0, 1, hi_open=True),
    "trans_ratio": _num_in(0, 1),
    "logit_mean": ((lambda v: _is_num(v)), "a finite number"),
    "logit_std": _NON_NEGATIVE,
    "min_sigma": _num_in(0, 1, lo_open=True, hi_open=True),
    "log_every": _int_at_least(1),
    "ckpt_every": _int_at_least(1),
    "threads": (_int_at_least(0)[0], "an int >= 0 (0: torch's default)"),
}

_NET_INTS = {
    "K": 1,
    "dim": 1,
    "hidden": 1,
    "depth": 1,
    "pos_freqs": 0,
    "in_channels": 1,
    "image_size": 1,
    "patch_size": 1,
    "heads": 1,
    "num_classes": 1,
    "logstd_hidden": 1,
}


def _guidance_rule(zero_ok: bool):
    """``{mode: [scales]}``: probabilistic scales in [0, 1), CFG scales > 0; 0 (unguided) only where ``zero_ok``."""

    def scale_ok(mode, v):
        if not _is_num(v) or v < 0 or (v == 0 and not zero_ok):
            return False
        return v < 1 if mode == "probabilistic" else True

    def ok(v):
        return isinstance(v, dict) and all(
            m in GUIDANCE_MODES and isinstance(s, (list, tuple)) and s and all(scale_ok(m, x) for x in s)
            for m, s in v.items()
        )

    zero = "0 (unguided) or " if zero_ok else ""
    return ok, (
        f"a dict {{mode: [scales]}} with modes from {list(GUIDANCE_MODES)}, each a non-empty list of scales: "
        f"{zero}probabilistic in (0, 1), mean-cfg and weight > 0"
    )


_SWEEP_RULES = {
    "solvers": _SOLVER_LIST,
    "nfe": _NFE_LIST,
    "guidance": _guidance_rule(zero_ok=True),
    "n_seeds": _int_at_least(1),
    "per_class": _int_at_least(1),
    "clock": ((lambda v: v in ("wall", "cpu")), "'wall' or 'cpu'"),
}

EVAL_RULES = {
    "kind": ((lambda v: v in ("2d", "digits", "imagenet", "none")), "one of '2d', 'digits', 'imagenet', 'none'"),
    "n": _int_at_least(2),
    "n_per_class": _int_at_least(1),
    "nfe": _NFE_LIST,
    "projections": _int_at_least(1),
    "seed": _int_at_least(0),
    "n_seeds": _int_at_least(1),
    "k": _int_at_least(1),
    "ode_substeps": _int_at_least(1),
    "shift": _POSITIVE,
    "guidance_nfe": _int_at_least(1),
    "guidance_solver": ((lambda v: v in ("gm-sde", "gm-ode", "euler")), "one of 'gm-sde', 'gm-ode', 'euler'"),
    "guidance_order": ((lambda v: v in (1, 2)), "1 or 2 (euler: 1)"),
    "guidance": (
        (lambda v: v == {} or _guidance_rule(zero_ok=False)[0](v)),
        "{} (no guidance sweep) or " + _guidance_rule(zero_ok=False)[1],
    ),
    "per_class": _int_at_least(1),
    "batch": _int_at_least(1),
    "solver": ((lambda v: v in SOLVERS), f"one of {list(SOLVERS)}"),
    "steps": _int_at_least(1),
    "guidance_scale": _num_in(0, 1, hi_open=True),
    "orthogonal": _num_in(0, 1),
    "inception_batch": _int_at_least(1),
}


def _check(rules: dict, node: dict, prefix: str, where: str) -> None:
    for key, value in node.items():
        rule = rules.get(key)
        if rule is not None and not rule[0](value):
            raise ValueError(f"{where}: {prefix}{key} must be {rule[1]}, got {value!r}")


def check_train_config(cfg: dict) -> None:
    """Raise a ValueError naming the first training setting (top level or ``net_cfg``) outside its valid range."""
    where = f"preset {cfg.get('preset')!r}"
    _check(TRAIN_RULES, cfg, "", where)
    net_rules = {k: _int_at_least(lo) for k, lo in _NET_INTS.items()}
    net_rules["class_dropout"] = _num_in(0, 1, hi_open=True)
    _check(net_rules, cfg["net_cfg"], "net_cfg.", where)


def check_eval_config(cfg: dict) -> None:
    """Raise a ValueError naming the first ``eval.*`` setting outside its valid range (also the cross-checks: enough
    samples for the k-NN metrics, Euler only at order 1)."""
    where = f"preset {cfg.get('preset')!r}"
    ecfg = cfg["eval"]
    _check(EVAL_RULES, ecfg, "eval.", where)
    _check(_SWEEP_RULES, ecfg.get("sweep", {}), "eval.sweep.", where)
    n = ecfg["n"] if ecfg["kind"] == "2d" else ecfg.get("n_per_class", 0) * 10 if ecfg["kind"] == "digits" else None
    if n is not None and "k" in ecfg and n <= ecfg["k"]:
        key = "eval.n" if ecfg["kind"] == "2d" else "eval.n_per_class"
        raise ValueError(
            f"{where}: {key} gives {n} samples, and the k-NN precision/recall needs more than eval.k={ecfg['k']}"
        )
    guided = {m for m, scales in ecfg.get("sweep", {}).get("guidance", {}).items() if any(x > 0 for x in scales)}
    if ecfg["kind"] == "2d" and guided:
        raise ValueError(
            f"{where}: eval.sweep.guidance must be {{'probabilistic': [0.0]}} (unguided): the 2-D model is "
            f"unconditional, got {ecfg['sweep']['guidance']!r}"
        )
    if ecfg["kind"] == "imagenet" and guided - {"probabilistic"}:
        raise ValueError(
            f"{where}: eval.sweep.guidance may only hold 'probabilistic' scales (GMDiTPipeline's guidance), "
            f"got {ecfg['sweep']['guidance']!r}"
        )
    if ecfg["kind"] == "imagenet" and ecfg.get("sweep", {}).get("clock", "wall") != "wall":
        raise ValueError(
            f"{where}: eval.sweep.clock must be 'wall' for the ImageNet protocol (its ranks' CPU time is not "
            f"the cost), got {ecfg['sweep']['clock']!r}"
        )
    if ecfg.get("guidance_solver") == "euler" and ecfg.get("guidance_order") != 1:
        raise ValueError(
            f"{where}: eval.guidance_order must be 1 with eval.guidance_solver='euler', got {ecfg['guidance_order']}"
        )
