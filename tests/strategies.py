"""Hypothesis strategies for GMs, states and sigmas, shared by every test module.

``gms(...)`` draws a GM dict with random shapes (0-2 batch dims, odd H, W, K from 1 to a cap,
C from 1 to a cap) and values: means with random offsets and scales, log-stds from tiny to
large, log-weights with optional dead components (``-inf``, never all of them).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    den = ref.norm()
    num = (out - ref).norm()
    return float(num / den) if den > 0 else float(num)


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@st.composite
def gm_shapes(draw, max_k: int = 16, max_c: int = 8, max_hw: int = 7, max_batch_dims: int = 2, max_b: int = 3):
    """``(batch, K, C, H, W)``."""
    nb = draw(st.integers(0, max_batch_dims))
    batch = tuple(draw(st.integers(1, max_b)) for _ in range(nb))
    K = draw(st.one_of(st.just(1), st.integers(1, max_k)))
    C = draw(st.integers(1, max_c))
    H = draw(st.integers(1, max_hw))
    W = draw(st.integers(1, max_hw))
    return batch, K, C, H, W


def make_gm(shape, seed: int, dtype=torch.float64, dead: bool = False, logstd_range=(-3.0, 1.0), per_pixel_std=False):
    """A random GM with the given ``(batch, K, C, H, W)``; ``dead`` kills about a third of the
    components (-inf log-weights), never all of a pixel's."""
    batch, K, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty((*batch, 1, 1, 1, 1), dtype=torch.float64).uniform_(-1, 1, generator=g))
    means = torch.randn((*batch, K, C, H, W), generator=g, dtype=torch.float64) * scale
    means = means + torch.randn((*batch, 1, C, 1, 1), generator=g, dtype=torch.float64)
    lo, hi = logstd_range
    std_shape = (*batch, 1, 1, H, W) if per_pixel_std else (*batch, 1, 1, 1, 1)
    logstds = torch.empty(std_shape, dtype=torch.float64).uniform_(lo, hi, generator=g)
    logits = torch.randn((*batch, K, 1, H, W), generator=g, dtype=torch.float64) * 2
    if dead and K > 1:
        kill = torch.rand((*batch, K, 1, H, W), generator=g, dtype=torch.float64) < 0.35
        kill[..., :1, :, :, :] = False  # component 0 stays alive
        perm = torch.randperm(K, generator=g)
        logits = torch.where(kill, float("-inf"), logits)[..., perm, :, :, :]
    logweights = torch.log_softmax(logits, dim=-4)
    return {"means": means.to(dtype), "logstds": logstds.to(dtype), "logweights": logweights.to(dtype)}


def make_state(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A random ``(*B, C, H, W)`` state for a GM of the given shape."""
    batch, _, C, H, W = shape
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randn((*batch, C, H, W), generator=g, dtype=torch.float64).to(dtype)


sigmas = st.floats(min_value=1e-3, max_value=1.0 - 1e-3)
seeds = st.integers(0, 2**31 - 1)


def assert_compiled_training_matches_eager(fns, value_and_grads, module, launcher: str) -> None:
    """For each of ``fns``: ``value_and_grads(torch.compile(fn, backend="aot_eager",
    fullgraph=True))`` (no graph break, else compile raises) equals ``value_and_grads(fn)``
    within 1e-6 relative, and the compiled backward calls ``module.<launcher>`` (the fused
    backward's launcher) once. Run it under ``use_backend("triton")``."""
    from unittest import mock

    for fn in fns:
        eager = value_and_grads(fn)
        with mock.patch.object(module, launcher, wraps=getattr(module, launcher)) as backward:
            compiled = value_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True))
        assert backward.call_count == 1
        for a, b in zip(compiled, eager):
            assert rel_err(a, b) < 1e-6


def assert_int64_offsets_change_nothing(run, module) -> None:
    """``run()`` (tensors computed on the Triton path) gives the same bits again with
    ``module.needs_int64`` forced true, i.e. through the kernels' 64-bit offset path (the
    predicate is a key of the stored launch plans, so forcing it plans anew)."""
    from unittest import mock

    want = run()
    with mock.patch.object(module, "needs_int64", lambda *t: True):
        got = run()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
