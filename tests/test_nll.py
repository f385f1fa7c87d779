"""The GM NLL and transition loss on the reference side: gradients against float64 finite
differences, the closed-form backward (the math of the fused kernel) against autograd, the
clamp, reductions, the transition-loss definition and its argument checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gmkernels as G
import reference.likelihood as R
import reference.transition as RT
from strategies import gm_shapes, make_gm, make_state, rel_err, seeds, sigmas


@pytest.fixture(autouse=True)
def _torch_backend():
    with G.use_backend("torch"):
        yield


def _leaves(gm: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in gm.items()}


@pytest.mark.parametrize("per_pixel_std", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_nll_gradcheck_float64(per_pixel_std, reduction):
    """torch.autograd.gradcheck (finite differences) on the float64 reference, dead components
    included; logstds kept away from the clamp's kink."""
    shape = ((2,), 4, 3, 2, 3)
    gm = make_gm(shape, 5, dead=True, per_pixel_std=per_pixel_std, logstd_range=(-1.0, 0.5))
    y = make_state(shape, 5).requires_grad_()
    alive = torch.isfinite(gm["logweights"])

    def f(means, logstds, lw_alive, y):
        lw = torch.full_like(gm["logweights"], float("-inf")).masked_scatter(alive, lw_alive)
        return R.gm_nll_loss({"means": means, "logstds": logstds, "logweights": lw}, y, reduction=reduction)

    args = (gm["means"].requires_grad_(), gm["logstds"].requires_grad_(), gm["logweights"][alive].requires_grad_(), y)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@settings(max_examples=10)
@given(c=st.tuples(gm_shapes(max_k=10, max_c=5, max_hw=5), seeds, st.booleans(), st.booleans()),
       clamp=st.booleans())
def test_closed_form_backward_matches_autograd(c, clamp):
    """``reference.gm_nll_loss_backward`` (what the fused backward kernel computes) equals autograd
    of ``reference.gm_nll_loss`` in float64, with and without the istd clamp active."""
    shape, seed, dead, per_pixel_std = c
    gm = make_gm(shape, seed, dead=dead, per_pixel_std=per_pixel_std, logstd_range=(-12.0, -6.0) if clamp else (-3.0, 1.0))
    y = make_state(shape, seed)
    leaves = _leaves(gm)
    loss = R.gm_nll_loss(leaves, y, reduction="none")
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    auto = torch.autograd.grad(loss, [leaves[k] for k in ("means", "logstds", "logweights")], g)
    closed = R.gm_nll_loss_backward(gm, y, g)
    for a, k in zip(auto, ("means", "logstds", "logweights")):
        assert closed[k].shape == gm[k].shape
        assert rel_err(closed[k], a) < 1e-10, k


def test_clamp_has_no_gradient_through_istd():
    """Below ``logstds = log(eps)`` the quadratic term is frozen: d loss / d logstds = C per pixel."""
    shape = ((2,), 3, 4, 2, 2)
    gm = _leaves(make_gm(shape, 3, logstd_range=(-12.0, -11.0)))
    loss = R.gm_nll_loss(gm, make_state(shape, 3), eps=1e-4, reduction="sum")
    loss.backward()
    assert torch.allclose(gm["logstds"].grad, torch.full_like(gm["logstds"], 4.0 * 2 * 2))


@given(c=st.tuples(gm_shapes(max_k=1, max_c=6), seeds))
def test_k1_nll_is_l2_with_gradients(c):
    """K = 1: NLL = ``0.5 * ||y - mu||^2 / s^2 + C * logstd``, so dNLL/dmu = (mu - y) / s^2:
    plain flow matching's L2 up to the std; the (unnormalised) log-weight gets -1 per pixel."""
    shape, seed = c
    gm = _leaves(make_gm(shape, seed))
    y = make_state(shape, seed)
    G.gm_nll_loss(gm, y, reduction="sum").backward()
    s2 = torch.exp(2 * gm["logstds"].detach())
    assert rel_err(gm["means"].grad, (gm["means"].detach() - y.unsqueeze(-4)) / s2) < 1e-12
    assert (gm["logweights"].grad == -1).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(reduction):
    shape = ((2, 3), 5, 2, 3, 4)
    gm, y = make_gm(shape, 1, dead=True), make_state(shape, 1)
    per_pixel = G.gm_nll_loss(gm, y, reduction="none")
    assert per_pixel.shape == (2, 3, 3, 4)
    want = per_pixel.mean() if reduction == "mean" else per_pixel.sum()
    assert rel_err(G.gm_nll_loss(gm, y, reduction=reduction), want) < 1e-12


@settings(max_examples=8)
@given(c=st.tuples(gm_shapes(max_k=6, max_c=4, max_hw=4, max_batch_dims=1), seeds), s=st.tuples(sigmas, sigmas))
def test_transition_loss_definition(c, s):
    """transition_loss = NLL of x_t_low under reverse_transition(u_to_x0(gm_u)), t = 1000 sigma."""
    shape, seed = c
    s_high, s_low = max(s), min(s)
    gm_u, x_high, x_low = make_gm(shape, seed, dead=True), make_state(shape, seed), make_state(shape, seed + 1)
    gm_low = RT.reverse_transition(RT.u_to_x0(gm_u, x_high, s_high), x_high, s_high, s_low)
    want = R.gm_nll_loss(gm_low, x_low, reduction="none")
    out = G.transition_loss(gm_u, x_high, 1000 * s_high, x_low, 1000 * s_low, reduction="none")
    assert rel_err(out, want) < 1e-10


def test_transition_loss_per_sample_timesteps_and_edges():
    """``t`` as a ``(B,)`` tensor equals per-sample floats; ``t_low = t_high`` and ``t_low = 0``
    stay finite and differentiable."""
    shape = ((3,), 4, 2, 2, 3)
    gm_u, x_high, x_low = make_gm(shape, 2, dead=True), make_state(shape, 2), make_state(shape, 3)
    t_high = torch.tensor([900.0, 500.0, 1000.0], dtype=torch.float64)
    t_low = torch.tensor([900.0, 0.0, 10.0], dtype=torch.float64)
    gm = _leaves(gm_u)
    loss = G.transition_loss(gm, x_high, t_high, x_low, t_low, reduction="none")
    loss.sum().backward()
    for b in range(3):
        one = {k: v[b] for k, v in gm_u.items()}
        want = G.transition_loss(one, x_high[b], float(t_high[b]), x_low[b], float(t_low[b]), reduction="none")
        assert rel_err(loss[b].detach(), want) < 1e-12
    assert torch.isfinite(loss).all()
    for v in gm.values():
        assert torch.isfinite(v.grad).all()


def test_transition_loss_rejects_bad_timesteps():
    shape = ((2,), 3, 2, 2, 2)
    gm_u, x = make_gm(shape, 0), make_state(shape, 0)
    with pytest.raises(ValueError, match="t_high"):
        G.transition_loss(gm_u, x, 1500.0, x, 10.0)
    with pytest.raises(ValueError, match="t_low"):
        G.transition_loss(gm_u, x, 500.0, x, torch.tensor([-1.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="t_low must be <= t_high"):
        G.transition_loss(gm_u, x, 400.0, x, 500.0)
    with pytest.raises(ValueError, match="t_high"):
        G.transition_loss(gm_u, x, torch.ones(3, dtype=torch.float64), x, 1.0)
    with pytest.raises(TypeError, match="t_low"):
        G.transition_loss(gm_u, x, 500.0, x, "1")
    with pytest.raises(ValueError, match="x_t_low"):
        G.transition_loss(gm_u, x, 500.0, x[:1], 100.0)
    with pytest.raises(ValueError, match="reduction"):
        G.transition_loss(gm_u, x, 500.0, x, 100.0, reduction="avg")


_ORDER = r"t_low must be <= t_high \(the transition runs from t_high down to t_low\)"


@pytest.mark.parametrize("t_high, t_low, match", [
    ([700.0, 1500.0], 10.0, r"t_high must lie in \[0, 1000\]; got values from 700.0 to 1500.0"),
    ([700.0, float("nan")], 1.0, r"t_high must lie in \[0, 1000\]; got values from nan to nan"),
    ([700.0, 500.0], [-1.0, 3.0], r"t_low must lie in \[0, 1000\]; got values from -1.0 to 3.0"),
    ([700.0, 500.0], [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
    ("(B, 1, 1, 1)", [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
    ("0-d", [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
    (300.0, [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
    ([700.0, 500.0], 600.0, _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
])
def test_transition_loss_timestep_values_on_the_host(t_high, t_low, match):
    """Per-sample timestep tensors on CPU: the values are read once, and each failing check
    raises its own ``ValueError`` (range of t_high, range of t_low, then the order)."""
    shape = ((2,), 3, 2, 2, 2)
    gm_u, x = make_gm(shape, 0), make_state(shape, 0)
    as_t = lambda v: torch.tensor(v) if isinstance(v, list) else v  # noqa: E731
    if t_high == "(B, 1, 1, 1)":
        t_high = torch.tensor([700.0, 500.0]).view(2, 1, 1, 1)
    elif t_high == "0-d":
        t_high = torch.tensor(500.0)
    with pytest.raises(ValueError, match=match):
        G.transition_loss(gm_u, x, as_t(t_high), x, as_t(t_low))
    ok_low = torch.tensor([100.0, 0.0])  # the same timesteps in order pass
    G.transition_loss(gm_u, x, torch.tensor([700.0, 500.0]), x, ok_low)


def test_transition_loss_timestep_values_on_a_device(monkeypatch):
    """Where values are not read on the host (CUDA), one device-side assert checks
    ``0 <= t_low <= t_high <= 1000`` for tensors of any accepted shape (CPU tensors stand in:
    the assert fails synchronously there, with the same message)."""
    from gmkernels import _validate

    monkeypatch.setattr(_validate, "host_checks_values", lambda t: False)
    shape = ((2,), 3, 2, 2, 2)
    gm_u, x = make_gm(shape, 0), make_state(shape, 0)
    good = [(torch.tensor([700.0, 500.0]), torch.tensor([100.0, 0.0]).view(2, 1, 1, 1)),
            (torch.tensor(500.0), torch.tensor([100.0, 500.0])), (800.0, torch.tensor([0.0, 800.0])),
            (torch.tensor([1000.0, 1.0]), 1.0)]  # fmt: skip
    for t_high, t_low in good:
        G.transition_loss(gm_u, x, t_high, x, t_low)
    bad = [(torch.tensor([700.0, 1500.0]), 10.0), (500.0, torch.tensor([-1.0, 3.0])),
           (torch.tensor([700.0, 500.0]), torch.tensor([100.0, 600.0]).view(2, 1, 1, 1)),
           (torch.tensor([700.0, float("nan")]), torch.tensor([1.0, 1.0])), (300.0, torch.tensor([100.0, 600.0]))]  # fmt: skip
    for t_high, t_low in bad:
        with pytest.raises(RuntimeError, match=r"t_high and t_low must satisfy 0 <= t_low <= t_high <= 1000"):
            G.transition_loss(gm_u, x, t_high, x, t_low)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("inf")])
def test_nll_rejects_bad_eps(eps):
    shape = ((2,), 3, 2, 2, 2)
    with pytest.raises(ValueError, match="eps"):
        G.gm_nll_loss(make_gm(shape, 0), make_state(shape, 0), eps=eps)
