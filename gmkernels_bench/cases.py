"""The benchmark cases: every op of docs/ops.md (``ops``), the GM NLL forward+backward (``train``) and
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
draws per pixel, ``X`` elements, not the whole ``G``. ``python -m gmkernels_bench.byte_check``
compares this model with the bytes the kernels really move (counted by the interpreter).

Sampler-step traffic (``step_traffic``, ``traffic_table``): bytes per network call of the fused
Triton sampler step, launch by launch, next to that minimum (a model, not a measurement).
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
# A small run (``small_run``: on a CPU unless --full-size) takes the named shapes at these sizes:
# the same K and C, fewer batch elements and pixels, so eager and compiled torch finish in
# seconds (a full-size CPU run of the ops suite takes over 10 minutes on 2 cores).
CPU_SIZES = {"imagenet": (4, 8, 4, 16, 16), "large-k": (1, 256, 4, 8, 8)}
# torch.compile on a CPU costs seconds per op, shape and dtype (and ~20 s to start): a small CPU
# run compiles this subset at the first shape only: the fused sampler op and the training loss.
CPU_COMPILE = ("gm_posterior_mean", "gm_nll_loss fwd+bwd")
# ops at batches up to this size also run, on a GPU only, the ``graph`` backend (the Triton op
# captured in a CUDA graph and replayed: no Python, dispatch or launch cost) and
# ``reduce-overhead`` (``torch.compile(reference, mode="reduce-overhead")``, CUDA graphs of
# compiled torch); on a CPU those rows are absent.
SMALL_BATCH = 8

# Solver configurations (docs/solvers.md): (steps, substeps) x solver x guidance scale.
SOLVER_STEPS = ((32, 4), (16, 8))
SOLVER_STEPS_QUICK = ((4, 2),)
SOLVERS = ("gm-ode", "gm-sde")
GUIDANCE_SCALES = (0.0, 0.5)


def small_run(device: torch.device, quick: bool, full_size: bool) -> bool:
    """Whether a run takes the small settings (``CPU_SIZES`` and the CPU compile subset on a
    CPU, fewer timer repeats and solver steps everywhere): under ``--quick``, and on a CPU unless
    ``--full-size``."""
    return quick or (device.type == "cpu" and not full_size)


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


def parse_shapes(tokens: list[str], device: torch.device, small: bool) -> list[Shape]:
    """``["imagenet", "large-k", "custom", "2,4,3,8,8", "custom:1,2,3,4,5"]`` -> shapes.

    Named presets shrink to ``CPU_SIZES`` in a ``small`` run (``small_run``) on a CPU; custom
    shapes never change.
    """
    shapes: list[Shape] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        for name in tok.split(",") if not tok[:1].isdigit() and not tok.startswith("custom") else [tok]:
            if name in PRESETS:
                dims = CPU_SIZES[name] if small and device.type == "cpu" else PRESETS[name]
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
        """A 1-D GM per pixel (docs/ops.md#inverse-cdf-and-transports): means, log-weights ``(B, K, H, W)``, log-stds ``(B, 1, 1, 1)``."""
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
    # the product's log-stds are per pixel when the Gaussian's variance is (as here): V written, not S
    "gm_mul_iso_gaussian": ("product", lambda r: (r.gm(), r.gaussian()), "G+L+S+X+V", "G+L+V"),
    "iso_gaussian_mul_iso_gaussian": ("product", lambda r: (r.gaussian(), r.gaussian()), "X+V+X+V", "X+V"),
    "u_to_x0": ("transition", lambda r: (r.gm(), r.state(), 0.6), "G+S+X", "G+S"),
    "x0_to_u": ("transition", lambda r: (r.gm(), r.state(), 0.6), "G+S+X", "G+S"),
    "gm_posterior_mean": ("posterior", lambda r: (r.gm(), r.state(), 0.7, r.state(), 0.5), "G+L+S+X+X", "X"),
    "reverse_transition": ("transition", lambda r: (r.gm(), r.state(), 0.6, 0.4), "G+S+X", "G+S"),
    "gm_logprob": ("likelihood", lambda r: (r.gm(), r.state(1)), "G+L+S+X", "V"),
    "gm_nll_loss": (
        "likelihood",
        lambda r: (r.gm(), r.state()),
        "G+L+S+X",
        "Vf",
    ),  # float32 per-pixel losses, then torch's mean
    "gm_sample": ("sampling", lambda r: (r.gm(),), "X+L+S", "X"),  # only the drawn component's means: X
    "probabilistic_guidance": ("guidance", lambda r: (r.gm(), r.gm(), 0.5), "G+L+S+G+L", "G+L+S"),
    "weight_guidance": ("guidance", lambda r: (r.gm(), r.gm(), 2.0), "L+L", "L"),
    "mean_cfg": ("guidance", lambda r: (r.gm(), r.gm(), 2.0), "G+L+G+L", "G"),
    "gm1d_inverse_cdf": ("inverse_cdf", lambda r: (r.gm1d(), r.scaled_cdfs()), "L+L+S+V", "V"),
    "gaussian_samples_to_gm_samples": ("inverse_cdf", lambda r: (r.gm(), r.state(1)), "G+L+S+X", "X"),
    "gm_samples_to_gaussian_samples": ("inverse_cdf", lambda r: (r.gm(), r.state(1)), "G+L+S+X", "X"),
}
OP_NAMES = tuple(_OPS)


def model_bytes(expr: str, c: dict[str, int], itemsize: int) -> int:
    """Bytes of a sum of ``counts()`` terms in the benchmark dtype (``itemsize``); a term ending
    in ``f`` (``Vf``) is float32 whatever the dtype (the NLL's per-pixel losses)."""
    return sum(c[t[:-1]] * 4 if t.endswith("f") else c[t] * itemsize for t in expr.split("+") if t)


def _elements(expr: str, c: dict[str, int]) -> int:
    return sum(c[t] for t in expr.split("+") if t)


def op_cases(shape: Shape, dtype: torch.dtype, device: torch.device, compile_ops: tuple[str, ...] | None) -> list[Case]:
    """Every op of docs/ops.md at ``shape``; ``compile_ops`` limits the ``compile`` backend (None: all)."""
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
        nbytes = model_bytes(reads, c, dtype.itemsize) + model_bytes(writes, c, dtype.itemsize)
        out.append(
            Case(
                "ops",
                name,
                family,
                shape,
                dtype,
                nbytes,
                lambda a=args, s=i: a(Inputs(shape, dtype, device, seed=s)),
                runs,
            )
        )
    return out


def _nll_grads(loss_fn: Callable) -> Callable[[Any], tuple]:
    def run(a: tuple) -> tuple:
        gm, target = a
        loss = loss_fn(gm, target)
        return torch.autograd.grad(loss, [gm["means"], gm["logstds"], gm["logweights"]])

    return run


def train_cases(
    shape: Shape, dtype: torch.dtype, device: torch.device, compile_ops: tuple[str, ...] | None = None
) -> list[Case]:
    """``gm_nll_loss`` forward + backward (gradients of means, log-stds, log-weights; no
    accumulation). Minimal traffic: read the GM and the target once, write the three gradients,
    and the per-pixel losses the forward writes and the backward reads back (its softmax
    normaliser, as flash attention keeps its log-sum-exp). ``compile_ops`` without
    ``"gm_nll_loss fwd+bwd"`` drops the ``compile`` backend."""
    c = counts(shape)
    nbytes = model_bytes("G+L+S+X+Vf", c, dtype.itemsize) + model_bytes("G+L+S+Vf", c, dtype.itemsize)

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
    """``denoiser(x_t, t)`` of docs/solvers.md#gmkernelssample that costs nothing: returns a fixed random u-GM (a pair
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


def solver_configs(small: bool) -> list[dict]:
    """Solver configurations (docs/solvers.md), ``SOLVER_STEPS_QUICK`` in a ``small`` run; GM-SDE has no substeps
    (one exact transition per call), so it runs the same numbers of steps with ``substeps=1``."""
    steps = SOLVER_STEPS_QUICK if small else SOLVER_STEPS
    return [
        {"solver": solver, "num_steps": n, "substeps": m if solver == "gm-ode" else 1, "guidance_scale": g}
        for (n, m) in steps
        for solver in SOLVERS
        for g in GUIDANCE_SCALES
    ]


def solver_label(cfg: dict) -> str:
    guide = f" guided {cfg['guidance_scale']:g}" if cfg["guidance_scale"] > 0 else ""
    return f"sample {cfg['solver']} {cfg['num_steps']}x{cfg['substeps']}{guide}"


def solver_cases(
    shape: Shape, dtype: torch.dtype, device: torch.device, small: bool, compile_loop: bool, max_copies: int = 64
) -> list[Case]:
    """``gmkernels.sample`` with a stub denoiser, per solver configuration (docs/solvers.md; when ``small``,
    ``SOLVER_STEPS_QUICK`` and, on a CPU, the shape's own batch instead of ``SOLVER_BATCH``). ``triton`` is the
    default dispatch, ``torch`` the same loop under ``use_backend("torch")`` (the reference ops),
    ``compile`` ``torch.compile`` of that loop (only when ``compile_loop``).

    Minimal traffic per network call: the GM(s) read once, the state read and written once."""
    if shape.name in SOLVER_BATCH and not (small and device.type == "cpu"):
        shape = shape.with_batch(SOLVER_BATCH[shape.name])
    c = counts(shape)
    out = []
    for cfg in solver_configs(small):
        guided = cfg["guidance_scale"] > 0
        per_call = (_elements("G+L+S", c) * (2 if guided else 1) + 2 * c["X"]) * dtype.itemsize

        def make(guided: bool = guided, copies: int = input_copies(per_call, device, max_copies)) -> tuple:
            return StubDenoiser(shape, dtype, device, guided, copies), Inputs(shape, dtype, device, seed=303).state()

        def loop(a: tuple, cfg: dict = cfg) -> torch.Tensor:
            return gmkernels.sample(
                a[0],
                a[1],
                cfg["num_steps"],
                solver=cfg["solver"],
                substeps=cfg["substeps"],
                guidance_scale=cfg["guidance_scale"],
            )

        def torch_loop(a: tuple, loop: Callable = loop) -> torch.Tensor:
            with gmkernels.use_backend("torch"):
                return loop(a)

        runs = {"triton": loop, "torch": torch_loop}
        if compile_loop:
            runs["compile"] = lambda a, f=torch_loop: compiled(f)(a)
        out.append(
            Case(
                "solvers",
                solver_label(cfg),
                "solver_steps",
                shape,
                dtype,
                per_call * cfg["num_steps"],
                make,
                runs,
                params=dict(cfg),
                per_call=cfg["num_steps"],
                batch=shape.B,
                rotate=False,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# pi-Flow GM policies (issue 15): the GM heads of pi-Flow's ImageNet (K=32, C=4, 32x32) and FLUX
# (K=8, C=16, 96x170 latents at 1360x768) models, one full rollout of 128 substeps. The suite
# uses these shapes whatever --shapes says.

POLICY_SHAPES = {"piflow-imagenet": (64, 32, 4, 32, 32), "piflow-flux": (2, 8, 16, 96, 170)}
POLICY_CPU_SIZES = {"piflow-imagenet": (2, 32, 4, 8, 8), "piflow-flux": (1, 8, 16, 8, 12)}
POLICY_SUBSTEPS = 128
POLICY_CPU_SUBSTEPS = 16  # a small CPU run: the reference's training rollout costs ~1 s per 16 substeps
POLICY_SHIFT = 3.0


def _policy_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, grad: bool, n: int) -> tuple:
    """``(gm_u, x_src, sigma_src, raw_t_start, raw_t_end, total_substeps)``: a rollout over the
    whole raw interval."""
    r = Inputs(shape, dtype, device, seed=404)
    gm = r.gm()
    if grad:
        gm = {k: v.requires_grad_() for k, v in gm.items()}
    ones = torch.ones(shape.B, device=device)
    return gm, r.state(), ones, ones, torch.zeros(shape.B, device=device), n


def _policy_rollout(a: tuple) -> torch.Tensor:
    from gmkernels.policy import GMFlowPolicy

    gm, x, s, r0, r1, n = a
    return GMFlowPolicy(gm, x, s).integrate(x, s, r0, r1, shift=POLICY_SHIFT, total_substeps=n)[0]


def _policy_rollout_torch(a: tuple) -> torch.Tensor:
    with gmkernels.use_backend("torch"):
        return _policy_rollout(a)


def _policy_rollout_compiled_pi(a: tuple) -> torch.Tensor:
    """The reference loop with ``torch.compile`` of the velocity (the loop itself would unroll
    128 substeps)."""
    import reference.policy as ref_policy
    from gmkernels.policy import GMFlowPolicy

    gm, x, s, r0, r1, n = a
    with gmkernels.use_backend("torch"):
        pol = GMFlowPolicy(gm, x, s)
    warp = lambda t: POLICY_SHIFT * t / (1 + (POLICY_SHIFT - 1) * t)  # noqa: E731
    sigmas, _ = ref_policy.rollout_sigmas(pol.sigma_src, r0, r1, n, warp)
    pi = compiled(ref_policy.policy_pi)
    xf = x.float()
    for j in range(n):
        u = pi(
            pol.means_u.float(), pol.gm_vars, pol.logweights.float(), pol.x_src.float(), pol.sigma_src, xf, sigmas[:, j]
        )
        xf = xf + u * (sigmas[:, j + 1] - sigmas[:, j]).view(-1, 1, 1, 1)
    return xf.to(x.dtype)


def _policy_grads(rollout: Callable) -> Callable[[tuple], tuple]:
    def run(a: tuple) -> tuple:
        gm = a[0]
        out = rollout(a)
        return torch.autograd.grad(out, [gm["means"], gm["logstds"], gm["logweights"]], torch.ones_like(out))

    return run


def policy_cases(dtype: torch.dtype, device: torch.device, small: bool, compile_ok: bool) -> list[Case]:
    """A full 128-substep rollout of a GM policy (16, at ``POLICY_CPU_SIZES``, in a ``small`` run on
    a CPU): ``triton`` the fused kernel, ``torch`` the reference loop, ``compile`` that loop with a
    compiled velocity (when ``compile_ok``); and the training rollout (forward + gradients of the
    u-GM; named without "fwd+bwd", which selects the NLL training case): fused backward vs the
    reference with one activation checkpoint per substep (``measure_memory``: peak memory on CUDA).

    Minimal traffic: the GM and ``x_src`` read once (the rollout starts at ``x_src``: ``x_start``
    is the same tensor) and ``x_end`` written (training: plus the three gradients written)."""
    out = []
    small_cpu = small and device.type == "cpu"
    n = POLICY_CPU_SUBSTEPS if small_cpu else POLICY_SUBSTEPS
    for name, dims in POLICY_SHAPES.items():
        shape = Shape(name, *(POLICY_CPU_SIZES[name] if small_cpu else dims))
        c = counts(shape)
        fwd_bytes = (_elements("G+L+S+X+X", c)) * dtype.itemsize
        runs = {"triton": _policy_rollout, "torch": _policy_rollout_torch}
        if compile_ok:
            runs["compile"] = _policy_rollout_compiled_pi
        params = {"substeps": n, "shift": POLICY_SHIFT}
        out.append(
            Case(
                "policy",
                f"policy rollout {n}",
                "policy",
                shape,
                dtype,
                fwd_bytes,
                lambda s=shape: _policy_inputs(s, dtype, device, False, n),
                runs,
                params=dict(params),
                per_call=n,
                batch=shape.B,
            )
        )
        train_runs = {"triton": _policy_grads(_policy_rollout), "torch": _policy_grads(_policy_rollout_torch)}
        out.append(
            Case(
                "policy",
                f"policy training rollout {n}",
                "policy",
                shape,
                dtype,
                fwd_bytes + _elements("G+L+S", c) * dtype.itemsize,
                lambda s=shape: _policy_inputs(s, dtype, device, True, n),
                train_runs,
                params=dict(params),
                per_call=n,
                batch=shape.B,
                measure_memory=True,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# what a small CPU run reduces


def small_cpu_lines(notes: list[str]) -> list[str]:
    """The notes of a small CPU run as printed: the first says how to get the full run."""
    head = "small cpu run (the default on a cpu; --full-size for the full sizes: the ops suite takes 10+ minutes on 2 cores)"
    return [f"{head if i == 0 else 'small cpu run'}: {n}" for i, n in enumerate(notes)]


def cpu_size_notes(tokens: list[str], suites: tuple[str, ...]) -> list[str]:
    """The sizes a small CPU run (``small_run``) shrinks for ``suites``, each next to its full
    size: the named shapes among the ``--shapes`` ``tokens``, the sampling loops, the policy
    rollouts."""
    cpu = torch.device("cpu")
    dims = lambda d: "x".join(map(str, d))  # noqa: E731
    steps = lambda configs: " and ".join(f"{n}x{m}" for n, m in configs)  # noqa: E731
    pairs = [(s, f) for s, f in zip(parse_shapes(tokens, cpu, True), parse_shapes(tokens, cpu, False)) if s != f]
    notes = []
    if pairs and set(suites) & {"ops", "train", "solvers"}:
        notes.append("shapes " + ", ".join(f"{s.name} {s.label} (full {f.label})" for s, f in pairs))
    if "solvers" in suites:
        batches = "".join(f", {f.name} at B={SOLVER_BATCH[f.name]}" for _, f in pairs if f.name in SOLVER_BATCH)
        notes.append(
            f"sampling loops of {steps(SOLVER_STEPS_QUICK)} steps x substeps (full {steps(SOLVER_STEPS)}{batches})"
        )
    if "policy" in suites:
        notes.append(
            f"policy rollouts of {POLICY_CPU_SUBSTEPS} substeps at {' and '.join(map(dims, POLICY_CPU_SIZES.values()))}"
            f", no torch.compile (full {POLICY_SUBSTEPS} at {' and '.join(map(dims, POLICY_SHAPES.values()))})"
        )
    return notes


# ---------------------------------------------------------------------------------------------
# traffic of one sampler step (issue 13): the fused Triton path, launch by launch


def step_launches(solver: str, order: int, guidance: str, orthogonal: float = 1.0) -> list[int]:
    """The statistics and step launches of one sampler step of the Triton path, as their mode: 1
    and 2 are ``_step_stats_kernel``'s passes, 0 ``_step_kernel``, the step itself
    (``gmkernels.ops.solver.step``).
    ``guidance`` is ``"none"`` or a guidance mode with a scale > 0; ``order`` 2 means a step with
    a previous one (the first step of a loop is first order)."""
    del solver  # GM-ODE and GM-SDE launch alike
    has_uncond = guidance in ("probabilistic", "mean-cfg")
    launches = []
    if has_uncond or order == 2:
        launches.append(1)
    if order == 2 and (guidance == "probabilistic" or (guidance == "mean-cfg" and orthogonal > 0)):
        launches.append(2)
    return launches + [0]


def launch_reads_memory(mode: int, order: int, guidance: str, orthogonal: float = 1.0) -> bool:
    """Whether a launch of ``step_launches`` reads the 2nd-order memory (the previous step's
    posterior mean): every launch at order 2 except the first statistics pass when a second one
    computes the bias power."""
    return order == 2 and not (mode == 1 and 2 in step_launches("gm-ode", order, guidance, orthogonal))


def step_traffic(
    shape: Shape,
    gm_dtype: torch.dtype,
    state_dtype: torch.dtype,
    solver: str,
    order: int,
    guidance: str,
    orthogonal: float = 1.0,
    last: bool = False,
) -> dict[str, Any]:
    """Bytes one sampler step (one network call) reads and writes on the fused Triton path, next
    to the minimum: the network output read once (both GMs under probabilistic guidance and
    mean-CFG, the conditional GM and the unconditional log-weights under weight guidance), the
    state read once and written once.

    Model: a launch reads each array it needs once (a program re-reads only its own tile of the
    GM, from registers or L1/L2, which is not counted); per launch: the conditional GM (means,
    log-weights, log-stds; the plain GM-SDE draw reads the log-weights and gathers one mean per
    pixel and channel), the unconditional means and log-weights when the step needs ``m_u``, its
    log-weights under weight guidance (the first launch keeps ``m_u``, ``X`` float32, which the
    later ones read instead), the state, the 2nd-order memory (``X`` in float32, ``launch_reads_memory``) and the
    outputs: the new state and, at 2nd order except after the last step, the posterior mean for
    the next step (``X`` float32). Per-sample scalars (a few partial sums per program) are
    left out. ``tests/test_sampler.py`` checks the launch list against the kernel launches.

    Returns:
        ``{"launches": [...], "bytes": int, "minimum": int, "ratio": float}``.
    """
    c = counts(shape)
    g, xs, f32 = gm_dtype.itemsize, state_dtype.itemsize, 4
    has_uncond = guidance in ("probabilistic", "mean-cfg")
    weight = guidance == "weight"
    gm_c = (c["G"] + c["L"] + c["S"]) * g
    gm_u = (c["G"] + c["L"]) * g if has_uncond else (c["L"] * g if weight else 0)
    state = c["X"] * xs
    launches = step_launches(solver, order, guidance, orthogonal)
    total = 0
    for i, mode in enumerate(launches):
        plain_draw = solver == "gm-sde" and mode == 0 and not has_uncond and order == 1
        cond = (c["L"] + c["S"]) * g + c["X"] * g if plain_draw else gm_c
        # the first launch reads the unconditional GM and keeps m_u (X float32) for the others
        uncond = (gm_u + c["X"] * f32 if i == 0 else c["X"] * f32) if has_uncond else gm_u
        memory = c["X"] * f32 if launch_reads_memory(mode, order, guidance, orthogonal) else 0
        total += cond + uncond + state + memory
        if mode == 0:
            total += state + (c["X"] * f32 if order == 2 and not last else 0)
    minimum = gm_c + gm_u + 2 * state
    return {"launches": launches, "bytes": total, "minimum": minimum, "ratio": total / minimum}


def traffic_table(
    shape: Shape, gm_dtype: torch.dtype = torch.bfloat16, state_dtype: torch.dtype = torch.float32
) -> str:
    """Markdown table of ``step_traffic`` per solver, order and guidance mode (bytes per pixel)."""
    P = shape.B * shape.H * shape.W
    lines = [
        f"| step ({shape.label}, GM {str(gm_dtype)[6:]}, state {str(state_dtype)[6:]}) | launches | B/pixel | minimum | ratio |",
        "|---|---|---|---|---|",
    ]
    for solver in ("gm-ode", "gm-sde"):
        for order in (1, 2):
            for guidance in ("none", "probabilistic", "weight", "mean-cfg"):
                t = step_traffic(shape, gm_dtype, state_dtype, solver, order, guidance)
                lines.append(
                    f"| {solver} order {order} {guidance} | {len(t['launches'])} | {t['bytes'] / P:.0f} | "
                    f"{t['minimum'] / P:.0f} | {t['ratio']:.2f} |"
                )
    return "\n".join(lines)
