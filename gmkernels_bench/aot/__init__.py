"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

Nothing here runs when ``gmkernels`` is imported: the cases are collected when asked
(``compile_report``, ``tests/test_aot.py``). Each op family has a module here,
``gmkernels_bench.aot.<family>`` (listed in ``FAMILIES``), that defines

* ``aot_cases(B, K, C, H, W) -> list[AotCase]``: every kernel its launchers run for a GM of
  shape ``(B, K, C, H, W)`` (one sample per pixel, contiguous inputs), fp32 and bf16. Build them
  with ``launch_cases``: it runs the family's real launcher on ``meta`` tensors (``meta_gm``)
  with every Triton launch recorded instead of run, and turns each recorded launch into a case
  exactly as Triton's launcher would specialise it (constexprs, ``num_warps``, ``num_stages``,
  integers of 1 as constants, divisibility by 16, the grid). Nothing is copied from the
  launcher, so the report cannot drift from what a launch compiles. Name the cases
  ``f"{op}[{shape_tag(...)}]"``.
* ``bench_cases()``: the cases at the benchmark shapes (the fast subset the test suite compiles).

A kernel names the pixel count of one row of its pixel axis ``P`` or ``HW``, and one that packs
several rows into that axis says so with a ``PACK`` constexpr: the report's points per program
(``AotCase.pixels_per_program``) reads them.

``compile_case`` compiles one case for ``sm_80`` / ``sm_90`` with ``triton.compile`` and reads
from the cubin (``cuobjdump`` / ``nvdisasm`` ship with the triton wheel): registers, spills
(local memory), shared memory, the bytes of the static global loads and the share of them
made by 128-bit loads, and for the hottest loop (the largest innermost loop of the SASS)
its instructions, barriers, shuffles and shared-memory accesses, and keeps the SASS with its
line table (``AotResult.sass``) for the performance model. ``python -m
gmkernels_bench.compile_report`` prints the table; the test suite fails on a spill.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

FAMILIES = (
    "mixture",
    "product",
    "posterior",
    "transition",
    "guidance",
    "likelihood",
    "sampling",
    "inverse_cdf",
    "solver_steps",
    "policy",
)

#: named shape sets ``(B, K, C, H, W)`` for ``compile_report --shapes``
SHAPE_SETS = {
    "bench": ((256, 8, 4, 32, 32), (32, 256, 4, 32, 32)),
    "users": (
        (256, 8, 4, 32, 32),  # ImageNet latents
        (1, 8, 4, 32, 32),  # small batches
        (8, 8, 4, 32, 32),
        (2, 8, 4, 8, 8),  # small images: the shapes users try first
        (1, 4, 4, 16, 16),
        (32, 256, 4, 32, 32),  # large K
        (8, 1024, 4, 16, 16),
        (64, 32, 4, 32, 32),  # pi-Flow policies
        (2, 8, 16, 96, 170),  # FLUX at 1360x768
        (1, 8, 16, 134, 240),  # Qwen-Image at 1080p
        (2, 8, 32, 64, 64),  # C = 32
        (1, 16, 64, 32, 32),  # C = 64
        (100000, 64, 2, 1, 1),  # 2-D points
    ),
}


@dataclass(frozen=True)
class AotCase:
    """One kernel specialisation to compile.

    ``signature`` maps every argument name to a Triton type (``"*fp32"``, ``"*bf16"``, ``"i32"``,
    ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the constexpr values;
    ``divisible`` names the arguments Triton may assume divisible by 16 (pointers and
    strides of contiguous inputs, as its launcher specialises them at run time).
    ``num_stages=None`` compiles with Triton's default, which is what a launch that passes no
    ``num_stages`` gets. ``pixels`` is the number of pixels one program owns (default:
    ``pixels_per_program``), for the thread-instructions-per-pixel column; ``row_pixels`` the
    pixels of one row of the kernel's pixel axis (its ``P`` or ``HW`` argument) when the case
    was recorded from a launch; ``grid`` the launch grid then.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: Optional[int] = None
    divisible: tuple[str, ...] = field(default_factory=tuple)
    pixels: Optional[int] = None
    grid: tuple[int, ...] = ()
    row_pixels: Optional[int] = None

    @property
    def pixels_per_program(self) -> int:
        """The pixels one program really covers: its ``BLOCK_P`` lanes, of which only the row's
        ``row_pixels`` are live when that row is shorter, unless the kernel packs rows into
        its pixel axis (a true ``PACK`` constexpr: every lane may hold another row)."""
        if self.pixels is not None:
            return self.pixels
        block = int(self.constexprs.get("BLOCK_P", 1))
        if self.row_pixels is None or self.constexprs.get("PACK"):
            return block
        return min(block, self.row_pixels)


@dataclass(frozen=True)
class LoopStats:
    """The hottest loop of a kernel's SASS: instructions, ``BAR`` barriers, ``SHFL`` shuffles
    and shared-memory accesses (``LDS``/``STS``/``LDSM``/``ATOMS``) per iteration."""

    instructions: int
    barriers: int
    shuffles: int
    smem_ops: int


@dataclass(frozen=True)
class AotResult:
    name: str
    arch: int
    registers: int
    local_bytes: int
    shared_bytes: int
    global_load_bytes: int  # per thread, over the static LDG instructions
    global_load_bytes_128: int  # of which by 128-bit LDGs
    loop: Optional[LoopStats]
    threads: int
    pixels: int
    #: ``nvdisasm -c -gi`` of the cubin (with the source line of every instruction, inlining
    #: included), for ``gmkernels_bench.perfmodel.sass_profile``
    sass: str = field(default="", repr=False, compare=False)

    @property
    def share_128(self) -> float:
        """Share of the loaded bytes (not of the instructions) that 128-bit loads carry."""
        return self.global_load_bytes_128 / self.global_load_bytes if self.global_load_bytes else 1.0

    @property
    def thread_instructions_per_pixel(self) -> Optional[float]:
        """Hottest-loop instructions x threads / pixels per program: the issue cost of one loop
        iteration, per pixel."""
        return self.loop.instructions * self.threads / self.pixels if self.loop else None


def shape_tag(B: int, K: int, C: int, H: int, W: int, dtype: str) -> str:
    return f"B{B},K{K},C{C},{H}x{W},{dtype}"


AOT_DTYPES = ("fp32", "bf16")  #: the dtypes every family compiles


def meta_gm(B: int, K: int, C: int, H: int, W: int, dtype: str) -> dict:
    """A contiguous GM ``{means (B, K, C, H, W), logstds (B, 1, 1, 1, 1), logweights (B, K, 1, H, W)}``
    of ``dtype`` (``"fp32"`` / ``"bf16"``) on the ``meta`` device: shapes and strides, no memory."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return {
        "means": torch.empty((B, K, C, H, W), dtype=dt, device="meta"),
        "logstds": torch.empty((B, 1, 1, 1, 1), dtype=dt, device="meta"),
        "logweights": torch.empty((B, K, 1, H, W), dtype=dt, device="meta"),
    }


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Within the block, every Triton launch (``kernel[grid](...)``, compiled or interpreted)
    records ``(kernel, grid, args, kwargs)`` in the yielded list instead of running."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list = []

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append((self, tuple(grid), args, kwargs))

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    try:
        for cls in originals:
            cls.run = run
        yield launches
    finally:
        for cls, fn in originals.items():
            cls.run = fn


def case_from_launch(name: str, kernel: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> AotCase:
    """The specialisation Triton's launcher compiles for ``kernel[grid](*args, **kwargs)``."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction

    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # triton < 3.5 specialises in Python, with the backend's divisibility rule
        from triton.runtime.jit import create_specialize_impl

        python_impl = create_specialize_impl(BaseBackend.get_arg_specialization)

        def native_specialize_impl(backend, arg, is_const, specialize, align):
            return python_impl(arg, is_const, specialize, align)

    if not isinstance(kernel, JITFunction):  # recorded under TRITON_INTERPRET=1: the same function, compilable
        kernel = JITFunction(kernel.fn)
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    num_stages = kwargs.pop("num_stages", None)
    values = dict(zip(kernel.arg_names, args), **kwargs)
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    divisible = []
    for p in kernel.params:
        v = values[p.name] if p.name in values else p.default
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        ty, key = native_specialize_impl(
            BaseBackend, v, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        if ty == "constexpr":
            sig[p.name], consts[p.name] = "constexpr", key
        else:
            sig[p.name] = ty
            if key == "D":
                divisible.append(p.name)
    row = next((values[n] for n in ("P", "HW") if isinstance(values.get(n), int)), None)
    return AotCase(name, kernel, sig, consts, num_warps, num_stages, tuple(divisible), grid=grid, row_pixels=row)


#: callbacks ``(name, kernel, grid, args, kwargs)`` that ``launch_cases`` hands every recorded
#: launch to (``observe_launches``)
_OBSERVERS: list[Callable[..., None]] = []


@contextlib.contextmanager
def observe_launches(fn: Callable[..., None]) -> Iterator[None]:
    """Within the block, ``launch_cases`` also calls ``fn(case_name, kernel, grid, args,
    kwargs)`` for every launch it records, with the launch's own (``meta``) arguments: how
    ``gmkernels_bench.traffic`` replays the launches of a family's ``aot_cases``."""
    _OBSERVERS.append(fn)
    try:
        yield
    finally:
        _OBSERVERS.remove(fn)


def launch_cases(name: str, launcher: Callable[..., Any], *args: Any, **kwargs: Any) -> list[AotCase]:
    """Run ``launcher(*args, **kwargs)`` (on ``meta`` tensors) with every launch recorded; one
    case per launch, named ``name`` (``name#i`` when it launches more than once)."""
    with recording() as launches:
        launcher(*args, **kwargs)
    tags = [name] if len(launches) == 1 else [f"{name}#{i}" for i in range(len(launches))]
    for tag, launch in zip(tags, launches):
        for fn in list(_OBSERVERS):
            fn(tag, *launch)
    return [case_from_launch(t, *launch) for t, launch in zip(tags, launches)]


def _family_modules() -> Iterator[tuple[str, Any]]:
    for fam in FAMILIES:
        yield fam, importlib.import_module(f"{__name__}.{fam}")


def all_cases() -> list[AotCase]:
    """Every family's ``bench_cases()`` (the benchmark shapes)."""
    cases: list[AotCase] = []
    for _, mod in _family_modules():
        cases.extend(mod.bench_cases())
    return cases


def shape_cases(B: int, K: int, C: int, H: int, W: int) -> list[AotCase]:
    """Every family's ``aot_cases`` at ``(B, K, C, H, W)``."""
    cases: list[AotCase] = []
    for _, mod in _family_modules():
        cases.extend(mod.aot_cases(B, K, C, H, W))
    return cases


def bench_shape_cases(aot_cases: Callable[..., list[AotCase]]) -> list[AotCase]:
    """``aot_cases`` at each benchmark shape (``SHAPE_SETS["bench"]``)."""
    return [c for shape in SHAPE_SETS["bench"] for c in aot_cases(*shape)]


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_INSTR = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_LDG_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _ldg_bytes(opcode: str) -> int:
    """Bytes per thread of one ``LDG`` (``LDG.E.128``: 16, ``LDG.E.U16``: 2, ``LDG.E``: 4)."""
    return next((_LDG_BYTES[part] for part in opcode.split(".") if part in _LDG_BYTES), 4)


def sass_stats(sass: str) -> tuple[int, int, Optional[LoopStats]]:
    """``(global load bytes, of which 128-bit, hottest loop)`` of ``nvdisasm -c`` output.

    A loop is a label and a branch back to it; the hottest loop is the innermost one (holding no
    other loop) with the most instructions, the branch included (``None`` without a loop)."""
    ops: list[str] = []
    labels: dict[str, int] = {}
    back_edges: list[tuple[str, int]] = []
    for line in sass.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            labels[lab.group(1)] = len(ops)
            continue
        ins = _INSTR.search(line)
        if not ins:
            continue
        opcode, rest = ins.group(1), ins.group(2)
        if opcode == "BRA":
            tgt = _TARGET.search(rest)
            if tgt:
                back_edges.append((tgt.group(1), len(ops)))
        ops.append(opcode)
    loops = [(labels[t], j) for t, j in back_edges if t in labels and labels[t] < j]
    inner = [(i, j) for i, j in loops if not any((a, b) != (i, j) and i <= a and b <= j for a, b in loops)]
    hot = None
    if inner:
        i, j = max(inner, key=lambda ij: ij[1] - ij[0])
        body = ops[i : j + 1]
        hot = LoopStats(
            instructions=len(body),
            barriers=sum(op.startswith("BAR") for op in body),
            shuffles=sum(op.startswith("SHFL") for op in body),
            smem_ops=sum(op.split(".")[0] in ("LDS", "STS", "LDSM", "ATOMS") for op in body),
        )
    ldg = [_ldg_bytes(op) for op in ops if op.startswith("LDG")]
    return sum(ldg), sum(b for b in ldg if b == 16), hot


def compile_case(case: AotCase, arch: int) -> AotResult:
    """Compile ``case`` for ``sm_<arch>`` and read its resource usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(case.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case.divisible}
    src = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    opts: dict[str, Any] = {"num_warps": case.num_warps}
    if case.num_stages is not None:
        opts["num_stages"] = case.num_stages
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-gi", path], capture_output=True, text=True, check=True).stdout

    def field_of(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    ldg_bytes, ldg_128, loop = sass_stats(sass)
    return AotResult(
        name=case.name,
        arch=arch,
        registers=field_of("REG"),
        local_bytes=field_of("LOCAL") + field_of("STACK"),
        shared_bytes=field_of("SHARED"),
        global_load_bytes=ldg_bytes,
        global_load_bytes_128=ldg_128,
        loop=loop,
        threads=32 * case.num_warps,
        pixels=case.pixels_per_program,
        sass=sass,
    )
