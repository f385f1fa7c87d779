"""Host cost of a public op call: launch plans (blocks, grid, the flattened views' strides)
are computed once per shape, custom ops are called directly in plain eager mode (their
registered autograd formula as a plain ``autograd.Function`` when autograd tracks an input;
through the dispatcher whenever something observes or traces the call), and the benchmark
that measures it runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gmkernels as G
from gmkernels.ops import _launch, mixture
from gmkernels_bench import host_cost
from strategies import make_gm, make_state, rel_err

SHAPE = ((2,), 3, 4, 5, 6)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _plan_stats():
    infos = [f.cache_info() for f in _launch.PLAN_FUNCTIONS]
    return sum(i.misses for i in infos), sum(i.hits for i in infos)


@pytest.mark.parametrize("op", [
    "gm_to_mean", "gm_to_iso_gaussian", "gm_mul_iso_gaussian", "iso_gaussian_mul_iso_gaussian", "u_to_x0 (tensor sigma)",
    "reverse_transition", "gm_posterior_mean (float sigmas)", "gm_logprob", "gm_nll_loss", "gm_nll_loss fwd+bwd",
    "transition_loss fwd+bwd", "gm_sample", "probabilistic_guidance", "weight_guidance", "mean_cfg", "gm1d_inverse_cdf",
    "gm_ode_substeps (tensor sigmas)", "gm_sde_step", "GMSDEScheduler.step (probabilistic)",
    "GMODEScheduler.step (order 2, probabilistic)",
])  # fmt: skip
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
def test_direct_call_equals_the_dispatcher_and_steps_aside():
    """Plain eager: the implementation runs without the dispatcher (same result); under a
    dispatch mode, or with a tensor autograd must track, the op goes through the dispatcher."""
    gm = make_gm(SHAPE, 2, torch.float32)
    with G.use_backend("triton"):
        direct = G.gm_to_mean(gm)
        dispatched = torch.ops.gmkernels.gm_to_mean(gm["means"], gm["logweights"], 1.0)
        assert rel_err(direct, dispatched) == 0
        with Ops() as mode:
            G.gm_to_mean(gm)
        assert "gmkernels.gm_to_mean" in mode.names
    plain = (gm["means"], gm["logweights"], 1.0)
    assert _launch._plain_eager(plain)
    assert not _launch._plain_eager((gm["means"].requires_grad_(), gm["logweights"], 1.0))
    with torch.no_grad():
        assert _launch._plain_eager((gm["means"], gm["logweights"], 1.0))
    with Ops():
        assert not _launch._plain_eager(plain)


def test_host_cost_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert host_cost.main(["--calls", "2", "--repeat", "1", "--filter", "gm_to_mean", "--json", str(out)]) == 0
    assert "gm_to_mean" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert records[0]["op"] == "gm_to_mean" and records[0]["launches"] == 1 and records[0]["host_us"] > 0


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
    key = next(k for k in mixture._PLANS._plans if k[1][1] == gm["means"].stride())
    assert mixture._PLANS._plans[key][0] is False  # not the tensors themselves
    assert rel_err(first, want) < 1e-5 and rel_err(second, want) < 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("loss", ["gm_nll_loss", "transition_loss"])
def test_direct_autograd_equals_the_dispatcher(loss):
    """With inputs that require grad the op's registered formula runs as a plain
    ``autograd.Function``: the same loss and gradients as through the dispatcher (forced here
    by a dispatch mode, which makes the call observed)."""
    shape = ((2,), 3, 4, 5, 3)
    gm = make_gm(shape, 5, torch.float32)
    x, y = make_state(shape, 5).float(), make_state(shape, 6).float()
    t_hi, t_lo = torch.tensor([700.0, 400.0]), torch.tensor([500.0, 0.0])

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in gm.items()}
        out = G.gm_nll_loss(leaves, y) if loss == "gm_nll_loss" else G.transition_loss(leaves, x, t_hi, y, t_lo)
        return out.detach(), torch.autograd.grad(out, list(leaves.values()))

    with G.use_backend("triton"):
        leaves = [v.clone().requires_grad_() for v in gm.values()]
        assert _launch._tracked_plain((*leaves, y)) and not _launch._plain_eager((*leaves, y))
        direct = run()
        with Ops() as mode:
            dispatched = run()
    assert "gmkernels.gm_nll_loss_pixels" in mode.names
    assert torch.equal(direct[0], dispatched[0])
    for a, b in zip(direct[1], dispatched[1]):
        assert torch.equal(a, b)
