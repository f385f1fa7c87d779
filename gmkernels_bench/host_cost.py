"""Host cost of each public op call: the Python side (validation, dispatch, launch arguments)
with the Triton kernel launch itself stubbed, in microseconds.

    python -m gmkernels_bench.host_cost                  # every op, a table on stdout
    python -m gmkernels_bench.host_cost --json out.json --repeat 5 --calls 200

What is timed: a repeated call of the public function with the same shapes, on the Triton path
(what runs for CUDA tensors), here on CPU tensors under ``TRITON_INTERPRET=1`` with every
``kernel[grid](...)`` replaced by a no-op that records the launch. So the figure contains input
validation, backend selection, the ``torch.library`` custom-op dispatch, block sizes, grids,
strides, output allocation and any small tensor op a launcher does, and excludes the kernel's
own launch path (Triton's argument binding and the driver call) and the kernel's run time. Run
it on an idle machine: it is a CPU-bound loop whose figure scales with the host's single-thread
speed. Outputs of stubbed launches are uninitialised memory; nothing reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import time
from typing import Callable, Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU tensors on the Triton path)

import torch  # noqa: E402

import gmkernels as G  # noqa: E402
from gmkernels.policy import GMFlowPolicy  # noqa: E402
from gmkernels.schedulers import GMODEScheduler, GMSDEScheduler  # noqa: E402

# a small shape: the host cost does not depend on the sizes (nothing here loops over elements)
SHAPE = (2, 8, 4, 8, 8)


@contextlib.contextmanager
def stubbed_launches(counter: list | None = None) -> Iterator[None]:
    """Replace the launch of every Triton kernel (``kernel[grid](...)``) by a no-op that
    records the kernel's name in ``counter`` (when given)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if counter is not None:
            counter.append(self.fn.__name__)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _inputs(seed: int = 0):
    B, K, C, H, W = SHAPE
    g = torch.Generator().manual_seed(seed)
    gm = {
        "means": torch.randn(B, K, C, H, W, generator=g),
        "logstds": torch.full((B, 1, 1, 1, 1), -1.0),
        "logweights": torch.log_softmax(torch.randn(B, K, 1, H, W, generator=g), dim=1),
    }
    x = torch.randn(B, C, H, W, generator=g)
    gauss = {"mean": torch.randn(B, C, H, W, generator=g), "var": torch.rand(B, 1, H, W, generator=g) + 0.1}
    gm1d = {
        "means": torch.randn(B, K, H, W, generator=g),
        "logstds": torch.full((B, 1, 1, 1), -1.0),
        "logweights": torch.log_softmax(torch.randn(B, K, H, W, generator=g), dim=1),
    }
    return gm, x, gauss, gm1d


def cases() -> dict[str, Callable[[], object]]:
    """``name -> call``: one call of each public op (and the training loss forward+backward),
    and one sampler step of each scheduler (plain, 2nd order, probabilistic guidance)."""
    gm, x, gauss, gm1d = _inputs()
    gm2, _, _, _ = _inputs(1)
    B = SHAPE[0]
    t_hi, t_lo = torch.full((B,), 700.0), torch.full((B,), 500.0)
    sig = torch.full((B, 1, 1, 1), 0.7)
    sigmas = torch.tensor([0.7, 0.6, 0.5])
    u = torch.rand(B, 3, SHAPE[3], SHAPE[4])
    gm_train = {k: v.clone().requires_grad_(k != "logstds") for k, v in gm.items()}

    def nll_fwd_bwd():
        G.gm_nll_loss(gm_train, x).backward()

    def transition_fwd_bwd():
        G.transition_loss(gm_train, x, t_hi, x, t_lo).backward()

    policy = GMFlowPolicy(gm, x, 0.9)
    policy_train = GMFlowPolicy(gm_train, x, 0.9)

    def policy_rollout_fwd_bwd():
        policy_train.integrate(x, 0.9, 0.9, 0.5, total_substeps=4)[0].sum().backward()

    def step(cls, order: int = 1, guided: bool = False) -> Callable[[], object]:
        """One ``scheduler.step`` of a long schedule (rescheduled when it ends: once per 4096
        calls), the network output given: its second and later steps are 2nd order at ``order=2``."""
        sched = cls(order=order, guidance_scale=0.5 if guided else 0.0)
        out = (gm, gm2) if guided else gm
        ts: list = []

        def call():
            if sched.timesteps is None or sched.step_index >= sched.num_steps:
                sched.set_timesteps(4096)
                ts[:] = list(sched.timesteps)
            return sched.step(out, ts[sched.step_index], x)

        return call

    return {
        "gm_to_mean": lambda: G.gm_to_mean(gm),
        "gm_to_iso_gaussian": lambda: G.gm_to_iso_gaussian(gm),
        "gm_mul_iso_gaussian": lambda: G.gm_mul_iso_gaussian(gm, gauss),
        "iso_gaussian_mul_iso_gaussian": lambda: G.iso_gaussian_mul_iso_gaussian(gauss, gauss),
        "u_to_x0 (float sigma)": lambda: G.u_to_x0(gm, x, 0.7),
        "u_to_x0 (tensor sigma)": lambda: G.u_to_x0(gm, x, sig),
        "x0_to_u": lambda: G.x0_to_u(gm, x, 0.7),
        "reverse_transition": lambda: G.reverse_transition(gm, x, 0.7, 0.5),
        "gm_posterior_mean (float sigmas)": lambda: G.gm_posterior_mean(gm, x, 0.7, x, 0.5),
        "gm_posterior_mean (tensor sigmas)": lambda: G.gm_posterior_mean(gm, x, sig, x, sig),
        "gm_logprob": lambda: G.gm_logprob(gm, x.unsqueeze(1)),
        "gm_nll_loss": lambda: G.gm_nll_loss(gm, x),
        "gm_nll_loss fwd+bwd": nll_fwd_bwd,
        "transition_loss (tensor t)": lambda: G.transition_loss(gm, x, t_hi, x, t_lo),
        "transition_loss fwd+bwd": transition_fwd_bwd,
        "gm_sample": lambda: G.gm_sample(gm),
        "probabilistic_guidance": lambda: G.probabilistic_guidance(gm, gm2, 0.5),
        "weight_guidance": lambda: G.weight_guidance(gm, gm2, 2.0),
        "mean_cfg": lambda: G.mean_cfg(gm, gm2, 2.0),
        "gm1d_inverse_cdf": lambda: G.gm1d_inverse_cdf(gm1d, u),
        "gm_ode_substeps (tensor sigmas)": lambda: G.gm_ode_substeps(gm, x, sigmas),
        "gm_sde_step": lambda: G.gm_sde_step(gm, x, 0.7, 0.5),
        "GMFlowPolicy.pi": lambda: policy.pi(x, 0.5),
        "GMFlowPolicy.integrate": lambda: policy.integrate(x, 0.9, 0.9, 0.5, total_substeps=4),
        "GMFlowPolicy.integrate fwd+bwd": policy_rollout_fwd_bwd,
        "GMODEScheduler.step": step(GMODEScheduler),
        "GMSDEScheduler.step": step(GMSDEScheduler),
        "GMODEScheduler.step (order 2)": step(GMODEScheduler, order=2),
        "GMSDEScheduler.step (probabilistic)": step(GMSDEScheduler, guided=True),
        "GMODEScheduler.step (order 2, probabilistic)": step(GMODEScheduler, order=2, guided=True),
    }


_PACKAGE = os.path.dirname(G.__file__) + os.sep


def call_path(call: Callable[[], object]) -> tuple[int, int]:
    """``(calls, frames)`` of one warm call: the Python function calls made inside the
    ``gmkernels`` package from the call's start to its last kernel launch, and the most
    ``gmkernels`` frames on the stack at a launch (how deep the path from a public function to
    its kernel is). Launches stubbed, Triton path, after a warm-up so plans are cached."""
    calls = 0
    at_launch: list[tuple[int, int]] = []

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(_PACKAGE):
            calls += 1

    def launched() -> None:
        frame, depth = inspect.currentframe(), 0
        while frame is not None:
            depth += frame.f_code.co_filename.startswith(_PACKAGE)
            frame = frame.f_back
        at_launch.append((calls, depth))

    from triton.runtime.interpreter import InterpretedFunction

    with G.use_backend("triton"), stubbed_launches():
        for _ in range(3):
            call()
        original = InterpretedFunction.run
        InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: launched()
        sys.setprofile(profile)
        try:
            call()
        finally:
            sys.setprofile(None)
            InterpretedFunction.run = original
    if not at_launch:
        return calls, 0
    return at_launch[-1][0], max(d for _, d in at_launch)


def measure(call: Callable[[], object], calls: int, repeat: int, warmup: int = 20) -> tuple[float, float, int]:
    """The CPU time of one call in µs -- the fastest and the median of ``repeat`` rounds of
    ``calls`` calls each -- and the number of kernel launches one call makes.

    CPU time of this thread (``time.thread_time``), not wall time: on a shared machine the
    wall clock also counts the time the thread waits for a core; the fastest round is the
    least disturbed one (caches shared with other processes still inflate it)."""
    launches: list = []
    with G.use_backend("triton"), stubbed_launches(launches):
        for _ in range(warmup):
            call()
        launches.clear()
        call()  # a repeated call (a scheduler's first step is first order, its later ones not)
        n_launch = len(launches)
        rounds = []
        for _ in range(repeat):
            t0 = time.thread_time()
            for _ in range(calls):
                call()
            rounds.append((time.thread_time() - t0) / calls * 1e6)
    return min(rounds), statistics.median(rounds), n_launch


def run(calls: int = 200, repeat: int = 5, filter_: str = "") -> list[dict]:
    """One record ``{op, host_us (fastest round), host_us_median, launches}`` per case."""
    torch.set_num_threads(1)
    out = []
    for name, call in cases().items():
        if filter_ and filter_ not in name:
            continue
        best, median, n = measure(call, calls, repeat)
        py_calls, frames = call_path(call)
        out.append(
            {
                "op": name,
                "host_us": round(best, 1),
                "host_us_median": round(median, 1),
                "launches": n,
                "py_calls": py_calls,
                "frames": frames,
            }
        )
    return out


def table(records: list[dict]) -> str:
    w = max(len(r["op"]) for r in records)
    lines = [
        f"{'op':<{w}}  {'host µs':>8}  {'median':>8}  launches  py calls  frames",
        f"{'-' * w}  {'-' * 8}  {'-' * 8}  --------  --------  ------",
    ]
    lines += [
        f"{r['op']:<{w}}  {r['host_us']:>8.1f}  {r['host_us_median']:>8.1f}  {r['launches']:>8}  {r['py_calls']:>8}  {r['frames']:>6}"
        for r in records
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmkernels_bench.host_cost", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200, help="calls per timing round (default 200)")
    p.add_argument("--repeat", type=int, default=5, help="timing rounds, the median is reported (default 5)")
    p.add_argument("--filter", default="", help="only ops whose name contains this")
    p.add_argument("--json", default=None, help="also write the records to this file")
    args = p.parse_args(argv)
    from gmkernels._dispatch import interpreting

    if not interpreting():
        print(
            "host_cost: set TRITON_INTERPRET=1 before Python starts (Triton was imported without it)", file=sys.stderr
        )
        return 2
    records = run(args.calls, args.repeat, args.filter)
    print(
        f"host cost per call, kernel launches stubbed: CPU µs of the fastest / median of {args.repeat} rounds of "
        f"{args.calls} calls (torch {torch.__version__}, 1 thread, shape {SHAPE})"
    )
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": SHAPE, "torch_version": torch.__version__, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
