"""The static performance model of ``python -m gmkernels_bench.estimate`` (docs/performance-model.md).

Per launch::

    us = max(DRAM bytes / copy bandwidth,                                       "dram"
             issue: the busiest SM's programs x the busiest pipe's cycles,      "issue:<pipe>"
             latency: waves x dependent memory waits per program x latency,     "latency"
             launch cost)                                                       "launch"

* DRAM bytes: the distinct 32-byte sectors a launch touches (``gmkernels_bench.traffic``).
* Issue: the SASS of the launch (``sass_profile``: every instruction's pipe, innermost loop
  and source line chain) with each loop's executions per program counted by the interpreter;
  per pipe, warp-instructions / (rate per SM per clock / 32), and every instruction takes one
  of the 4 issue slots per SM per clock.
* Latency (Little's law): a program waits ``waits`` times per run for a global load it has
  issued (the first use of a register that an ``LDG`` writes; a ``DEPBAR`` of asynchronous copies
  counts ``1 / (stages - 1)``); ``programs resident per SM`` (registers, warps, shared memory,
  block limit) run at once, so ``ceil(programs / (SMs x resident))`` waves each take
  ``waits x latency`` (the latency of a DRAM access, or of an L2 hit for the share of sectors
  the launch re-reads).

Every figure is an estimate until ``gmkernels_bench.gpu_check --calibrate FILE`` has measured the
device constants it uses (copy bandwidth, latency, launch cost): ``Device.measured`` then says
which, where and when.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Optional

# ---------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class Device:
    """The constants of one GPU (docs/performance-model.md#devices has the sources)."""

    name: str
    arch: int  # the SASS target whose compile gives registers and instructions: 80 or 90
    sms: int
    clock_ghz: float  # sustained SM clock under load
    dram_peak_gbs: float  # datasheet
    copy_gbs: float  # copy bandwidth (read + write bytes / s) a copy kernel reaches
    l2_mb: float
    l2_gbs: float  # L2 hit bandwidth
    dram_latency_ns: float  # a dependent global load that misses L2 (pointer chase)
    l2_latency_ns: float  # one that hits L2
    launch_us: float  # back-to-back launches of an empty kernel, per launch
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm_kb: float = 164.0  # usable by blocks (one KiB more is reserved per block)
    #: thread-operations per SM per clock of each pipe (CUDA C++ Programming Guide, "Arithmetic
    #: Instructions"); "lsu" is in bytes per SM per clock (L1 wavefronts of 128 B)
    pipes: tuple[tuple[str, float], ...] = ()
    issue_per_clock: float = 4.0  # warp-instructions per SM per clock (4 schedulers)
    measured: tuple[tuple[str, str], ...] = ()  # (constant, "where, when") after a calibration

    def rate(self, pipe: str) -> float:
        return dict(self.pipes)[pipe]

    def label(self) -> str:
        return f"{self.name} ({'calibrated: ' + ', '.join(k for k, _ in self.measured) if self.measured else 'uncalibrated estimate'})"


_PIPES_80 = (
    ("fma", 64),
    ("imad", 64),
    ("alu", 64),
    ("mufu", 16),
    ("conv", 16),
    ("fp64", 32),
    ("shfl", 32),
    ("lsu", 128),
)
_PIPES_90 = (
    ("fma", 128),
    ("imad", 64),
    ("alu", 64),
    ("mufu", 16),
    ("conv", 16),
    ("fp64", 64),
    ("shfl", 32),
    ("lsu", 128),
)

#: the constants before any calibration; sources in docs/performance-model.md#devices
DEVICES: dict[str, Device] = {
    "a100": Device("A100-SXM4-80GB", 80, sms=108, clock_ghz=1.41, dram_peak_gbs=2039, copy_gbs=1835, l2_mb=40,
                   l2_gbs=5000, dram_latency_ns=480, l2_latency_ns=200, launch_us=2.5, smem_per_sm_kb=164,
                   pipes=_PIPES_80),
    "h100": Device("H100-SXM5-80GB", 90, sms=132, clock_ghz=1.755, dram_peak_gbs=3352, copy_gbs=3017, l2_mb=50,
                   l2_gbs=7500, dram_latency_ns=560, l2_latency_ns=230, launch_us=2.5, smem_per_sm_kb=228,
                   pipes=_PIPES_90),
    "h200": Device("H200-SXM-141GB", 90, sms=132, clock_ghz=1.755, dram_peak_gbs=4800, copy_gbs=4320, l2_mb=50,
                   l2_gbs=7500, dram_latency_ns=560, l2_latency_ns=230, launch_us=2.5, smem_per_sm_kb=228,
                   pipes=_PIPES_90),
}  # fmt: skip

#: the constants ``gpu_check --calibrate`` measures and refits
CALIBRATED = ("copy_gbs", "dram_latency_ns", "launch_us", "clock_ghz")


def device(name: str, calibration: Optional[dict] = None) -> Device:
    """``DEVICES[name]`` with the constants of ``calibration`` (a ``--calibrate`` file's
    ``devices[name]``) applied and recorded in ``measured``."""
    base = DEVICES[name]
    if not calibration or name not in calibration.get("devices", {}):
        return base
    entry = calibration["devices"][name]
    where = f"{entry.get('gpu', '?')}, {entry.get('when', '?')}"
    values = {k: float(v) for k, v in entry.get("constants", {}).items() if k in CALIBRATED}
    return replace(base, **values, measured=tuple((k, where) for k in sorted(values)))


def load_calibration(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# SASS: pipes, loops, line chains, dependent waits

_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_FILE = re.compile(r'File "([^"]+)", line (\d+)')
_REG = re.compile(r"(?<![A-Z_])R(\d+)(\.64)?")

_PIPE = {
    **dict.fromkeys(("FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I", "HADD2", "HMUL2", "HFMA2", "FMUL2", "FADD2", "FFMA2"), "fma"),
    **dict.fromkeys(("IMAD", "IMUL", "IMAD32I", "IMADSP", "IDP", "IDP4A"), "imad"),
    **dict.fromkeys(("MUFU",), "mufu"),
    **dict.fromkeys(("F2F", "F2I", "I2F", "FRND", "I2I"), "conv"),
    **dict.fromkeys(("DADD", "DMUL", "DFMA", "DSETP", "DMNMX"), "fp64"),
    **dict.fromkeys(("SHFL",), "shfl"),
    **dict.fromkeys(("LDG", "STG", "LD", "ST", "LDS", "STS", "LDSM", "ATOM", "ATOMG", "ATOMS", "RED", "LDGSTS", "LDL", "STL"), "lsu"),
    **dict.fromkeys(("IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "ISETP", "ICMP", "SEL", "FSEL",
                     "FSETP", "FSET", "FMNMX", "IMNMX", "IABS", "LEA", "MOV", "MOV32I", "PRMT", "PLOP3", "P2R", "R2P", "VIADD",
                     "VIMNMX", "VIADDMNMX", "FCHK", "POPC", "FLO", "BMSK", "SGXT", "CS2R", "F2FP", "I2FP", "HSETP2", "HMNMX2",
                     "BREV", "IMNMX", "ISCADD"), "alu"),
}  # fmt: skip
PIPES = ("fma", "imad", "alu", "mufu", "conv", "fp64", "shfl", "lsu")
_NO_DEST = {"STG", "ST", "STS", "STL", "RED", "BRA", "EXIT", "BAR", "RET", "BSSY", "BSYNC", "WARPSYNC", "NOP", "DEPBAR",
            "LDGDEPBAR", "CALL", "MEMBAR", "ERRBAR", "CCTL", "YIELD", "BPT", "KILL"}  # fmt: skip
_ACCESS_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _access_bytes(opcode: str) -> int:
    return next((_ACCESS_BYTES[p] for p in opcode.split(".") if p in _ACCESS_BYTES), 4)


def _regs(text: str) -> set[int]:
    out: set[int] = set()
    for m in _REG.finditer(text):
        r = int(m.group(1))
        out.update((r, r + 1) if m.group(2) else (r,))
    return out


def sass_profile(sass: str, stmt_line=None) -> dict:
    """The model's view of ``nvdisasm -c -gi`` output: ``{"loops": [[first, last, parent], ...],
    "groups": [[loop, chain, {pipe: count}, issue], ...], "waits": [waits outside loops,
    waits per iteration of each loop]}``.

    ``loop`` is the index of the innermost loop (a label and a branch back to it) holding the
    instructions, -1 outside; ``chain`` the source location of the instructions, outermost
    call site first, each ``[file, first line of the statement]`` (``stmt_line(file, line)``
    maps a line to its statement); ``{pipe: count}`` the instructions per pipe (``lsu`` in L1
    wavefronts of 128 bytes per warp) and ``issue`` all instructions of the group. A wait is a
    read of a register that an outstanding ``LDG`` writes (it and every older load then
    complete); a loop's waits are counted in its second iteration, so a load issued in one
    iteration and used in the next (loads issued ahead of use) costs no wait; an inner loop
    completes every outstanding load. ``DEPBAR`` (asynchronous copies) counts as half a wait."""
    instrs: list[tuple[str, str, Optional[tuple]]] = []
    labels: dict[str, int] = {}
    back: list[tuple[str, int]] = []
    chain: Optional[tuple] = None
    group: list[tuple[str, int]] = []  # the //## lines before an instruction: one call level each
    for line in sass.splitlines():
        s = line.strip()
        if s.startswith("//##"):
            loc = _FILE.search(s)
            if loc:
                group.append((loc.group(1), int(loc.group(2))))
            continue
        lab = _LABEL.match(s)
        if lab:
            labels[lab.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        if group:  # innermost first in the listing: the chain is kept outermost first
            chain = tuple((f, stmt_line(f, n) if stmt_line else n) for f, n in reversed(group))
            group = []
        opcode, rest = m.group(3), m.group(4)
        if opcode == "BRA":
            tgt = _TARGET.search(rest)
            if tgt:
                back.append((tgt.group(1), len(instrs)))
        instrs.append((opcode, rest, chain))
    loops = sorted({(labels[t], j) for t, j in back if t in labels and labels[t] < j})
    # innermost loop per instruction; parents
    parent = []
    for a, (i, j) in enumerate(loops):
        outer = [b for b, (p, q) in enumerate(loops) if b != a and p <= i and j <= q]
        parent.append(min(outer, key=lambda b: loops[b][1] - loops[b][0]) if outer else -1)
    inner_of = [-1] * len(instrs)
    for a, (i, j) in sorted(enumerate(loops), key=lambda x: -(x[1][1] - x[1][0])):
        for k in range(i, j + 1):
            inner_of[k] = a
    groups: dict[tuple, list] = {}
    for k, (op, rest, ch) in enumerate(instrs):
        base = op.split(".")[0]
        key = (inner_of[k], ch)
        g = groups.setdefault(key, [dict.fromkeys(PIPES, 0.0), 0])
        pipe = _PIPE.get(base)
        if pipe == "lsu":
            g[0]["lsu"] += (
                max(1.0, 32 * _access_bytes(op) / 128) if base not in ("LDS", "STS", "LDSM", "ATOMS") else 1.0
            )
        elif pipe:
            g[0][pipe] += 1
        g[1] += 1
    waits = _waits(instrs, loops, inner_of)
    return {
        "loops": [[i, j, p] for (i, j), p in zip(loops, parent)],
        "groups": [[lp, [list(x) for x in ch] if ch else None, {p: v for p, v in c.items() if v}, n]
                   for (lp, ch), (c, n) in groups.items()],
        "waits": waits,
        "instructions": len(instrs),
    }  # fmt: skip


def _waits(instrs: list, loops: list, inner_of: list) -> list[float]:
    """``[waits outside loops, waits per iteration of loop 0, 1, ...]`` (see ``sass_profile``)."""

    def run(seq: list[int], pending: list[tuple[int, set]]) -> tuple[float, list]:
        # pending: (round the load was issued in, its registers); a wait on a load issued in
        # the current round starts a new round (one latency); one on an older load costs none
        n = 0.0
        for k in seq:
            if k < 0:  # an inner loop: every outstanding load completes
                pending = []
                continue
            op, rest, _ = instrs[k]
            base = op.split(".")[0]
            if base == "DEPBAR":
                n += 0.5
                continue
            ops = rest.split(",")
            has_dest = base not in _NO_DEST and ops and _REG.match(ops[0].strip())
            srcs = _regs(",".join(ops[1:]) if has_dest else rest)
            hit = max((i for i, (_, regs) in enumerate(pending) if regs & srcs), default=-1)
            if hit >= 0:
                if pending[hit][0] == n:
                    n += 1
                pending = pending[hit + 1 :]
            if base == "LDG" and has_dest:
                r0 = int(_REG.match(ops[0].strip()).group(1))
                width = max(1, _access_bytes(op) // 4)
                pending = pending + [(n, set(range(r0, r0 + width)))]
            elif has_dest:
                dest = _regs(ops[0])
                pending = [(r, regs - dest) for r, regs in pending if regs - dest]
        return n, pending

    def body(a: int) -> list[int]:
        i, j = loops[a]
        seq, k = [], i
        while k <= j:
            b = inner_of[k]
            if b == a:
                seq.append(k)
                k += 1
            else:  # an inner loop: skip it, mark it
                top = b
                while top != -1 and _parent(top) != a:
                    top = _parent(top)
                seq.append(-1)
                k = loops[top][1] + 1 if top != -1 else k + 1
        return seq

    parents: dict[int, int] = {}

    def _parent(b: int) -> int:
        if b not in parents:
            i, j = loops[b]
            outer = [c for c, (p, q) in enumerate(loops) if c != b and p <= i and j <= q]
            parents[b] = min(outer, key=lambda c: loops[c][1] - loops[c][0]) if outer else -1
        return parents[b]

    out = []
    top_seq, k = [], 0
    while k < len(instrs):
        b = inner_of[k]
        if b == -1:
            top_seq.append(k)
            k += 1
        else:
            while _parent(b) != -1:
                b = _parent(b)
            top_seq.append(-1)
            k = loops[b][1] + 1
    out.append(run(top_seq, [])[0])
    for a in range(len(loops)):
        seq = body(a)
        n1, pend = run(seq, [])
        # the second iteration, with the loads the first left outstanding (rounds renumbered)
        n, _ = run(seq, [(r - n1, regs) for r, regs in pend])
        out.append(n)
    return out


# ---------------------------------------------------------------------------------------------
# dynamic counts: each loop's executions per program from the interpreter's line counts


def loop_executions(profile: dict, lines: dict, programs: int) -> list[float]:
    """Executions per program of each loop of ``profile``: the median, over the instructions
    directly in the loop whose source chain the interpreter counted, of that count / programs
    (an inner Python loop unrolled into this SASS loop raises some chains' counts, an ``if``
    lowers others: the median is the loop's own). A loop none of whose chains was counted runs
    as often as its parent (once per program at the top)."""
    loops = profile["loops"]
    counts: dict[int, list[tuple[float, int]]] = {a: [] for a in range(len(loops))}
    for lp, ch, _, n in profile["groups"]:
        if lp < 0 or not ch:
            continue
        key = tuple(tuple(x) for x in ch)
        if key in lines:
            counts[lp].append((lines[key] / max(programs, 1), n))
    out: list[Optional[float]] = [None] * len(loops)

    def get(a: int) -> float:
        if out[a] is None:
            vals = counts[a]
            if vals:
                expanded = sorted(v for v, n in vals for _ in range(min(n, 64)))
                out[a] = float(statistics.median(expanded))
            else:
                p = loops[a][2]
                out[a] = get(p) if p >= 0 else 1.0
        return out[a]

    return [get(a) for a in range(len(loops))]


def dynamic_counts(profile: dict, executions: list[float]) -> tuple[dict[str, float], float, float]:
    """``({pipe: warp-instructions}, issue slots, dependent waits)`` per warp of one program."""
    pipes = dict.fromkeys(PIPES, 0.0)
    issue = 0.0
    for lp, _, c, n in profile["groups"]:
        mult = executions[lp] if lp >= 0 else 1.0
        for p, v in c.items():
            pipes[p] += v * mult
        issue += n * mult
    waits = profile["waits"][0] + sum(w * executions[a] for a, w in enumerate(profile["waits"][1:]))
    return pipes, issue, waits


# ---------------------------------------------------------------------------------------------
# the estimate of one launch


def residency(dev: Device, registers: int, warps: int, shared_bytes: int) -> tuple[int, str]:
    """``(programs resident per SM, what limits it)``: registers (allocated per warp in units of
    256, 4 partitions of ``regs_per_sm / 4``), warps, shared memory (+1 KiB reserved per block),
    the block limit."""
    regs = max(8, math.ceil(max(registers, 1) / 8) * 8)
    warps_by_regs = 4 * ((dev.regs_per_sm // 4) // (regs * 32))
    limits = {  # on a tie the first is named
        "warps": dev.max_warps_per_sm // max(warps, 1),
        "registers": warps_by_regs // max(warps, 1),
        "blocks": dev.max_blocks_per_sm,
    }
    if shared_bytes > 0:
        limits["shared memory"] = int(dev.smem_per_sm_kb * 1024 // (shared_bytes + 1024))
    which = min(limits, key=lambda k: limits[k])
    return max(limits[which], 0), which


def estimate_launch(dev: Device, *, programs: int, warps: int, registers: int, shared_bytes: int,
                    dram_bytes: float, profile: Optional[dict], executions: Optional[list[float]],
                    l2_hit_share: float = 0.0, l2_bytes: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """The terms of one launch on ``dev`` (see the module docstring): ``us``, ``limit``, the
    terms in µs, ``programs_per_sm``, ``residency_limit``, ``waves``, ``copy_share``, ``waits``,
    and ``inputs``: what ``time_terms`` needs to recompute the time with other constants."""
    occ, occ_limit = residency(dev, registers, warps, shared_bytes)
    waves = programs / (dev.sms * occ) if occ else float("inf")
    inputs: dict[str, Any] = {"dram_bytes": dram_bytes, "l2_bytes": l2_bytes, "l2_hit_share": l2_hit_share,
                              "issue_cycles": None, "issue_pipe": None, "latency_waits": None}  # fmt: skip
    waits = 0.0
    if profile is not None and executions is not None and occ:
        pipes, issue, waits = dynamic_counts(profile, executions)
        per_sm = math.ceil(programs / dev.sms)  # the busiest SM's programs
        cycles = {p: v * warps / (dev.rate(p) / 32) for p, v in pipes.items() if p != "lsu"}
        # lsu counts L1 wavefronts (128 B each): the SM moves rate("lsu") bytes per clock
        cycles["lsu"] = pipes["lsu"] * warps * 128 / dev.rate("lsu")
        cycles["slots"] = issue * warps / dev.issue_per_clock
        pipe = max(cycles, key=lambda p: cycles[p])
        inputs.update(issue_cycles=per_sm * cycles[pipe], issue_pipe=pipe, latency_waits=math.ceil(waves) * waits)
    terms = time_terms(inputs, dev) if occ else {"unlaunchable": float("inf")}
    limit = max(terms, key=lambda k: terms[k])
    us = terms[limit]
    copy_us = dram_bytes / (dev.copy_gbs * 1e3)
    return {"us": us, "limit": limit, "terms": terms, "programs_per_sm": occ, "residency_limit": occ_limit,
            "waves": waves, "copy_share": copy_us / us if us > 0 else 0.0, "waits": waits, "inputs": inputs}  # fmt: skip


def time_terms(inputs: dict, dev: Device) -> dict[str, float]:
    """The µs of each term from a launch's ``inputs`` (``estimate_launch``) and ``dev``'s
    constants: how a calibration recomputes the stored estimates."""
    terms = {"launch": dev.launch_us, "dram": inputs["dram_bytes"] / (dev.copy_gbs * 1e3)}
    if inputs.get("l2_bytes"):
        terms["l2"] = inputs["l2_bytes"] / (dev.l2_gbs * 1e3)
    if inputs.get("issue_cycles") is not None:
        terms[f"issue:{inputs['issue_pipe']}"] = inputs["issue_cycles"] / (dev.clock_ghz * 1e3)
    if inputs.get("latency_waits") is not None:
        h = inputs.get("l2_hit_share", 0.0)
        latency_ns = h * dev.l2_latency_ns + (1 - h) * dev.dram_latency_ns
        terms["latency"] = inputs["latency_waits"] * latency_ns / 1e3
    return terms


def reestimate(inputs: dict, dev: Device) -> tuple[float, str]:
    """``(µs, limit)`` of a launch from its stored ``inputs`` on ``dev``."""
    terms = time_terms(inputs, dev)
    limit = max(terms, key=lambda k: terms[k])
    return terms[limit], limit


# ---------------------------------------------------------------------------------------------
# sequences: L2 reuse between the launches of one op or one sampler step


@dataclass
class Step:
    """One launch of a sequence: its storages ``{key: (bytes read, bytes written)}`` and its own
    estimate for cold reads (``us``, ``limit``, ...)."""

    name: str
    storages: dict[Any, tuple[float, float]]
    row: dict = field(default_factory=dict)


def l2_reuse(dev: Device, steps: list[Step], usable: float = 0.5) -> list[float]:
    """Bytes of each step's reads served by L2: a storage read by a step after an earlier step
    of the sequence touched it, with at most ``usable x L2`` bytes of traffic in between (its
    own size included), is an L2 hit."""
    cap = usable * dev.l2_mb * 1e6
    last: dict[Any, float] = {}  # storage -> traffic clock at its last touch
    clock = 0.0
    hits = []
    for st in steps:
        h = 0.0
        for key, (rd, wr) in st.storages.items():
            if rd and key in last and clock - last[key] + rd <= cap:
                h += rd
        hits.append(h)
        for key, (rd, wr) in st.storages.items():
            clock += rd + wr
            if rd or wr:
                last[key] = clock
    return hits


# ---------------------------------------------------------------------------------------------
# torch ops: one launch each, bytes read and written (the reference composition)

_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape", "alias",
    "as_strided", "expand", "t", "transpose", "permute", "select", "slice", "unsqueeze", "squeeze", "unbind", "split",
    "split_with_sizes", "narrow", "detach", "lift_fresh", "_reshape_alias", "view_as", "diagonal", "unfold", "movedim",
    "_to_copy_noop", "resolve_conj", "resolve_neg", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "set_", "_local_scalar_dense_noop", "lift_fresh_copy_noop",
}  # fmt: skip


def _distinct_bytes(t) -> int:
    """Bytes of the elements a tensor view addresses (a stride-0 axis counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(tree: Any) -> list:
    """The leaves of an aten op's nested arguments or results (tuples, lists, dicts)."""
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return [tree]


class TorchOps:
    """A ``TorchDispatchMode`` that records every aten op that launches a kernel: name, bytes
    read (the distinct elements of each tensor input), bytes written (each tensor output),
    storages ``{key: (read, written)}``. Works on ``meta`` tensors (sizes only); the
    ``gmkernels::`` custom ops run their Python implementation (on ``meta`` tensors their
    fake kernel would run instead, and their Triton launches would not be seen)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        ops: list[Step] = []
        self.ops = ops

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                kwargs = kwargs or {}
                if getattr(func, "namespace", "") == "gmkernels":
                    # the project's own custom ops: run their implementation (its launches are
                    # recorded as Triton launches, its torch ops here), not their meta kernel
                    from torch._library.custom_ops import OPDEFS

                    opdef = OPDEFS.get(func._schema.name)
                    if opdef is not None:
                        with self:
                            return opdef._init_fn(*args, **kwargs)
                out = func(*args, **kwargs)
                name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
                base = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else name
                if base in _NO_KERNEL or base.startswith("sym_"):
                    return out
                storages: dict[Any, list[float]] = {}
                ins = _tensors((args, kwargs))
                for t in ins:
                    if isinstance(t, torch.Tensor):
                        k = id(t.untyped_storage())
                        storages.setdefault(k, [0.0, 0.0])[0] += _distinct_bytes(t)
                outs = _tensors(out)
                for t in outs:
                    if isinstance(t, torch.Tensor):
                        k = id(t.untyped_storage())
                        storages.setdefault(k, [0.0, 0.0])[1] += _distinct_bytes(t)
                if base in (
                    "zeros",
                    "ones",
                    "full",
                    "arange",
                    "zeros_like",
                    "ones_like",
                    "full_like",
                    "fill",
                    "zero",
                    "randn",
                    "rand",
                    "randint",
                    "normal",
                    "uniform",
                    "random",
                    "bernoulli",
                    "scalar_tensor",
                    "copy",
                ):
                    pass  # fills write only (their inputs are scalars or the target)
                ops.append(Step(base, {k: (r, w) for k, (r, w) in storages.items()}))
                return out

        self.mode = Mode()

    def __enter__(self) -> "TorchOps":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def torch_op_estimate(dev: Device, step: Step, l2_hit: float = 0.0) -> dict[str, Any]:
    """One torch op: ``max(launch cost, DRAM bytes / copy bandwidth, L2 hits / L2 bandwidth)``
    (a torch kernel is taken to run at copy bandwidth: the reference's best case)."""
    rd = sum(r for r, _ in step.storages.values())
    wr = sum(w for _, w in step.storages.values())
    dram = rd - l2_hit + wr
    inputs = {"dram_bytes": dram, "l2_bytes": l2_hit, "l2_hit_share": 0.0, "issue_cycles": None, "issue_pipe": None,
              "latency_waits": None}  # fmt: skip
    terms = time_terms(inputs, dev)
    limit = max(terms, key=lambda k: terms[k])
    return {"us": terms[limit], "limit": limit, "terms": terms, "dram_bytes": dram, "inputs": inputs,
            "copy_share": terms["dram"] / terms[limit] if terms[limit] else 0.0}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# calibration: refit the device constants from measurements (gpu_check --calibrate)


def refit(dev_name: str, measurements: dict, gpu: str = "", when: Optional[str] = None) -> dict:
    """The ``--calibrate`` file entry of ``dev_name`` from ``measurements``:

    * ``copy``: ``[{"bytes": read + written, "us": time}, ...]`` -> ``copy_gbs`` (the best);
    * ``chase``: ``[{"hops": n, "us": time}, ...]`` of a dependent pointer chase over a buffer
      far larger than L2 -> ``dram_latency_ns`` (least-squares slope of time over hops);
    * ``empty``: ``[{"launches": n, "us": time}, ...]`` of back-to-back empty launches ->
      ``launch_us`` (slope);
    * ``clock_ghz``: the SM clock read during the run (optional).

    Returns ``{"gpu", "when", "constants": {...}, "measurements": ...}``."""

    def slope(points: list[tuple[float, float]]) -> float:
        if len(points) == 1:
            x, y = points[0]
            return y / x
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        sxx = sum((x - mx) ** 2 for x, _ in points)
        return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else my / mx

    c: dict[str, float] = {}
    if measurements.get("copy"):
        c["copy_gbs"] = max(m["bytes"] / m["us"] / 1e3 for m in measurements["copy"])
    if measurements.get("chase"):
        c["dram_latency_ns"] = 1e3 * slope([(m["hops"], m["us"]) for m in measurements["chase"]])
    if measurements.get("empty"):
        c["launch_us"] = slope([(m["launches"], m["us"]) for m in measurements["empty"]])
    if measurements.get("clock_ghz"):
        c["clock_ghz"] = float(measurements["clock_ghz"])
    return {
        "gpu": gpu or dev_name,
        "when": when or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "constants": {k: round(v, 4) for k, v in c.items()},
        "measurements": measurements,
    }


def device_table(devs: Iterable[Device]) -> str:
    """Markdown table of the constants of ``devs``."""
    devs = list(devs)
    rows = [("SMs", "sms"), ("SM clock (GHz)", "clock_ghz"), ("DRAM peak (GB/s)", "dram_peak_gbs"),
            ("copy bandwidth (GB/s)", "copy_gbs"), ("L2 (MB)", "l2_mb"), ("L2 bandwidth (GB/s)", "l2_gbs"),
            ("DRAM latency (ns)", "dram_latency_ns"), ("L2 latency (ns)", "l2_latency_ns"), ("launch cost (µs)", "launch_us"),
            ("registers per SM", "regs_per_sm"), ("warps per SM", "max_warps_per_sm"), ("blocks per SM", "max_blocks_per_sm"),
            ("shared memory per SM (KiB)", "smem_per_sm_kb")]  # fmt: skip
    out = ["| constant | " + " | ".join(d.name for d in devs) + " |", "|---" * (len(devs) + 1) + "|"]
    for label, key in rows:
        out.append(f"| {label} | " + " | ".join(f"{getattr(d, key):g}" for d in devs) + " |")
    for p in PIPES:
        out.append(
            f"| {p} {'B' if p == 'lsu' else 'ops'}/SM/clock | " + " | ".join(f"{d.rate(p):g}" for d in devs) + " |"
        )
    return "\n".join(out)


def as_json(dev: Device) -> dict:
    return asdict(dev)
