"""Launcher helpers shared by the op families: when to run the kernels, flattened views of
``(*B, K, C, H, W)`` tensors, 64-bit offset detection, the block-size heuristic, and the
host-cost side of a launch.

Host cost (``python -m gmkernels_bench.host_cost`` measures it per public op with the kernel
launch stubbed): a repeated call with the same shapes recomputes no launch plan. Block-size
heuristics are memoised per argument tuple (:func:`launch_plan`, a bounded LRU cache: they
are pure functions of sizes and flags), ``cdiv``/``next_pow2`` are plain integer arithmetic
(``triton.cdiv`` is a ``constexpr_function`` costing 6-11 µs per call from Python), the int64
test is free for contiguous tensors, and :func:`call_op` calls a custom op's implementation
directly in plain eager mode (the dispatcher's custom-op layers cost ~50 µs per call).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch._library.custom_ops import OPDEFS

from .._dispatch import select_backend

try:
    import triton
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

LOG2E = 1.4426950408889634
I32_MAX = 2**31 - 1


def kernels_wanted(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these inputs: ``select_backend`` says
    ``"triton"``, no input is float64 (the kernels compute in float32; float64 stays on the
    exact torch path) and no input needs a gradient (the kernels are inference-only; the
    torch path is differentiable)."""
    if select_backend(tensors[0]) == "torch":
        return False
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def gm_views(means: torch.Tensor, logweights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``means (*B, K, C, H, W) -> (R, K, C, P)`` and ``logweights (*B, K, 1, H, W) -> (R, K, P)``
    with ``R = prod(*B)``, ``P = H * W``: views whenever the strides allow, any strides
    included; ``reshape`` copies only when the batch axes or H and W cannot be merged (e.g. a
    transposed spatial layout, or a slice with a step along a batch axis)."""
    *batch, K, C, H, W = means.shape
    R = math.prod(batch)
    return means.reshape(R, K, C, H * W), logweights.reshape(R, K, H * W)


def per_row(t: torch.Tensor, R: int, P: int) -> torch.Tensor:
    """A per-batch ``(*B, 1, .., 1)`` or per-pixel ``(*B, 1, .., H, W)`` quantity as an
    ``(R, P)`` view (stride 0 along the pixels when it is per batch)."""
    return t.reshape(R, -1).expand(R, P)


def pixel_rows(*views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """When every pixel axis (the last) has size 1 (point data, ``H = W = 1``), swap it with the
    row axis (the first) so the batch becomes the pixel axis of the kernel's block. Views only."""
    if views[0].shape[0] > 1 and views[0].shape[-1] == 1:
        return tuple(v.transpose(0, -1) for v in views)
    return views


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` without its per-call wrapper cost)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


#: every memoised launch-plan function (their ``cache_info()`` shows hits and misses)
PLAN_FUNCTIONS: list = []


def launch_plan(fn: Callable) -> Callable:
    """Memoise a launch-plan function (block sizes, warps, grid) of hashable arguments
    (sizes, flags): a repeated shape costs one dictionary lookup. Bounded LRU: a workload
    sweeping many shapes keeps the most recent 4096 per function."""
    cached = functools.lru_cache(maxsize=4096)(fn)
    PLAN_FUNCTIONS.append(cached)
    return cached


@functools.lru_cache(maxsize=4096)
def _extent_needs_int64(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    return sum((n - 1) * abs(st) for n, st in zip(shape, stride)) >= I32_MAX


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when an element offset of one of these (strided) tensors may exceed int32."""
    for t in tensors:
        if t.numel() >= I32_MAX:
            return True
        if not t.is_contiguous() and _extent_needs_int64(tuple(t.shape), t.stride()):
            return True
    return False


_DIRECT: dict[Any, Callable] = {}


def _plain_eager(args: tuple) -> bool:
    """True when nothing but the implementation itself would act on this call: not traced by
    torch.compile, no dispatch or function mode, no functorch transform, plain tensors, and
    no tensor argument that autograd must track."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or (grad and a.requires_grad)):
            return False
    return True


def call_op(op: Any, *args: Any) -> Any:
    """``op(*args)`` for a ``torch.library.custom_op`` (the ``torch.ops.gmkernels.<name>``
    packet), minus the dispatcher when the call is plain eager (:func:`_plain_eager`): then the
    op's Python implementation runs directly, which is what the dispatcher would end up
    running, without its custom-op layers (autograd wrapper, redispatch, the dynamo-disable
    wrapper: ~50 µs of host time per call). Traced, transformed, mode-observed or
    autograd-tracked calls go through the dispatcher as before. A direct call does not show up
    under the op's name in ``torch.profiler`` traces."""
    if _plain_eager(args):
        impl = _DIRECT.get(op)
        if impl is None:
            opdef = OPDEFS.get(op._qualified_op_name)
            impl = _DIRECT[op] = getattr(opdef, "_init_fn", op)
        return impl(*args)
    return op(*args)
