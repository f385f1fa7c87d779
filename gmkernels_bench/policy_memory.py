"""Memory of a training rollout of a pi-Flow GM policy, without a GPU.

    python -m gmkernels_bench.policy_memory            # both pi-Flow shapes, fp32
    python -m gmkernels_bench.policy_memory --quick    # small shapes

Reference (measured on this CPU): the torch path, which backpropagates through the rollout with
one activation checkpoint per substep (what the public pi-Flow code does). Each measurement runs
forward + backward of an ``n``-substep rollout in a fresh process and reads the peak resident
memory (VmHWM, reset just before) above the level before the rollout (inputs allocated), minus
the gradients it returns
(large tensors are mmap'ed by the C allocator, so resident memory follows them). The peak grows
linearly in ``n`` (one saved state per substep plus a fixed set of K x C x H x W temporaries of one
recomputed substep), so two substep counts give the line, extrapolated to 128.

Fused path (analytic, from the saved tensors of ``gmkernels.ops.policy``; the interpreter is too
slow for these shapes, and ``tests/test_policy.py`` checks the saved-tensor count at a
small shape): the forward saves ``ceil(N / S)`` states per pixel in fp32 (``S = ceil(sqrt(N))``)
and the ``(B, N + 1)`` sigma table; the backward adds a ``(B, H*W)`` fp32 partial of the variance
gradient. Everything else it holds is the inputs and the gradients themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

POLICY_SHAPES = {"piflow-imagenet": (64, 32, 4, 32, 32), "piflow-flux": (2, 8, 16, 96, 170)}
QUICK = {"piflow-imagenet": (2, 32, 4, 8, 8), "piflow-flux": (1, 8, 16, 8, 12)}
N_FULL = 128


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(dims: tuple[int, ...], n: int) -> dict:
    """Forward + backward of an ``n``-substep reference rollout in this (fresh) process."""
    import torch

    import gmkernels
    from gmkernels.policy import GMFlowPolicy

    torch.set_num_threads(1)
    B, K, C, H, W = dims
    g = torch.Generator().manual_seed(0)
    gm = {
        "means": torch.randn(B, K, C, H, W, generator=g).requires_grad_(),
        "logstds": (torch.rand(B, 1, 1, 1, 1, generator=g) * -1.5 - 0.5).requires_grad_(),
        "logweights": torch.log_softmax(torch.randn(B, K, 1, H, W, generator=g) * 2, dim=1).requires_grad_(),
    }
    x = torch.randn(B, C, H, W, generator=g)
    ones = torch.ones(B)

    def run(n: int) -> tuple:
        with gmkernels.use_backend("torch"):
            out = GMFlowPolicy(gm, x, ones).integrate(x, ones, ones, torch.zeros(B), shift=3.0, total_substeps=n)[0]
            return torch.autograd.grad(out, list(gm.values()), torch.ones_like(out))

    run(1)  # one-time set-up of autograd and the ops (tens of MiB) out of the measurement
    _reset_peak()
    base = _rss()
    grads = run(n)
    peak = _peak()
    grad_bytes = sum(t.numel() * t.element_size() for t in grads)
    return {"peak_extra": peak - base - grad_bytes, "grad_bytes": grad_bytes}


def _measure(dims: tuple[int, ...], n: int) -> dict:
    # A fixed mmap threshold: every allocation from 64 KiB is its own mapping, returned to the OS on
    # free (glibc's dynamic threshold would otherwise keep freed tensors resident and hide the peak).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-m", "gmkernels_bench.policy_memory", "--child", ",".join(map(str, dims)), str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fused_extra_bytes(dims: tuple[int, ...], n: int) -> int:
    """Saved checkpoints + sigma table + the backward's variance partials, fp32."""
    from gmkernels.ops.policy import checkpoint_stride

    B, K, C, H, W = dims
    P = H * W
    return 4 * (B * math.ceil(n / checkpoint_stride(n)) * C * P + B * (n + 1) + B * P)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmkernels_bench.policy_memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--counts", default="4,8", help="substep counts the reference runs at (default 4,8)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(tuple(int(v) for v in args.child[0].split(",")), int(args.child[1]))))
        return 0
    counts = [int(v) for v in args.counts.split(",")]
    shapes = QUICK if args.quick else POLICY_SHAPES
    mib = 2**20
    print(
        "| shape BxKxCxHxW | GM grads MiB | reference peak extra MiB, measured at N = "
        + ", ".join(map(str, counts))
        + f" | reference at N={N_FULL} (linear fit) | fused at N={N_FULL} (analytic) | fused / GM grads |"
    )
    print("|---|---|---|---|---|---|")
    for name, dims in shapes.items():
        rows = [_measure(dims, n) for n in counts]
        (n0, r0), (n1, r1) = (counts[0], rows[0]), (counts[-1], rows[-1])
        slope = (r1["peak_extra"] - r0["peak_extra"]) / (n1 - n0)
        full = r1["peak_extra"] + slope * (N_FULL - n1)
        grads = rows[0]["grad_bytes"]
        fused = fused_extra_bytes(dims, N_FULL)
        print(
            f"| {name} {'x'.join(map(str, dims))} | {grads / mib:.1f} | "
            + ", ".join(f"{r['peak_extra'] / mib:.1f}" for r in rows)
            + f" | {full / mib:.1f} ({full / grads:.2f}x grads) | {fused / mib:.1f} | {fused / grads:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
