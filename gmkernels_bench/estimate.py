"""Estimated time of every kernel launch on a GPU, without a GPU (docs/performance-model.md).

    python -m gmkernels_bench.estimate                                    # bench shapes, H100
    python -m gmkernels_bench.estimate --shapes 256,8,4,32,32 --device a100,h100,h200 --json est.json
    python -m gmkernels_bench.estimate --shapes bench --reference         # + ops and sampler steps vs the reference
    python -m gmkernels_bench.estimate --calibration gpu-check-out/calibration.json

Per launch that ``compile_report`` builds at the shapes (every family's ``aot_cases``; the policy
kernels at the policy shapes): the estimated µs, the limiting term (``dram``, ``issue:<pipe>``,
``latency``, ``launch``), programs resident per SM and what limits them (registers, warps,
shared memory), waves, dependent memory waits per program, DRAM bytes and the share of copy
bandwidth the launch reaches (DRAM bytes / copy bandwidth / estimated time). The model
(``gmkernels_bench.perfmodel``) combines:

* the compile report's rows for ``sm_80`` (A100) or ``sm_90`` (H100, H200): registers, warps,
  shared memory, and the SASS with its line table (pipes per instruction, loops, the waits on
  global loads);
* the traffic counted by the interpreter (``gmkernels_bench.traffic``) at a small shape with
  the same K and C (``small_shape``): each argument storage's share of sectors read and
  written, scaled to the storage sizes of the large shape, and each SASS loop's executions per
  program (the interpreter's per-line counts matched to the SASS line table).

``--reference`` adds, per op of docs/ops.md and per sampler step (GM-SDE and GM-ODE, order 1
and 2, probabilistic guidance on and off), the gmkernels total (its launches with L2 reuse
between them, plus the torch ops of its host code) next to the reference composition
(``reference/``, eager, counted by a dispatch mode: one launch per torch op, its bytes read
and written) on the same model: µs and the estimated speedup.

Compile rows and counted traffic are cached on disk (``compile_report.cache_dir()``): a
repeated run only reads them. The compile runs in a child process (``TRITON_INTERPRET=0``);
this process interprets (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the traffic counts; the compile runs in a child (see compile_cases)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

from gmkernels_bench import perfmodel as pm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEVICES = ("h100",)
#: the shapes of issue 24 item 5: ImageNet, FLUX, pi-Flow
TARGET_SHAPES = ((256, 8, 4, 32, 32), (2, 8, 16, 96, 170), (64, 32, 4, 32, 32))
#: the sampler steps of ``--reference``: solver x order x guidance (probabilistic, scale 0.5)
STEP_CONFIGS = tuple(
    (solver, order, guided) for solver in ("gm-sde", "gm-ode") for order in (1, 2) for guided in (False, True)
)
LOOP_STEPS = 3  # network calls recorded per loop: the first (order 1), a middle one, the last
ODE_SUBSTEPS = 8  # as the AOT cases (9 sigmas)


def cache_dir() -> str:
    return os.environ.get("GMKERNELS_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gmkernels_bench")


def small_shape(B: int, K: int, C: int, H: int, W: int) -> tuple[int, int, int, int, int]:
    """The shape the interpreter counts traffic at for ``(B, K, C, H, W)``: the same K and C (the
    loops over them run as at the large shape), 2 batch rows and a 3 x 5 image (odd: masked
    tails), or for point data (``H = W = 1``) up to 33 rows (kernels pack rows into lanes)."""
    if H * W == 1:
        return (min(B, 33), K, C, 1, 1)
    return (min(B, 2), K, C, min(H, 3), min(W, 5))


def parse_shapes(items: list[str]) -> list[tuple[int, ...]]:
    from gmkernels_bench.aot import SHAPE_SETS

    shapes: list[tuple[int, ...]] = []
    for item in items:
        if item in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[item])
            continue
        try:
            shape = tuple(int(v) for v in item.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 5 or min(shape) < 1:
            raise SystemExit(
                f"--shapes: {item!r} is neither B,K,C,H,W (five positive integers) nor one of {sorted(SHAPE_SETS)}"
            )
        shapes.append(shape)
    return list(dict.fromkeys(shapes))


# ---------------------------------------------------------------------------------------------
# scenarios: code that launches kernels, run on meta tensors at the large shape (recorded) and on
# CPU tensors at the small shape (interpreted, traffic counted); launch i of one is launch i of
# the other


@dataclass
class Item:
    """One launch of a scenario at the large shape: a Triton launch (``case``) or a torch op."""

    name: str
    step: int  # network call (sampler loops), else 0
    case: Any = None  # AotCase of a Triton launch
    storages: dict = field(
        default_factory=dict
    )  # Triton: first arg name -> (storage key, nbytes); torch: key -> (read, written)
    torch_op: Optional[str] = None
    dtype: str = ""
    arg_storages: dict = field(default_factory=dict)  # Triton: every tensor arg name -> (storage key, nbytes)


def _storage_map(kernel: Any, args: tuple, kwargs: dict, per_arg: bool = False) -> dict[str, tuple[int, int]]:
    """``{argument name: (storage key, storage bytes)}`` of a recorded launch's tensors: the
    first argument of each storage, or with ``per_arg`` every tensor argument (the convention
    of the counted traffic it is matched with: ``traffic.replay`` gives each argument its own
    storage, a scenario run on real tensors keeps their aliasing)."""
    import torch

    out: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    names = list(zip(kernel.arg_names, args)) + list(kwargs.items())
    for name, v in names:
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            key = id(st)  # a storage's Python object is kept while any view of it lives
            if per_arg or key not in seen:
                seen.add(key)
                out[name] = (key, st.nbytes())
    return out


def coverage_key(case) -> tuple:
    """What a launch's traffic and loop trips depend on besides sizes: the kernel, its
    constexprs but the block sizes (its modes: ``STATS``, ``ORDER2``, ``ONE_TILE``, ...) and the
    element types of its arguments."""
    modes = tuple(sorted((k, v) for k, v in case.constexprs.items() if k.isupper() and not k.startswith("BLOCK")))
    return (case.kernel.fn.__name__, modes, tuple(v for v in case.signature.values() if v.startswith("*")))


def _dtype_of(name: str) -> str:
    return "bf16" if "bf16" in name else ("fp32" if "fp32" in name else "")


class _Recorder:
    """Records a scenario's launches at the large shape (meta tensors)."""

    def __init__(self, torch_ops: bool):
        self.items: list[Item] = []
        self.step = 0
        self.torch_ops = torch_ops

    def triton(self, name: str, kernel: Any, grid: tuple, args: tuple, kwargs: dict) -> None:
        from gmkernels_bench.aot import case_from_launch

        case = case_from_launch(name, kernel, tuple(grid), args, kwargs)
        self.items.append(Item(name, self.step, case, _storage_map(kernel, args, kwargs), dtype=_dtype_of(name),
                               arg_storages=_storage_map(kernel, args, kwargs, per_arg=True)))  # fmt: skip


def aot_family_scenario(family: str) -> Callable:
    """The launches of ``gmkernels_bench.aot.<family>.aot_cases`` (what compile_report builds)."""
    import importlib

    mod = importlib.import_module(f"gmkernels_bench.aot.{family}")

    def run(shape: tuple, device: str, rec: Optional[_Recorder]) -> None:
        from gmkernels_bench import aot

        if device == "meta":
            with aot.observe_launches(rec.triton):
                mod.aot_cases(*shape)
        else:
            raise AssertionError("the AOT families are replayed with traffic.launch_cases_traffic")

    run.family = family  # type: ignore[attr-defined]
    return run


class _MetaInputs:
    """``cases.Inputs`` on the ``meta`` device (sizes only) or on CPU with values."""

    def __new__(cls, dims: tuple, dtype: Any, device: str, seed: int = 0):
        import torch

        from gmkernels_bench.cases import Inputs, Shape

        inp = Inputs(Shape("est", *dims), dtype, torch.device("cpu"), seed)
        if device == "meta":
            inp.device = torch.device("meta")
            inp._randn = lambda *size: torch.zeros(size, device="meta")  # type: ignore[method-assign]
            inp._rand = lambda *size: torch.zeros(size, device="meta")  # type: ignore[method-assign]
        return inp


def op_scenario(op: str) -> Callable:
    """One call of the public op ``gmkernels.<op>`` (the benchmark's arguments, ``cases._OPS``)."""

    def run(shape: tuple, dtype: str, device: str, rec: Optional[_Recorder], reference: bool = False) -> Any:
        import torch

        import gmkernels
        import reference as ref
        from gmkernels_bench.cases import _OPS

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        args = _OPS[op][1](_MetaInputs(shape, dt, device, seed=list(_OPS).index(op)))
        fn = getattr(ref, op) if reference else getattr(gmkernels, op)
        return _call(fn, args, device, rec, reference, f"{op}[{dtype}]")

    run.op = op  # type: ignore[attr-defined]
    return run


def _call(fn: Callable, args: tuple, device: str, rec: Optional[_Recorder], reference: bool, tag: str) -> Any:
    import gmkernels
    from gmkernels_bench.aot import recording

    if reference:
        ops = pm.TorchOps()
        with ops:
            fn(*args)
        for st in ops.ops:
            rec.items.append(Item(st.name, rec.step, storages=st.storages, torch_op=st.name))
        return None
    if device != "meta":
        with gmkernels.use_backend("triton"):
            return fn(*args)
    ops = pm.TorchOps() if rec.torch_ops else None
    with gmkernels.use_backend("triton"), recording() as launches:
        if ops:
            with ops:
                fn(*args)
        else:
            fn(*args)
    _merge(rec, launches, ops.ops if ops else [], tag)
    return None


def _merge(rec: _Recorder, launches: list, torch_ops: list, tag: str) -> None:
    """Triton launches (recorded) and torch ops (their order is lost between the two: torch ops
    are listed first, as launchers allocate and prepare before they launch)."""
    for st in torch_ops:
        rec.items.append(Item(st.name, rec.step, storages=st.storages, torch_op=st.name))
    for i, (kernel, grid, args, kwargs) in enumerate(launches):
        rec.triton(f"{tag}#{i}:{kernel.fn.__name__}", kernel, grid, args, kwargs)


def step_scenario(solver: str, order: int, guided: bool) -> Callable:
    """``gmkernels.sample`` for ``LOOP_STEPS`` network calls (a stub denoiser returning fixed
    GMs), GM-ODE with ``ODE_SUBSTEPS`` substeps; launches are tagged with their network call."""

    def run(shape: tuple, dtype: str, device: str, rec: Optional[_Recorder], reference: bool = False) -> Any:
        import torch

        import gmkernels
        from gmkernels_bench.aot import recording

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        inp = _MetaInputs(shape, dt, device, seed=7)
        gms = (inp.gm(), inp.gm()) if guided else inp.gm()
        noise = inp.state().float()
        kw = dict(solver=solver, substeps=ODE_SUBSTEPS if solver == "gm-ode" else 1, order=order,
                  guidance="probabilistic", guidance_scale=0.5 if guided else 0.0)  # fmt: skip
        gen = torch.Generator().manual_seed(0) if device == "cpu" else None
        if reference:
            ops = pm.TorchOps()
            marks: list[int] = []

            def den_ref(x, t):
                marks.append(len(ops.ops))
                return gms

            with gmkernels.use_backend("torch"), ops:
                gmkernels.sample(den_ref, noise, LOOP_STEPS, **kw)
            for i, st in enumerate(ops.ops):
                step = max((s for s, m in enumerate(marks) if m <= i), default=0)
                rec.items.append(Item(st.name, step, storages=st.storages, torch_op=st.name))
            return None
        if device != "meta":
            with gmkernels.use_backend("triton"):
                return gmkernels.sample(lambda x, t: gms, noise, LOOP_STEPS, generator=gen, **kw)
        ops = pm.TorchOps() if rec.torch_ops else None

        with gmkernels.use_backend("triton"), recording() as launches:
            boundaries: list[tuple[int, int]] = []

            def den(x, t):
                boundaries.append((len(launches), len(ops.ops) if ops else 0))
                return gms

            if ops:
                with ops:
                    gmkernels.sample(den, noise, LOOP_STEPS, **kw)
            else:
                gmkernels.sample(den, noise, LOOP_STEPS, **kw)
        bounds = [b[0] for b in boundaries] + [len(launches)]
        tbounds = [b[1] for b in boundaries] + [len(ops.ops) if ops else 0]
        for s in range(LOOP_STEPS):
            rec.step = s
            _merge(rec, launches[bounds[s]:bounds[s + 1]], ops.ops[tbounds[s]:tbounds[s + 1]] if ops else [],
                   f"{solver},order{order},{'guided' if guided else 'plain'},{dtype}:step{s}")  # fmt: skip
        return None

    run.config = (solver, order, guided)  # type: ignore[attr-defined]
    return run


def step_label(solver: str, order: int, guided: bool) -> str:
    return f"{solver} order {order}{' guided' if guided else ''}"


# ---------------------------------------------------------------------------------------------
# traffic at the small shape (interpreted, cached)


def _code_hash(scenario: bool) -> str:
    """The code counted traffic depends on: the package, the AOT cases and the counter (and for
    a scenario, the benchmark's inputs and the reference)."""
    h = hashlib.sha256()
    for folder in ("gmkernels", "gmkernels_bench/aot") + (("reference",) if scenario else ()):
        for p in sorted((REPO / folder).rglob("*.py")):  # the solver package's modules included
            h.update(p.read_bytes())
    for p in ("gmkernels_bench/traffic.py",) + (("gmkernels_bench/cases.py",) if scenario else ()):
        h.update((REPO / p).read_bytes())
    import triton

    h.update(triton.__version__.encode())
    return h.hexdigest()[:16]


def _traffic_to_json(t) -> dict:
    d = t.as_dict()
    d["lines"] = [[[list(x) for x in k], v] for k, v in t.lines.items()]
    return d


@dataclass
class Counted:
    """A launch's traffic at the small shape, as ``estimate`` uses it."""

    kernel: str
    name: str
    programs: int
    storages: dict  # first arg name -> {"load_sectors", "store_sectors", "storage_sectors", ...}
    lines: dict  # chain tuple -> executions (all programs)
    load_sectors: int
    load_distinct_sectors: int
    requested_bytes: int
    distinct_bytes: int
    dram_bytes: int
    l2_bytes: int
    per_arg: bool = False  # storages are arguments (traffic.replay), not the first argument of each storage


def _counted(d: dict) -> Counted:
    st = d["storages"]
    return Counted(d["kernel"], d["name"], d["programs"], st,
                   {tuple(tuple(x) for x in k): v for k, v in d["lines"]}, d["l2_bytes"] // 32 - sum(v["store_sectors"] for v in st.values()),
                   d["dram_bytes"] // 32 - sum(v["store_sectors"] for v in st.values()), d["requested_bytes"],
                   d["distinct_bytes"], d["dram_bytes"], d["l2_bytes"])  # fmt: skip


def counted_traffic(key: str, compute: Callable[[], list], use_cache: bool = True) -> list[Counted]:
    """``compute()`` (a list of ``traffic.LaunchTraffic``) cached on disk under ``key`` and the
    code it depends on."""
    folder = Path(cache_dir()) / "traffic"
    digest = hashlib.sha256(f"{key}|{_code_hash(not key.startswith('aot:'))}".encode()).hexdigest()[:24]
    path = folder / f"{digest}.json"
    if use_cache and path.exists():
        try:
            return [_counted(d) for d in json.loads(path.read_text())]
        except (OSError, ValueError, KeyError):
            pass
    data = [_traffic_to_json(t) for t in compute()]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return [_counted(d) for d in data]


def small_traffic(scenario: Callable, shape: tuple, dtype: str = "", use_cache: bool = True) -> list[Counted]:
    """The scenario's launches at ``small_shape(shape)``, interpreted with traffic and line counts."""
    from gmkernels_bench import traffic

    small = small_shape(*shape)
    if hasattr(scenario, "family"):
        import importlib

        mod = importlib.import_module(f"gmkernels_bench.aot.{scenario.family}")
        key = f"aot:{scenario.family}:{small}"
        out = counted_traffic(key, lambda: traffic.launch_cases_traffic(mod.aot_cases, *small, lines=True), use_cache)
        for c in out:
            c.per_arg = True
        return out

    def compute() -> list:
        with traffic.count_traffic(lines=True) as launches:
            scenario(small, dtype, "cpu", None)
        return launches

    tag = getattr(scenario, "op", None) or getattr(scenario, "config", None)
    return counted_traffic(f"scenario:{tag}:{dtype}:{small}", compute, use_cache)


# ---------------------------------------------------------------------------------------------
# compile rows (child process, TRITON_INTERPRET=0)


def _case_spec(case) -> dict:
    fn = case.kernel.fn
    return {"name": case.name, "module": fn.__module__, "kernel": fn.__name__, "signature": case.signature,
            "constexprs": case.constexprs, "num_warps": case.num_warps, "num_stages": case.num_stages,
            "divisible": list(case.divisible), "grid": list(case.grid), "row_pixels": case.row_pixels}  # fmt: skip


def compile_cases(cases: list, archs: tuple[int, ...]) -> dict[tuple[str, int], dict]:
    """Compile rows with SASS profiles of ``cases`` for ``archs``, by ``(case name, arch)``:
    ``compile_report.compile_rows`` in a child process with ``TRITON_INTERPRET=0`` (its disk
    cache makes a repeated call cheap)."""
    specs = {c.name: _case_spec(c) for c in cases}
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "cases.json"), os.path.join(d, "rows.json")
        with open(src, "w") as f:
            json.dump({"archs": list(archs), "cases": list(specs.values())}, f)
        env = {**os.environ, "TRITON_INTERPRET": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "gmkernels_bench.estimate", "--compile-child", src, dst], env=env,
                              cwd=REPO, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"compile child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        with open(dst) as f:
            out = json.load(f)
    return {(r["kernel"], int(r["arch"][3:])): r for r in out["rows"]} | {
        ("__failures__", 0): {"failures": out["failures"]}
    }


def _compile_child(src: str, dst: str) -> int:
    import importlib

    os.environ["TRITON_INTERPRET"] = "0"
    from gmkernels_bench.aot import AotCase
    from gmkernels_bench.compile_report import compile_rows

    with open(src) as f:
        spec = json.load(f)
    cases = []
    for s in spec["cases"]:
        kernel = getattr(importlib.import_module(s["module"]), s["kernel"])
        cases.append(AotCase(s["name"], kernel, s["signature"], s["constexprs"], s["num_warps"], s["num_stages"],
                             tuple(s["divisible"]), grid=tuple(s["grid"]), row_pixels=s["row_pixels"]))  # fmt: skip
    rows, failures = compile_rows(cases, tuple(spec["archs"]), profile=True)
    with open(dst, "w") as f:
        json.dump({"rows": rows, "failures": failures}, f)
    return 0


# ---------------------------------------------------------------------------------------------
# combining: one estimate per launch and device


def _lookup(lines: dict, chain: tuple) -> Optional[float]:
    while chain:
        if chain in lines:
            return lines[chain]
        chain = chain[:-1]
    return None


def launch_executions(profile: dict, counted: Counted) -> list[float]:
    """``perfmodel.loop_executions`` with chains matched by their longest counted prefix (a SASS
    chain may end in Triton's own library functions, which the interpreter does not trace)."""
    lines = {}
    for _, ch, _, _ in profile["groups"]:
        if ch:
            key = tuple(tuple(x) for x in ch)
            v = _lookup(counted.lines, key)
            if v is not None:
                lines[key] = v
    return pm.loop_executions(profile, lines, counted.programs)


def traffic_at(item: Item, counted: Optional[Counted]) -> tuple[dict, float, float]:
    """``({storage key: (bytes read, bytes written)}, DRAM bytes, L2 re-read share)`` of a large
    launch: each storage's sector coverage at the small shape times its size here."""
    out: dict = {}
    if counted is None:
        return out, float("nan"), 0.0
    for name, (key, nbytes) in (item.arg_storages if counted.per_arg else item.storages).items():
        st = counted.storages.get(name)
        if st is None:
            continue
        sectors = max(st["storage_sectors"], 1)
        rd = st["load_sectors"] / sectors * nbytes
        wr = st["store_sectors"] / sectors * nbytes
        if rd or wr:
            r0, w0 = out.get(key, (0.0, 0.0))
            out[key] = (r0 + rd, w0 + wr)
    dram = sum(r + w for r, w in out.values())
    reread = 1 - counted.load_distinct_sectors / counted.load_sectors if counted.load_sectors else 0.0
    return out, dram, max(0.0, reread)


def estimate_items(items: list[Item], counted: list[Counted], rows: dict, dev: pm.Device, reuse: bool,
                   group: Callable[[Item], Any] = lambda it: it.name.split("#")[0]) -> list[dict]:  # fmt: skip
    """One estimate row per item (``reuse``: L2 reuse within each ``group`` of consecutive items)."""
    triton_items = [it for it in items if it.case is not None]
    by_item: dict[int, Optional[Counted]] = {}
    mismatch = []
    for i, it in enumerate(triton_items):
        c = counted[i] if i < len(counted) else None
        if c is not None and c.kernel != it.case.kernel.fn.__name__:
            mismatch.append(it.name)
            c = None
        by_item[id(it)] = c
    prepared = []
    for it in items:
        if it.case is None:
            prepared.append((it, pm.Step(it.name, it.storages), None, 0.0))
            continue
        c = by_item[id(it)]
        st, dram, reread = traffic_at(it, c)
        prepared.append((it, pm.Step(it.name, st), c, reread))
    hits = [0.0] * len(prepared)
    if reuse:
        start = 0
        while start < len(prepared):
            end = start
            g = group(prepared[start][0])
            while end < len(prepared) and group(prepared[end][0]) == g:
                end += 1
            for k, h in enumerate(pm.l2_reuse(dev, [p[1] for p in prepared[start:end]])):
                hits[start + k] = h
            start = end
    out = []
    for (it, step, c, reread), hit in zip(prepared, hits):
        if it.case is None:
            e = pm.torch_op_estimate(dev, step, hit)
            out.append({"kernel": it.name, "torch_op": True, "step": it.step, **e})
            continue
        row = rows.get((it.case.name, dev.arch))
        programs = math.prod(it.case.grid) if it.case.grid else 0
        dram = sum(r + w for r, w in step.storages.values()) if c is not None else float("nan")
        base = {"kernel": it.name, "triton_kernel": it.case.kernel.fn.__name__, "step": it.step, "dtype": it.dtype,
                "programs": programs, "warps": it.case.num_warps, "counted": c is not None}  # fmt: skip
        if row is None or c is None:
            out.append({**base, "us": float("nan"), "limit": "not estimated" if row else "not compiled", "dram_bytes": dram,
                        "copy_share": float("nan"), "programs_per_sm": None, "waves": None})  # fmt: skip
            continue
        execs = launch_executions(row["profile"], c)
        e = pm.estimate_launch(dev, programs=programs, warps=it.case.num_warps, registers=row["registers"],
                               shared_bytes=row["shared_bytes"], dram_bytes=dram - hit, profile=row["profile"],
                               executions=execs, l2_hit_share=reread, l2_bytes=hit)  # fmt: skip
        out.append({**base, **e, "dram_bytes": dram - hit, "l2_hit_bytes": hit, "registers": row["registers"],
                    "shared_bytes": row["shared_bytes"], "loop_executions": [round(x, 2) for x in execs],
                    "copy_share": e["copy_share"]})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# the command line


def _fmt_bytes(b: float) -> str:
    return "-" if b != b else f"{b / 1e6:.2f}"


def launch_table(rows: list[dict], dev: pm.Device) -> str:
    w = max([len(r["kernel"]) for r in rows] + [6])
    head = (f"{'kernel':<{w}} {'µs':>8} {'limit':<12} {'copy%':>5} {'regs':>4} {'warps':>5} {'prog/SM':>7} "
            f"{'(limit)':<14} {'waves':>6} {'waits':>6} {'DRAM MB':>8}")  # fmt: skip
    lines = [f"{dev.label()}: estimated per launch", head, "-" * len(head)]
    for r in rows:
        if r.get("torch_op"):
            continue
        if r["us"] != r["us"]:
            lines.append(f"{r['kernel']:<{w}} {'-':>8} {r['limit']:<12}")
            continue
        lines.append(f"{r['kernel']:<{w}} {r['us']:>8.1f} {r['limit']:<12} {100 * r['copy_share']:>4.0f}% {r['registers']:>4} "
                     f"{r['warps']:>5} {r['programs_per_sm']:>7} {('(' + r['residency_limit'] + ')'):<14} {r['waves']:>6.2f} "
                     f"{r['waits']:>6.1f} {_fmt_bytes(r['dram_bytes']):>8}")  # fmt: skip
    return "\n".join(lines)


def _sum(rows: list[dict]) -> float:
    return sum(r["us"] for r in rows)


def run(shapes: list[tuple], devices: list[pm.Device], reference: bool, filt: str = "", use_cache: bool = True,
        log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Every estimate at ``shapes`` on ``devices`` (see the module docstring); the JSON document."""
    archs = tuple(sorted({d.arch for d in devices}))
    result: dict = {"devices": {d.name: pm.as_json(d) for d in devices}, "uncalibrated": [d.name for d in devices if not d.measured],
                    "shapes": [list(s) for s in shapes], "rows": [], "ops": [], "steps": [], "failures": []}  # fmt: skip
    for shape in shapes:
        t0 = time.time()
        recs = family_records(shape, filt, use_cache)
        if reference:
            known = known_traffic(recs)
            scenarios = [("op", op_scenario(op), (op,)) for op in _op_names()]
            scenarios += [("step", step_scenario(*cfg), (cfg,)) for cfg in STEP_CONFIGS]
            for kind, sc, tag in scenarios:
                for dtype in ("fp32", "bf16"):
                    rec, counted = scenario_record(sc, shape, dtype, known, use_cache)
                    ref = _Recorder(torch_ops=True)
                    sc(shape, dtype, "meta", ref, reference=True)
                    recs.append((kind, rec, counted, (*tag, dtype, ref)))
        log(f"[estimate] {shape}: recorded and counted in {time.time() - t0:.0f} s")
        cases = [it.case for _, rec, _, _ in recs for it in rec.items if it.case is not None]
        uniq = {c.name: c for c in cases}
        t0 = time.time()
        rows = compile_cases(list(uniq.values()), archs)
        result["failures"] += rows.pop(("__failures__", 0))["failures"]
        log(f"[estimate] {shape}: {len(uniq)} launches compiled (or read from the cache) in {time.time() - t0:.0f} s")
        for dev in devices:
            for kind, rec, counted, extra in recs:
                if kind == "launch":
                    est = _estimate_aligned(rec.items, counted, rows, dev)
                    for r in est:
                        result["rows"].append({**r, "shape": list(shape), "device": dev.name, "family": extra})
                elif kind == "op":
                    op, dtype, ref = extra
                    est = estimate_items(rec.items, counted, rows, dev, reuse=True, group=lambda it: 0)
                    ref_est = estimate_items(ref.items, [], rows, dev, reuse=True, group=lambda it: 0)
                    result["ops"].append(_compare(op, dtype, shape, dev, est, ref_est))
                else:
                    cfg, dtype, ref = extra
                    est = estimate_items(rec.items, counted, rows, dev, reuse=True, group=lambda it: it.step)
                    ref_est = estimate_items(ref.items, [], rows, dev, reuse=True, group=lambda it: it.step)
                    result["steps"].append(_compare(step_label(*cfg), dtype, shape, dev, est, ref_est, per_step=True))
    return result


def family_records(shape: tuple, filt: str = "", use_cache: bool = True) -> list:
    """``[("launch", recorder, counted, family), ...]``: every family's AOT launches at
    ``shape`` (recorded on meta tensors) with their traffic counted at the small shape, launch i
    against launch i; and the policy kernels (``_policy_records``)."""
    from gmkernels_bench.aot import FAMILIES

    recs: list = []
    for fam in FAMILIES:
        if fam == "policy":
            continue
        sc = aot_family_scenario(fam)
        rec = _Recorder(torch_ops=False)
        sc(shape, "meta", rec)
        if filt and not any(filt in it.name for it in rec.items):
            continue
        counted: list = small_traffic(sc, shape, use_cache=use_cache)
        counted = counted + [None] * (len(rec.items) - len(counted))
        if filt:
            keep = [i for i, it in enumerate(rec.items) if filt in it.name]
            rec.items, counted = [rec.items[i] for i in keep], [counted[i] for i in keep]
        recs.append(("launch", rec, counted, fam))
    if not filt or "policy" in filt:
        recs += _policy_records(shape, use_cache)
    return recs


def known_traffic(recs: list) -> dict:
    """Counted traffic by ``coverage_key``: what a scenario's launch of the same kernel and
    modes takes (the same launcher ran it)."""
    return {
        coverage_key(it.case): c for _, rec, counted, _ in recs for it, c in zip(rec.items, counted) if c is not None
    }


def scenario_record(
    sc: Callable, shape: tuple, dtype: str, known: dict, use_cache: bool, torch_ops: bool = True
) -> tuple:
    """``(recorder, counted)`` of a scenario at ``shape``: its launches recorded on meta tensors,
    their traffic from ``known`` or, when a launch is not there, the scenario interpreted at
    the small shape."""
    rec = _Recorder(torch_ops=torch_ops)
    sc(shape, dtype, "meta", rec)
    triton_items = [it for it in rec.items if it.case is not None]
    counted = [known.get(coverage_key(it.case)) for it in triton_items]
    if any(c is None for c in counted):
        counted = small_traffic(sc, shape, dtype, use_cache)
    return rec, counted


def calibration_set(path: str, use_cache: bool = True) -> dict:
    """The stored estimates ``gpu_check``'s calibrate part compares with: each launch of
    ``calibrate.LAUNCHES`` at ``calibrate.SHAPE`` on every device, with the model inputs that
    ``perfmodel.reestimate`` recomputes on refitted constants. Writes ``path``."""
    from gmkernels_bench import calibrate as cb

    shape, dtype = cb.SHAPE, cb.DTYPE
    known = known_traffic(family_records(shape, "", use_cache))
    recs = []
    for label, kind, name in cb.LAUNCHES:
        sc = op_scenario(name) if kind == "op" else step_scenario(name, 1, False)
        # the torch-op recorder runs the custom ops' implementation (on meta tensors without it
        # their fake kernel would run and no Triton launch would be seen)
        rec, counted = scenario_record(sc, shape, dtype, known, use_cache)
        items = [it for it in rec.items if it.case is not None and it.step == 0]
        recs.append((label, items, counted[: len(items)]))
    cases = {it.case.name: it.case for _, items, _ in recs for it in items}
    rows = compile_cases(list(cases.values()), tuple(sorted({d.arch for d in pm.DEVICES.values()})))
    rows.pop(("__failures__", 0))
    out: dict = {"shape": list(shape), "dtype": dtype, "made": time.strftime("%Y-%m-%d"), "devices": {}}
    for key, dev in pm.DEVICES.items():
        entries = []
        for label, items, counted in recs:
            est = estimate_items(items, counted, rows, dev, reuse=True, group=lambda it: 0)
            for i, (it, e) in enumerate(zip(items, est)):
                entries.append({"label": label, "index": i, "kernel": it.case.kernel.fn.__name__, "us": e["us"],
                                "limit": e["limit"], "inputs": e.get("inputs")})  # fmt: skip
        out["devices"][key] = entries
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return out


def _estimate_aligned(items: list[Item], counted: list, rows: dict, dev: pm.Device) -> list[dict]:
    """``estimate_items`` per op (the launches ``name#0``, ``name#1``, ... of one call, with L2
    reuse between them), for items whose counted traffic is aligned one to one (None: not
    counted)."""
    out = []
    ops: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        ops.setdefault(it.name.split("#")[0], []).append(i)
    missing = Counted("?", "", 0, {}, {}, 0, 0, 0, 0, 0, 0)
    for _, idx in ops.items():
        out += estimate_items([items[i] for i in idx], [counted[i] or missing for i in idx], rows, dev, reuse=True,
                              group=lambda it: 0)  # fmt: skip
    return out


def _compare(
    label: str, dtype: str, shape: tuple, dev: pm.Device, est: list[dict], ref: list[dict], per_step: bool = False
) -> dict:
    def total(rows: list[dict], step: Optional[int] = None) -> float:
        return sum(r["us"] for r in rows if step is None or r.get("step") == step)

    entry = {"op": label, "dtype": dtype, "shape": list(shape), "device": dev.name,
             "launches": sum(1 for r in est), "triton_launches": sum(1 for r in est if not r.get("torch_op")),
             "reference_launches": len(ref)}  # fmt: skip
    if per_step:
        mid = LOOP_STEPS // 2
        entry.update(us=total(est, mid), reference_us=total(ref, mid), first_us=total(est, 0), reference_first_us=total(ref, 0),
                     launches=sum(1 for r in est if r.get("step") == mid),
                     triton_launches=sum(1 for r in est if r.get("step") == mid and not r.get("torch_op")),
                     reference_launches=sum(1 for r in ref if r.get("step") == mid),
                     limits=dict(Counter(r["limit"] for r in est if r.get("step") == mid)))  # fmt: skip
    else:
        entry.update(us=total(est), reference_us=total(ref), limits=dict(Counter(r["limit"] for r in est)))
    entry["speedup"] = entry["reference_us"] / entry["us"] if entry["us"] else float("nan")
    entry["detail"] = [{k: r.get(k) for k in ("kernel", "us", "limit", "dram_bytes", "copy_share", "programs_per_sm", "waves")}
                       for r in est if per_step is False or r.get("step") == LOOP_STEPS // 2]  # fmt: skip
    return entry


def _op_names() -> list[str]:
    from gmkernels_bench.cases import OP_NAMES

    return list(OP_NAMES)


def _policy_records(shape: tuple, use_cache: bool) -> list:
    """The pi-Flow policy kernels (velocity, rollout of 128 substeps) through the public
    ``GMFlowPolicy`` on this shape: recorded on CPU tensors (the rollout table is built on the
    host), counted at the small shape."""
    import torch

    from gmkernels_bench.cases import POLICY_SHIFT, POLICY_SUBSTEPS

    recs = []
    for dtype in ("fp32", "bf16"):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

        def scenario(dims: tuple, dtype_: str, device: str, rec: Optional[_Recorder], dt=dt, dtype=dtype) -> None:
            import gmkernels
            from gmkernels.policy import GMFlowPolicy
            from gmkernels_bench.aot import recording

            inp = _MetaInputs(dims, dt, "cpu", seed=404)
            gm, x = inp.gm(), inp.state()
            B = dims[0]
            ones = torch.ones(B)

            def calls() -> None:
                pol = GMFlowPolicy(gm, x, ones)
                pol.pi(x, ones * 0.5)
                pol.integrate(x, ones, ones, torch.zeros(B), shift=POLICY_SHIFT, total_substeps=POLICY_SUBSTEPS)

            if rec is None:
                with gmkernels.use_backend("triton"):
                    calls()
                return
            tag = shape_tag_policy(dims, dtype)
            with gmkernels.use_backend("triton"), recording() as launches:
                calls()
            for i, (kernel, grid, args, kwargs) in enumerate(launches):
                rec.triton(f"policy.{kernel.fn.__name__.strip('_').replace('policy_', '').replace('_kernel', '')}[{tag}]#{i}",
                           kernel, grid, args, kwargs)  # fmt: skip

        scenario.op = f"policy:{dtype}"  # type: ignore[attr-defined]
        rec = _Recorder(torch_ops=False)
        try:
            scenario(shape, dtype, "cpu-record", rec)
        except Exception as e:  # a shape the policy API refuses: no policy rows
            print(f"[estimate] policy kernels at {shape} not recorded: {e}", file=sys.stderr)
            return []
        counted = small_traffic(scenario, shape, dtype, use_cache)
        recs.append(("launch", rec, counted, "policy"))
    return recs


def shape_tag_policy(dims: tuple, dtype: str) -> str:
    B, K, C, H, W = dims
    return f"B{B},K{K},C{C},{H}x{W},N{128},{dtype}"


#: why a launch below ``BELOW`` of copy bandwidth stays there and what would lift it, by Triton
#: kernel (and, for the fused step, its solver); the limiting term and its numbers come from the
#: estimate. These are the kernel owners' to act on: this module only reports them.
WHY = {
    "_step_coef_kernel": "per-sample coefficients between a statistics launch and the step (B rows, KiB): the "
    "launch cost is its time; only computing them in every program of the next launch "
    "(redundantly) would remove it",
    "_guidance_bias_power_kernel": "per-sample sums between the guidance passes (B rows): the launch cost is its time",
    "_step_kernel gm-ode": "GM-ODE: each of the N substeps evaluates the posterior over the K components of "
    "every pixel (N x K exponentials and C-wide dot products per pixel) on a GM read "
    "once: issue-bound by design; fewer instructions per component and substep (exp2 "
    "on prescaled logits, the affine map of op 5 applied once to the loaded means, "
    "not per substep) would lift it",
    "_step_kernel gm-sde": "GM-SDE: the Philox draw (integer multiply-heavy) and the inverse-CDF pick over K "
    "per pixel, plus the per-component reweighting math of the 2nd-order and guided "
    "variants: bf16 halves the bytes, not the instructions; a cheaper counter-based "
    "RNG (one Philox round per 4 normals is already the floor) or packing two bf16 "
    "conversions per instruction would lift it",
    "_step_kernel": "the fused sampler step (see its solver)",
    "_gm_ode_kernel": "each of the N substeps evaluates the posterior over the K components of every pixel on a GM "
    "read once: issue-bound by design (as the fused GM-ODE step)",
    "_step_stats_kernel": "the statistics pass of a 2nd-order or guided step: per-component reweighting math and "
    "per-sample partial sums; bf16 halves the bytes, not the instructions",
    "_guidance_apply_kernel": "at B = 2 in bf16 the pixel-per-thread layout (8 pixels a thread, warps halved to 1 to "
    "get programs) still gives about one program per SM: halving the pixels per thread before the "
    "warps reach 1 would double the programs",
    "_mean_cfg_apply_kernel": "as _guidance_apply_kernel: too few programs at B = 2 in bf16",
    "_gm_sde_step_kernel": "the Philox draw and the inverse-CDF pick over K per pixel (as the fused GM-SDE step)",
    "_kr_inverse_kernel": "Newton iterations on the 1-D mixture CDF, channel after channel (n_steps x K erf and exp "
    "per pixel and channel): compute-bound by the algorithm",
    "_kr_cdf_kernel": "the mixture CDF per channel (K erf per pixel and channel): compute-bound by the algorithm",
    "_policy_rollout_kernel": "128 Euler substeps in one launch, each a posterior over K per pixel, on a GM read "
    "once: compute-bound by design (the share of copy bandwidth is not its measure)",
    "_policy_pi_kernel": "one posterior over K per pixel with op 5 applied to every loaded mean",
    "_gm_posterior_mean_kernel": "the posterior per pixel (an exponential and a C-wide dot product per component): "
    "in bf16 the bytes halve and the instructions stay",
    "_transition_kernel": "the per-sample coefficients (divisions, logarithms of sigma and sigma_to) are computed "
    "for every row of the program's tile, not once per sample: hoisting them (one row of "
    "coefficients per program, or computed on the host) would make it DRAM-bound",
    "_gm_sample_kernel": "the Philox draw and the inverse-CDF pick over K per pixel: bf16 halves the bytes only",
    "_gm_moments_kernel": "two dependent load rounds per K tile (the log-weights' registers are reused for the "
    "means, so the means are loaded after the first wait) with K / BLOCK_K tiles per "
    "program: issuing the next tile's loads before the current tile's math (software "
    "pipelining, or num_stages > 1 with tl.range) would lift it",
    "_gauss_mul_kernel": "a few KiB per sample at this shape: the launch cost is its time",
    "_weight_guidance_kernel": "a small launch at this shape: the launch cost is its time",
    "_guidance_stats_kernel": "per-sample partial sums over every pixel: a small launch at the ImageNet shape, too few "
    "programs at B = 2 in bf16 (as _guidance_apply_kernel)",
}
BELOW = 0.70


def why(row: dict) -> str:
    """The reason a launch stays below ``BELOW`` of copy bandwidth (``WHY`` by its Triton kernel,
    else what its limiting term says) with the term's numbers."""
    kernel = row.get("triton_kernel", "")
    solver = (
        "gm-ode"
        if ("gm-ode" in row["kernel"] or "gm_ode" in row["kernel"])
        else ("gm-sde" if "sde" in row["kernel"] else "")
    )
    base = WHY.get(f"{kernel} {solver}") or WHY.get(kernel, "")
    limit = row["limit"]
    if limit == "launch":
        detail = f"{_fmt_bytes(row['dram_bytes'])} MB moved, the launch cost is the floor"
    elif limit.startswith("issue"):
        detail = f"issue-bound ({limit.split(':')[1]})"
    elif limit == "latency":
        detail = (f"latency-bound: {row['waits']:.0f} dependent waits per program, {row['programs_per_sm']} programs "
                  f"resident ({row['residency_limit']})")  # fmt: skip
    else:
        detail = f"{limit}-bound"
    return f"{detail}: {base}" if base else detail


def below_groups(rows: list[dict]) -> list[dict]:
    """The launches below ``BELOW`` of copy bandwidth grouped by Triton kernel, solver and limit."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["us"] == r["us"] and r["copy_share"] < BELOW:
            solver = (
                "gm-ode"
                if "gm-ode" in r["kernel"] or "gm_ode" in r["kernel"]
                else ("gm-sde" if "sde" in r["kernel"] else "")
            )
            groups.setdefault(
                (
                    r.get("triton_kernel", r["kernel"]),
                    solver if r.get("triton_kernel") == "_step_kernel" else "",
                    r["limit"],
                ),
                [],
            ).append(r)
    out = []
    for (kernel, solver, limit), rs in groups.items():
        cs = [r["copy_share"] for r in rs]
        out.append({"kernel": kernel + (f" ({solver})" if solver else ""), "limit": limit, "launches": len(rs),
                    "copy_min": min(cs), "copy_max": max(cs), "us_min": min(r["us"] for r in rs), "us_max": max(r["us"] for r in rs),
                    "dtypes": sorted({r.get("dtype", "") for r in rs}), "why": why(rs[0]), "names": [r["kernel"] for r in rs]})  # fmt: skip
    return sorted(out, key=lambda g: g["copy_min"])


def markdown_report(result: dict, device: str) -> str:
    """The note's tables for ``device``: per shape the launches (µs, limit, share of copy,
    residency), the launches below ``BELOW`` of copy bandwidth with their reason, the ops and
    the sampler steps next to the reference."""
    out = []
    for shape in result["shapes"]:
        rows = [r for r in result["rows"] if r["device"] == device and r["shape"] == shape and not r.get("torch_op")]
        if not rows:
            continue
        out.append(f"#### {tuple(shape)} on {device}: every launch (estimate)\n")
        out.append("| launch | µs | limit | copy | regs | warps | programs/SM (limit) | waves | waits |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["us"] != r["us"]:
                out.append(f"| {r['kernel']} | - | {r['limit']} | | | | | | |")
                continue
            out.append(f"| {r['kernel']} | {r['us']:.1f} | {r['limit']} | {100 * r['copy_share']:.0f}% | {r['registers']} | "
                       f"{r['warps']} | {r['programs_per_sm']} ({r['residency_limit']}) | {r['waves']:.2f} | {r['waits']:.0f} |")  # fmt: skip
        low = [r for r in rows if r["us"] == r["us"] and r["copy_share"] < BELOW]
        out.append(
            f"\nBelow {100 * BELOW:.0f} % of copy bandwidth: {len(low)} of {len(rows)} launches, by kernel and limit "
            "(every launch is in the table above and in the JSON):\n"
        )
        out.append("| kernel | limit | launches | dtypes | copy | µs | why it stays / what would lift it |")
        out.append("|---|---|---|---|---|---|---|")
        for g in below_groups(rows):
            out.append(f"| {g['kernel']} | {g['limit']} | {g['launches']} | {','.join(g['dtypes'])} | "
                       f"{100 * g['copy_min']:.0f}–{100 * g['copy_max']:.0f}% | {g['us_min']:.1f}–{g['us_max']:.1f} | {g['why']} |")  # fmt: skip
        for key, title in (("ops", "ops"), ("steps", "sampler step, one network call (a middle step of 3)")):
            ents = [e for e in result[key] if e["device"] == device and e["shape"] == shape]
            if not ents:
                continue
            out.append(f"\n{title}, gmkernels vs the reference composition (estimate):\n")
            out.append("| case | dtype | gmkernels µs | launches | reference µs | launches | speedup |")
            out.append("|---|---|---|---|---|---|---|")
            for e in ents:
                out.append(f"| {e['op']} | {e['dtype']} | {e['us']:.1f} | {e['launches']} | {e['reference_us']:.1f} | "
                           f"{e['reference_launches']} | {e['speedup']:.1f}x |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def op_table(entries: list[dict], title: str) -> str:
    w = max([len(e["op"]) for e in entries] + [4])
    lines = [
        title,
        f"{'op':<{w}} {'dtype':<5} {'gmkernels µs':>12} {'launches':>8} {'reference µs':>12} {'launches':>8} {'speedup':>8}  limits",
    ]
    for e in entries:
        lim = ", ".join(f"{k} x{v}" for k, v in e["limits"].items())
        lines.append(f"{e['op']:<{w}} {e['dtype']:<5} {e['us']:>12.1f} {e['launches']:>8} {e['reference_us']:>12.1f} "
                     f"{e['reference_launches']:>8} {e['speedup']:>7.1f}x  {lim}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmkernels_bench.estimate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["bench"],
        metavar="B,K,C,H,W",
        help="GM shapes or named sets ('bench', 'users', 'targets': ImageNet, FLUX, pi-Flow); default bench",
    )
    p.add_argument(
        "--device", default=",".join(DEFAULT_DEVICES), help=f"comma list of {','.join(pm.DEVICES)} (default h100)"
    )
    p.add_argument("--json", metavar="PATH", help="write every row as JSON to PATH")
    p.add_argument("--markdown", metavar="PATH", help="write the note's tables (per device) as markdown to PATH")
    p.add_argument(
        "--reference", action="store_true", help="also each op and sampler step next to the reference composition"
    )
    p.add_argument("--calibration", metavar="FILE", help="device constants measured by gpu_check --calibrate FILE")
    p.add_argument("--filter", default="", help="only launches whose name contains this")
    p.add_argument("--no-cache", action="store_true", help="count and compile again")
    p.add_argument(
        "--calibration-set",
        metavar="PATH",
        help="write the stored estimates of gpu_check's calibrate part "
        "(calibrate.LAUNCHES on every device) to PATH and exit",
    )
    p.add_argument("--compile-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile_child:
        return _compile_child(*args.compile_child)
    if args.calibration_set:
        out = calibration_set(args.calibration_set, not args.no_cache)
        print(f"wrote {args.calibration_set}: {sum(len(v) for v in out['devices'].values())} launch estimates")
        return 0
    names = [d.strip() for d in args.device.split(",") if d.strip()]
    unknown = [d for d in names if d not in pm.DEVICES]
    if unknown:
        p.error(f"--device: unknown {unknown}; known: {list(pm.DEVICES)}")
    cal = pm.load_calibration(args.calibration)
    devices = [pm.device(d, cal) for d in names]
    items = []
    for s in args.shapes:
        items += [",".join(map(str, t)) for t in TARGET_SHAPES] if s == "targets" else [s]
    shapes = parse_shapes(items)
    t0 = time.time()
    result = run(shapes, devices, args.reference, args.filter, not args.no_cache)
    for dev in devices:
        for shape in shapes:
            rows = [r for r in result["rows"] if r["device"] == dev.name and r["shape"] == list(shape)]
            print()
            print(f"shape {shape}")
            print(launch_table(rows, dev))
        if args.reference:
            print()
            print(
                op_table(
                    [e for e in result["ops"] if e["device"] == dev.name], f"{dev.label()}: ops, gmkernels vs reference"
                )
            )
            print()
            print(
                op_table(
                    [e for e in result["steps"] if e["device"] == dev.name],
                    f"{dev.label()}: sampler step (one network call, a middle step of {LOOP_STEPS}), gmkernels vs reference",
                )
            )
    for f in result["failures"]:
        print("FAIL:", f)
    print(
        f"\n[estimate] {len(result['rows'])} launch rows in {time.time() - t0:.0f} s; every figure is an estimate"
        + ("" if all(d.measured for d in devices) else " (uncalibrated: see docs/performance-model.md)")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            for dev in devices:
                f.write(markdown_report(result, dev.name) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
