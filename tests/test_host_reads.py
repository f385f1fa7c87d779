"""No host reads in a sampler step or a training step on a device where a read synchronises.

A host read of a CUDA tensor (``.item()``, ``bool(t)``, ``float(t)``, a Python ``if`` on a
tensor) stalls the host until the GPU catches up and breaks CUDA-graph capture. Every such read
reaches the dispatcher as ``aten._local_scalar_dense`` (or ``aten.item`` / ``aten.is_nonzero``);
the mode below fails on them.

How the CUDA branch is exercised without a GPU:

* Triton backend (what runs on CUDA): CPU tensors under the interpreter. Validation decides
  with ``gmkernels._validate.host_checks_values`` whether a tensor's values are checked on the
  host (CPU: a ``ValueError``) or by a device-side assert (CUDA: ``torch._assert_async``); the
  tests patch that predicate to answer as it does for a CUDA tensor, so the code that runs on
  CUDA runs here (``_assert_async`` on a CPU tensor reads its value inside its own kernel,
  below this mode, as the CUDA kernel does on the device). Kernel launches run in the
  interpreter with the audit suspended (a launch on CUDA is asynchronous and reads no tensor
  value; the interpreter is not what is audited), so everything else a call does --
  validation, dispatch, the launchers' Python, the autograd glue -- runs under the mode,
  including the bodies of the ``gmkernels::`` custom ops.
* torch backend (``use_backend("torch")`` on CUDA): meta tensors, no patch. A meta tensor has
  no values, so validation takes the same device-assert branch as for CUDA (a no-op there),
  and any read of a device tensor raises, while reading a CPU scalar the code made from a
  Python float (no synchronisation on CUDA either) stays allowed. A device-to-host copy
  (``.cpu()``, ``.tolist()``) raises on meta too.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from strategies import make_gm, make_state
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

import gmkernels as G
from gmkernels import _validate

aten = torch.ops.aten
HOST_READS = (aten._local_scalar_dense, aten.item, aten.is_nonzero)


class NoHostReads(TorchDispatchMode):
    """Fails on a host read of a device tensor; counts device-side asserts; runs the Python
    implementation of every ``gmkernels::`` custom op under itself so reads inside launchers
    are seen.

    ``cpu_is_device=True`` (CPU tensors stand in for CUDA ones): a CPU tensor is a device
    tensor unless the code made it on the host -- from Python data (``torch.tensor(x)``) or by
    a factory without a ``device`` argument -- or computed it from such tensors only; reading
    those costs no synchronisation on CUDA either (e.g. rounding a float to float32 through a
    CPU scalar). Tensors from outside the audited call, factories given a ``device`` and
    anything computed from them are device tensors."""

    def __init__(self, cpu_is_device: bool = True):
        super().__init__()
        self.asserts = 0
        self.cpu_is_device = cpu_is_device
        self._host_made = WeakIdKeyDictionary()

    def _is_device(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return True
        return self.cpu_is_device and t not in self._host_made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_READS and self._is_device(args[0]):
            raise AssertionError(f"host read: {func} of a {args[0].device.type} tensor")
        if func.overloadpacket is aten._assert_async:
            self.asserts += 1
        if func.namespace == "gmkernels":
            from torch._library.custom_ops import _maybe_get_opdef

            opdef = _maybe_get_opdef(func)
            assert opdef is not None, f"{func} is not a torch.library.custom_op: its Python body cannot be audited"
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        lifted = func.overloadpacket in (aten.lift_fresh, aten.lift_fresh_copy)
        if kwargs.get("device") is None and (lifted or all(not self._is_device(t) for t in inputs)):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._host_made[t] = True
        return out


@pytest.fixture
def cuda_like(monkeypatch):
    """Validation takes its CUDA branch (device-side asserts) for CPU tensors."""
    monkeypatch.setattr(_validate, "host_checks_values", lambda t: False)


def test_the_mode_catches_reads_and_counts_asserts(cuda_like):
    """The audit itself can fail: each kind of read is caught, and a value check on the CUDA
    branch is one device-side assert (the check still fails on bad values, as on CUDA)."""
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t.sum()), lambda: float(t.sum()), lambda: int(t[0])):
        with NoHostReads(), pytest.raises(AssertionError, match="host read"):
            read()
    gm = make_gm(((2,), 3, 2, 3, 3), 0, torch.float32)
    x = make_state(((2,), 3, 2, 3, 3), 0, torch.float32)
    with NoHostReads() as mode:
        G.u_to_x0(gm, x, torch.full((2, 1, 1, 1), 0.5))
    assert mode.asserts == 1
    with pytest.raises(RuntimeError, match=r"sigma must lie in \[0, 1\]"):
        G.u_to_x0(gm, x, torch.full((2, 1, 1, 1), 1.5))


SHAPE = ((2,), 3, 2, 3, 3)
BACKENDS = (pytest.param("triton", marks=pytest.mark.triton), "torch")


def _device(backend: str) -> str:
    return "cpu" if backend == "triton" else "meta"


@contextlib.contextmanager
def unaudited_launches(counter: list):
    """Triton launches run (in the interpreter) with the audit suspended: on CUDA a launch is
    asynchronous and reads no tensor value; the interpreter is not what is audited. Their
    results are real, so the values the next op checks are too."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counter.append(self.fn.__name__)
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _run(backend: str, fn):
    """``fn()`` under the audit on ``backend``; returns the mode."""
    launches: list = []
    with G.use_backend(backend), unaudited_launches(launches), NoHostReads(cpu_is_device=backend == "triton") as mode:
        fn()
    if backend == "triton":
        assert launches, "the Triton path did not launch a kernel: the audit ran the wrong path"
    return mode


def _gm(seed, dtype, device, grad=False):
    return {k: v.to(device).requires_grad_(grad) for k, v in make_gm(SHAPE, seed, dtype).items()}


def _state(seed, dtype, device):
    return make_state(SHAPE, seed, dtype).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_steps_have_no_host_reads(cuda_like, backend, dtype):
    """``transition_loss`` with per-sample tensor timesteps and ``gm_nll_loss``, forward and
    backward; the timestep checks (range and order) are device-side asserts."""
    dev = _device(backend)
    x_hi, x_lo = _state(2, dtype, dev), _state(3, dtype, dev)
    t_hi, t_lo = torch.tensor([700.0, 400.0], device=dev), torch.tensor([300.0, 0.0], device=dev)

    def transition():
        gm = _gm(1, dtype, dev, grad=True)
        G.transition_loss(gm, x_hi, t_hi, x_lo, t_lo).backward()
        assert gm["means"].grad is not None and gm["logweights"].grad is not None

    def nll():
        gm = _gm(1, dtype, dev, grad=True)
        G.gm_nll_loss(gm, x_lo).backward()
        assert gm["means"].grad is not None

    mode = _run(backend, transition)
    assert mode.asserts == 1  # 0 <= t_low <= t_high <= 1000: one device-side assert
    _run(backend, nll)


def _denoiser(guided: bool, dtype):
    """A u-GM computed from ``x`` by tensor ops only (no value read), one per call."""
    K = SHAPE[1]

    def one(x, t, sign):
        B = x.shape[0]
        means = torch.stack([sign * x * (0.5 + 0.1 * k) for k in range(K)], dim=1)
        logits = torch.stack([x.mean(1, keepdim=True) * (k - 1) for k in range(K)], dim=1)
        logstds = (t.view(B, 1, 1, 1, 1) / 1000 - 2).expand(B, 1, 1, 1, 1)
        return {"means": means.to(dtype), "logstds": logstds.to(dtype), "logweights": logits.log_softmax(1).to(dtype)}

    def den(x, t):
        return (one(x, t, 1.0), one(x, t, 0.8)) if guided else one(x, t, 1.0)

    return den


CONFIGS = [
    (solver, order, guidance)
    for solver in ("gm-ode", "gm-sde", "euler")
    for order in ((1, 2) if solver != "euler" else (1,))
    for guidance in (None, "probabilistic", "weight", "mean-cfg")
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver, order, guidance", CONFIGS)
def test_sampler_steps_have_no_host_reads(cuda_like, backend, solver, order, guidance):
    """Every solver, order and guidance mode, three steps (the 2nd-order rule acts from the
    second), through ``gmkernels.sample`` (the schedulers' ``step``)."""
    scale = 0.0 if guidance is None else (0.5 if guidance == "probabilistic" else 2.0)
    dtype = torch.bfloat16 if order == 2 else torch.float32  # a bf16 network output too
    noise = _state(4, torch.float32, _device(backend))
    gen = torch.Generator().manual_seed(0) if backend == "triton" else None
    kw = dict(
        solver=solver,
        order=order,
        substeps=2 if solver == "gm-ode" else 1,
        shift=3.0,
        guidance=guidance or "probabilistic",
        guidance_scale=scale,
        generator=gen,
    )
    _run(backend, lambda: G.sample(_denoiser(guidance is not None, dtype), noise, 3, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_documented_order_checks_are_device_asserts(cuda_like, backend):
    """The conditions checked for issue 18 (sigma_to <= sigma, sigma_tgt <= sigma_src, a
    positive variance) with tensor arguments: device-side asserts, no host read; the two
    sigmas' ranges and their order are one assert."""
    dev = _device(backend)
    gm, x = _gm(0, torch.float32, dev), _state(0, torch.float32, dev)
    hi, lo = torch.full((2, 1, 1, 1), 0.8, device=dev), torch.full((2, 1, 1, 1), 0.3, device=dev)
    mode = _run(backend, lambda: G.reverse_transition(gm, x, hi, lo))
    assert mode.asserts == 1  # 0 <= sigma_to <= sigma <= 1
    mode = _run(backend, lambda: G.gm_posterior_mean(gm, x, hi, x, lo))
    assert mode.asserts == 1
    mode = _run(backend, lambda: G.gm_mul_iso_gaussian(gm, {"mean": x, "var": torch.ones(2, 1, 1, 1, device=dev)}))
    assert mode.asserts == 1
