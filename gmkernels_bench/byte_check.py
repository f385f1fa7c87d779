"""The hand-written byte model of ``gmkernels_bench.cases`` checked against the traffic the
kernels really make (``gmkernels_bench.traffic``, counted by the interpreter).

    python -m gmkernels_bench.byte_check                         # the default shapes, fp32 and bf16
    python -m gmkernels_bench.byte_check --shapes 2,3,3,5,7 --dtype fp32 --markdown

Per case (every op of ``cases._OPS``, the NLL forward + backward, the policy rollout, the
sampler step in every solver x order x guidance mode) at each shape: the model's bytes, the
counted bytes, their gap, and, for the record, the DRAM bytes of the launches (distinct 32-byte
sectors, each launch from a cold cache) and the launches. What is compared:

* ops, NLL, policy: the model counts each input once and each output once, so it is compared
  with the distinct bytes of all the op's launches together (``traffic.union_bytes``);
* sampler steps: ``cases.step_traffic`` counts what each launch reads and writes, so it is
  compared with the sum over launches of each launch's distinct bytes (the second call of a
  two-step loop at order 2, the only call of a one-step loop at order 1; both the last step).

Needs ``TRITON_INTERPRET=1`` (set here before triton is imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

#: three shapes, odd sizes included (point data, H = W = 1, is left out: there the per-sample scalars
#: that the model does not count, statistics and seeds, are as large as the data)
SHAPES = ((2, 3, 3, 5, 7), (1, 8, 4, 8, 8), (3, 5, 2, 7, 9))
TOLERANCE = 0.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STEP_GUIDANCE = ("none", "probabilistic", "weight", "mean-cfg")


#: gaps beyond ``TOLERANCE`` that are the kernels' (the model is the minimum the op needs; the
#: implementation moves more): what it moves beyond the model and the change that would close it.
#: ``tests/test_traffic.py`` fails on any other gap and on a listed one that has closed.
KNOWN_GAPS = {
    "probabilistic_guidance": "two passes (the guidance needs global sums): the statistics pass writes m_c and d (X float32 "
    "each) that the apply pass reads back, and the apply pass writes unnormalised log-weights "
    "and reads them back to normalise (L); keep K in registers when it fits and recompute d "
    "from the GMs in the apply pass",
    "mean_cfg": "plain mean-CFG needs no global sum but runs as two launches: the first writes m_c - m_u (X float32) "
    "that the second reads back; one launch could loop over K twice (the second pass from L1/L2)",
    "gm1d_inverse_cdf": "the Newton start z = sqrt(2) erfinv(u) is computed by torch ops on the host path and read by "
    "the kernel (V float32 written and read, plus the torch launches): compute it in the kernel",
    "gaussian_samples_to_gm_samples": "the KR transport keeps its per-component log-likelihood accumulator in a float32 "
    "(R, K, P) scratch that every channel reads and writes: keep it in registers "
    "when BLOCK_K covers K",
    "gm_samples_to_gaussian_samples": "as gaussian_samples_to_gm_samples (the same scratch)",
    "gm_mul_iso_gaussian bf16": "for a bf16 GM the unnormalised log-weights go through a float32 (R, K, P) scratch, "
    "written and read back to normalise (2 x L float32 beyond the model); keep them in "
    "registers when BLOCK_K covers K (the fp32 path writes them into the output instead)",
}


def known_gap(ch: "Check") -> str | None:
    """The ``KNOWN_GAPS`` reason of a check (by case and dtype, or by case), if any."""
    return KNOWN_GAPS.get(f"{ch.case} {ch.dtype}") or KNOWN_GAPS.get(ch.case)


@dataclass
class Check:
    family: str
    case: str
    shape: tuple
    dtype: str
    model: int
    counted: int
    dram: int
    launches: int
    compared: str  # "union" or "per launch"

    @property
    def gap(self) -> float:
        return (self.counted - self.model) / self.model if self.model else float("inf")


def _count(fn: Callable[[], Any]) -> list:
    import gmkernels
    from gmkernels_bench.traffic import count_traffic

    with gmkernels.use_backend("triton"), count_traffic(addresses=True) as launches:
        fn()
    return launches


def _union(launches: list) -> int:
    from gmkernels_bench.traffic import union_bytes

    return union_bytes(launches, "load") + union_bytes(launches, "store")


def op_checks(dims: tuple, dtype: str, ops: tuple[str, ...] | None = None) -> list[Check]:
    import gmkernels
    from gmkernels_bench import cases

    dt = DTYPES[dtype]
    shape = cases.Shape("check", *dims)
    c = cases.counts(shape)
    out = []
    for i, (name, (family, args, reads, writes)) in enumerate(cases._OPS.items()):
        if ops is not None and name not in ops:
            continue
        a = args(cases.Inputs(shape, dt, torch.device("cpu"), seed=i))
        launches = _count(lambda: getattr(gmkernels, name)(*a))
        model = cases.model_bytes(reads, c, dt.itemsize) + cases.model_bytes(writes, c, dt.itemsize)
        out.append(
            Check(
                family,
                name,
                dims,
                dtype,
                model,
                _union(launches),
                sum(t.dram_bytes for t in launches),
                len(launches),
                "union",
            )
        )
    return out


def train_check(dims: tuple, dtype: str) -> Check:
    import gmkernels
    from gmkernels_bench import cases

    dt = DTYPES[dtype]
    shape = cases.Shape("check", *dims)
    (case,) = cases.train_cases(shape, dt, torch.device("cpu"), compile_ops=())
    a = case.make()
    launches = _count(lambda: case.runs["triton"](a))
    del gmkernels
    return Check("likelihood", "gm_nll_loss fwd+bwd", dims, dtype, case.bytes, _union(launches),
                 sum(t.dram_bytes for t in launches), len(launches), "union")  # fmt: skip


def policy_check(dims: tuple, dtype: str, substeps: int = 4) -> Check:
    """One rollout of ``substeps`` Euler substeps (the model does not depend on their number)."""
    from gmkernels_bench import cases

    dt = DTYPES[dtype]
    shape = cases.Shape("check", *dims)
    c = cases.counts(shape)
    a = cases._policy_inputs(shape, dt, torch.device("cpu"), False, substeps)
    launches = _count(lambda: cases._policy_rollout(a))
    model = cases._elements("G+L+S+X+X", c) * dt.itemsize  # as cases.policy_cases: x_start is x_src
    return Check("policy", f"policy rollout {substeps}", dims, dtype, model, _union(launches),
                 sum(t.dram_bytes for t in launches), len(launches), "union")  # fmt: skip


def step_checks(dims: tuple, dtype: str, guidance_modes: tuple[str, ...] = STEP_GUIDANCE) -> list[Check]:
    """The last call of a sampling loop (fp32 state, GM in ``dtype``), per solver, order, guidance."""
    import gmkernels
    from gmkernels_bench import cases
    from gmkernels_bench.traffic import count_traffic

    dt = DTYPES[dtype]
    shape = cases.Shape("check", *dims)
    out = []
    for solver in ("gm-ode", "gm-sde"):
        for order in (1, 2):
            for guidance in guidance_modes:
                inp = cases.Inputs(shape, dt, torch.device("cpu"), seed=5)
                guided = guidance != "none"
                gms = (inp.gm(), inp.gm()) if guided else inp.gm()
                noise = inp.state().float()
                marks: list[int] = []
                with gmkernels.use_backend("triton"), count_traffic() as launches:

                    def den(x, t):
                        marks.append(len(launches))
                        return gms

                    gmkernels.sample(den, noise, order, solver=solver, substeps=4 if solver == "gm-ode" else 1, order=order,
                                     guidance=guidance if guided else "probabilistic", guidance_scale=(0.5 if guidance == "probabilistic" else 2.0) if guided else 0.0,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip
                last = launches[marks[-1] :]
                model = cases.step_traffic(shape, dt, torch.float32, solver, order, guidance, last=True)
                out.append(Check("solver_steps", f"step {solver} order {order} {guidance}", dims, dtype, model["bytes"],
                                 sum(t.distinct_bytes for t in last), sum(t.dram_bytes for t in last), len(last), "per launch"))  # fmt: skip
    return out


def run(shapes=SHAPES, dtypes=("fp32", "bf16"), log: Callable[[str], None] | None = None) -> list[Check]:
    out: list[Check] = []
    for dims in shapes:
        for dtype in dtypes:
            got = (
                op_checks(dims, dtype)
                + [train_check(dims, dtype), policy_check(dims, dtype)]
                + step_checks(dims, dtype)
            )
            if log:
                for ch in got:
                    log(row(ch))
            out += got
    return out


def row(ch: Check) -> str:
    flag = "" if abs(ch.gap) <= TOLERANCE else ("  <-- kernel (KNOWN_GAPS)" if known_gap(ch) else "  <-- gap")
    return (f"| {ch.family} | {ch.case} | {','.join(map(str, ch.shape))} | {ch.dtype} | {ch.model} | {ch.counted} | "
            f"{100 * ch.gap:+.1f}% | {ch.dram} | {ch.launches} | {ch.compared} |{flag}")  # fmt: skip


HEADER = (
    "| family | case | B,K,C,H,W | dtype | model B | counted B | gap | DRAM B (sectors) | launches | compared |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmkernels_bench.byte_check", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES], metavar="B,K,C,H,W")
    p.add_argument("--dtype", default="fp32,bf16")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    print(HEADER)
    checks = run(shapes, tuple(args.dtype.split(",")), log=lambda s: print(s, flush=True))
    bad = [c for c in checks if abs(c.gap) > TOLERANCE and not known_gap(c)]
    known = sorted(
        {f"{c.case} ({c.dtype})": known_gap(c) for c in checks if abs(c.gap) > TOLERANCE and known_gap(c)}.items()
    )
    print(
        f"\n{len(checks)} checks, {len(bad)} unexplained gaps beyond {100 * TOLERANCE:.0f}%; the kernels' known gaps:"
    )
    for k, why in known:
        print(f"  {k}: {why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
