"""The reference (through the public API, torch backend) against a separate float64 evaluation.

The oracle below is written independently of ``reference/``: numpy, pixels flattened, per-pixel
weights normalised by hand. Shapes are drawn by hypothesis: K up to 1024, C up to 64, odd H, W,
0-2 batch dims; values include dead components and a wide range of stds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import TOL, make_gm, make_state, rel_err, seeds, sigmas

import gmkernels as G

# ---------------------------------------------------------------- oracle (numpy, float64)


def _np(gm):
    """-> means (N, K, C, P), logstd (N, P), logweights (N, K, P) and the batch shape."""
    m = gm["means"].double().numpy()
    *b, K, C, H, W = m.shape
    N = int(np.prod(b)) if b else 1
    ls = np.broadcast_to(gm["logstds"].double().numpy().reshape(N, -1), (N, H * W))
    return m.reshape(N, K, C, H * W), ls, gm["logweights"].double().numpy().reshape(N, K, H * W), (tuple(b), C, H, W)


def _softmax(logits):
    """softmax over axis 1, -inf entries get weight 0."""
    mx = np.max(logits, axis=1, keepdims=True)
    e = np.where(np.isneginf(logits), 0.0, np.exp(logits - mx))
    return e / e.sum(axis=1, keepdims=True)


def o_mean(gm, power=1.0):
    m, _, lw, (b, C, H, W) = _np(gm)
    w = _softmax(np.where(np.isneginf(lw), -np.inf, power * lw))
    return np.einsum("nkp,nkcp->ncp", w, m).reshape(*b, C, H, W)


def o_iso(gm):
    m, ls, lw, (b, C, H, W) = _np(gm)
    w = _softmax(lw)
    mean = np.einsum("nkp,nkcp->ncp", w, m)
    second = np.einsum("nkp,nkcp->ncp", w, m * m)
    var = (second - mean * mean).mean(axis=1) + np.exp(2 * ls)
    return mean.reshape(*b, C, H, W), var.reshape(*b, 1, H, W)


def o_mul(gm, g_mean, g_var, a=1.0, bpow=1.0, eps=1e-6):
    m, ls, lw, (b, C, H, W) = _np(gm)
    N, K, _, P = m.shape
    g = g_mean.double().numpy().reshape(N, C, P)
    v = np.broadcast_to(g_var.double().numpy().reshape(N, -1), (N, P))
    r = bpow / a
    s2 = np.exp(2 * ls)
    n = np.maximum(v + r * s2, eps)
    means = (v[:, None, None] * m + (r * s2 * 1.0)[:, None, None] * g[:, None]) / n[:, None, None]
    logits = lw - 0.5 * r / n[:, None] * ((m - g[:, None]) ** 2).sum(axis=2)
    mx = logits.max(axis=1, keepdims=True)
    logw = logits - (mx + np.log(np.exp(logits - mx).sum(axis=1, keepdims=True)))
    logstds = ls + 0.5 * np.log(v) - 0.5 * np.log(n)
    return means.reshape(*b, K, C, H, W), logstds, logw.reshape(*b, K, 1, H, W)


def o_nll(gm, y, eps=1e-4):
    m, ls, lw, (b, C, H, W) = _np(gm)
    N, K, _, P = m.shape
    yy = y.double().numpy().reshape(N, 1, C, P)
    istd = np.minimum(np.exp(-ls), 1 / eps)[:, None, None]
    comp = (-0.5 * ((yy - m) * istd) ** 2).sum(axis=2) - C * ls[:, None]
    logits = lw + comp
    mx = logits.max(axis=1)
    return -(mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1))).reshape(*b, H, W)


def o_logprob(gm, samples):
    m, ls, lw, (b, C, H, W) = _np(gm)
    N, K, _, P = m.shape
    S = samples.shape[len(b)]
    y = samples.double().numpy().reshape(N, S, 1, C, P)
    comp = (-0.5 * ((y - m[:, None]) * np.exp(-ls)[:, None, None, None]) ** 2).sum(axis=3)
    comp = comp - C * ls[:, None, None] - 0.5 * C * math.log(2 * math.pi)
    logits = lw[:, None] + comp
    mx = logits.max(axis=2)
    return (mx + np.log(np.exp(logits - mx[:, :, None]).sum(axis=2))).reshape(*b, S, H, W)


def logstd_err(out, ref):
    """``rel_err`` of log-quantities (log-stds, NLLs) with a floor of 1 per element: a log-std
    or a log-density near 0 has no relative precision in any float format (an NLL of 0.0097 is
    a difference of terms of size ~1, each carrying fp32's ~1e-7), and on the log scale 1 is the
    natural unit."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / max(float(ref.norm()), ref.numel() ** 0.5))


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------- strategies

MAX_ELEMS = 60_000


@st.composite
def big_shapes(draw):
    """K up to 1024, C up to 64, odd H, W, 0-2 batch dims, bounded total size."""
    nb = draw(st.integers(0, 2))
    batch = tuple(draw(st.integers(1, 3)) for _ in range(nb))
    K = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 256, 1024]))
    C = draw(st.sampled_from([1, 3, 4, 16, 64]))
    H = draw(st.integers(1, 7))
    W = draw(st.integers(1, 7))
    assume(math.prod(batch) * K * C * H * W <= MAX_ELEMS)
    return batch, K, C, H, W


case = st.tuples(big_shapes(), seeds, st.booleans())
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _gm(shape, seed, dead, dtype):
    """A GM drawn in float64 then rounded to ``dtype``; the oracle sees the rounded values."""
    return make_gm(shape, seed, dead=dead, dtype=dtype)


@pytest.fixture(autouse=True)
def _torch_backend():
    with G.use_backend("torch"):
        yield


# ---------------------------------------------------------------- value tests


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, power=st.sampled_from([1.0, 0.5, 2.0, 0.0]))
def test_gm_to_mean(dtype, c, power):
    shape, seed, dead = c
    gm = _gm(shape, seed, dead, dtype)
    out = G.gm_to_mean(gm, power)
    assert out.dtype == dtype and out.shape == (*shape[0], *shape[2:])
    assert rel_err(out, _t(o_mean(gm, power))) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case)
def test_gm_to_iso_gaussian(dtype, c):
    shape, seed, dead = c
    gm = _gm(shape, seed, dead, dtype)
    out = G.gm_to_iso_gaussian(gm)
    mean, var = o_iso(gm)
    assert rel_err(out["mean"], _t(mean)) < TOL[dtype]
    assert rel_err(out["var"], _t(var)) < TOL[dtype]
    assert torch.isfinite(out["var"]).all() and (out["var"].double() > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, per_pixel=st.booleans(), powers=st.sampled_from([(1.0, 1.0), (1.0, -0.5), (2.0, 1.0), (0.5, 3.0)]))
def test_gm_mul_iso_gaussian(dtype, c, per_pixel, powers):
    shape, seed, dead = c
    batch, K, C, H, W = shape
    gm = _gm(shape, seed, dead, dtype)
    g_mean = make_state(shape, seed, dtype)
    gen = torch.Generator().manual_seed(seed)
    var_shape = (*batch, 1, H, W) if per_pixel else (*batch, 1, 1, 1)
    g_var = torch.empty(var_shape, dtype=torch.float64).uniform_(0.5, 4.0, generator=gen).to(dtype)
    a, b = powers
    if b < 0:  # dividing by a Gaussian: keep v + r * s2 well away from 0, where it is ill-conditioned
        g_var = (g_var.double() + 2 * abs(b / a) * torch.exp(2 * gm["logstds"].double()).max()).to(dtype)
    out = G.gm_mul_iso_gaussian(gm, {"mean": g_mean, "var": g_var}, a, b)
    means, logstds, logw = o_mul(gm, g_mean, g_var, a, b)
    assert rel_err(out["means"], _t(means)) < TOL[dtype]
    assert rel_err(out["logweights"].clamp(min=-1e4), _t(logw).clamp(min=-1e4)) < TOL[dtype]
    N = math.prod(batch)
    assert rel_err(out["logstds"].reshape(N, -1).expand(N, H * W), _t(logstds)) < TOL[dtype]


@given(c=case, p1=st.sampled_from([1.0, 2.0]), p2=st.sampled_from([1.0, -0.5, 0.3]))
def test_iso_gaussian_mul_iso_gaussian(c, p1, p2):
    shape, seed, _ = c
    batch, K, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    m1, m2 = make_state(shape, seed), make_state(shape, seed + 1)
    v1 = torch.empty((*batch, 1, H, W), dtype=torch.float64).uniform_(0.5, 1.0, generator=gen)
    v2 = torch.empty((*batch, 1, 1, 1), dtype=torch.float64).uniform_(2.0, 3.0, generator=gen)
    out = G.iso_gaussian_mul_iso_gaussian({"mean": m1, "var": v1}, {"mean": m2, "var": v2}, p1, p2)
    n = np.maximum(p1 * v2.numpy() + p2 * v1.numpy(), 1e-6)
    assert rel_err(out["var"], _t(v1.numpy() * v2.numpy() / n)) < 1e-10
    assert rel_err(out["mean"], _t((p1 * v2.numpy() * m1.numpy() + p2 * v1.numpy() * m2.numpy()) / n)) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, sig=sigmas, tensor_sigma=st.booleans())
def test_u_to_x0_and_back(dtype, c, sig, tensor_sigma):
    shape, seed, dead = c
    gm = _gm(shape, seed, dead, dtype)
    x = make_state(shape, seed, dtype)
    sigma = torch.full((*shape[0], 1, 1, 1), sig, dtype=torch.float64) if tensor_sigma else sig
    x0 = G.u_to_x0(gm, x, sigma)
    exp_means = x.double().unsqueeze(-4) - sig * gm["means"].double()
    assert rel_err(x0["means"], exp_means) < TOL[dtype]
    assert logstd_err(x0["logstds"], gm["logstds"].double() + math.log(sig)) < TOL[dtype]
    if dtype == torch.float64:
        back = G.x0_to_u(x0, x, sigma)
        assert rel_err(back["means"], gm["means"]) < 1e-8
        assert rel_err(back["logstds"], gm["logstds"]) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, s=st.tuples(sigmas, sigmas))
def test_reverse_transition(dtype, c, s):
    shape, seed, dead = c
    sigma, sigma_to = max(s), min(s)
    gm = _gm(shape, seed, dead, dtype)
    x = make_state(shape, seed, dtype)
    out = G.reverse_transition(gm, x, sigma, sigma_to)
    a, a_to = 1 - sigma, 1 - sigma_to
    q, p = sigma_to / sigma, a / a_to
    beta = 1 - (q * p) ** 2
    c1, c2, c3 = q * q * p, beta * a_to, beta * sigma_to**2
    exp_means = c1 * x.double().unsqueeze(-4) + c2 * gm["means"].double()
    exp_logstds = 0.5 * torch.log(c2**2 * torch.exp(2 * gm["logstds"].double()) + max(c3, 1e-12))
    assert rel_err(out["means"], exp_means) < TOL[dtype]
    assert logstd_err(out["logstds"], exp_logstds) < TOL[dtype]
    assert torch.equal(out["logweights"], gm["logweights"])


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, s_src=sigmas, ratio=st.floats(0.0, 0.98))
def test_gm_posterior_mean(dtype, c, s_src, ratio):
    """``sigma_tgt`` strictly below ``sigma_src``: at equal sigmas ``d`` is clamped to ``eps`` and
    the formula's condition number is ``1 / eps`` (covered in float64 by the property tests)."""
    shape, seed, dead = c
    s_tgt = s_src * ratio
    gm = _gm(shape, seed, dead, dtype)
    x_src, x_tgt = make_state(shape, seed, dtype), make_state(shape, seed + 3, dtype)
    out = G.gm_posterior_mean(gm, x_src, s_src, x_tgt, s_tgt)
    a_src, a_tgt = 1 - s_src, 1 - s_tgt
    d = max((a_tgt * s_src) ** 2 - (a_src * s_tgt) ** 2, 1e-6)
    g = (a_tgt * s_src**2 * x_tgt.double() - a_src * s_tgt**2 * x_src.double()) / d
    v = torch.full((*shape[0], 1, 1, 1), (s_tgt * s_src) ** 2 / d, dtype=torch.float64)
    means, logstds, logw = o_mul(gm, g, v)
    post = {"means": _t(means), "logstds": _t(logstds), "logweights": _t(logw)}
    assert rel_err(out, _t(o_mean(post))) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, n=st.integers(1, 3))
def test_gm_logprob(dtype, c, n):
    shape, seed, dead = c
    gm = _gm(shape, seed, dead, dtype)
    gen = torch.Generator().manual_seed(seed)
    samples = (torch.randn((*shape[0], n, *shape[2:]), generator=gen, dtype=torch.float64) * 2).to(dtype)
    out = G.gm_logprob(gm, samples)
    assert out.shape == (*shape[0], n, shape[3], shape[4])
    assert rel_err(out, _t(o_logprob(gm, samples))) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, reduction=st.sampled_from(["none", "mean", "sum"]))
def test_gm_nll_loss(dtype, c, reduction):
    shape, seed, dead = c
    gm = _gm(shape, seed, dead, dtype)
    y = make_state(shape, seed, dtype)
    out = G.gm_nll_loss(gm, y, reduction=reduction)
    exp = _t(o_nll(gm, y))
    exp = {"none": exp, "mean": exp.mean(), "sum": exp.sum()}[reduction]
    assert logstd_err(out, exp) < TOL[dtype]


def test_nll_istd_clamp():
    """Tiny stds hit ``istd = min(exp(-logstds), 1/eps)`` exactly as docs/ops.md#gm_nll_loss puts it."""
    shape = ((2,), 3, 2, 3, 3)
    gm = make_gm(shape, 0)
    gm["logstds"] = torch.full_like(gm["logstds"], -30.0)
    y = make_state(shape, 0)
    out = G.gm_nll_loss(gm, y, eps=1e-4, reduction="none")
    assert torch.isfinite(out).all()
    assert rel_err(out, _t(o_nll(gm, y, eps=1e-4))) < 1e-10


@given(c=case, n=st.integers(1, 2), power=st.sampled_from([1.0, 0.5]))
def test_gm_sample_shapes_and_support(c, n, power):
    """Draws have the right shape, are finite and come from live components only."""
    shape, seed, _ = c
    batch, K, C, H, W = shape
    gm = make_gm(shape, seed, dead=True)
    gm["logstds"] = torch.full_like(gm["logstds"], -40.0)  # samples sit on the means
    out = G.gm_sample(gm, n, power, generator=torch.Generator().manual_seed(seed))
    assert out.shape == (*batch, n, C, H, W) and torch.isfinite(out).all()
    d2 = (out.unsqueeze(-4) - gm["means"].unsqueeze(-5)).square().sum(-3)  # (*B, N, K, H, W)
    d2 = torch.where(torch.isinf(gm["logweights"]).squeeze(-3).unsqueeze(-4), float("inf"), d2)
    assert (d2.min(dim=-3).values < 1e-20).all()


def test_gm_sample_frequencies_match_weights():
    """The component frequencies of many draws match softmax(power * logweights)."""
    logits = torch.tensor([0.0, 1.0, -1.0, float("-inf"), 0.5], dtype=torch.float64)
    K = logits.numel()
    gm = {
        "means": torch.arange(K, dtype=torch.float64).view(K, 1, 1, 1) * 10,
        "logstds": torch.full((1, 1, 1, 1), -40.0, dtype=torch.float64),
        "logweights": torch.log_softmax(logits, 0).view(K, 1, 1, 1),
    }
    for power in (1.0, 2.0):
        x = G.gm_sample(gm, 40000, power, generator=torch.Generator().manual_seed(1)).view(-1)
        freq = torch.bincount((x / 10).round().long(), minlength=K).double() / x.numel()
        w = torch.softmax(torch.where(torch.isinf(logits), logits, power * logits), 0)
        assert (freq - w).abs().max() < 0.01
        assert freq[3] == 0


# ---------------------------------------------------------------- guidance


def _pair(shape, seed, dead, dtype=torch.float64):
    gm_c = _gm(shape, seed, dead, dtype)
    gm_u = _gm(shape, seed + 1, dead, dtype)
    gm_u["logstds"] = gm_c["logstds"]
    return gm_c, gm_u


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=case, scale=st.floats(0.05, 0.95), orth=st.sampled_from([0.0, 0.5, 1.0]))
def test_probabilistic_guidance(dtype, c, scale, orth):
    shape, seed, dead = c
    # One element per sample (C = H = W = 1) and orth = 1: the orthogonalised bias is exactly 0, so
    # P is rounding noise that the 1e-6 floor turns into a bias of relative size ~1e-5 in fp32
    # (an ill-posed direction, not an accuracy defect); the kernel tests assume C*H*W >= 3 too.
    assume(not (orth == 1.0 and shape[-3] * shape[-2] * shape[-1] == 1))
    gm_c, gm_u = _pair(shape, seed, dead, dtype)
    out = G.probabilistic_guidance(gm_c, gm_u, scale, orth)
    m_c, v_c = (_t(a) for a in o_iso(gm_c))
    v_c = v_c.mean(dim=(-2, -1), keepdim=True)
    bias = m_c - _t(o_mean(gm_u))
    dims = (-3, -2, -1)
    if orth > 0:
        bias = bias - orth * (bias * m_c).mean(dims, True) / (m_c * m_c).mean(dims, True).clamp(min=1e-6) * m_c
    P = (bias * bias).mean(dims, True)
    bias = bias * scale * torch.sqrt(v_c / P.clamp(min=1e-6))
    # target / cond: mean = m_c + bias / scale^2, var = (1 - scale^2) v_c / scale^2
    g_mean = m_c + bias / scale**2
    g_var = (1 - scale**2) * v_c / scale**2
    means, logstds, logw = o_mul(gm_c, g_mean, g_var)
    tol = TOL[dtype] * (10 if dtype == torch.bfloat16 else 1)  # bf16 rounding of the inputs moves the global stats
    assert rel_err(out["means"], _t(means)) < tol
    assert rel_err(out["logweights"].clamp(min=-1e4), _t(logw).clamp(min=-1e4)) < tol


@given(c=case, scale=st.floats(0.0, 5.0))
def test_weight_guidance(c, scale):
    shape, seed, _ = c
    gm_c, gm_u = _pair(shape, seed, False)
    out = G.weight_guidance(gm_c, gm_u, scale)
    lc, lu = gm_c["logweights"], gm_u["logweights"]
    assert rel_err(out["logweights"], torch.log_softmax(scale * lc - (scale - 1) * lu, dim=-4)) < 1e-10
    assert out["means"] is gm_c["means"] or torch.equal(out["means"], gm_c["means"])


@given(c=case, scale=st.floats(0.0, 5.0), orth=st.booleans())
def test_mean_cfg(c, scale, orth):
    shape, seed, dead = c
    gm_c, gm_u = _pair(shape, seed, dead)
    out = G.mean_cfg(gm_c, gm_u, scale, orth)
    m_c, m_u = _t(o_mean(gm_c)), _t(o_mean(gm_u))
    bias = m_c - m_u
    if orth:
        dims = (-3, -2, -1)
        bias = bias - (bias * m_c).mean(dims, True) / (m_c * m_c).mean(dims, True).clamp(min=1e-6) * m_c
    assert rel_err(out["means"], gm_c["means"] + (scale - 1) * bias.unsqueeze(-4)) < 1e-10
    # the guided mixture mean moves by exactly the CFG shift
    assert rel_err(G.gm_to_mean(out), m_c + (scale - 1) * bias) < 1e-10
