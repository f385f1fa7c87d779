"""GM log-density, NLL loss and transition loss: the reference against float64 finite
differences and its closed-form backward (the math of the fused kernel), then the Triton kernels
(NLL forward + backward, log-density, the transition map) against the reference, degenerate
inputs on both backends, the custom ops and torch.compile.

Kernels run under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py). Values and gradients are
compared with the float64 reference evaluated on the same (dtype-rounded) inputs. The gradient
of a shared log-std is a sum over pixels of ``g * sum_k r_k * (q_k - C)``, which can cancel; its
error is measured against that sum's magnitude ``sum |g| * sum_k r_k * (q_k + C)`` (its
condition), the bound any float32 evaluation of the formula meets.
"""

from __future__ import annotations

import contextlib
import functools
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    TOL,
    assert_compiled_training_matches_eager,
    assert_int64_offsets_change_nothing,
    gm_shapes,
    make_gm,
    make_state,
    rel_err,
    seeds,
    sigmas,
)

import gmkernels as G
import gmkernels.ops.likelihood as lik
import reference.likelihood as R
import reference.transition as RT

LOWP = (torch.bfloat16, torch.float16)
INF = math.inf


tiles = st.sampled_from([16, 64, lik.TILE])


@contextlib.contextmanager
def _tile(n: int):
    """Small register tiles make K larger than BLOCK_K (BLOCK_K = 1 at 16) at test shapes (the
    block function is a key of the stored launch plans, so the patched one plans anew)."""
    with mock.patch.object(lik, "_blocks", functools.partial(lik._blocks, tile=n)):
        yield


@pytest.fixture
def torch_backend():
    with G.use_backend("torch"):
        yield


def _leaves(gm: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in gm.items()}


def _cast(d: dict, dtype) -> dict:
    return {k: v.to(dtype) for k, v in d.items()}


def _nll_and_grads(fn, gm, y, grad, reduction, target_grad):
    """Loss and gradients (means, logstds, logweights[, target]) of ``fn(gm, y, reduction)``."""
    gm = {k: v.detach().clone().requires_grad_() for k, v in gm.items()}
    y = y.detach().clone().requires_grad_(target_grad)
    loss = fn(gm, y, reduction=reduction)
    inputs = [gm["means"], gm["logstds"], gm["logweights"]] + ([y] if target_grad else [])
    return loss.detach(), torch.autograd.grad(loss, inputs, grad.to(loss.dtype))


def _logstd_grad_scale(gm64, y64, grad64, reduction):
    """``sum |g| * sum_k r_k * (q_k + C)`` per log-std: the magnitude of the terms its gradient sums."""
    logstds = gm64["logstds"]
    istd = torch.exp(-logstds).clamp(max=1e4)
    q = ((y64.unsqueeze(-4) - gm64["means"]) * istd).square().sum(-3, keepdim=True)
    r = torch.softmax(gm64["logweights"] - 0.5 * q, dim=-4)
    C = gm64["means"].shape[-3]
    g = torch.ones_like(y64[..., 0, :, :]) * grad64.abs()  # per pixel
    if reduction == "mean":
        g = g / g.numel()
    terms = (r * (q + C)).sum(-4, keepdim=True) * g.unsqueeze(-3).unsqueeze(-4)
    return terms.sum_to_size(logstds.shape)


def _check_nll(shape, seed, dtype, dead, per_pixel_std, reduction, target_grad=False, logstd_range=(-3.0, 1.0)):
    gm = _cast(make_gm(shape, seed, dead=dead, per_pixel_std=per_pixel_std, logstd_range=logstd_range), dtype)
    y = make_state(shape, seed).to(dtype)
    gm64, y64 = _cast(gm, torch.float64), y.double()  # the reference sees the rounded inputs
    batch, _, _, H, W = shape
    g = torch.Generator().manual_seed(seed)
    grad = (
        torch.randn((*batch, H, W), generator=g, dtype=torch.float64)
        if reduction == "none"
        else torch.tensor(1.7, dtype=torch.float64)
    )

    ref_loss, ref_grads = _nll_and_grads(R.gm_nll_loss, gm64, y64, grad, reduction, target_grad)
    # the float32 evaluation of the same formula: responsibilities are exp(-q / 2) of sums q that
    # can reach 1e3 (tiny stds, far targets), so fp32 itself loses digits there; the kernel's
    # gradients must meet TOL or be no worse than twice what fp32 torch gives
    _, f32_grads = _nll_and_grads(R.gm_nll_loss, _cast(gm, torch.float32), y.float(), grad, reduction, target_grad)
    with G.use_backend("triton"):
        loss, grads = _nll_and_grads(G.gm_nll_loss, gm, y, grad, reduction, target_grad)

    tol = TOL[dtype]
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    for got, t in zip(grads, (gm["means"], gm["logstds"], gm["logweights"], y)):
        assert got.dtype == t.dtype and got.shape == t.shape
    # finite wherever the output dtype can hold the value (a float16 sum may overflow to inf)
    outs = [(loss, ref_loss), *zip(grads, ref_grads)]
    fits = [torch.isfinite(want.to(got.dtype)) for got, want in outs]
    for (got, want), ok in zip(outs, fits):
        assert (torch.isfinite(got) | ~ok).all() and (got[~ok] == want.to(got.dtype)[~ok]).all()
    (loss, ref_loss), *pairs = [(got[ok], want[ok]) for (got, want), ok in zip(outs, fits)]
    if reduction == "none":
        assert rel_err(loss, ref_loss) < tol
    elif loss.numel():  # a mean or sum can cancel: bound by the magnitude of the summed per-pixel losses
        mag = R.gm_nll_loss(gm64, y64, reduction="none").abs()
        mag = mag.mean() if reduction == "mean" else mag.sum()
        assert abs(float(loss) - float(ref_loss)) <= tol * float(mag) + 1e-30
    f32 = [g32[ok] for g32, ok in zip(f32_grads, fits[1:])]
    bound = [max(tol, 2 * rel_err(g32, want)) for g32, (_, want) in zip(f32, pairs)]
    assert rel_err(*pairs[0]) < bound[0], "means"
    assert rel_err(*pairs[2]) < bound[2], "logweights"
    scale = _logstd_grad_scale(gm64, y64, grad, reduction)[fits[2]]
    err32 = float((f32[1].double() - pairs[1][1]).norm())
    assert float((pairs[1][0].double() - pairs[1][1]).norm()) <= max(tol * float(scale.norm()), 2 * err32), "logstds"
    if target_grad:
        assert rel_err(*pairs[3]) < bound[3], "target"


# --------------------------------------------------------------------------------------------
# The reference (torch path)
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("torch_backend")
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


@pytest.mark.usefixtures("torch_backend")
@settings(max_examples=10)
@given(c=st.tuples(gm_shapes(max_k=10, max_c=5, max_hw=5), seeds, st.booleans(), st.booleans()), clamp=st.booleans())
def test_closed_form_backward_matches_autograd(c, clamp):
    """``reference.gm_nll_loss_backward`` (what the fused backward kernel computes) equals autograd
    of ``reference.gm_nll_loss`` in float64, with and without the istd clamp active."""
    shape, seed, dead, per_pixel_std = c
    gm = make_gm(
        shape, seed, dead=dead, per_pixel_std=per_pixel_std, logstd_range=(-12.0, -6.0) if clamp else (-3.0, 1.0)
    )
    y = make_state(shape, seed)
    leaves = _leaves(gm)
    loss = R.gm_nll_loss(leaves, y, reduction="none")
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    auto = torch.autograd.grad(loss, [leaves[k] for k in ("means", "logstds", "logweights")], g)
    closed = R.gm_nll_loss_backward(gm, y, g)
    for a, k in zip(auto, ("means", "logstds", "logweights")):
        assert closed[k].shape == gm[k].shape
        assert rel_err(closed[k], a) < 1e-10, k


@pytest.mark.usefixtures("torch_backend")
def test_clamp_has_no_gradient_through_istd():
    """Below ``logstds = log(eps)`` the quadratic term is frozen: d loss / d logstds = C per pixel."""
    shape = ((2,), 3, 4, 2, 2)
    gm = _leaves(make_gm(shape, 3, logstd_range=(-12.0, -11.0)))
    loss = R.gm_nll_loss(gm, make_state(shape, 3), eps=1e-4, reduction="sum")
    loss.backward()
    assert torch.allclose(gm["logstds"].grad, torch.full_like(gm["logstds"], 4.0 * 2 * 2))


@pytest.mark.usefixtures("torch_backend")
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


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(reduction):
    shape = ((2, 3), 5, 2, 3, 4)
    gm, y = make_gm(shape, 1, dead=True), make_state(shape, 1)
    per_pixel = G.gm_nll_loss(gm, y, reduction="none")
    assert per_pixel.shape == (2, 3, 3, 4)
    want = per_pixel.mean() if reduction == "mean" else per_pixel.sum()
    assert rel_err(G.gm_nll_loss(gm, y, reduction=reduction), want) < 1e-12


@pytest.mark.usefixtures("torch_backend")
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


@pytest.mark.usefixtures("torch_backend")
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


@pytest.mark.usefixtures("torch_backend")
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


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize(
    "t_high, t_low, match",
    [
        ([700.0, 1500.0], 10.0, r"t_high must lie in \[0, 1000\]; got values from 700.0 to 1500.0"),
        ([700.0, float("nan")], 1.0, r"t_high must lie in \[0, 1000\]; got values from nan to nan"),
        ([700.0, 500.0], [-1.0, 3.0], r"t_low must lie in \[0, 1000\]; got values from -1.0 to 3.0"),
        ([700.0, 500.0], [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
        ("(B, 1, 1, 1)", [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
        ("0-d", [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
        (300.0, [100.0, 600.0], _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
        ([700.0, 500.0], 600.0, _ORDER + "; t_low exceeds t_high at 1 of 2 entries"),
    ],
)
@pytest.mark.usefixtures("torch_backend")
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


@pytest.mark.usefixtures("torch_backend")
def test_transition_loss_timestep_values_on_a_device(monkeypatch):
    """Where values are not read on the host (CUDA), one device-side assert checks
    ``0 <= t_low <= t_high <= 1000`` for tensors of any accepted shape (CPU tensors stand in:
    the assert fails synchronously there, with the same message)."""
    from gmkernels import _validate

    monkeypatch.setattr(_validate, "host_checks_values", lambda t: False)
    shape = ((2,), 3, 2, 2, 2)
    gm_u, x = make_gm(shape, 0), make_state(shape, 0)
    good = [
        (torch.tensor([700.0, 500.0]), torch.tensor([100.0, 0.0]).view(2, 1, 1, 1)),
        (torch.tensor(500.0), torch.tensor([100.0, 500.0])),
        (800.0, torch.tensor([0.0, 800.0])),
        (torch.tensor([1000.0, 1.0]), 1.0),
    ]
    for t_high, t_low in good:
        G.transition_loss(gm_u, x, t_high, x, t_low)
    bad = [
        (torch.tensor([700.0, 1500.0]), 10.0),
        (500.0, torch.tensor([-1.0, 3.0])),
        (torch.tensor([700.0, 500.0]), torch.tensor([100.0, 600.0]).view(2, 1, 1, 1)),
        (torch.tensor([700.0, float("nan")]), torch.tensor([1.0, 1.0])),
        (300.0, torch.tensor([100.0, 600.0])),
    ]
    for t_high, t_low in bad:
        with pytest.raises(RuntimeError, match=r"t_high and t_low must satisfy 0 <= t_low <= t_high <= 1000"):
            G.transition_loss(gm_u, x, t_high, x, t_low)


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("eps", [0.0, -1.0, float("inf")])
def test_nll_rejects_bad_eps(eps):
    shape = ((2,), 3, 2, 2, 2)
    with pytest.raises(ValueError, match="eps"):
        G.gm_nll_loss(make_gm(shape, 0), make_state(shape, 0), eps=eps)


# --------------------------------------------------------------------------------------------
# The Triton kernels against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@settings(max_examples=8)
@given(
    c=st.tuples(gm_shapes(max_k=20, max_c=5, max_hw=6), seeds, st.booleans(), st.booleans()),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    target_grad=st.booleans(),
    tile=tiles,
)
def test_nll_forward_backward_matches_reference(c, dtype, reduction, target_grad, tile):
    shape, seed, dead, per_pixel_std = c
    with _tile(tile):
        _check_nll(shape, seed, dtype, dead, per_pixel_std, reduction, target_grad)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_pixel_std", [False, True])
def test_nll_point_data(dtype, per_pixel_std):
    """H = W = 1 (2-D toy data): the batch runs along the kernel's pixel block."""
    _check_nll(((37,), 5, 2, 1, 1), 3, dtype, True, per_pixel_std, "mean")
    _check_nll(((3, 4), 3, 2, 1, 1), 4, dtype, False, per_pixel_std, "none", target_grad=True)


@pytest.mark.triton
def test_nll_huge_k():
    """K = 1030 (many tiles of the online logsumexp) with dead components, at a tiny image."""
    _check_nll(((2,), 1030, 2, 2, 3), 11, torch.float32, True, False, "none")


@pytest.mark.triton
def test_nll_many_channels():
    """C = 64 (the loop over channels) and K = 3."""
    _check_nll(((2,), 3, 64, 3, 2), 12, torch.float32, True, False, "sum")


@pytest.mark.triton
def test_nll_more_pixels_than_a_block():
    """H * W = 132 > BLOCK_P = 128: two programs per row, the shared log-std's gradient summed
    from their partials; point data with 130 rows: two programs across the batch."""
    _check_nll(((2,), 3, 2, 12, 11), 13, torch.float32, True, False, "mean")
    _check_nll(((130,), 3, 2, 1, 1), 14, torch.float32, False, False, "sum")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_tiny_stds_hit_the_clamp(dtype):
    """``exp(-logstds) > 1/eps``: istd is clamped (no gradient through it), nothing overflows."""
    _check_nll(((3,), 4, 3, 2, 3), 5, dtype, True, False, "none", logstd_range=(-14.0, -10.0))
    _check_nll(((3,), 4, 3, 2, 3), 6, dtype, False, True, "mean", logstd_range=(-14.0, -8.0))


@pytest.mark.triton
def test_nll_dead_components_get_zero_gradient():
    shape = ((2,), 9, 3, 3, 3)
    gm = make_gm(shape, 21, dtype=torch.float32, dead=True)
    gm = {k: v.requires_grad_() for k, v in gm.items()}
    y = make_state(shape, 21).float()
    with G.use_backend("triton"):
        G.gm_nll_loss(gm, y).backward()
    dead = torch.isinf(gm["logweights"].detach())
    assert dead.any()
    for t in gm.values():
        assert torch.isfinite(t.grad).all()
    assert (gm["logweights"].grad[dead] == 0).all()
    assert (gm["means"].grad[dead.expand_as(gm["means"])] == 0).all()


@pytest.mark.triton
def test_nll_non_contiguous_inputs():
    """Strided views (a K slice, transposed H/W, an expanded target) give the same result."""
    shape = ((2,), 6, 3, 4, 5)
    gm = make_gm(((2,), 12, 3, 5, 4), 8, dtype=torch.float32, dead=True)
    gm = {
        "means": gm["means"][:, ::2].transpose(-1, -2),
        "logstds": gm["logstds"],
        "logweights": torch.log_softmax(gm["logweights"][:, 1::2].transpose(-1, -2), dim=-4),
    }
    y = make_state(((1,), *shape[1:]), 8).float().expand(2, 3, 4, 5)
    ref = R.gm_nll_loss(_cast(gm, torch.float64), y.double(), reduction="none")
    with G.use_backend("triton"):
        out = G.gm_nll_loss(gm, y, reduction="none")
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.triton
def test_k1_nll_is_l2_up_to_constants():
    """K = 1: ``0.5 * ||y - mu||^2 / s^2 + C * logstd`` per pixel, on the kernel path."""
    shape = ((3,), 1, 4, 3, 5)
    gm = make_gm(shape, 2, dtype=torch.float32)
    y = make_state(shape, 2).float()
    with G.use_backend("triton"):
        nll = G.gm_nll_loss(gm, y, reduction="none")
    ls = gm["logstds"].double().view(3, 1, 1)
    l2 = 0.5 * (y.double() - gm["means"].double().squeeze(-4)).square().sum(-3) * torch.exp(-2 * ls)
    assert rel_err(nll, l2 + 4 * ls) < TOL[torch.float32]


@pytest.mark.triton
@settings(max_examples=6)
@given(
    c=st.tuples(gm_shapes(max_k=20, max_c=5, max_hw=5), seeds, st.booleans(), st.booleans()),
    n=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    tile=tiles,
)
def test_logprob_matches_reference(c, n, dtype, tile):
    shape, seed, dead, per_pixel_std = c
    batch, _, C, H, W = shape
    gm = _cast(make_gm(shape, seed, dead=dead, per_pixel_std=per_pixel_std), dtype)
    g = torch.Generator().manual_seed(seed)
    samples = (torch.randn((*batch, n, C, H, W), generator=g, dtype=torch.float64) * 2).to(dtype)
    ref = R.gm_logprob(_cast(gm, torch.float64), samples.double())
    with G.use_backend("triton"), _tile(tile):
        out = G.gm_logprob(gm, samples)
    assert out.dtype == dtype and out.shape == (*batch, n, H, W)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.triton
def test_logprob_huge_k_point_data():
    shape = ((17,), 1030, 2, 1, 1)
    gm = make_gm(shape, 4, dtype=torch.float32, dead=True)
    samples = torch.stack([make_state(shape, 4), make_state(shape, 5)], dim=-4).float()
    with G.use_backend("triton"):
        out = G.gm_logprob(gm, samples)
    assert rel_err(out, R.gm_logprob(_cast(gm, torch.float64), samples.double())) < TOL[torch.float32]


@st.composite
def timestep_pairs(draw, batch):
    """``(t_high, t_low)`` as floats, 0-d tensors, per-sample ``(*B,)`` tensors or ``(*B, 1, 1, 1)``
    tensors (float64), including t_low = t_high, t_low = 0 and close timesteps (where
    ``1 - c1 - c2`` cancels)."""

    def one():
        t_high = draw(st.floats(1.0, 999.0))
        t_low = draw(st.sampled_from([0.0, t_high, "close", None]))
        if t_low == "close":
            return t_high, t_high - draw(st.floats(1e-3, 1.0))
        return t_high, draw(st.floats(0.0, t_high)) if t_low is None else t_low

    form = draw(st.sampled_from(["float", "0-d", "(*B,)", "(*B, 1, 1, 1)"] if batch else ["float", "0-d"]))
    if form in ("float", "0-d"):
        pair = one()
        return pair if form == "float" else tuple(torch.tensor(v, dtype=torch.float64) for v in pair)
    pairs = [one() for _ in range(int(torch.Size(batch).numel()))]
    shape = batch if form == "(*B,)" else (*batch, 1, 1, 1)
    return tuple(torch.tensor(v, dtype=torch.float64).view(shape) for v in zip(*pairs))


@pytest.mark.triton
@settings(max_examples=6)
@given(
    c=st.tuples(gm_shapes(max_k=12, max_c=4, max_hw=5), seeds, st.booleans(), st.booleans()),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    reduction=st.sampled_from(["none", "mean"]),
    data=st.data(),
)
def test_transition_loss_matches_reference(c, dtype, reduction, data):
    """The fused transition loss (means scaled in the kernel, shifted target) against the float64
    composition u_to_x0 -> reverse_transition -> gm_nll_loss, values and gradients.

    States as in training: ``x_t_low`` on the path, ``x_t_high`` drawn from the forward
    transition ``x_t_low -> x_t_high``. (An ``x_t_low`` thousands of stds from every component, as
    an unrelated state at ``t_low`` close to ``t_high`` is, makes the NLL ~1e8 and the log-weights
    fall below float32 resolution, in the float32 reference as in the kernel.)"""
    shape, seed, dead, per_pixel_std = c
    batch, _, _, H, W = shape
    t_high, t_low = data.draw(timestep_pairs(batch))
    gm_u = _cast(make_gm(shape, seed, dead=dead, per_pixel_std=per_pixel_std), dtype)

    def as_sigma(t):  # (*B, 1, 1, 1) or a float
        if not isinstance(t, torch.Tensor):
            return t / 1000
        return (t.view(*batch, 1, 1, 1) if batch and t.shape == batch else t.expand(*batch, 1, 1, 1)) / 1000

    s_high, s_low = as_sigma(t_high), as_sigma(t_low)
    x_low = make_state(shape, seed)
    ratio = (1 - s_high) / (1 - s_low)
    var = s_high**2 - (ratio * s_low) ** 2  # of the forward transition's noise
    noise = max(var, 0.0) ** 0.5 if isinstance(var, float) else var.clamp(min=0).sqrt()
    x_high = (ratio * x_low + noise * make_state(shape, seed + 1)).to(dtype)
    x_low = x_low.to(dtype)
    gm64, xh64, xl64 = _cast(gm_u, torch.float64), x_high.double(), x_low.double()
    gm_low64 = RT.reverse_transition(RT.u_to_x0(gm64, xh64, s_high), xh64, s_high, s_low)
    grad = torch.randn((*batch, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if reduction == "mean":
        grad = torch.tensor(1.3, dtype=torch.float64)

    def run(fn, gm, *args):
        gm = {k: v.detach().clone().requires_grad_() for k, v in gm.items()}
        out = fn(gm, *args, reduction=reduction)
        return out.detach(), torch.autograd.grad(
            out, [gm[k] for k in ("means", "logstds", "logweights")], grad.to(out.dtype)
        )

    ref_out, ref_grads = run(R.transition_loss, gm64, xh64, 1000 * s_high, xl64, 1000 * s_low)
    with G.use_backend("triton"):
        out, grads = run(G.transition_loss, gm_u, x_high, t_high, x_low, t_low)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref_out.shape
    for t in (out, *grads):
        assert torch.isfinite(t).all()
    # the loss is 0.5 * q - C * logstds_low, with logstds_low ~ log(sigma_high) large at small
    # sigmas: bound the error by the size of those terms (its condition), not by their difference
    C = shape[2]
    ls_low = gm_low64["logstds"].abs().expand(*batch, 1, 1, H, W).reshape(*batch, H, W)
    mag = R.gm_nll_loss(gm_low64, xl64, reduction="none").abs() + C * ls_low
    if reduction == "none":
        assert float((out.double() - ref_out).norm()) <= tol * float(mag.norm())
    else:
        assert abs(float(out) - float(ref_out)) <= tol * float(mag.mean())
    # the means' gradient carries the residual x_low - mu_low, a difference of nearly equal
    # states at tiny sigmas: its float32 rounding is amplified by (|x| + |mu|) / |x - mu| (531
    # at t_high = 2, t_low = 0, where float32 torch itself misses 1e-5): widened past 100x
    resid = xl64.unsqueeze(-4) - gm_low64["means"]
    amplification = float((xl64.unsqueeze(-4).abs() + gm_low64["means"].abs()).norm() / resid.norm())
    assert rel_err(grads[0], ref_grads[0]) < tol * max(1.0, amplification / 100), "means"
    assert rel_err(grads[2], ref_grads[2]) < tol, "logweights"
    # d logstds_low / d logstds_u lies in [0, 1]: the NLL's log-std bound carries over
    scale = _logstd_grad_scale(gm_low64, xl64, grad, reduction).sum_to_size(gm_u["logstds"].shape)
    assert float((grads[1].double() - ref_grads[1]).norm()) <= tol * float(scale.norm()), "logstds"


if lik.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _transition_map_probe(th_ptr, tlow_ptr, ls_ptr, out_ptr, R, s_th, s_tl, BLOCK: tl.constexpr):
        """``out (4, R)``: ``_transition_map``'s ``mscale, xres``, mapped log-std and its derivative
        for ``R`` rows held in one block's lanes (timesteps by strides, as the NLL kernels load them
        for point data)."""
        r = tl.arange(0, BLOCK)
        mask = r < R
        ls = tl.load(ls_ptr + r, mask=mask, other=0.0)
        msc, xres, ls_low, dls = lik._transition_map(th_ptr, tlow_ptr, 0, r, 0, s_th, 0, s_tl, mask, ls, BLOCK)
        tl.store(out_ptr + r, msc, mask=mask)
        tl.store(out_ptr + R + r, xres, mask=mask)
        tl.store(out_ptr + 2 * R + r, ls_low, mask=mask)
        tl.store(out_ptr + 3 * R + r, dls, mask=mask)


def _transition_terms(t_high: torch.Tensor, t_low: torch.Tensor, batch: tuple) -> tuple:
    """The torch twin of the kernels' ``_transition_map`` constants, in float64, each
    ``(*batch, 1, 1, 1, 1)``: ``mscale = -c2 * sigma_high``, ``xres = 1 - c1 - c2``,
    ``A = 2 log(|c2| max(sigma_high, 1e-6))`` and ``L = log(max(c3, 1e-12))`` for timesteps of
    shape ``batch`` or broadcastable to ``(*batch, 1, 1, 1)`` (``sigma = t / 1000`` in float32,
    in float64 for float64 timesteps). The reverse-transition GM of a u-GM then has means
    ``mscale * means_u + (1 - xres) * x_t_high`` and log-stds
    ``0.5 * logaddexp(2 * logstds_u + A, L)``."""

    def sigma(t):
        t = t.reshape(*batch, 1, 1, 1, 1) if t.shape == tuple(batch) else t.expand(*batch, 1, 1, 1).unsqueeze(-4)
        return (t / 1000 if t.dtype == torch.float64 else t.float() / 1000).double()

    sh, sl = sigma(t_high), sigma(t_low)
    c1, c2, c3 = RT.transition_coefficients(sh, sl)
    return -c2 * sh, 1 - c1 - c2, 2 * (c2.abs() * sh.clamp(min=1e-6)).log(), c3.clamp(min=1e-12).log()


@pytest.mark.triton
@settings(max_examples=30, deadline=None)
@given(
    batch=st.sampled_from([(), (1,), (3,), (2, 3)]),
    dtypes=st.tuples(*[st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, None])] * 2),
    data=st.data(),
)
def test_transition_map_equals_its_torch_twin(batch, dtypes, data):
    """The transition loss's per-row map, computed in float64 inside the NLL kernels, against its
    float64 torch twin rounded to float32: ``mscale, xres`` (the means' map), the mapped log-std
    ``0.5 * logaddexp(2 * logstds + A, L)`` and its derivative, for per-sample or broadcast
    timesteps of any float dtype (None: a Python float, passed as a 0-d float64 tensor),
    including t_low = t_high (A = -inf), t_low = 0, t_high = 1000, close timesteps (``xres``
    cancels) and a t_high below 1e-3 (the eps floors)."""
    n = int(torch.Size(batch).numel())
    edge = st.sampled_from([0.0, 1e-4, 0.5, 1.0, 999.0, 1000.0])
    highs = data.draw(st.lists(st.one_of(edge, st.floats(0.0, 1000.0)), min_size=n, max_size=n))
    lows = [data.draw(st.one_of(st.sampled_from([0.0, h, h * (1 - 1e-5)]), st.floats(0.0, h))) for h in highs]
    logstds = torch.tensor(data.draw(st.lists(st.floats(-20.0, 5.0), min_size=n, max_size=n)), dtype=torch.float32)

    def timestep(values, dt):  # (*B, 1, 1, 1) or 0-d
        if dt is None or not batch:
            return torch.tensor(values[0] if values else 0.0, dtype=dt or torch.float64)
        return torch.tensor(values, dtype=dt).view(*batch, 1, 1, 1)

    def form(t):
        if not batch or t.dim() == 0:
            return t
        kind = data.draw(st.sampled_from(["per-sample", "(*B,)", "broadcast"]))
        return {"per-sample": t, "(*B,)": t.view(batch), "broadcast": t[..., :1, :1, :1].expand(*batch, 1, 1, 1)}[kind]

    t_high, t_low = timestep(highs, dtypes[0]), timestep(lows, dtypes[1])
    t_high = form(t_high)
    th = t_high.view(*batch, 1, 1, 1) if batch and t_high.shape == batch else t_high
    cap = th.min() if t_low.dim() == 0 else th  # rounding may have swapped them
    t_low = form(torch.minimum(t_low.to(th.dtype), cap).to(t_low.dtype))
    rows = [(t if t.shape == batch else t.expand(*batch, 1, 1, 1)).reshape(-1) for t in (t_high, t_low)]
    got = torch.empty((4, n), dtype=torch.float32)
    if n:
        _transition_map_probe[(1,)](
            *rows, logstds, got, n, rows[0].stride(0), rows[1].stride(0), BLOCK=lik.next_pow2(n)
        )
    mscale, xres, A, L = (v.reshape(-1) for v in _transition_terms(t_high, t_low, batch))
    v = 2 * logstds.double() + A
    want = torch.stack([mscale, xres, 0.5 * torch.logaddexp(v, L), torch.sigmoid(v - L)]).float()
    assert torch.isfinite(got).all()
    # both round float64 values to float32 (float64 logs and exps may differ in the last bit)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [((2,), 3, 2, 12, 11), ((130,), 3, 2, 1, 1)])
def test_transition_loss_more_pixels_than_a_block(shape):
    """Two programs per row (132 pixels) or across the batch (130 points): the per-sample
    constants and the log-std gradient through the map, summed from the programs' partials."""
    batch = shape[0]
    gm_u = make_gm(shape, 15, dtype=torch.float32)
    t_high = torch.linspace(900.0, 300.0, batch[0], dtype=torch.float64)
    t_low = t_high * 0.9
    s_high, s_low = t_high.view(-1, 1, 1, 1) / 1000, t_low.view(-1, 1, 1, 1) / 1000
    x_low = make_state(shape, 15)
    ratio = (1 - s_high) / (1 - s_low)
    x_high = ratio * x_low + (s_high**2 - (ratio * s_low) ** 2).sqrt() * make_state(shape, 16)

    def run(fn, gm, *args):
        gm = {k: v.detach().clone().requires_grad_() for k, v in gm.items()}
        out = fn(gm, *args)
        return out.detach(), torch.autograd.grad(out, [gm[k] for k in ("means", "logstds", "logweights")])

    want, want_grads = run(R.transition_loss, _cast(gm_u, torch.float64), x_high, 1000 * s_high, x_low, 1000 * s_low)
    with G.use_backend("triton"):
        got, grads = run(G.transition_loss, gm_u, x_high.float(), t_high, x_low.float(), t_low)
    assert rel_err(got, want) < TOL[torch.float32]
    for g, w, name in zip(grads, want_grads, ("means", "logstds", "logweights")):
        assert rel_err(g, w) < TOL[torch.float32], name


@pytest.mark.triton
def test_transition_loss_states_with_grad_take_the_torch_path():
    shape = ((2,), 3, 2, 2, 3)
    gm_u = _cast(make_gm(shape, 3), torch.float32)
    x_high = make_state(shape, 3).float().requires_grad_()
    x_low = make_state(shape, 4).float().requires_grad_()
    with G.use_backend("triton"):
        G.transition_loss(gm_u, x_high, 800.0, x_low, 600.0).backward()
    ref_x = [x_high.detach().double().requires_grad_(), x_low.detach().double().requires_grad_()]
    R.transition_loss(_cast(gm_u, torch.float64), ref_x[0], 800.0, ref_x[1], 600.0).backward()
    assert rel_err(x_high.grad, ref_x[0].grad) < TOL[torch.float32]
    assert rel_err(x_low.grad, ref_x[1].grad) < TOL[torch.float32]


@pytest.mark.triton
def test_nll_int64_offsets():
    """The 64-bit offset path (forced: the int64 predicate is a key of the stored plans) gives the
    32-bit path's values and gradients, plain and with the transition map."""
    shape = ((2,), 5, 3, 3, 4)
    gm = make_gm(shape, 9, dtype=torch.float32, dead=True)
    y = make_state(shape, 9).float()
    t_high, t_low = torch.tensor([700.0, 300.0]), torch.tensor([650.0, 0.0])

    def run():
        leaves = _leaves(gm)
        nll = G.gm_nll_loss(leaves, y, reduction="none")
        trans = G.transition_loss(leaves, y, t_high, y.flip(-1), t_low, reduction="none")
        grads = torch.autograd.grad((nll.sum(), trans.sum()), list(leaves.values()))
        return nll, trans, *grads, G.gm_logprob(gm, y.unsqueeze(-4))

    with G.use_backend("triton"):
        assert_int64_offsets_change_nothing(run, lik)


# --------------------------------------------------------------------------------------------
# Degenerate inputs (docs/numerics.md#likelihood), on both backends
# --------------------------------------------------------------------------------------------


def _degenerate_gm(per_pixel_std: bool) -> dict:
    """A float32 GM ``((3,), 4, 2, 2, 3)`` with dead components, an all-dead pixel ``[0, :, 1, 2]``,
    sample 0's log-std 0.3 and sample 1's ``-inf`` (a zero std), sample 2's ``+inf``; per pixel
    (``per_pixel_std``) the same values over each sample's pixels."""
    shape = ((3,), 4, 2, 2, 3)
    gm = make_gm(shape, 31, dtype=torch.float32, dead=True, per_pixel_std=per_pixel_std)
    gm["logweights"][0, :, :, 1, 2] = -INF
    gm["logstds"][0] = 0.3
    gm["logstds"][1] = -INF
    gm["logstds"][2] = INF
    return gm


def _nll_on(backend: str, fn, gm: dict, *args) -> tuple:
    """``fn(gm, *args, reduction="none")`` and its gradients for an upstream gradient of ones."""
    leaves = _leaves(gm)
    with G.use_backend(backend):
        out = fn(leaves, *args, reduction="none")
    return out.detach(), *torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))


@pytest.mark.triton
@pytest.mark.parametrize("per_pixel_std", [False, True])
def test_zero_and_infinite_stds_and_dead_pixels_in_the_nll(per_pixel_std):
    """A zero std (``logstds = -inf``): the NLL is ``-inf`` where a component lives, whatever the
    target (the floor on ``1 / std`` keeps the quadratic term finite), a pixel of no live
    component is ``+inf`` (also under the finite std), an infinite std ``+inf``. Gradients: 0
    from dead components and from an all-dead pixel; NaN from the live components of an
    infinite loss. Both backends give exactly these values, the finite ones within fp32."""
    gm = _degenerate_gm(per_pixel_std)
    y = make_state(((3,), 4, 2, 2, 3), 31).float()
    y[1, :, 0, 0] = gm["means"][1, 0, :, 0, 0]  # a target on a live mean: still -inf
    got = _nll_on("triton", G.gm_nll_loss, gm, y)
    want = _nll_on("torch", G.gm_nll_loss, gm, y)
    loss = want[0]
    assert (loss[1] == -INF).all() and (loss[2] == INF).all()
    assert loss[0, 1, 2] == INF and torch.isfinite(loss[0]).sum() == 5
    dead = gm["logweights"] == -INF
    for a, b, name in zip(got, want, ("loss", "means", "logstds", "logweights")):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(a[torch.isinf(b)], b[torch.isinf(b)]), name
        finite = torch.isfinite(b)
        assert rel_err(a[finite], b[finite]) < TOL[torch.float32], name
    g_means, g_logstds, g_logweights = want[1:]
    assert (g_logweights[dead] == 0).all() and (g_means[dead.expand_as(g_means)] == 0).all()
    assert torch.isfinite(g_means[0]).all() and torch.isfinite(g_logstds[0]).all()  # the all-dead pixel passes 0
    assert torch.isnan(g_logweights[1:][~dead[1:]]).all()


@pytest.mark.triton
def test_degenerate_inputs_in_the_transition_loss_and_the_log_density():
    """transition_loss: a zero u-std is finite (the reverse transition adds its own variance),
    values and gradients; an infinite one ``+inf``; an all-dead pixel ``+inf`` with 0 gradients,
    also at ``t_low = t_high``, where an infinite u-std is NaN on both backends (the map scales
    it by 0). gm_logprob: ``-inf`` at an all-dead pixel and an infinite std, NaN at a zero std.
    Both backends give the same values and NaN pattern."""
    gm = _degenerate_gm(False)
    x_high = make_state(((3,), 4, 2, 2, 3), 32).float()
    x_low = 0.9 * x_high + 0.1 * make_state(((3,), 4, 2, 2, 3), 33).float()
    for t_low in (torch.tensor([600.0, 0.0, 300.0]), torch.tensor([700.0, 500.0, 900.0])):
        t_high = torch.tensor([700.0, 500.0, 900.0])
        got = _nll_on("triton", G.transition_loss, gm, x_high, t_high, x_low, t_low)
        want = _nll_on("torch", G.transition_loss, gm, x_high, t_high, x_low, t_low)
        loss = want[0]
        assert torch.isfinite(loss[1]).all() and loss[0, 1, 2] == INF
        assert (loss[2] == INF).all() if t_low[2] < t_high[2] else torch.isnan(loss[2]).all()
        assert all(torch.isfinite(g[:2]).all() for g in want[1:])
        n = 3 if t_low[2] < t_high[2] else 2  # a NaN log-std: the backends' NaN patterns may differ
        for i, (a, b, name) in enumerate(zip(got, want, ("loss", "means", "logstds", "logweights"))):
            a, b = (a, b) if i == 0 else (a[:n], b[:n])
            assert torch.equal(torch.isnan(a), torch.isnan(b)), name
            assert torch.equal(a[torch.isinf(b)], b[torch.isinf(b)]), name
            finite = torch.isfinite(b)
            assert rel_err(a[finite], b[finite]) < TOL[torch.float32], name
    samples = torch.stack([x_high, x_low], dim=-4)
    with G.use_backend("triton"):
        got = G.gm_logprob(gm, samples)
    with G.use_backend("torch"):
        want = G.gm_logprob(gm, samples)
    assert (want[0, :, 1, 2] == -INF).all() and torch.isnan(want[1]).all() and (want[2] == -INF).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(
        got[torch.isinf(want)], want[torch.isinf(want)]
    )
    finite = torch.isfinite(want)
    assert rel_err(got[finite], want[finite]) < TOL[torch.float32]


@pytest.mark.triton
def test_reductions_of_infinite_pixels():
    """``"sum"`` and ``"mean"`` add the per-pixel losses: ``+inf`` with an all-dead pixel, ``-inf``
    with a zero std, NaN where both meet; the same on both backends."""
    gm = _degenerate_gm(False)
    y = make_state(((3,), 4, 2, 2, 3), 34).float()
    for rows, want in (([0], INF), ([1], -INF), ([0, 1], None)):
        part = {k: v[rows] for k, v in gm.items()}
        for backend in ("triton", "torch"):
            with G.use_backend(backend):
                for reduction in ("sum", "mean"):
                    got = float(G.gm_nll_loss(part, y[rows], reduction=reduction))
                    assert math.isnan(got) if want is None else got == want


# --------------------------------------------------------------------------------------------
# torch.library ops and torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_nll_custom_ops_opcheck():
    """Schema, fake tensors and autograd registration of the torch.library ops (kernel path)."""
    shape = ((2,), 3, 2, 2, 3)
    gm = make_gm(shape, 1, dtype=torch.float32, dead=True)
    y = make_state(shape, 1).float()
    gm_args = (gm["means"].requires_grad_(), gm["logstds"].requires_grad_(), gm["logweights"].requires_grad_())
    transitions = (
        (y.flip(-1), torch.tensor([700.0, 300.0]), torch.tensor([650.0, 0.0])),
        (y.flip(-1), torch.tensor(500.0, dtype=torch.float64), torch.tensor([[[[20.0]]], [[[499.0]]]])),
    )
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    with G.use_backend("triton"):
        for tr in ((None, None, None), *transitions):
            torch.library.opcheck(torch.ops.gmkernels.gm_nll_loss_pixels, (*gm_args, y, *tr, 1e-4), test_utils=utils)
        torch.library.opcheck(torch.ops.gmkernels.gm_logprob, (*gm_args, y.unsqueeze(-4)), test_utils=utils[:2])


@pytest.mark.triton
def test_losses_compile_with_fullgraph_forward_and_backward():
    """``torch.compile(fullgraph=True, backend="aot_eager")`` of gm_nll_loss and transition_loss
    on the Triton path: no graph break, the backward graph runs the fused backward op, and the
    values and gradients are the eager ones."""
    shape = ((2,), 3, 2, 2, 3)
    gm = make_gm(shape, 1, dtype=torch.float32)
    y = make_state(shape, 1).float()

    def nll(means, logstds, logweights, y):
        return G.gm_nll_loss({"means": means, "logstds": logstds, "logweights": logweights}, y)

    def transition(means, logstds, logweights, y):
        gm_u = {"means": means, "logstds": logstds, "logweights": logweights}
        return G.transition_loss(gm_u, y, torch.tensor([700.0, 300.0]), y.flip(-1), torch.tensor([650.0, 0.0]))

    def loss_and_grads(fn):
        leaves = [gm[k].clone().requires_grad_() for k in ("means", "logstds", "logweights")]
        loss = fn(*leaves, y)
        return loss.detach(), *torch.autograd.grad(loss, leaves)

    with G.use_backend("triton"):
        assert_compiled_training_matches_eager((nll, transition), loss_and_grads, lik, "_launch_nll_bwd")
