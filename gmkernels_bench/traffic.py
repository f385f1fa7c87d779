"""Exact memory traffic of Triton launches, counted by the interpreter (``TRITON_INTERPRET=1``).

    with count_traffic() as launches:
        gmkernels.gm_to_mean(gm)                   # CPU tensors, use_backend("triton")
    launches[0].dram_bytes, launches[0].l2_bytes, launches[0].requested_bytes

Within ``count_traffic()`` every interpreted launch (``kernel[grid](...)``) gets a
``LaunchTraffic`` record built from the addresses of its masked loads and stores (the
interpreter's ``create_masked_load`` / ``create_masked_store``, the atomics as both), lane by
lane:

* **requested bytes**: the element size summed over the active lanes (what the kernel asks for);
* **sectors touched** (``l2_bytes`` = 32 x): per executed load or store of a program, the number
  of distinct 32-byte sectors its active lanes touch, summed over instructions and programs.
  A GPU splits a program's access over its warps, so lanes of different warps that share a
  sector count once here, twice on the GPU: a lower bound of the L1->L2 traffic, exact when each
  sector belongs to one warp (the pixel-contiguous layouts of this project);
* **distinct sectors** (``dram_bytes`` = 32 x): the sectors touched at least once by the whole
  launch, loads and stores counted apart: the DRAM traffic from a cold cache with no eviction;
* **distinct bytes**: the distinct addresses x element size (what a byte model counts).

Each figure is also split per argument storage (``LaunchTraffic.storages``, named by the first
kernel argument that points into it), which is how ``estimate`` scales a count made at a small
shape to a large one (``coverage``). With ``lines=True`` the record also has the executions
of every source line of the kernel and its ``@triton.jit`` helpers, keyed by the call chain
``((file, line) of the kernel, ..., (file, line) of the innermost helper)`` (sys.settrace;
slower), which ``estimate`` matches to the SASS line table to count each loop's trips.

``launch_cases_traffic`` counts the launches that ``gmkernels_bench.aot`` records for a
family's ``aot_cases`` (meta tensors): each recorded launch is replayed in the interpreter on
CPU tensors of the same sizes and strides, one storage per argument, filled with values in
(0.1, 0.9).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

SECTOR = 32  # bytes: the unit of L1/L2 <-> DRAM transfers on sm_80 / sm_90


@dataclass
class StorageTraffic:
    """Traffic of one launch into one argument storage (``nbytes`` long)."""

    nbytes: int
    load_bytes: int = 0  # distinct bytes loaded
    store_bytes: int = 0
    load_sectors: int = 0  # distinct sectors loaded
    store_sectors: int = 0
    storage_sectors: int = 0  # sectors the storage spans

    @property
    def load_coverage(self) -> float:
        """Distinct sectors loaded / sectors of the storage (1.0: read once, whole)."""
        return self.load_sectors / self.storage_sectors if self.storage_sectors else 0.0

    @property
    def store_coverage(self) -> float:
        return self.store_sectors / self.storage_sectors if self.storage_sectors else 0.0


@dataclass
class LaunchTraffic:
    """The memory traffic of one launch (see the module docstring)."""

    kernel: str
    grid: tuple[int, int, int] = (1, 1, 1)
    programs: int = 0
    load_requested: int = 0
    store_requested: int = 0
    load_sectors: int = 0  # touched: per program-level instruction, summed
    store_sectors: int = 0
    load_distinct_sectors: int = 0
    store_distinct_sectors: int = 0
    load_distinct_bytes: int = 0
    store_distinct_bytes: int = 0
    load_instructions: int = 0  # program-level tl.load executions, all programs
    store_instructions: int = 0
    storages: dict[str, StorageTraffic] = field(default_factory=dict)
    lines: Counter = field(default_factory=Counter)  # call chain -> executions, all programs (lines=True)
    name: str = ""  # the AOT case name when replayed by launch_cases_traffic
    args: dict[str, Any] = field(default_factory=dict, repr=False)  # the launch's non-tensor arguments
    #: with ``count_traffic(addresses=True)``: ``{"load" | "store": (distinct addresses, their element sizes)}``
    addresses: dict[str, tuple] = field(default_factory=dict, repr=False)

    @property
    def requested_bytes(self) -> int:
        return self.load_requested + self.store_requested

    @property
    def l2_bytes(self) -> int:
        return SECTOR * (self.load_sectors + self.store_sectors)

    @property
    def dram_bytes(self) -> int:
        return SECTOR * (self.load_distinct_sectors + self.store_distinct_sectors)

    @property
    def distinct_bytes(self) -> int:
        return self.load_distinct_bytes + self.store_distinct_bytes

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "name": self.name, "grid": list(self.grid), "programs": self.programs,
                "requested_bytes": self.requested_bytes, "l2_bytes": self.l2_bytes, "dram_bytes": self.dram_bytes,
                "distinct_bytes": self.distinct_bytes, "load_requested": self.load_requested,
                "store_requested": self.store_requested, "load_distinct_bytes": self.load_distinct_bytes,
                "store_distinct_bytes": self.store_distinct_bytes, "load_instructions": self.load_instructions,
                "store_instructions": self.store_instructions,
                "storages": {k: vars(v) for k, v in self.storages.items()}}  # fmt: skip


class _Recorder:
    """Addresses of one launch, reduced when it ends."""

    def __init__(self, kernel: str, storages: list[tuple[str, int, int]], keep: bool = False):
        self.keep = keep
        self.rec = LaunchTraffic(kernel)
        self.storages = sorted(storages, key=lambda s: s[1])  # (name, start, nbytes)
        self.addrs: dict[str, list[np.ndarray]] = {"load": [], "store": []}
        self.sizes: dict[str, list[np.ndarray]] = {"load": [], "store": []}

    def access(self, kind: str, ptrs: np.ndarray, mask: np.ndarray, elem: int) -> None:
        addr = np.asarray(ptrs, dtype=np.uint64)
        m = np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)
        live = addr[m].astype(np.int64)
        r = self.rec
        if kind == "load":
            r.load_instructions += 1
            r.load_requested += live.size * elem
        else:
            r.store_instructions += 1
            r.store_requested += live.size * elem
        if live.size == 0:
            return
        touched = np.unique(live // SECTOR).size
        if kind == "load":
            r.load_sectors += touched
        else:
            r.store_sectors += touched
        self.addrs[kind].append(live)
        self.sizes[kind].append(np.full(live.size, elem, dtype=np.int64))

    def finish(self) -> LaunchTraffic:
        r = self.rec
        starts = np.array([s[1] for s in self.storages], dtype=np.int64)
        for name, start, nbytes in self.storages:
            first = start // SECTOR
            last = (start + max(nbytes, 1) - 1) // SECTOR
            r.storages.setdefault(name, StorageTraffic(nbytes, storage_sectors=int(last - first + 1)))
        for kind in ("load", "store"):
            if not self.addrs[kind]:
                continue
            addr = np.concatenate(self.addrs[kind])
            size = np.concatenate(self.sizes[kind])
            uniq, idx = np.unique(addr, return_index=True)
            usize = size[idx]
            if self.keep:
                r.addresses[kind] = (uniq, usize)
            sectors = np.unique(uniq // SECTOR)
            setattr(r, f"{kind}_distinct_bytes", int(usize.sum()))
            setattr(r, f"{kind}_distinct_sectors", int(sectors.size))
            if not self.storages:
                continue
            # attribute to the storage that holds the address (the last start at or below it)
            which = np.searchsorted(starts, uniq, side="right") - 1
            for i, (name, start, nbytes) in enumerate(self.storages):
                sel = (which == i) & (uniq < start + max(nbytes, 1))
                if not sel.any():
                    continue
                st = r.storages[name]
                setattr(st, f"{kind}_bytes", getattr(st, f"{kind}_bytes") + int(usize[sel].sum()))
                setattr(
                    st, f"{kind}_sectors", getattr(st, f"{kind}_sectors") + int(np.unique(uniq[sel] // SECTOR).size)
                )
        return r


def _storages(arg_names: list[str], args: tuple, kwargs: dict) -> list[tuple[str, int, int]]:
    """``(name, start address, nbytes)`` of every distinct tensor storage among the arguments."""
    import torch

    seen: dict[int, tuple[str, int, int]] = {}
    named = list(zip(arg_names, args)) + list(kwargs.items())
    for name, v in named:
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            st = v.untyped_storage()
            if st.data_ptr() not in seen:
                seen[st.data_ptr()] = (name, st.data_ptr(), st.nbytes())
    return list(seen.values())


_STATEMENTS: dict[str, dict[int, int]] = {}


def statement_line(filename: str, line: int) -> int:
    """The first line of the innermost statement of ``filename`` that holds ``line`` (the
    header's first line for ``for`` / ``if`` / ``while``): how a multi-line statement is counted
    once per execution, and how the SASS line table (which names any line of a statement) is
    matched to those counts."""
    table = _STATEMENTS.get(filename)
    if table is None:
        import ast

        table = {}
        try:
            with open(filename) as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError):
            tree = None
        if tree is not None:
            for node in ast.walk(tree):  # breadth first: inner statements overwrite outer ones
                if isinstance(node, ast.stmt):
                    end = node.end_lineno or node.lineno
                    body = getattr(node, "body", None)
                    if (
                        isinstance(body, list)
                        and body
                        and isinstance(body[0], ast.stmt)
                        and not isinstance(node, (ast.FunctionDef, ast.ClassDef))
                    ):
                        end = body[0].lineno - 1  # a compound statement: its header
                    for ln in range(node.lineno, max(end, node.lineno) + 1):
                        table[ln] = node.lineno
        _STATEMENTS[filename] = table
    return table.get(line, line)


class _LineTracer:
    """Per-statement execution counts of the interpreted kernel and its jit helpers, keyed by
    call chain (outermost first) of ``(file, first line of the statement)``: Python's line
    events of one multi-line statement are counted once."""

    def __init__(self, counts: Counter):
        from triton.runtime.interpreter import InterpretedFunction

        self.counts = counts
        self.jit_codes: dict[Any, bool] = {}
        self.prefix: dict[int, tuple] = {}
        self._IF = InterpretedFunction

    def _is_jit(self, frame) -> bool:
        code = frame.f_code
        hit = self.jit_codes.get(code)
        if hit is None:
            hit = isinstance(frame.f_globals.get(code.co_name), self._IF)
            self.jit_codes[code] = hit
        return hit

    def __call__(self, frame, event, arg):  # the global trace function: 'call' events only
        if not self._is_jit(frame):
            return None
        parent = frame.f_back
        while parent is not None and id(parent) not in self.prefix:
            parent = parent.f_back
        if parent is None:
            base: tuple = ()
        else:
            pf = parent.f_code.co_filename
            base = self.prefix[id(parent)] + ((pf, statement_line(pf, parent.f_lineno)),)
        self.prefix[id(frame)] = base
        counts = self.counts
        filename = frame.f_code.co_filename
        last = [0]

        def local(f, ev, a):
            if ev == "line":
                stmt = statement_line(filename, f.f_lineno)
                if stmt != last[0]:
                    counts[base + ((filename, stmt),)] += 1
                last[0] = stmt
            elif ev == "return":
                self.prefix.pop(id(f), None)
            return local

        return local


@contextlib.contextmanager
def count_traffic(lines: bool = False, addresses: bool = False) -> Iterator[list[LaunchTraffic]]:
    """Within the block, every interpreted Triton launch runs as usual and appends its
    ``LaunchTraffic`` to the yielded list. Needs ``TRITON_INTERPRET=1`` (the kernels are
    ``InterpretedFunction``); ``lines=True`` also counts source-line executions,
    ``addresses=True`` keeps each launch's distinct addresses (``union_bytes``)."""
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

    launches: list[LaunchTraffic] = []
    current: list[Optional[_Recorder]] = [None]
    orig_run = InterpretedFunction.run
    orig_load, orig_store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
    orig_rmw, orig_cas = InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas
    orig_idx = InterpreterBuilder.set_grid_idx

    def elem(ptrs) -> int:
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        if current[0] is not None:
            current[0].access("load", ptrs.data, mask.data, elem(ptrs))
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        if current[0] is not None:
            current[0].access("store", ptrs.data, mask.data, elem(ptrs))
        return orig_store(self, ptrs, value, mask, cache_policy)

    def rmw(self, rmwOp, ptr, val, mask, sem, scope):
        if current[0] is not None:
            for kind in ("load", "store"):
                current[0].access(kind, ptr.data, mask.data, elem(ptr))
        return orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    def cas(self, ptr, cmp, val, sem, scope):
        if current[0] is not None:
            for kind in ("load", "store"):
                current[0].access(kind, ptr.data, np.ones(np.shape(ptr.data), bool), elem(ptr))
        return orig_cas(self, ptr, cmp, val, sem, scope)

    def set_grid_idx(self, x, y, z):
        if current[0] is not None:
            current[0].rec.programs += 1
            current[0].rec.grid = tuple(self.grid_dim)
        return orig_idx(self, x, y, z)

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        rec = _Recorder(self.fn.__name__, _storages(self.arg_names, args, kwargs), addresses)
        names = dict(zip(self.arg_names, args), **kwargs)
        rec.rec.args = {k: v for k, v in names.items() if isinstance(v, (int, float, bool))}
        outer, current[0] = current[0], rec
        tracer = None
        old_trace = sys.gettrace()
        if lines:
            tracer = _LineTracer(rec.rec.lines)
            sys.settrace(tracer)
        try:
            out = orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            if lines:
                sys.settrace(old_trace)
            current[0] = outer
        launches.append(rec.finish())
        return out

    InterpretedFunction.run = run
    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
    InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas = rmw, cas
    InterpreterBuilder.set_grid_idx = set_grid_idx
    try:
        yield launches
    finally:
        InterpretedFunction.run = orig_run
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = orig_load, orig_store
        InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas = orig_rmw, orig_cas
        InterpreterBuilder.set_grid_idx = orig_idx


def union_bytes(launches: list[LaunchTraffic], kind: str) -> int:
    """Distinct bytes loaded (``kind="load"``) or stored over several launches (counted with
    ``addresses=True``): what one pass over the data would move."""
    parts = [t.addresses[kind] for t in launches if kind in t.addresses]
    if not parts:
        return 0
    addr = np.concatenate([a for a, _ in parts])
    size = np.concatenate([s for _, s in parts])
    _, idx = np.unique(addr, return_index=True)
    return int(size[idx].sum())


# ---------------------------------------------------------------------------------------------
# replaying the launches that gmkernels_bench.aot records on meta tensors


def materialise(args: tuple, kwargs: dict, seed: int = 0, alias: bool = False) -> tuple[tuple, dict]:
    """``args`` / ``kwargs`` with every ``meta`` tensor replaced by a CPU tensor of the same
    dtype, sizes, strides and storage offset over a CPU storage as long as its meta storage.
    Each argument gets its own storage unless ``alias`` (then tensors that share a meta storage
    share the CPU one): the AOT cases pass one meta GM for what are two GMs at run time (both
    GMs of guidance), so the traffic of each argument is counted apart. Floats are uniform in
    (0.1, 0.9), integers in [1, 1000): values a kernel can run on without ``inf`` / ``NaN``
    control flow or out-of-range gathers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    storages: dict[Any, Any] = {}
    position = [0]

    def move(t: Any) -> Any:
        position[0] += 1
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return t
        st = t.untyped_storage()
        key = id(st) if alias else position[0]
        if key not in storages:
            n = max(st.nbytes() // t.element_size(), 1)
            if t.dtype.is_floating_point:
                flat = (torch.rand(n, generator=gen) * 0.8 + 0.1).to(t.dtype)
            elif t.dtype == torch.bool:
                flat = torch.ones(n, dtype=torch.bool)
            else:
                flat = torch.randint(1, 1000, (n,), generator=gen).to(t.dtype)
            storages[key] = flat.untyped_storage()
        return torch.empty(0, dtype=t.dtype).set_(storages[key], t.storage_offset(), t.shape, t.stride())

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def replay(kernel: Any, grid: tuple, args: tuple, kwargs: dict, lines: bool = False, name: str = "") -> LaunchTraffic:
    """Run one recorded launch (meta tensors) in the interpreter on CPU tensors; its traffic."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("replaying a launch needs TRITON_INTERPRET=1 before triton is imported")
    cargs, ckwargs = materialise(args, kwargs)  # one storage per argument: storages are arguments
    with count_traffic(lines=lines) as launches:
        kernel[grid](*cargs, **ckwargs)
    (rec,) = launches
    rec.name = name
    return rec


def launch_cases_traffic(aot_cases: Callable[..., list], *shape: int, lines: bool = False,
                         only: Optional[Callable[[str], bool]] = None) -> list[LaunchTraffic]:  # fmt: skip
    """The traffic of every launch ``aot_cases(*shape)`` records (``gmkernels_bench.aot``),
    each replayed in the interpreter (``replay``) and named as its AOT case; ``only(name)``
    selects the cases to replay."""
    from gmkernels_bench import aot

    out: list[LaunchTraffic] = []

    def observe(name: str, kernel: Any, grid: tuple, args: tuple, kwargs: dict) -> None:
        if only is None or only(name):
            out.append(replay(kernel, grid, args, kwargs, lines=lines, name=name))

    with aot.observe_launches(observe):
        aot_cases(*shape)
    return out


def kernel_source_hash(*kernels: Any) -> str:
    """A short hash of the source of ``kernels`` and of the modules that define them (their
    jit helpers): the key under which counted traffic may be cached."""
    h = hashlib.sha256()
    for k in kernels:
        fn = getattr(k, "fn", k)
        h.update(inspect.getsource(sys.modules[fn.__module__]).encode())
    return h.hexdigest()[:16]
