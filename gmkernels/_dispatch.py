"""Backend selection: CUDA tensors run Triton kernels, CPU tensors run ``reference/``.

``use_backend("triton")`` forces the kernels; on CPU that only works under
``TRITON_INTERPRET=1`` (Triton's interpreter, a correctness tool used by the test suite).
``use_backend("torch")`` forces the plain-PyTorch reference on any device.

The torch path computes in float32 (float64 when an input is float64) and casts the
results back to the output dtype, the same contract as the kernels, which load any float
dtype and do their arithmetic in float32 registers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
# A plain module global, not a ContextVar: torch.compile traces a global read (and guards on
# its value, recompiling when a ``use_backend`` block changes it) but not ``ContextVar.get``.
_state = {"backend": "auto"}
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package is installed."""
    return _TRITON


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when gmkernels' op modules are
# imported (right after this one): the kernels run in the interpreter or not from then on.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` was set when
    gmkernels was imported (Triton decides it when the kernels are defined; setting or clearing
    the variable later changes nothing for them)."""
    return _INTERPRETED


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block: ``"auto"``, ``"triton"`` or ``"torch"``.

    Example::

        with gmkernels.use_backend("torch"):
            mean = gmkernels.gm_to_mean(gm)   # plain PyTorch even on CUDA
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    previous = _state["backend"]
    _state["backend"] = name
    try:
        yield
    finally:
        _state["backend"] = previous


def current_backend() -> str:
    """The backend forced by the innermost ``use_backend`` ("auto" when none)."""
    return _state["backend"]


def select_backend(tensor: torch.Tensor) -> str:
    """Resolve the backend for an op whose inputs live on ``tensor.device``.

    Returns ``"triton"`` or ``"torch"``; raises ``RuntimeError`` when Triton is forced
    where it cannot run.
    """
    choice = _state["backend"]
    if choice == "torch":
        return "torch"
    on_cuda = tensor.is_cuda
    if choice == "auto":
        return "triton" if on_cuda and _TRITON else "torch"
    if not _TRITON:
        raise RuntimeError("use_backend('triton'): the triton package is not installed")
    if not on_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"use_backend('triton'): tensors are on {tensor.device}, and Triton kernels run there "
            "only under the interpreter; set TRITON_INTERPRET=1 before importing triton, or use "
            "CUDA tensors, or use_backend('auto'|'torch')"
        )
    return "triton"


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (the arithmetic dtype of every op)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def run_reference(fn: Callable[..., Any], *args: Any, out_dtype: torch.dtype, **kwargs: Any) -> Any:
    """Call a ``reference`` function with float inputs upcast to the compute dtype and cast
    every float output to ``out_dtype`` (the dtype of ``means`` by the spec)."""
    dtypes: list[torch.dtype] = []
    _map((args, kwargs), lambda t: dtypes.append(t.dtype) or t)
    cdt = compute_dtype(*dtypes)
    out = fn(*_map(args, lambda t: t.to(cdt)), **_map(kwargs, lambda t: t.to(cdt)))
    return _map(out, lambda t: t.to(out_dtype))
