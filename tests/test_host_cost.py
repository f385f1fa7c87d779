"""Host cost of a public op call: launch plans (blocks, grid, the flattened views' strides)
are computed once per shape, the path from a public function to its kernel is short (Python
calls and package frames, measured by ``host_cost.call_path``), every op reaches its kernel
through its ``torch.library`` op (so the profiler names it), and the benchmark that measures
it runs."""

from __future__ import annotations

import json

import pytest
import torch
from strategies import make_gm, rel_err

import gmkernels as G
from gmkernels.ops import _launch, mixture
from gmkernels_bench import host_cost

SHAPE = ((2,), 3, 4, 5, 6)


def _plan_stats():
    infos = [f.cache_info() for f in _launch.PLAN_FUNCTIONS]
    return sum(i.misses for i in infos), sum(i.hits for i in infos)


@pytest.mark.parametrize(
    "op",
    [
        "gm_to_mean",
        "gm_to_iso_gaussian",
        "gm_mul_iso_gaussian",
        "iso_gaussian_mul_iso_gaussian",
        "u_to_x0 (tensor sigma)",
        "reverse_transition",
        "gm_posterior_mean (float sigmas)",
        "gm_logprob",
        "gm_nll_loss",
        "gm_nll_loss fwd+bwd",
        "transition_loss fwd+bwd",
        "gm_sample",
        "probabilistic_guidance",
        "weight_guidance",
        "mean_cfg",
        "gm1d_inverse_cdf",
        "gm_ode_substeps (tensor sigmas)",
        "gm_sde_step",
        "GMSDEScheduler.step (probabilistic)",
        "GMODEScheduler.step (order 2, probabilistic)",
    ],
)
def test_repeated_shape_recomputes_no_launch_plan(op):
    call = host_cost.cases()[op]
    with G.use_backend("triton"), host_cost.stubbed_launches():
        call()  # the first call of this shape may compute plans
        misses, hits = _plan_stats()
        call()
        misses_after, hits_after = _plan_stats()
    assert misses_after == misses and hits_after > hits


def test_needs_int64_and_integer_helpers():
    import triton

    assert [_launch.next_pow2(n) for n in range(0, 2050)] == [triton.next_power_of_2(n) for n in range(0, 2050)]
    assert all(_launch.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 70) for b in range(1, 9))
    small = torch.empty(4, 5)
    assert not _launch.needs_int64(small, small.t())
    huge = torch.empty_strided((2, 2), (2**31, 1), device="meta")  # offsets past int32, no memory
    assert _launch.needs_int64(small, huge)


@pytest.mark.triton
def test_the_op_reaches_its_kernel_through_its_library_op():
    """The Triton path runs ``gmkernels::<op>`` through the dispatcher: the profiler shows it."""
    gm = make_gm(SHAPE, 2, torch.float32)
    with G.use_backend("triton"), torch.profiler.profile() as prof:
        G.gm_to_mean(gm)
    assert "gmkernels::gm_to_mean" in {e.name for e in prof.events()}


#: cases that are not one call of a public function (autograd runs the backward)
_NOT_ONE_CALL = ("fwd+bwd",)


@pytest.mark.triton
def test_the_path_from_a_public_call_to_its_kernel_is_short():
    """At most 16 Python calls inside the package from a public op or scheduler step to its last
    launch (median over the public ops at most 10), at most 4 package frames at a launch."""
    cases = {name: call for name, call in host_cost.cases().items() if not any(tag in name for tag in _NOT_ONE_CALL)}
    paths = {name: host_cost.call_path(call) for name, call in cases.items()}
    long = {name: p for name, p in paths.items() if p[0] > 16 or p[1] > 4 or p[1] == 0}
    assert not long, long
    ops = sorted(calls for name, (calls, _) in paths.items() if ".step" not in name)
    assert ops[len(ops) // 2] <= 10, paths


def test_host_cost_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert host_cost.main(["--calls", "2", "--repeat", "1", "--filter", "gm_to_mean", "--json", str(out)]) == 0
    assert "gm_to_mean" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert records[0]["op"] == "gm_to_mean" and records[0]["launches"] == 1 and records[0]["host_us"] > 0
    assert 0 < records[0]["py_calls"] <= 16 and 0 < records[0]["frames"] <= 4


@pytest.mark.triton
def test_a_plan_whose_view_copies_is_recomputed_per_call():
    """Means whose H and W cannot be merged (a transposed spatial layout): the flattening copies,
    so the stored plan says so and each call makes its own views; results stay exact."""
    gm = make_gm(((2,), 3, 4, 5, 6), 3, torch.float32)
    gm["means"] = gm["means"].transpose(-1, -2).contiguous().transpose(-1, -2)
    gm["logweights"] = gm["logweights"].transpose(-1, -2).contiguous().transpose(-1, -2)
    with G.use_backend("torch"):
        want = G.gm_to_mean(gm)
    with G.use_backend("triton"):
        first, second = G.gm_to_mean(gm), G.gm_to_mean(gm)
    key = next(k for k in mixture._PLANS.plans if k[1][1] == gm["means"].stride())
    assert mixture._PLANS.plans[key][0] is False  # not the tensors themselves
    assert rel_err(first, want) < 1e-5 and rel_err(second, want) < 1e-5
