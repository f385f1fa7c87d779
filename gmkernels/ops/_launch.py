"""Launcher helpers shared by the op families: when to run the kernels, flattened views of
``(*B, K, C, H, W)`` tensors, 64-bit offset detection, and the one per-shape cache of launch
plans (:func:`planned_args`).

The path of a public op, the same in every family::

    public function      validates once, picks the backend once (kernels_wanted)
      -> reference       torch path: reference/<family>.py through run_reference
      -> the op          Triton path: a torch.library.custom_op "gmkernels::<op>" (the name the
                         profiler shows; a fake for torch.compile, which sees one opaque node;
                         register_autograd where the op trains)
         -> launcher     planned_args: views, grid, integer arguments, constexprs
            -> kernel[grid](...)

The ops are opaque to torch.compile rather than ``triton_op`` + ``wrap_triton`` or dynamo's
tracing of user kernels: both of those trace the launcher itself, which the Triton interpreter
cannot serve (the CPU test suite compiles every op), and the plain custom op dispatches faster.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from .. import _dispatch
from .._dispatch import select_backend

try:
    import triton
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

LOG2E = 1.4426950408889634
I32_MAX = 2**31 - 1

#: ``(major, minor)`` of the installed triton (``None`` without it): the layout choices that
#: differ between compiler versions key on it.
TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2]) if triton is not None else None
#: Triton before 3.9 (3.6 checked) lays a ``(K, C, pixels)`` tile with the threads along K when
#: the tile has no contiguous axis (packed 2-D points) or its channels span several tiles or warps,
#: where 3.9 keeps one pixel per thread: cross-thread reductions and spills. The launchers that
#: meet such tiles stream one component at a time or do not pack there.
THREADS_ALONG_K = TRITON_VERSION is not None and TRITON_VERSION < (3, 9)


def kernels_wanted(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these inputs: the backend is Triton (what
    ``select_backend`` decides, written out here since every op call asks: "auto" on CUDA with
    triton installed, or "triton" forced where it can run; forced where it cannot,
    ``select_backend`` raises the error that says why), no input is float64 (the kernels compute
    in float32; float64 stays on the exact torch path) and no input needs a gradient (the
    kernels are inference-only; the torch path is differentiable)."""
    choice, first = _dispatch._state["backend"], tensors[0]
    if choice == "torch":
        return False
    if choice == "auto":
        if not (first.is_cuda and _dispatch._TRITON):
            return False
    elif not (_dispatch._TRITON and (first.is_cuda or _dispatch._INTERPRETED)):
        select_backend(first)
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype is torch.float64 or (grad and t.requires_grad):
            return False
    return True


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


#: every plan cache (their ``cache_info()`` shows hits and misses)
PLAN_FUNCTIONS: list = []


class PlanCacheInfo(NamedTuple):
    """Statistics of a :class:`PlanCache`, as ``functools.lru_cache``'s ``cache_info()``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class PlanCache:
    """Per-shape launch plans of one launcher: ``get(key, build)`` returns the plan stored
    under ``key`` (a tuple of sizes, strides, dtypes and flags) or stores ``build()``'s. A plan holds everything a launch derives from metadata -- blocks,
    grid, the kernel's integer arguments (strides of the flattened views included), the int64
    flag -- so a repeated call passes its tensors' data and the stored integers and computes
    nothing. Bounded: past ``maxsize`` plans the oldest is dropped. ``cache_info()`` as an
    ``lru_cache``'s (registered in :data:`PLAN_FUNCTIONS`)."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self.plans: dict = {}
        self.hits = self.misses = 0
        PLAN_FUNCTIONS.append(self)

    def store(self, key: tuple, plan: Any) -> Any:
        """Store ``plan`` under ``key`` (a miss: the caller found no plan in ``plans``)."""
        self.misses += 1
        if len(self.plans) >= self.maxsize:
            self.plans.pop(next(iter(self.plans)), None)
        self.plans[key] = plan
        return plan

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The plan stored under ``key``, or ``build()``'s, stored."""
        plan = self.plans.get(key)
        if plan is None:
            return self.store(key, build())
        self.hits += 1
        return plan

    def cache_info(self) -> "PlanCacheInfo":
        return PlanCacheInfo(self.hits, self.misses, self.maxsize, len(self.plans))


#: results of validations that depend only on metadata (:func:`checked_once`)
CHECKED = PlanCache()


def checked_once(tag: str, check: Callable[[], Any], *tensors: Any) -> Any:
    """``check()``, a validation whose outcome depends only on the types, shapes, dtypes and
    devices of ``tensors`` (``tag`` names it), run once per such metadata with its result
    stored in :data:`CHECKED` when every one is a plain tensor; anything else (a subclass, a
    missing entry) is checked on every call. A failing check raises and stores nothing."""
    key = [tag]
    for t in tensors:
        if type(t) is not torch.Tensor:
            return check()
        key.append((t.shape, t.dtype, t.device))
    return CHECKED.get(tuple(key), check)


def same_data(views: tuple, tensors: tuple) -> bool:
    """True when every view starts at its tensor's first element, i.e. the flattening made no
    copy: the kernel may then be handed the original tensor (Triton reads a tensor argument's
    data pointer and dtype only) with the view's strides from a stored plan."""
    return all(v.data_ptr() == t.data_ptr() and v.dtype == t.dtype for v, t in zip(views, tensors))


def _planned(args_fn: Callable, tensors: tuple, extra: tuple) -> tuple:
    views, grid, ints, options = args_fn(*tensors, *extra)
    return same_data(views, tensors), grid, ints, options


def planned_args(cache: PlanCache, args_fn: Callable, tensors: tuple, *extra: Any, n_key: int | None = None) -> tuple:
    """``(tensors, grid, ints, options)`` for ``kernel[grid](*tensors, *ints, ..., **options)``:
    the one way a launcher gets its launch plan.

    ``args_fn(*tensors, *extra)`` computes them from scratch: the kernel's tensor arguments
    (views of ``tensors``, one each, in order), grid, integer arguments and options
    (constexprs, ``num_warps``). Its result is stored in ``cache`` under the device and the
    sizes, strides and dtypes of the first ``n_key`` tensors (all by default; the rest must be
    outputs the launcher allocated contiguous, with shapes and dtypes that follow from the
    keyed ones and ``extra``) and the hashable ``extra``; a repeated call then hands the kernel
    the ``tensors`` themselves (when the views made no copy, :func:`same_data`) with the stored
    rest. When a view copied, ``args_fn`` runs again. Tensors that are not plain
    ``torch.Tensor`` (the fake and functional tensors of a torch.compile trace) are planned
    from scratch and never stored."""
    for t in tensors:
        if type(t) is not torch.Tensor:
            return args_fn(*tensors, *extra)
    key = [tensors[0].device]
    for t in tensors if n_key is None else tensors[:n_key]:
        key.append((t.shape, t.stride(), t.dtype))
    key = (*key, *extra)
    plan = cache.plans.get(key)
    if plan is None:
        plan = cache.store(key, _planned(args_fn, tensors, extra))
    else:
        cache.hits += 1
    pure, grid, ints, options = plan
    if pure:
        return tensors, grid, ints, options
    return args_fn(*tensors, *extra)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when an element offset of one of these (strided) tensors may exceed int32."""
    for t in tensors:
        if t.numel() >= I32_MAX:
            return True
        if not t.is_contiguous() and sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= I32_MAX:
            return True
    return False
