"""The benchmark cases: every op of SPEC §3 (``ops``), the GM NLL forward+backward (``train``) and
the sampling loop with a stub denoiser (``solvers``), each with its minimal-traffic byte count.

Backends of a case:

* ``triton``: the public ``gmkernels`` function (Triton kernels on CUDA tensors);
* ``torch``: the ``reference`` function, eager, called on the inputs as they are (so bf16 inputs
  compute in bf16, as a user of the plain-PyTorch code would run it);
* ``compile``: ``torch.compile(reference function, dynamic=False)``.

Minimal-traffic model (``bytes``): each input the op needs is read once and each output written
once, in the benchmark dtype; with ``P = H*W``: means ``G = B*K*C*P``, log-weights ``L = B*K*P``,
log-stds ``S = B``, a state ``X = B*C*P``, a per-pixel variance ``V = B*P``. Outputs that the
contract lets an op return unchanged (the log-weights of ``u_to_x0``, the means of
``weight_guidance``) cost nothing; scalars are not counted. The 1-D GM of ``gm1d_inverse_cdf`` is
the ``C = 1`` case (its means count as ``L``). ``gm_sample`` reads the means of the one component it
draws per pixel, ``X`` elements, not the whole ``G``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import gmkernels
import reference

from .timing import input_copies

# (B, K, C, H, W) of the named shapes (issue 3 item 7, issue 5 item 5); the solver benchmark of
# issue 4 item 6 uses B=125 at the ImageNet shape.
PRESETS = {"imagenet": (256, 8, 4, 32, 32), "large-k": (32, 256, 4, 32, 32)}
SOLVER_BATCH = {"imagenet": 125}
# --quick on a CPU: the same K and C, fewer batch elements and pixels, so eager and compiled
# torch finish in seconds.
QUICK_CPU = {"imagenet": (4, 8, 4, 16, 16), "large-k": (1, 256, 4, 8, 8)}
# torch.compile on a CPU costs seconds per op and shape (and ~20 s to start): --quick compiles
# this subset at the first shape only: the fused sampler op and the training loss.
QUICK_CPU_COMPILE = ("gm_posterior_mean", "gm_nll_loss fwd+bwd")
# ops at batches up to this size also run, on a GPU only, the ``graph`` backend (the Triton op
# captured in a CUDA graph and replayed: no Python, dispatch or launch cost) and
# ``reduce-overhead`` (``torch.compile(reference, mode="reduce-overhead")``, CUDA graphs of
# compiled torch); on a CPU those rows are absent.
SMALL_BATCH = 8

# SPEC §4 configurations: (steps, substeps) x solver x guidance scale.
SOLVER_STEPS = ((32, 4), (16, 8))
SOLVER_STEPS_QUICK = ((4, 2),)
SOLVERS = ("gm-ode", "gm-sde")
GUIDANCE_SCALES = (0.0, 0.5)


@dataclass(frozen=True)
class Shape:
    """A benchmark shape ``(B, K, C, H, W)`` and the name it was asked for by."""

    name: str
    B: int
    K: int
    C: int
    H: int
    W: int

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.B, self.K, self.C, self.H, self.W)

    @property
    def label(self) -> str:
        return "x".join(map(str, self.dims))

    def with_batch(self, B: int) -> "Shape":
        return Shape(self.name, B, self.K, self.C, self.H, self.W)


def parse_custom(spec: str) -> Shape:
    """``"B,K,C,H,W"`` -> a custom Shape; ``ValueError`` naming the spec otherwise."""
    parts = spec.split(",")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 5 or min(dims) < 1:
        raise ValueError(f"--shapes custom: expected five positive integers B,K,C,H,W, got {spec!r}")
    return Shape("custom", *dims)


def parse_shapes(tokens: list[str], device: torch.device, quick: bool) -> list[Shape]:
    """``["imagenet", "large-k", "custom", "2,4,3,8,8", "custom:1,2,3,4,5"]`` -> shapes.

    Named presets shrink to ``QUICK_CPU`` under ``quick`` on a CPU; custom shapes never change.
    """
    shapes: list[Shape] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        for name in tok.split(",") if not tok[:1].isdigit() and not tok.startswith("custom") else [tok]:
            if name in PRESETS:
                dims = QUICK_CPU[name] if quick and device.type == "cpu" else PRESETS[name]
                shapes.append(Shape(name, *dims))
            elif name == "custom":
                if i + 1 >= len(tokens):
                    raise ValueError("--shapes custom: needs B,K,C,H,W after it")
                i += 1
                shapes.append(parse_custom(tokens[i]))
            elif name.startswith(("custom:", "custom=")):
                shapes.append(parse_custom(name[7:]))
            elif name[:1].isdigit():
                shapes.append(parse_custom(name))
            else:
                raise ValueError(f"--shapes: unknown shape {name!r}; use {', '.join(PRESETS)} or custom B,K,C,H,W")
        i += 1
    return shapes


# ---------------------------------------------------------------------------------------------
# random inputs (never zeros): means ~ N(0, 1), log-stds in [-2, -0.5], log-weights the
# log-softmax of N(0, 4) logits, states ~ N(0, 1), variances in [0.1, 1.1].


class Inputs:
    """Draws the random tensors of one case on ``device`` in ``dtype`` from a seeded generator."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.s, self.dtype, self.device = shape, dtype, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def _randn(self, *size: int) -> torch.Tensor:
        return torch.randn(size, generator=self.gen, device=self.device)

    def _rand(self, *size: int) -> torch.Tensor:
        return torch.rand(size, generator=self.gen, device=self.device)

    def gm(self) -> dict:
        B, K, C, H, W = self.s.dims
        return {
            "means": self._randn(B, K, C, H, W).to(self.dtype),
            "logstds": (self._rand(B, 1, 1, 1, 1) * -1.5 - 0.5).to(self.dtype),
            "logweights": torch.log_softmax(self._randn(B, K, 1, H, W) * 2, dim=1).to(self.dtype),
        }

    def state(self, n: int | None = None) -> torch.Tensor:
        B, _, C, H, W = self.s.dims
        size = (B, C, H, W) if n is None else (B, n, C, H, W)
        return self._randn(*size).to(self.dtype)

    def gm1d(self) -> dict:
        """A 1-D GM per pixel (SPEC §3.12): means, log-weights ``(B, K, H, W)``, log-stds ``(B, 1, 1, 1)``."""
        gm = self.gm()
        return {k: v[:, :, 0].contiguous() for k, v in gm.items()}

    def scaled_cdfs(self) -> torch.Tensor:
        """``(B, 1, H, W)`` targets of the 1-D inverse CDF, uniform in (-0.98, 0.98)."""
        B, _, _, H, W = self.s.dims
        return ((self._rand(B, 1, H, W) * 2 - 1) * 0.98).to(self.dtype)

    def gaussian(self) -> dict:
        B, _, _, H, W = self.s.dims
        return {"mean": self.state(), "var": (self._rand(B, 1, H, W) + 0.1).to(self.dtype)}


def clone_tree(obj: Any) -> Any:
    """A copy of every tensor in a tuple/list/dict tree (new memory, same values; a tensor that
    requires grad is copied to a new leaf that requires grad)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmark case: ``make()`` draws an input copy, ``runs[backend](inputs)`` runs it.

    ``bytes`` is the minimal-traffic model; ``per_call`` divides the time of one run into that
    many units (network calls of a sampling loop) for the ms/call column; ``rotate`` False: the
    runner times one input copy (a sampling loop rotates its stub GMs itself).
    """

    suite: str
    op: str
    family: str
    shape: Shape
    dtype: torch.dtype
    bytes: int
    make: Callable[[], Any]
    runs: dict[str, Callable[[Any], Any]]
    params: dict = field(default_factory=dict)
    per_call: int = 1
    batch: int = 0
    measure_memory: bool = False
    rotate: bool = True


def counts(s: Shape) -> dict[str, int]:
    """Element counts of the minimal-traffic model (see the module docstring)."""
    B, K, C, H, W = s.dims
    P = H * W
    return {"G": B * K * C * P, "L": B * K * P, "S": B, "X": B * C * P, "V": B * P}


_compiled: dict[tuple[Callable, str | None], Callable] = {}


def compiled(fn: Callable, mode: str | None = None) -> Callable:
    """``torch.compile(fn, dynamic=False, mode=mode)``, one wrapper per function and mode
    (recompiled per shape)."""
    if (fn, mode) not in _compiled:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(getattr(dynamo_config, "recompile_limit", 8), 64)
        _compiled[fn, mode] = torch.compile(fn, dynamic=False, mode=mode)
    return _compiled[fn, mode]


def has_triton_kernels(family: str) -> bool:
    """True when ``gmkernels.ops.<family>`` defines a Triton kernel (else its public functions
    run the reference even on CUDA, and a ``triton`` row measures that)."""
    try:
        from triton.runtime import KernelInterface

        mod = importlib.import_module(f"gmkernels.ops.{family}")
    except ImportError:
        return False
    return any(isinstance(v, KernelInterface) for v in vars(mod).values())


# name -> (family, arguments from Inputs, reads, writes) where reads/writes are sums over counts().
_OPS: dict[str, tuple[str, Callable[[Inputs], tuple], str, str]] = {
    "gm_to_mean": ("mixture", lambda r: (r.gm(),), "G+L", "X"),
    "gm_to_iso_gaussian": ("mixture", lambda r: (r.gm(),), "G+L+S", "X+V"),
    "gm_mul_iso_gaussian": ("product", lambda r: (r.gm(), r.gaussian()), "G+L+S+X+V", "G+L+S"),
    "iso_gaussian_mul_iso_gaussian": ("product", lambda r: (r.gaussian(), r.gaussian()), "X+V+X+V", "X+V"),
    "u_to_x0": ("transition", lambda r: (r.gm(), r.state(), 0.6), "G+S+X", "G+S"),
    "x0_to_u": ("transition", lambda r: (r.gm(), r.state(), 0.6), "G+S+X", "G+S"),
    "gm_posterior_mean": ("posterior", lambda r: (r.gm(), r.state(), 0.7, r.state(), 0.5), "G+L+S+X+X", "X"),
    "reverse_transition": ("transition", lambda r: (r.gm(), r.state(), 0.6, 0.4), "G+S+X", "G+S"),
    "gm_logprob": ("likelihood", lambda r: (r.gm(), r.state(1)), "G+L+S+X", "V"),
    "gm_nll_loss": ("likelihood", lambda r: (r.gm(), r.state()), "G+L+S+X", ""),
    "gm_sample": ("sampling", lambda r: (r.gm(),), "X+L+S", "X"),  # only the drawn component's means: X
    "probabilistic_guidance": ("guidance", lambda r: (r.gm(), r.gm(), 0.5), "G+L+S+G+L", "G+L+S"),
    "weight_guidance": ("guidance", lambda r: (r.gm(), r.gm(), 2.0), "L+L", "L"),
    "mean_cfg": ("guidance", lambda r: (r.gm(), r.gm(), 2.0), "G+L+G+L", "G"),
    "gm1d_inverse_cdf": ("inverse_cdf", lambda r: (r.gm1d(), r.scaled_cdfs()), "L+L+S+V", "V"),
    "gaussian_samples_to_gm_samples": ("inverse_cdf", lambda r: (r.gm(), r.state(1)), "G+L+S+X", "X"),
    "gm_samples_to_gaussian_samples": ("inverse_cdf", lambda r: (r.gm(), r.state(1)), "G+L+S+X", "X"),
}
OP_NAMES = tuple(_OPS)


def _elements(expr: str, c: dict[str, int]) -> int:
    return sum(c[t] for t in expr.split("+") if t)


def op_cases(shape: Shape, dtype: torch.dtype, device: torch.device, compile_ops: tuple[str, ...] | None) -> list[Case]:
    """Every SPEC §3 op at ``shape``; ``compile_ops`` limits the ``compile`` backend (None: all)."""
    out = []
    c = counts(shape)
    for i, (name, (family, args, reads, writes)) in enumerate(_OPS.items()):
        gm_fn, ref_fn = getattr(gmkernels, name), getattr(reference, name)
        runs = {"triton": lambda a, f=gm_fn: f(*a), "torch": lambda a, f=ref_fn: f(*a)}
        if compile_ops is None or name in compile_ops:
            runs["compile"] = lambda a, f=ref_fn: compiled(f)(*a)
        if device.type == "cuda" and shape.B <= SMALL_BATCH:  # where launch and host costs show
            runs["graph"] = runs["triton"]  # the runner captures it in CUDA graphs and times their replay
            runs["reduce-overhead"] = lambda a, f=ref_fn: compiled(f, "reduce-overhead")(*a)
        nbytes = (_elements(reads, c) + _elements(writes, c)) * dtype.itemsize
        out.append(
            Case("ops", name, family, shape, dtype, nbytes, lambda a=args, s=i: a(Inputs(shape, dtype, device, seed=s)), runs)
        )
    return out


def _nll_grads(loss_fn: Callable) -> Callable[[Any], tuple]:
    def run(a: tuple) -> tuple:
        gm, target = a
        loss = loss_fn(gm, target)
        return torch.autograd.grad(loss, [gm["means"], gm["logstds"], gm["logweights"]])

    return run


def train_cases(shape: Shape, dtype: torch.dtype, device: torch.device, compile_ops: tuple[str, ...] | None = None) -> list[Case]:
    """``gm_nll_loss`` forward + backward (gradients of means, log-stds, log-weights; no
    accumulation). Minimal traffic: read the GM and the target once, write the three gradients.
    ``compile_ops`` without ``"gm_nll_loss fwd+bwd"`` drops the ``compile`` backend."""
    c = counts(shape)
    nbytes = (_elements("G+L+S+X", c) + _elements("G+L+S", c)) * dtype.itemsize

    def make() -> tuple:
        r = Inputs(shape, dtype, device, seed=101)
        return {k: v.requires_grad_() for k, v in r.gm().items()}, r.state()

    op = "gm_nll_loss fwd+bwd"
    runs = {"triton": _nll_grads(gmkernels.gm_nll_loss), "torch": _nll_grads(reference.gm_nll_loss)}
    if compile_ops is None or op in compile_ops:
        runs["compile"] = _nll_grads(lambda gm, y: compiled(reference.gm_nll_loss)(gm, y))
    return [Case("train", op, "likelihood", shape, dtype, nbytes, make, runs, measure_memory=True)]


# ---------------------------------------------------------------------------------------------
# solvers


class StubDenoiser:
    """``denoiser(x_t, t)`` of SPEC §4 that costs nothing: returns a fixed random u-GM (a pair
    ``(gm_cond, gm_uncond)`` under guidance), cycling through ``copies`` equal copies so that
    consecutive calls do not find the GM in cache, as after a real network call."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, guided: bool, copies: int = 1):
        r = Inputs(shape, dtype, device, seed=202)
        out = (r.gm(), r.gm()) if guided else r.gm()
        self.outputs = [out] + [clone_tree(out) for _ in range(copies - 1)]
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


def sample_unavailable(device: torch.device) -> str | None:
    """None when ``gmkernels.sample`` runs; else the one-line reason it cannot be benchmarked."""
    s = Shape("probe", 1, 2, 1, 2, 2)
    try:
        noise = Inputs(s, torch.float32, device).state()
        gmkernels.sample(StubDenoiser(s, torch.float32, device, False), noise, 1, solver="gm-ode")
    except NotImplementedError as e:
        return f"gmkernels.sample raises NotImplementedError ({e})"
    return None


def solver_configs(quick: bool) -> list[dict]:
    """SPEC §4 configurations; GM-SDE has no substeps (one exact transition per call), so it runs
    the same numbers of steps with ``substeps=1``."""
    steps = SOLVER_STEPS_QUICK if quick else SOLVER_STEPS
    return [
        {"solver": solver, "num_steps": n, "substeps": m if solver == "gm-ode" else 1, "guidance_scale": g}
        for (n, m) in steps
        for solver in SOLVERS
        for g in GUIDANCE_SCALES
    ]


def solver_label(cfg: dict) -> str:
    guide = f" guided {cfg['guidance_scale']:g}" if cfg["guidance_scale"] > 0 else ""
    return f"sample {cfg['solver']} {cfg['num_steps']}x{cfg['substeps']}{guide}"


def solver_cases(shape: Shape, dtype: torch.dtype, device: torch.device, quick: bool, compile_loop: bool, max_copies: int = 64) -> list[Case]:
    """``gmkernels.sample`` with a stub denoiser, per SPEC §4 configuration. ``triton`` is the
    default dispatch, ``torch`` the same loop under ``use_backend("torch")`` (the reference ops),
    ``compile`` ``torch.compile`` of that loop (only when ``compile_loop``).

    Minimal traffic per network call: the GM(s) read once, the state read and written once."""
    if shape.name in SOLVER_BATCH and not (quick and device.type == "cpu"):
        shape = shape.with_batch(SOLVER_BATCH[shape.name])
    c = counts(shape)
    out = []
    for cfg in solver_configs(quick):
        guided = cfg["guidance_scale"] > 0
        per_call = (_elements("G+L+S", c) * (2 if guided else 1) + 2 * c["X"]) * dtype.itemsize

        def make(guided: bool = guided, copies: int = input_copies(per_call, device, max_copies)) -> tuple:
            return StubDenoiser(shape, dtype, device, guided, copies), Inputs(shape, dtype, device, seed=303).state()

        def loop(a: tuple, cfg: dict = cfg) -> torch.Tensor:
            return gmkernels.sample(a[0], a[1], cfg["num_steps"], solver=cfg["solver"], substeps=cfg["substeps"], guidance_scale=cfg["guidance_scale"])

        def torch_loop(a: tuple, loop: Callable = loop) -> torch.Tensor:
            with gmkernels.use_backend("torch"):
                return loop(a)

        runs = {"triton": loop, "torch": torch_loop}
        if compile_loop:
            runs["compile"] = lambda a, f=torch_loop: compiled(f)(a)
        out.append(
            Case(
                "solvers", solver_label(cfg), "solver_steps", shape, dtype, per_call * cfg["num_steps"], make, runs,
                params=dict(cfg), per_call=cfg["num_steps"], batch=shape.B, rotate=False,
            )
        )
    return out
