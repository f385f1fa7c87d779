"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

Each op family module lists ``AOT_CASES``: the kernels at the constexprs the benchmark
shapes use. ``compile_case`` compiles one for ``sm_80`` / ``sm_90`` with ``triton.compile`` and
reads registers, spills (local memory), shared memory and the share of 128-bit global loads
from the cubin with the ``cuobjdump`` / ``nvdisasm`` that the triton wheel ships. The test
suite fails on a compile error or a spill; ``python -m gmkernels_bench.compile_report``
prints the table.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("mixture", "product", "posterior", "transition", "guidance", "likelihood", "sampling", "inverse_cdf", "solver_steps", "policy")


@dataclass(frozen=True)
class AotCase:
    """One kernel specialisation to compile.

    ``signature`` maps every argument name to a Triton type (``"*fp32"``, ``"*bf16"``, ``"i32"``,
    ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the constexpr values;
    ``divisible`` names the arguments Triton may assume divisible by 16 (pointers and
    strides of contiguous inputs, as its launcher specialises them at run time).
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    divisible: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class AotResult:
    name: str
    arch: int
    registers: int
    local_bytes: int
    shared_bytes: int
    global_loads: int
    global_loads_128: int

    @property
    def share_128(self) -> float:
        return self.global_loads_128 / self.global_loads if self.global_loads else 1.0


def all_cases() -> list[AotCase]:
    """The ``AOT_CASES`` of every op family module that defines them."""
    cases: list[AotCase] = []
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"gmkernels.ops.{fam}")
        except ImportError:
            continue
        cases.extend(getattr(mod, "AOT_CASES", ()))
    return cases


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_case(case: AotCase, arch: int) -> AotResult:
    """Compile ``case`` for ``sm_<arch>`` and read its resource usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(case.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case.divisible}
    src = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    opts = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout

    def field_of(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    loads = re.findall(r"\bLDG\.E(\S*)", sass)
    return AotResult(
        name=case.name,
        arch=arch,
        registers=field_of("REG"),
        local_bytes=field_of("LOCAL") + field_of("STACK"),
        shared_bytes=field_of("SHARED"),
        global_loads=len(loads),
        global_loads_128=sum(1 for s in loads if ".128" in s),
    )
