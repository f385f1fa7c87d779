"""Math properties of the GM ops that must hold whatever the implementation (torch backend here;
kernel test modules rerun what applies on the Triton backend)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import gm_shapes, make_gm, make_state, rel_err, seeds, sigmas

import gmkernels as G

case = st.tuples(gm_shapes(max_k=12, max_c=6, max_hw=5), seeds, st.booleans())


@pytest.fixture(autouse=True)
def _torch_backend():
    with G.use_backend("torch"):
        yield


def _lse_k(logweights):
    return torch.logsumexp(logweights, dim=-4)


@given(c=case, powers=st.sampled_from([(1.0, 1.0), (1.0, -0.5), (3.0, 0.5)]), s=st.tuples(sigmas, sigmas))
def test_weights_stay_normalised(c, powers, s):
    shape, seed, dead = c
    gm = make_gm(shape, seed, dead=dead)
    g = G.gm_to_iso_gaussian(make_gm(shape, seed + 1))
    outs = [
        G.gm_mul_iso_gaussian(gm, g, *powers),
        G.probabilistic_guidance(gm, make_gm(shape, seed + 2), 0.6),
        G.weight_guidance(gm, make_gm(shape, seed + 2), 3.0),
        G.reverse_transition(gm, make_state(shape, seed), max(s), min(s)),
    ]
    for out in outs:
        assert (_lse_k(out["logweights"]).abs() < 1e-10).all()
        assert not torch.isnan(out["means"]).any() and not torch.isnan(out["logweights"]).any()


@given(c=st.tuples(gm_shapes(max_k=1, max_c=6), seeds))
def test_k1_nll_is_l2_up_to_constants(c):
    """K = 1: the GM NLL is ``0.5 ||y - mu||^2 / s^2 + C * logstd`` (plain flow matching's L2)."""
    shape, seed = c
    gm = make_gm(shape, seed)
    y = make_state(shape, seed)
    C = shape[2]
    nll = G.gm_nll_loss(gm, y, reduction="none")
    l2 = 0.5 * (y - gm["means"].squeeze(-4)).square().sum(-3) * torch.exp(-2 * gm["logstds"]).view(*shape[0], 1, 1)
    assert rel_err(nll, l2 + C * gm["logstds"].view(*shape[0], 1, 1)) < 1e-10


@given(c=st.tuples(gm_shapes(max_k=1, max_c=6), seeds), s=st.tuples(sigmas, sigmas), alpha=st.floats(-2, 2))
def test_k1_posterior_mean_is_affine_in_x(c, s, alpha):
    """K = 1: a Gaussian posterior's mean is affine in the new state."""
    shape, seed = c
    gm = make_gm(shape, seed)
    x_src, x1, x2 = (make_state(shape, seed + i) for i in range(3))
    f = lambda x: G.gm_posterior_mean(gm, x_src, max(s), x, min(s))  # noqa: E731
    assert rel_err(f(alpha * x1 + (1 - alpha) * x2), alpha * f(x1) + (1 - alpha) * f(x2)) < 1e-9


@given(c=case)
def test_product_with_huge_variance_is_identity(c):
    shape, seed, dead = c
    gm = make_gm(shape, seed, dead=dead)
    batch = shape[0]
    g = {"mean": make_state(shape, seed), "var": torch.full((*batch, 1, 1, 1), 1e14, dtype=torch.float64)}
    out = G.gm_mul_iso_gaussian(gm, g)
    assert rel_err(out["means"], gm["means"]) < 1e-9
    assert rel_err(out["logstds"], gm["logstds"]) < 1e-9
    assert rel_err(out["logweights"].clamp(min=-1e4), gm["logweights"].clamp(min=-1e4)) < 1e-9


@given(c=case, sig=sigmas)
def test_posterior_mean_at_the_same_state_is_the_mean(c, sig):
    """No move, no change: ``d`` is 0 there, so the spec's ``eps`` sets the residual (taken tiny)."""
    shape, seed, dead = c
    gm = make_gm(shape, seed, dead=dead)
    x = make_state(shape, seed)
    out = G.gm_posterior_mean(gm, x, sig, x, sig, eps=1e-30)
    assert rel_err(out, G.gm_to_mean(gm)) < 1e-9


@given(c=case, other=st.booleans())
def test_guidance_at_neutral_scale_is_identity(c, other):
    shape, seed, dead = c
    gm_c = make_gm(shape, seed, dead=dead)
    gm_u = make_gm(shape, seed + 1, dead=dead) if other else gm_c
    out = G.probabilistic_guidance(gm_c, gm_u, 0.0)
    for k in ("means", "logstds", "logweights"):
        assert torch.equal(out[k], gm_c[k])
    for out in (G.weight_guidance(gm_c, gm_u, 1.0), G.mean_cfg(gm_c, gm_u, 1.0)):  # CFG's neutral scale is 1
        assert rel_err(out["means"], gm_c["means"]) < 1e-12
        assert rel_err(out["logweights"].clamp(min=-1e4), gm_c["logweights"].clamp(min=-1e4)) < 1e-12


def test_probabilistic_guidance_shifts_mean_by_normalised_bias():
    """Guidance moves the moment-matched mean by ``scale * sqrt(V / P)`` times the bias, with the
    mixture variance shrunk: the paper's construction, checked on a K = 1 GM where it is exact."""
    shape = ((2,), 1, 3, 4, 4)
    gm_c, gm_u = make_gm(shape, 0), make_gm(shape, 1)
    scale = 0.5
    out = G.probabilistic_guidance(gm_c, gm_u, scale, orthogonal=0.0)
    m_c, m_u = G.gm_to_mean(gm_c), G.gm_to_mean(gm_u)
    bias = m_c - m_u
    P = bias.square().mean((-3, -2, -1), keepdim=True)
    V = torch.exp(2 * gm_c["logstds"]).view(2, 1, 1, 1)
    assert rel_err(G.gm_to_mean(out), m_c + scale * torch.sqrt(V / P) * bias) < 1e-10
    assert rel_err(torch.exp(2 * out["logstds"]).view(2, 1, 1, 1), V * (1 - scale**2)) < 1e-10


@given(c=st.tuples(gm_shapes(max_k=4, max_c=3, max_hw=3, max_b=2), seeds, st.booleans()))
def test_nll_gradient_matches_finite_differences(c):
    shape, seed, dead = c
    gm = make_gm(shape, seed, dead=dead)
    y = make_state(shape, seed)
    live = torch.isfinite(gm["logweights"])

    def f(means, logstds, logweights):
        lw = torch.where(live, logweights, float("-inf"))
        return G.gm_nll_loss({"means": means, "logstds": logstds, "logweights": lw}, y, reduction="sum")

    inputs = [
        gm["means"].requires_grad_(),
        gm["logstds"].requires_grad_(),
        torch.where(live, gm["logweights"], 0.0).requires_grad_(),
    ]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "extreme",
    ["tiny_std", "huge_std", "all_but_one_dead", "sigma_near_0", "sigma_near_1"],
)
def test_valid_extreme_inputs_give_no_nan(extreme):
    shape = ((2,), 5, 3, 3, 3)
    gm = make_gm(shape, 3, dead=True, dtype=torch.float32)
    x = make_state(shape, 3, torch.float32)
    s_hi, s_lo = 0.8, 0.3
    if extreme == "tiny_std":
        gm["logstds"] = torch.full_like(gm["logstds"], -40.0)
    elif extreme == "huge_std":
        gm["logstds"] = torch.full_like(gm["logstds"], 40.0)
    elif extreme == "all_but_one_dead":
        lw = torch.full_like(gm["logweights"], float("-inf"))
        lw[:, 2] = 0.0
        gm["logweights"] = lw
    elif extreme == "sigma_near_0":
        s_hi, s_lo = 1e-6, 0.0
    else:
        s_hi, s_lo = 1.0, 1.0 - 1e-7
    outs = [
        G.gm_to_mean(gm),
        *G.gm_to_iso_gaussian(gm).values(),
        *G.gm_mul_iso_gaussian(gm, G.gm_to_iso_gaussian(gm)).values(),
        *G.u_to_x0(gm, x, s_hi).values(),
        *G.x0_to_u(gm, x, s_lo).values(),
        *G.reverse_transition(gm, x, s_hi, s_lo).values(),
        G.gm_posterior_mean(gm, x, s_hi, x * 0.5, s_lo),
        G.gm_nll_loss(gm, x),
        G.gm_logprob(gm, x.unsqueeze(1)),
        G.gm_sample(gm, 2),
        *G.probabilistic_guidance(gm, make_gm(shape, 4, dtype=torch.float32), 0.7).values(),
        *G.weight_guidance(gm, make_gm(shape, 4, dead=True, dtype=torch.float32), 4.0).values(),
        *G.mean_cfg(gm, make_gm(shape, 4, dtype=torch.float32), 4.0, True).values(),
    ]
    for o in outs:
        assert not torch.isnan(o).any(), extreme
        if o.dtype.is_floating_point and o is not gm["logweights"]:
            assert not torch.isposinf(o).any(), extreme
