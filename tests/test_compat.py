"""gmkernels.compat: the GMFlow-compatible ops, helpers and schedulers (the schedulers' official
contract itself: tests/test_schedulers.py).

Every function is checked with the original module's calling conventions (tuple returns, dict
keys added as side effects, leading batch dims, the ``covs`` dict form) against the library's
own ops, and the functions with no library op against independent float64 computations
(``torch.distributions`` densities, moment identities, and the defining property of a normalised
product: ``log out(x) - sum_i p_i log f_i(x)`` does not depend on ``x``).
"""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import TOL, gm_shapes, make_gm, make_state, rel_err, seeds
from torch.distributions import MultivariateNormal, Normal

import gmkernels
import reference
from gmkernels.compat import gmflow as M
from gmkernels.compat import gmflow_ops as G
from gmkernels.compat import schedulers as S
from gmkernels.schedulers import GMTensorStepScheduler

F64 = torch.float64
TOL64 = TOL[F64]


def close(out, ref, tol=TOL64):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol, rel_err(out, ref)


def assert_gm_close(out, ref, tol=TOL64):
    for k in ("means", "logstds", "logweights"):
        o, r = out[k], ref[k]
        assert o.shape == r.shape, (k, o.shape, r.shape)
        dead = torch.isneginf(r)
        assert torch.equal(torch.isneginf(o), dead), k
        close(torch.where(dead, 0, o), torch.where(dead, 0, r), tol)


def to_covs(gm, per_component=False):
    """The same isotropic GM in the ``covs`` form (channel-last means, ``s2 * I`` covariances)."""
    means = gm["means"].movedim(-3, -1)  # (*B, K, H, W, C)
    *batch, K, H, W, C = means.shape
    var = torch.exp(2 * gm["logstds"]).squeeze(-3)  # (*B, 1, 1|H, 1|W)
    covs = (var[..., None, None] * torch.eye(C, dtype=means.dtype)).expand(
        *batch, K if per_component else 1, H, W, C, C
    )
    return {"means": means, "covs": covs, "logweights": gm["logweights"].squeeze(-3)}


def random_spd(shape, C, seed, dtype=F64, scale=1.0):
    """Random covariances with eigenvalues in ``scale * [0.3, 1.3]`` and random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn((*shape, C, C), generator=g, dtype=dtype)).Q
    eig = torch.rand((*shape, C), generator=g, dtype=dtype) + 0.3
    return scale * (Q * eig.unsqueeze(-2)) @ Q.transpose(-1, -2)


def gaussian_for(shape, seed, per_pixel, dtype=F64, lo=0.2):
    batch, _, C, H, W = shape
    g = torch.Generator().manual_seed(seed + 17)
    mean = torch.randn((*batch, C, H, W), generator=g, dtype=F64)
    var = torch.rand((*batch, 1, H, W) if per_pixel else (*batch, 1, 1, 1), generator=g, dtype=F64) + lo
    return {"mean": mean.to(dtype), "var": var.to(dtype)}


def mvn_gm_logprob(means_cl, covs, logweights, x_cl):
    """Independent float64 log-density of a full-covariance GM: ``means (*B, K, H, W, C)``,
    ``covs (*B, 1|K, H, W, C, C)``, ``logweights (*B, K, H, W)`` at ``x (*B, N, H, W, C)``."""
    comp = MultivariateNormal(means_cl.unsqueeze(-5), covariance_matrix=covs.unsqueeze(-6))
    return torch.logsumexp(logweights.unsqueeze(-4) + comp.log_prob(x_cl.unsqueeze(-4)), dim=-3)


def is_constant_in_x(d):
    """``d (*B, N, H, W)`` is the same for every sample n."""
    close(d, d[..., :1, :, :].expand_as(d), 1e-9)


small_shapes = gm_shapes(max_k=5, max_c=4, max_hw=4)


# ------------------------------------------------------------------------------------ moments


@given(small_shapes, seeds, st.booleans(), st.sampled_from([1, 0.5, 2.0]))
def test_gm_to_mean_and_iso_gaussian(shape, seed, dead, power):
    gm = make_gm(shape, seed, dead=dead)
    close(G.gm_to_mean(gm, power), gmkernels.gm_to_mean(gm, power))
    close(G.gm_to_mean(to_covs(gm), power), reference.gm_to_mean(gm, power))

    d = dict(gm)
    res = G.gm_to_iso_gaussian(d)
    gaussian, gm_diffs, gm_vars = res
    assert len(res) == 3 and res[0] is gaussian
    want = reference.gm_to_iso_gaussian(gm)
    close(gaussian["mean"], want["mean"])
    close(gaussian["var"], want["var"])
    close(gm_diffs, gm["means"] - want["mean"].unsqueeze(-4))
    close(gm_vars, torch.exp(2 * gm["logstds"]))
    assert torch.equal(d["gm_vars"], gm_vars)  # side effects of the original
    assert torch.equal(d["gm_weights"], gm["logweights"].exp())

    for per_component in (False, True):
        g_cov, _, vars_cov = G.gm_to_iso_gaussian(to_covs(gm, per_component))
        close(g_cov["mean"], want["mean"])
        close(g_cov["var"], want["var"].expand_as(g_cov["var"]))
        close(vars_cov, torch.exp(2 * gm["logstds"]).expand(*shape[0], 1, 1, shape[3], shape[4]))


def test_lazy_results_compute_deferred_items_once():
    calls = []
    res = G.LazyResults(1, G.Deferred(lambda: calls.append(1) or 2))
    assert res[0] == 1 and calls == []
    assert tuple(res) == (1, 2) and res[-1] == 2 and res[:2] == (1, 2) and calls == [1]


@settings(max_examples=8)
@given(small_shapes, seeds, st.booleans())
def test_gm_to_gaussian(shape, seed, per_pixel_std):
    gm = make_gm(shape, seed, per_pixel_std=per_pixel_std)
    batch, K, C, H, W = shape
    d = dict(gm)
    gaussian, gm_diffs, gm_covs = G.gm_to_gaussian(d, cov_scale=1.5)
    # independent: E[x x^T] - m m^T with the law of total covariance
    w = gm["logweights"].exp().squeeze(-3)  # (*B, K, H, W)
    mu = gm["means"].movedim(-3, -1)  # (*B, K, H, W, C)
    m = (w.unsqueeze(-1) * mu).sum(-4)
    second = (w[..., None, None] * mu.unsqueeze(-1) * mu.unsqueeze(-2)).sum(-5)
    s2 = torch.exp(2 * gm["logstds"]).squeeze(-3)[..., 0, :, :, None, None]  # (*B, 1|H, 1|W, 1, 1)
    cov = second - m.unsqueeze(-1) * m.unsqueeze(-2) + s2 * torch.eye(C, dtype=F64)
    close(gaussian["mean"], m)
    close(gaussian["cov"], 1.5 * cov, 1e-9)
    close(gm_diffs, mu - m.unsqueeze(-4))
    close(gm_covs, (s2 * torch.eye(C, dtype=F64)).unsqueeze(-5))  # (*B, 1, 1|H, 1|W, C, C)
    assert gm_covs.shape == (*batch, 1, *((H, W) if per_pixel_std else (1, 1)), C, C)
    assert "gm_vars" in d and "gm_weights" in d
    # trace / C is the isotropic variance; the covs form with s2 * I gives the same Gaussian
    iso_var = reference.gm_to_iso_gaussian(gm)["var"].squeeze(-3)
    close(gaussian["cov"].diagonal(dim1=-2, dim2=-1).mean(-1) / 1.5, iso_var)
    for per_component in (False, True):
        g2, diffs2, covs2 = G.gm_to_gaussian(to_covs(gm, per_component))
        close(g2["cov"], cov, 1e-9)
        close(diffs2, gm_diffs)


def test_gm_to_onehot():
    gm = make_gm(((2,), 4, 3, 3, 2), 5, dead=True)
    idx = gm["logweights"].argmax(-4, keepdim=True)
    want = gm["means"].gather(-4, idx.expand(2, 1, 3, 3, 2)).squeeze(-4)
    assert torch.equal(G.gm_to_onehot(gm), want)
    assert torch.equal(G.gm_to_onehot(to_covs(gm)), want)


# ------------------------------------------------------------------------------------ products


@given(small_shapes, seeds, st.booleans(), st.sampled_from([(1, 1), (2.0, 0.5), (1, -0.3), (0.5, 1)]))
def test_gm_mul_iso_gaussian_and_iso_product(shape, seed, per_pixel, powers):
    gm_power, g_power = powers
    gm = make_gm(shape, seed, dead=True, logstd_range=(-2.0, 0.0))
    gaussian = gaussian_for(shape, seed, per_pixel, lo=1.0)  # var > 0.3 * s2: the quotient stays proper
    d, g = dict(gm), dict(gaussian)
    out, p = G.gm_mul_iso_gaussian(d, g, gm_power, g_power)
    assert p == gm_power
    assert_gm_close(out, gmkernels.gm_mul_iso_gaussian(gm, gaussian, gm_power, g_power))
    assert "gm_vars" in d and torch.equal(g["logstd"], gaussian["var"].log() / 2)

    g2 = gaussian_for(shape, seed + 1, not per_pixel)
    want = gmkernels.iso_gaussian_mul_iso_gaussian(gaussian, g2, 1, -0.5)
    got = G.iso_gaussian_mul_iso_gaussian(gaussian, g2, 1, -0.5)
    close(got["mean"], want["mean"])
    close(got["var"], want["var"])
    # a variance with broadcast batch dims, as the original allows
    g3 = {"mean": g2["mean"], "var": torch.full([1] * g2["var"].dim(), 0.7, dtype=F64)}
    g3_full = {"mean": g2["mean"], "var": torch.full(g2["var"].shape, 0.7, dtype=F64)}
    close(
        G.iso_gaussian_mul_iso_gaussian(gaussian, g3, 1, 1)["mean"],
        gmkernels.iso_gaussian_mul_iso_gaussian(gaussian, g3_full)["mean"],
    )


@settings(max_examples=6)
@given(small_shapes, seeds, st.booleans(), st.sampled_from([1, 0.5, 2.0]))
def test_gm_mul_gaussian(shape, seed, per_pixel, g_power):
    batch, K, C, H, W = shape
    gm = make_gm(shape, seed, dead=True)
    gaussian = gaussian_for(shape, seed, per_pixel)
    var = gaussian["var"].expand(*batch, 1, H, W).squeeze(-3)[..., None, None]
    full = {"mean": gaussian["mean"].movedim(-3, -1), "cov": var * torch.eye(C, dtype=F64)}
    d = dict(gm)
    out, p = G.gm_mul_gaussian(d, full, 1, g_power)
    assert p == 1 and "gm_vars" in d
    # with cov = var * I it is the isotropic product
    iso, _ = G.gm_mul_iso_gaussian(dict(gm), gaussian, 1, g_power)
    close(out["means"], iso["means"].movedim(-3, -1))
    out_var = torch.exp(2 * iso["logstds"]).expand(*batch, 1, 1, H, W).squeeze(-3)[..., None, None]
    close(out["covs"], (out_var * torch.eye(C, dtype=F64)).expand_as(out["covs"]))
    live = torch.isfinite(iso["logweights"].squeeze(-3))
    close(out["logweights"][live], iso["logweights"].squeeze(-3)[live])

    # a general covariance: the product's defining property, with torch.distributions densities
    full = {"mean": full["mean"], "cov": random_spd((*batch, H, W), C, seed)}
    out, _ = G.gm_mul_gaussian(dict(gm), full, 1, g_power)
    x = torch.randn((*batch, 5, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=F64)
    x_cl = x.movedim(-3, -1)
    log_out = mvn_gm_logprob(out["means"], out["covs"], out["logweights"], x_cl)
    log_q = MultivariateNormal(full["mean"].unsqueeze(-4), covariance_matrix=full["cov"].unsqueeze(-5)).log_prob(x_cl)
    is_constant_in_x(log_out - reference.gm_logprob(gm, x) - g_power * log_q)


@settings(max_examples=8)
@given(small_shapes, seeds, st.sampled_from([(1, 1), (1, -0.5), (2.0, 0.5)]))
def test_gaussian_mul_gaussian(shape, seed, powers):
    batch, _, C, H, W = shape
    p1, p2 = powers
    g1 = {"mean": torch.randn((*batch, H, W, C), dtype=F64), "cov": random_spd((*batch, H, W), C, seed, scale=0.5)}
    g2 = {"mean": torch.randn((*batch, H, W, C), dtype=F64), "cov": random_spd((*batch, H, W), C, seed + 1, scale=4.0)}
    out = G.gaussian_mul_gaussian(g1, g2, p1, p2)
    x = torch.randn((*batch, 4, H, W, C), dtype=F64)
    logp = lambda g: MultivariateNormal(g["mean"].unsqueeze(-4), covariance_matrix=g["cov"].unsqueeze(-5)).log_prob(x)  # noqa: E731
    is_constant_in_x(logp(out) - p1 * logp(g1) - p2 * logp(g2))
    # scaled identities: the isotropic product
    v1, v2 = torch.rand((*batch, 1, H, W), dtype=F64) + 0.1, torch.rand((*batch, 1, H, W), dtype=F64) + 2.0
    eye = torch.eye(C, dtype=F64)
    full = lambda m, v: {"mean": m, "cov": v.squeeze(-3)[..., None, None] * eye}  # noqa: E731
    m1, m2 = torch.randn((*batch, C, H, W), dtype=F64), torch.randn((*batch, C, H, W), dtype=F64)
    got = G.gaussian_mul_gaussian(full(m1.movedim(-3, -1), v1), full(m2.movedim(-3, -1), v2), p1, p2)
    want = gmkernels.iso_gaussian_mul_iso_gaussian({"mean": m1, "var": v1}, {"mean": m2, "var": v2}, p1, p2)
    close(got["mean"], want["mean"].movedim(-3, -1))
    close(got["cov"], full(want["mean"], want["var"])["cov"])


@settings(max_examples=8)
@given(small_shapes, seeds, st.integers(1, 3))
def test_gm_mul_gm(shape, seed, K2):
    batch, K, C, H, W = shape
    gm1 = make_gm(shape, seed, dead=True)
    gm2 = make_gm((batch, K2, C, H, W), seed + 1, dead=True)
    d1, d2 = dict(gm1), dict(gm2)
    out = G.gm_mul_gm(d1, d2)
    assert out["means"].shape == (*batch, K * K2, C, H, W) and "gm_vars" in d1 and "gm_vars" in d2
    x = torch.randn((*batch, 4, C, H, W), dtype=F64)
    is_constant_in_x(reference.gm_logprob(out, x) - reference.gm_logprob(gm1, x) - reference.gm_logprob(gm2, x))
    if K2 == 1:
        g = {"mean": gm2["means"].squeeze(-4), "var": torch.exp(2 * gm2["logstds"]).squeeze(-4)}
        assert_gm_close(out, gmkernels.gm_mul_iso_gaussian(gm1, g))


# ------------------------------------------------------------------------------------ densities


@given(small_shapes, seeds, st.booleans())
def test_gm_logprob_and_iso_gaussian_logprob(shape, seed, per_pixel_std):
    batch, K, C, H, W = shape
    gm = make_gm(shape, seed, dead=True, per_pixel_std=per_pixel_std)
    x = torch.randn((*batch, 3, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=F64)
    res = G.gm_logprob(gm, x)
    logprob, glp = res
    close(logprob, gmkernels.gm_logprob(gm, x))
    comp = Normal(gm["means"].unsqueeze(-5), torch.exp(gm["logstds"]).unsqueeze(-5)).log_prob(x.unsqueeze(-4)).sum(-3)
    close(glp, comp)  # (*B, N, K, H, W)
    close(torch.logsumexp(gm["logweights"].squeeze(-3).unsqueeze(-4) + glp, dim=-3), logprob)
    # covs form with s2 * I: same densities, caches stored
    c = to_covs(gm, per_component=True)
    lp_c, glp_c = G.gm_logprob(c, x)
    close(lp_c, logprob)
    close(glp_c, comp)
    assert "invcov_trils" in c and "logdets" in c
    # the isotropic Gaussian density
    g = gaussian_for(shape, seed, per_pixel_std)
    want = Normal(g["mean"].unsqueeze(-4), g["var"].sqrt().unsqueeze(-4)).log_prob(x).sum(-3)
    close(G.iso_gaussian_logprob(g, x), want)


def test_gm_logprob_full_and_per_component_covariances():
    shape = ((2,), 3, 3, 2, 2)
    gm = make_gm(shape, 3, dead=True)
    x = torch.randn((2, 4, 3, 2, 2), dtype=F64)
    covs = random_spd((2, 3, 2, 2), 3, 9)
    c = {"means": gm["means"].movedim(-3, -1), "covs": covs, "logweights": gm["logweights"].squeeze(-3)}
    close(G.gm_logprob(c, x)[0], mvn_gm_logprob(c["means"], covs, c["logweights"], x.movedim(-3, -1)))
    pc = dict(gm, logstds=torch.rand((2, 3, 1, 2, 2), dtype=F64) - 1)  # per-component stds
    comp = Normal(pc["means"].unsqueeze(-5), pc["logstds"].exp().unsqueeze(-5)).log_prob(x.unsqueeze(-4)).sum(-3)
    close(G.gm_logprob(pc, x)[1], comp)
    close(G.gm_logprob(pc, x)[0], torch.logsumexp(pc["logweights"].squeeze(-3).unsqueeze(-4) + comp, dim=-3))


def test_gm1d_pdf_cdf():
    g = torch.Generator().manual_seed(0)
    gm1d = {
        "means": torch.randn((2, 4, 3, 3), generator=g, dtype=F64),
        "logstds": torch.full((2, 1, 1, 1), -0.5, dtype=F64),
        "logweights": torch.log_softmax(torch.randn((2, 4, 3, 3), generator=g, dtype=F64), dim=-3),
    }
    x = torch.randn((2, 5, 3, 3), generator=g, dtype=F64)
    pdf, cdf = G.gm1d_pdf_cdf(gm1d, x)
    comp = Normal(gm1d["means"].unsqueeze(-4), gm1d["logstds"].exp().unsqueeze(-4))
    w = gm1d["logweights"].exp().unsqueeze(-4)
    close(pdf, (w * comp.log_prob(x.unsqueeze(-3)).exp()).sum(-3))
    close(cdf, 2 * (w * comp.cdf(x.unsqueeze(-3))).sum(-3) - 1)


def test_gm_to_sample_kl_entropy():
    gm = make_gm(((2,), 3, 2, 3, 3), 1, dead=True)
    torch.manual_seed(0)
    got = G.gm_to_sample(gm, 2.0, n_samples=4)
    torch.manual_seed(0)
    assert torch.equal(got, gmkernels.gm_sample(gm, 4, power=2.0))
    torch.manual_seed(1)
    got = G.gm_to_sample(gm, 2.0, n_samples=4, cov_sharpen=True)
    torch.manual_seed(1)
    assert torch.equal(got, gmkernels.gm_sample(dict(gm, logstds=gm["logstds"] - 0.5 * math.log(2.0)), 4, power=2.0))

    q = make_gm(((2,), 2, 2, 3, 3), 2)
    torch.manual_seed(2)
    kl = G.gm_kl_div(gm, q, n_samples=8)
    torch.manual_seed(2)
    x = gmkernels.gm_sample(gm, 8)
    close(kl, (reference.gm_logprob(gm, x) - reference.gm_logprob(q, x)).mean(-3, keepdim=True))
    assert kl.shape == (2, 1, 3, 3)
    torch.manual_seed(3)
    ent = G.gm_entropy(gm, n_samples=8)
    torch.manual_seed(3)
    close(ent, -reference.gm_logprob(gm, gmkernels.gm_sample(gm, 8)).mean(-3, keepdim=True))
    assert torch.equal(G.gm_kl_div(gm, gm), torch.zeros(2, 1, 3, 3, dtype=F64))


@pytest.mark.parametrize("form", ["covs", "covs_per_component", "per_component_std"])
def test_gm_to_sample_other_forms_match_the_mixture_moments(form):
    torch.manual_seed(0)
    gm = make_gm(((1,), 2, 2, 1, 2), 4, logstd_range=(-1.0, -0.5))
    K, C = 2, 2
    if form == "per_component_std":
        gm = dict(gm, logstds=torch.tensor([-1.0, -0.3], dtype=F64).view(1, K, 1, 1, 1).expand(1, K, 1, 1, 2))
        var = gm["logstds"].exp().square().movedim(-3, -1)[..., None] * torch.eye(C, dtype=F64)  # (1, K, 1, 2, 1, C, C)
        covs = var.squeeze(-3)
        means, lw = gm["means"].movedim(-3, -1), gm["logweights"].squeeze(-3)
    else:
        means, lw = gm["means"].movedim(-3, -1), gm["logweights"].squeeze(-3)
        covs = random_spd((1, K if form == "covs_per_component" else 1, 1, 2), C, 5, scale=0.3)
        gm = {"means": means, "covs": covs, "logweights": lw}
    x = G.gm_to_sample(gm, n_samples=20000).movedim(-3, -1)  # (1, N, 1, 2, C)
    w = lw.exp()
    m = (w.unsqueeze(-1) * means).sum(-4)
    cov = (w[..., None, None] * (covs + means.unsqueeze(-1) * means.unsqueeze(-2))).sum(-5) - m.unsqueeze(
        -1
    ) * m.unsqueeze(-2)
    assert (x.mean(-4) - m).abs().max() < 0.05
    xc = x - x.mean(-4, keepdim=True)
    emp = (xc.unsqueeze(-1) * xc.unsqueeze(-2)).mean(-5)
    assert (emp - cov).abs().max() < 0.05 * cov.abs().max()


def test_gm_to_sample_cov_sharpen_follows_the_original():
    """cov_sharpen divides per-component covariances by gm_power, but, as in the original
    (lib/ops/gmflow_ops/gmflow_ops.py, gm_to_sample: the gm_covs.size(-5) == 1 branch takes the
    Cholesky factor of the covariances as they are), not a covariance shared by all components."""
    torch.manual_seed(0)
    means = torch.zeros((1, 2, 1, 1, 2))
    lw = torch.full((1, 2, 1, 1), -math.log(2))
    eye = torch.eye(2).expand(1, 1, 1, 1, 2, 2)
    for covs, var in ((eye, 1.0), (eye.expand(1, 2, 1, 1, 2, 2), 0.5)):
        x = G.gm_to_sample(
            {"means": means, "covs": covs, "logweights": lw}, gm_power=2, n_samples=20000, cov_sharpen=True
        )
        assert abs(x.var().item() / var - 1) < 0.05, (covs.shape, x.var().item())


def test_inverse_cdf_and_transports_wrap_the_library():
    gm = make_gm(((2,), 3, 2, 3, 3), 6, dtype=torch.float32)
    gm1d = {k: gm[k][:, :, 0] for k in ("means", "logstds", "logweights")}
    u = torch.rand((2, 4, 3, 3), generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    d = dict(gm1d)
    x = G.gm1d_inverse_cdf(d, u, n_steps=32, backward_steps=0)
    assert torch.equal(x, gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=32))
    assert "gm_weights" in d and "gm_vars" in d
    assert (G.gm1d_pdf_cdf(gm1d, x)[1] - u).abs().max() < 1e-4
    z = torch.randn((2, 4, 2, 3, 3), generator=torch.Generator().manual_seed(1))
    samples = G.gaussian_samples_to_gm_samples(gm, z, n_steps=32)
    assert torch.equal(samples, gmkernels.gaussian_samples_to_gm_samples(gm, z, n_steps=32))
    close(G.gm_samples_to_gaussian_samples(gm, samples), z, 1e-4)
    with pytest.raises(NotImplementedError, match="n_axes"):
        G.gaussian_samples_to_gm_samples(gm, z, n_axes=1)


def two_mode_gm1d(u):
    """Means [-4, 4], std 0.15, equal weights: modes 53 stds apart, the case where few Newton
    steps (each at most 1.5 stds) do not reach the root. Returns ``(gm1d, u (1, 1, 1, 1))``."""
    gm1d = {
        "means": torch.tensor([-4.0, 4.0]).view(1, 2, 1, 1),
        "logstds": torch.full((1, 1, 1, 1), math.log(0.15)),
        "logweights": torch.full((1, 2, 1, 1), math.log(0.5)),
    }
    return gm1d, torch.full((1, 1, 1, 1), u)


def test_gm1d_inverse_cdf_defaults_converge_like_the_original():
    """The original (lib/ops/gmflow_ops/gmflow_ops.py, gm1d_inverse_cdf) runs n_steps -
    backward_steps Newton steps in its CUDA kernel, then n_steps more in PyTorch when
    backward_steps > 0: 14 with the defaults, which reach 3.92134 here (8 steps stop at 3.34236)."""
    gm1d, u = two_mode_gm1d(0.3)
    # exact: P(X <= x) = 0.65 = 0.5 + 0.5 Phi((x - 4) / 0.15)
    exact = 4 + 0.15 * Normal(torch.tensor(0.0, dtype=F64), 1.0).icdf(torch.tensor(0.3, dtype=F64)).item()
    assert abs(exact - 3.92134) < 1e-5
    assert abs(G.gm1d_inverse_cdf(dict(gm1d), u).item() - exact) < 1e-5
    for n_steps, backward_steps, total in ((8, 2, 14), (8, 0, 8), (5, 5, 5), (6, 1, 11)):
        got = G.gm1d_inverse_cdf(dict(gm1d), u, n_steps=n_steps, backward_steps=backward_steps)
        assert torch.equal(got, gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=total)), (n_steps, backward_steps)
    with pytest.raises(ValueError, match="backward_steps"):
        G.gm1d_inverse_cdf(dict(gm1d), u, n_steps=2, backward_steps=3)
    with pytest.raises(TypeError, match="backward_steps"):
        G.gm1d_inverse_cdf(dict(gm1d), u, backward_steps=1.0)
    # the transport takes the same count per axis: 16 with its defaults (backward_steps=0)
    gm = {k: v.unsqueeze(-3) for k, v in gm1d.items()}
    z = torch.full((1, 1, 1, 1, 1), 0.3)
    assert torch.equal(
        G.gaussian_samples_to_gm_samples(gm, z, n_steps=8, backward_steps=2),
        gmkernels.gaussian_samples_to_gm_samples(gm, z, n_steps=14),
    )


def official_kr_basis(gm, axis_aligned=True):
    """The original's KR basis (lib/ops/gmflow_ops/gmflow_ops.py, gaussian_samples_to_gm_samples):
    ``eigh`` in float32 of gm_to_gaussian's covariance (averaged over pixels when axis_aligned),
    columns flipped to descending eigenvalues -> ``(*B, 1|H, 1|W, C, C)``."""
    cov = G.gm_to_gaussian({k: v.float() for k, v in gm.items()})[0]["cov"]
    if axis_aligned:
        cov = cov.mean(dim=(-4, -3), keepdim=True)
    return torch.linalg.eigh(cov.float())[1].flip(-1)


def official_transports(gm, z, x, axis_aligned=True):
    """Both KR directions in the original's basis, by the library's per-axis transport (which
    matches the original's) on the rotated GM: ``(gm samples of z, gaussian samples of x)``."""
    R = reference.inverse_cdf
    V = official_kr_basis(gm, axis_aligned).to(gm["means"].dtype)
    rot = {"means": R.to_basis(gm["means"], V), "logstds": gm["logstds"], "logweights": gm["logweights"]}
    to_gm = R.from_basis(R.kr_gaussian_to_gm(rot, z if axis_aligned else R.to_basis(z, V), 16), V)
    u = R.kr_gm_to_scaled_cdfs(rot, R.to_basis(x, V))
    z_back = torch.erfinv(u.clamp(-1 + 1e-6, 1 - 1e-6)) * math.sqrt(2)
    return to_gm, z_back if axis_aligned else R.from_basis(z_back, V)


def test_kr_transports_reproduce_the_original_seeded_samples():
    torch.manual_seed(0)
    means = torch.randn(1, 4, 3, 1, 1)
    z = torch.randn(1, 1, 3, 1, 1)
    gm = {
        "means": means,
        "logstds": torch.full((1, 1, 1, 1, 1), -1.0),
        "logweights": torch.full((1, 4, 1, 1, 1), -math.log(4)),
    }
    got = G.gaussian_samples_to_gm_samples(dict(gm), z)
    # the original's output for this seed (before: [1.115, 0.157, -2.188] from another eigenvector sign)
    assert (got.flatten() - torch.tensor([-0.590, -0.941, -0.293])).abs().max() < 1e-3
    want, _ = official_transports(gm, z, got)
    close(got, want, 1e-5)


@settings(max_examples=10)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), seeds, st.booleans())
def test_kr_transports_use_the_original_basis(B, H, W, seed, aligned):
    """K > C (distinct eigenvalues almost surely): both directions equal the transports in the
    original's basis, float32, pixel-averaged or per pixel."""
    gm = make_gm(((B,), 5, 3, H, W), seed, dtype=torch.float32, logstd_range=(-1.5, 0.0))
    cov = G.gm_to_gaussian(dict(gm))[0]["cov"]
    eig = torch.linalg.eigvalsh(cov.mean(dim=(-4, -3)) if aligned else cov)
    assume((eig.diff(dim=-1) / eig[..., -1:]).min() > 1e-3)  # nearly repeated: float32 rounding picks the vectors
    g = torch.Generator().manual_seed(seed % 10000)
    z = torch.randn((B, 2, 3, H, W), generator=g)
    x = G.gaussian_samples_to_gm_samples(dict(gm), z, axis_aligned=aligned)
    want_x, want_z = official_transports(gm, z, x, aligned)
    close(x, want_x, 1e-4)
    close(G.gm_samples_to_gaussian_samples(dict(gm), x, axis_aligned=aligned), want_z, 1e-4)


def test_kr_transport_with_repeated_eigenvalues():
    """K = 2 < C = 3 at one pixel: the covariance has eigenvalues (s^2 + spread, s^2, s^2). The
    component along the distinct eigenvector and the length of the rest match the original; how
    the repeated eigenspace is split into axes is eigh's choice, so values there need not."""
    g = torch.Generator().manual_seed(3)
    gm = {
        "means": torch.randn((1, 2, 3, 1, 1), generator=g),
        "logstds": torch.full((1, 1, 1, 1, 1), -1.0),
        "logweights": torch.log_softmax(torch.randn((1, 2, 1, 1, 1), generator=g), dim=-4),
    }
    z = torch.randn((1, 64, 3, 1, 1), generator=g)
    got = G.gaussian_samples_to_gm_samples(dict(gm), z)
    want, _ = official_transports(gm, z, got)
    v = official_kr_basis(gm)[0, 0, 0, :, 0].view(1, 1, 3, 1, 1)  # the distinct eigenvector
    m = gmkernels.gm_to_mean(gm).unsqueeze(-4)
    along = lambda x: ((x - m) * v).sum(-3)  # noqa: E731
    rest = lambda x: ((x - m) - along(x).unsqueeze(-3) * v).norm(dim=-3)  # noqa: E731
    close(along(got), along(want), 1e-5)
    close(rest(got), rest(want), 1e-5)


def test_gm_spectral_logprobs_without_spectrum_is_the_summed_logprob():
    gm = make_gm(((2,), 3, 2, 3, 3), 7)
    x = torch.randn((2, 4, 2, 3, 3), dtype=F64)
    close(G.gm_spectral_logprobs(gm, x), reference.gm_logprob(gm, x).sum((-2, -1)))
    spec = torch.zeros(2, 1, 3, 3, dtype=F64)  # a flat unit spectrum adds nothing
    close(
        G.gm_spectral_logprobs(gm, x, spec, spectral_samples=torch.randn(2, 4, 2, 3, 3, dtype=F64)),
        reference.gm_logprob(gm, x).sum((-2, -1)),
    )


def test_psd_inverse():
    A = random_spd((3,), 4, 0)
    close(G.psd_inverse(A), torch.linalg.inv(A), 1e-9)


# ------------------------------------------------------------------------------------ helpers


def sig(t, B):
    return (torch.as_tensor(t, dtype=F64) / 1000).expand(B).reshape(B, 1, 1, 1)


@settings(max_examples=8)
@given(
    gm_shapes(max_k=4, max_c=3, max_hw=4, max_batch_dims=1),
    seeds,
    st.floats(10.0, 990.0),
    st.sampled_from(["float", "0d", "batch"]),
)
def test_u_to_x_0_and_reverse_transition(shape, seed, t_high, t_kind):
    batch, K, C, H, W = shape
    shape = (batch or (2,), K, C, H, W)
    B = shape[0][0]
    gm_u = make_gm(shape, seed, dead=True)
    x = make_state(shape, seed)
    t_low = 0.4 * t_high
    conv = {
        "float": lambda t: t,
        "0d": lambda t: torch.tensor(t, dtype=F64),
        "batch": lambda t: torch.full((B,), t, dtype=F64),
    }[t_kind]
    sigma, sigma_to = sig(t_high, B), sig(t_low, B)
    gm_x0 = M.u_to_x_0(gm_u, x, conv(t_high))
    assert_gm_close(gm_x0, gmkernels.u_to_x0(gm_u, x, sigma))
    g = gaussian_for(shape, seed, True)
    got = M.u_to_x_0(g, x, sigma=sigma)
    close(got["mean"], x - sigma * g["mean"])
    close(got["var"], g["var"] * sigma**2)
    close(M.u_to_x_0(g["mean"], x, conv(t_high)), x - sigma * g["mean"])

    # independent float64 evaluation of the original's formulas
    q, p = sigma_to / sigma, (1 - sigma) / (1 - sigma_to)
    beta = 1 - (q * p) ** 2
    c1, c2, c3 = q * q * p, beta * (1 - sigma_to), beta * sigma_to**2
    for pred, src, scale in (("u", gm_u, sigma.unsqueeze(-4)), ("x0", gm_x0, 1.0)):
        out = M.reverse_transition(src, x, conv(t_low), conv(t_high), prediction_type=pred)
        close(out["means"], (c1 * x).unsqueeze(-4) + c2.unsqueeze(-4) * gm_x0["means"])
        var = (src["logstds"].exp() * scale * c2.unsqueeze(-4)) ** 2 + c3.unsqueeze(-4)
        close(out["logstds"], 0.5 * var.log(), 1e-9)
        assert out["logweights"] is src["logweights"] or torch.equal(out["logweights"], src["logweights"])
    # at t_low = 0 the std floor of the original: sqrt(eps)
    out = M.reverse_transition(
        dict(gm_x0, logstds=torch.full_like(gm_x0["logstds"], -20.0)), x, 0.0, conv(t_high), prediction_type="x0"
    )
    close(out["logstds"], torch.full_like(out["logstds"], 0.5 * math.log(1e-6)), 1e-6)
    # sample mode: one exact draw with the global RNG
    x0 = gmkernels.gm_to_mean(gm_x0)
    torch.manual_seed(seed % 1000)
    got = M.reverse_transition(x0, x, conv(t_low), conv(t_high), prediction_type="x0")
    torch.manual_seed(seed % 1000)
    close(got, c1 * x + c2 * x0 + c3.sqrt() * torch.randn(x.shape, dtype=F64))


@settings(max_examples=8)
@given(gm_shapes(max_k=4, max_c=3, max_hw=4, max_batch_dims=1), seeds, st.floats(20.0, 980.0), st.floats(0.05, 0.95))
def test_denoising_gm_convert(shape, seed, t_src, ratio):
    batch, K, C, H, W = shape
    shape = (batch or (1,), K, C, H, W)
    B = shape[0][0]
    gm = make_gm(shape, seed, dead=True)
    x_src, x_tgt = make_state(shape, seed), make_state(shape, seed + 1)
    t_tgt = t_src * ratio
    want = gmkernels.gm_posterior_mean(gm, x_src, sig(t_src, B), x_tgt, sig(t_tgt, B))
    close(G.gm_to_mean(M.denoising_gm_convert(gm, x_tgt, x_src, t_tgt, t_src)), want, 1e-8)
    d = dict(gm)
    close(M.denoising_gm_convert_to_mean(d, x_tgt, x_src, t_tgt, t_src), want)
    assert "gm_vars" in d
    close(M.denoising_gm_convert_to_mean(gm, x_tgt, x_src, sigma_src=sig(t_src, B), sigma_tgt=sig(t_tgt, B)), want)
    gm_u = gmkernels.x0_to_u(gm, x_src, sig(t_src, B))
    close(M.denoising_gm_convert_to_mean(gm_u, x_tgt, x_src, t_tgt, t_src, prediction_type="u"), want, 1e-9)


@settings(max_examples=8)
@given(small_shapes, seeds, st.floats(0.05, 0.9), st.sampled_from([0.0, 0.5, 1.0]))
def test_probabilistic_guidance_pipeline_equals_the_library(shape, seed, scale, orthogonal):
    gm_cond = make_gm(shape, seed, dead=True)
    gm_uncond = make_gm(shape, seed + 1)
    # the original pipeline's guidance block, verbatim in structure
    uncond_mean = G.gm_to_mean(gm_uncond)
    gaussian_cond = G.gm_to_iso_gaussian(gm_cond)[0]
    gaussian_cond["var"] = gaussian_cond["var"].mean(dim=(-1, -2), keepdim=True)
    gaussian_output, cfg_bias, avg_var = M.probabilistic_guidance_jit(
        gaussian_cond["mean"], gaussian_cond["var"], uncond_mean, scale, orthogonal=orthogonal
    )
    guided = G.gm_mul_iso_gaussian(
        gm_cond, G.iso_gaussian_mul_iso_gaussian(gaussian_output, gaussian_cond, 1, -1), 1, 1
    )[0]
    assert_gm_close(guided, gmkernels.probabilistic_guidance(gm_cond, gm_uncond, scale, orthogonal), 1e-8)
    close(gaussian_output["mean"] - gaussian_cond["mean"], cfg_bias)
    close(avg_var, gaussian_cond["var"].mean((-3, -2, -1), keepdim=True))


def test_probabilistic_guidance_orthogonal_axis():
    """orthogonal_axis (the original's lakonlab/models/diffusions/gmflow.py): the bias is made
    orthogonal to that axis instead of cond_mean; None is cond_mean; orthogonal=0 ignores it."""
    g = torch.Generator().manual_seed(0)
    cond, uncond, axis = (torch.randn((2, 3, 4, 4), generator=g, dtype=F64) for _ in range(3))
    var = torch.rand((2, 1, 1, 1), generator=g, dtype=F64) + 0.1
    default = M.probabilistic_guidance_jit(cond, var, uncond, 0.5)
    same = M.probabilistic_guidance_jit(cond, var, uncond, 0.5, orthogonal_axis=cond)
    close(same[0]["mean"], default[0]["mean"])
    close(same[1], default[1])
    _, bias, _ = M.probabilistic_guidance_jit(cond, var, uncond, 0.5, orthogonal=1.0, orthogonal_axis=axis)
    assert (bias * axis).mean((-3, -2, -1)).abs().max() < 1e-12
    assert (bias * cond).mean((-3, -2, -1)).abs().min() > 1e-3
    _, bias0, _ = M.probabilistic_guidance_jit(cond, var, uncond, 0.5, orthogonal=0.0, orthogonal_axis=axis)
    close(bias0, M.probabilistic_guidance_jit(cond, var, uncond, 0.5, orthogonal=0.0)[1])
    # half the component along the axis removed with orthogonal = 0.5
    raw = cond - uncond
    coef = (raw * axis).mean((-3, -2, -1), keepdim=True) / (axis * axis).mean((-3, -2, -1), keepdim=True)
    _, half, avg_var = M.probabilistic_guidance_jit(cond, var, uncond, 0.5, orthogonal=0.5, orthogonal_axis=axis)
    want = raw - 0.5 * coef * axis
    close(half, want * (avg_var / want.square().mean((-3, -2, -1), keepdim=True)).sqrt() * 0.5)


def test_u_to_x_0_takes_the_original_sigma_shape():
    """The original broadcasts sigma against x_t.unsqueeze(-4): (B, 1, 1, 1, 1) for a GM, B > 1."""
    shape = ((3,), 2, 2, 3, 3)
    gm, x = make_gm(shape, 1), make_state(shape, 1)
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=F64).view(3, 1, 1, 1)
    want = gmkernels.u_to_x0(gm, x, sigma)
    assert_gm_close(M.u_to_x_0(gm, x, sigma=sigma.view(3, 1, 1, 1, 1)), want)
    assert_gm_close(M.u_to_x_0(gm, x, sigma=sigma), want)


class Model(M.GMFlowMixin):
    num_timesteps = 1000


def test_gm_2nd_order_first_call_records_then_shifts_the_mean():
    B, C, H, W = 2, 3, 4, 4
    g = torch.Generator().manual_seed(0)
    model = Model()
    model.init_gm_cache()

    def k1_gm(mean, logstd):
        return {
            "means": mean.unsqueeze(-4),
            "logstds": torch.full((B, 1, 1, 1, 1), logstd, dtype=F64),
            "logweights": torch.zeros(B, 1, 1, H, W, dtype=F64),
        }

    x1, x2 = torch.randn(B, C, H, W, generator=g, dtype=F64), torch.randn(B, C, H, W, generator=g, dtype=F64)
    t1, h1, t2, h2 = (
        torch.tensor(800.0, dtype=F64),
        torch.tensor(200.0, dtype=F64),
        torch.tensor(600.0, dtype=F64),
        torch.tensor(200.0, dtype=F64),
    )
    gm1 = k1_gm(torch.randn(B, C, H, W, generator=g, dtype=F64), -1.0)
    g1 = G.gm_to_iso_gaussian(gm1)[0]
    out, gout = model.gm_2nd_order(gm1, g1, x1, t1, h1)
    assert out is gm1 and gout is g1 and model.prev_gm is gm1

    # K = 1: the update is exact: N(m + bias, s2 * (1 - P / V)) with the 2nd-order bias of docs/solvers.md#2nd-order
    gm2 = k1_gm(torch.randn(B, C, H, W, generator=g, dtype=F64) * 0.1, -3.0)
    g2 = G.gm_to_iso_gaussian(gm2)[0]
    m2 = g2["mean"].clone()
    out, _ = model.gm_2nd_order(gm2, g2, x2, t2, h2)
    V = math.exp(-6.0)
    from_prev = gmkernels.gm_posterior_mean(gm1, x1, 0.8, x2, 0.6)
    factor = 0.5 * h2 / h1 * math.sqrt(max(0.0, 1 - V * 0.005 / 0.2**2))
    bias = (m2 - from_prev) * factor
    P = bias.square().mean((-3, -2, -1), keepdim=True)
    bias = bias * (V / P).clamp(max=1).sqrt()
    close(out["means"].squeeze(-4), m2 + bias, 1e-8)
    close(
        torch.exp(2 * out["logstds"]).expand(B, 1, 1, H, W),
        (V * (1 - P / V).clamp(min=1e-6)).unsqueeze(-4).expand(B, 1, 1, H, W),
        1e-8,
    )
    assert model.prev_gm is gm2 and model.prev_h is h2


def test_gm_sample_spectral_and_model_output():
    """With a flat log power spectrum the spectral noise is white N(0, 1), so a K=1 GM's samples
    are N(mean, s^2) per pixel; without one, gm_sample is gm_to_sample."""
    B, C, H, W = 2, 2, 32, 32
    gm = {
        "means": torch.full((B, 1, C, H, W), 0.5),
        "logstds": torch.full((B, 1, 1, 1, 1), math.log(0.3)),
        "logweights": torch.zeros(B, 1, 1, H, W),
    }
    samples, spectral = Model.gm_sample(
        gm, torch.zeros(B, 1, H, W), n_samples=2, generator=torch.Generator().manual_seed(0)
    )
    assert samples.shape == (B, 2, C, H, W) and spectral.shape == (B, 2, C, H, W)
    assert abs(samples.mean().item() - 0.5) < 0.02 and abs(samples.std().item() / 0.3 - 1) < 0.05
    torch.manual_seed(4)
    out = Model().gm_to_model_output(gm, "sample")
    torch.manual_seed(4)
    assert torch.equal(out, G.gm_to_sample(gm).squeeze(-4))
    assert torch.equal(Model().gm_to_model_output(gm, "mean"), G.gm_to_mean(gm))


def test_gm_sample_spectral_reproduces_the_original():
    """The spectral path of the original's gm_sample (lib/models/diffusions/gmflow.py): seeded
    spectral noise, made Hermitian and inverse-FFT'd, then the KR transport in its basis."""
    gm = make_gm(
        ((1,), 5, 3, 4, 4), 7, dtype=torch.float32, logstd_range=(-1.5, -0.5)
    )  # where a float64 eigh flips two signs
    spectrum = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(1)) * 0.3
    samples, _ = Model.gm_sample(gm, spectrum, generator=torch.Generator().manual_seed(0))
    # the original's noise for this seed
    spectral = (
        torch.randn((1, 1, 3, 4, 4), generator=torch.Generator().manual_seed(0)) * (spectrum.unsqueeze(-4) / 2).exp()
    )
    z_1 = spectral.roll((-1, -1), dims=(-2, -1)).flip((-2, -1))[..., :3]
    z_0 = spectral[..., :3]
    gaussian = torch.fft.irfft2(torch.complex(z_0 + z_1, z_0 - z_1) / 2, norm="ortho")
    close(samples, official_transports(gm, gaussian, samples)[0], 1e-4)


def test_mixin_takes_T_from_the_pipeline_scheduler():
    class Pipe(M.GMFlowMixin):
        scheduler = S.FlowEulerODEScheduler(num_train_timesteps=500)

    gm = make_gm(((2,), 2, 2, 2, 2), 0)
    x = make_state(((2,), 2, 2, 2, 2), 0)
    assert_gm_close(Pipe().u_to_x_0(gm, x, 100.0), gmkernels.u_to_x0(gm, x, 0.2))


# ------------------------------------------------------------------------------------ schedulers


def test_gmflow_sde_scheduler_samples_the_data_distribution():
    """Data N(mu, s0^2) per pixel: the exact x0-posterior at every state is one Gaussian; GM-SDE
    steps drawing from it reproduce the data distribution at any number of steps."""
    mu, s0 = 0.7, 0.5
    sched = S.GMFlowSDEScheduler(shift=2.0)
    sched.set_timesteps(3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 96, 96, generator=gen)
    for t in sched.timesteps:
        sigma = float(t) / 1000
        a = 1 - sigma
        prec = 1 / s0**2 + a**2 / sigma**2
        post = {
            "means": ((mu / s0**2 + a * x / sigma**2) / prec).unsqueeze(-4),
            "logstds": torch.full((1, 1, 1, 1, 1), -0.5 * math.log(prec)),
            "logweights": torch.zeros(1, 1, 1, 96, 96),
        }
        torch.manual_seed(int(t))
        x0 = G.gm_to_sample(post).squeeze(-4)
        x = sched.step(x0, t, x, generator=gen, prediction_type="x0").prev_sample
    assert abs(x.mean().item() - mu) < 0.03 and abs(x.std().item() / s0 - 1) < 0.05


# ------------------------------------------------------------------------------------ Triton


@pytest.mark.triton
def test_isotropic_fast_paths_run_on_the_triton_backend():
    shape = ((2,), 3, 2, 3, 3)
    gm = make_gm(shape, 11, dtype=torch.float32, dead=True)
    x = make_state(shape, 11, dtype=torch.float32)
    gaussian = gaussian_for(shape, 11, True, dtype=torch.float32)
    samples = torch.randn((2, 2, 2, 3, 3))

    def run():
        return [
            G.gm_to_mean(dict(gm)),
            G.gm_to_iso_gaussian(dict(gm))[0]["var"],
            G.gm_mul_iso_gaussian(dict(gm), dict(gaussian), 1, 1)[0]["means"],
            G.gm_logprob(gm, samples)[0],
            M.u_to_x_0(gm, x, 300.0)["means"],
            M.reverse_transition(gm, x, 200.0, 500.0)["means"],
            M.denoising_gm_convert_to_mean(gm, x, x * 0.9, 300.0, 500.0),
        ]

    with gmkernels.use_backend("torch"):
        want = run()
    with gmkernels.use_backend("triton"):
        got = run()
    for o, r in zip(got, want):
        close(o, r, TOL[torch.float32])


def _stub_net(x, t, offset):
    """A deterministic stand-in for a GMFlow network: a K=2 u-GM that depends on ``x`` and ``t``."""
    s = (t / 1000).reshape(-1, 1, 1, 1)
    means = torch.stack([x * 0.5 + offset - s, -0.3 * x + s * x.mean(-3, keepdim=True)], dim=-4)
    logits = torch.stack([x.mean(-3, keepdim=True) * 2, -x.mean(-3, keepdim=True) + offset], dim=-4)
    logstds = torch.log(0.2 + 0.5 * s).reshape(-1, 1, 1, 1, 1)
    return {"means": means, "logstds": logstds, "logweights": torch.log_softmax(logits, dim=-4)}


@pytest.mark.parametrize("output_mode,guidance_scale", [("ode", 0.0), ("ode", 0.4), ("mean", 0.4)])
def test_original_pipeline_loop_on_compat_equals_gmkernels_sample(output_mode, guidance_scale):
    """The sampling loop of the original GMDiTPipeline (2nd order with substeps and probabilistic
    guidance on the GM's mean), written against the compat modules: with FlowEulerODEScheduler
    (GM-ODE) it gives gmkernels.sample's result, with GMFlowSDEScheduler(output_mode=...) that
    of GMTensorStepScheduler, the loop GMDiTPipeline runs for that pairing."""
    S_, N_, B = 3, 2, 2
    noise = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    use_guidance = guidance_scale > 0

    def net(x, t):  # the batch is [cond, uncond] like the pipeline's class labels
        return {
            k: torch.cat([a, b])
            for (k, a), b in zip(_stub_net(x[:B], t[:B], 0.3).items(), _stub_net(x[B:], t[B:], -0.2).values())
        }

    scheduler = (
        S.FlowEulerODEScheduler(shift=2.0)
        if output_mode == "ode"
        else S.GMFlowSDEScheduler(shift=2.0, output_mode=output_mode)
    )
    g = torch.Generator().manual_seed(3)
    model = Model()
    scheduler.set_timesteps(S_ * N_)
    model.init_gm_cache()
    x_t = noise
    for i in range(S_):
        t = scheduler.timesteps[i * N_]
        x_in = torch.cat([x_t, x_t]) if use_guidance else x_t
        gm_output = net(x_in, t.expand(x_in.size(0))) if use_guidance else _stub_net(x_in, t.expand(B), 0.3)
        gm_output = model.u_to_x_0(gm_output, x_in, t)
        if use_guidance:
            gm_cond = {k: v[:B] for k, v in gm_output.items()}
            gm_uncond = {k: v[B:] for k, v in gm_output.items()}
            uncond_mean = G.gm_to_mean(gm_uncond)
            gaussian_cond = G.gm_to_iso_gaussian(gm_cond)[0]
            gaussian_cond["var"] = gaussian_cond["var"].mean(dim=(-1, -2), keepdim=True)
            gaussian_output, cfg_bias, avg_var = M.probabilistic_guidance_jit(
                gaussian_cond["mean"], gaussian_cond["var"], uncond_mean, guidance_scale, orthogonal=1.0
            )
            gm_output = G.gm_mul_iso_gaussian(
                gm_cond, G.iso_gaussian_mul_iso_gaussian(gaussian_output, gaussian_cond, 1, -1), 1, 1
            )[0]
        else:
            gaussian_output = G.gm_to_iso_gaussian(gm_output)[0]
            gm_cond = gaussian_cond = avg_var = cfg_bias = None
        h = t - scheduler.timesteps[(i + 1) * N_] if i < S_ - 1 else t
        gm_output, gaussian_output = model.gm_2nd_order(
            gm_output, gaussian_output, x_t, t, h, guidance_scale, gm_cond, gaussian_cond, avg_var, cfg_bias
        )
        x_t_base, t_base = x_t, t
        for j in range(N_):
            if j == 0:
                model_output = G.gm_to_mean(gm_output)
            else:
                t = scheduler.timesteps[i * N_ + j]
                model_output = model.denoising_gm_convert_to_mean(
                    gm_output, x_t, x_t_base, t, t_base, prediction_type="x0"
                )
            x_t = scheduler.step(model_output, t, x_t, generator=g, return_dict=False, prediction_type="x0")[0]

    def denoiser(x, t):
        if not use_guidance:
            return _stub_net(x, t, 0.3)
        return _stub_net(x, t, 0.3), _stub_net(x, t, -0.2)

    if output_mode == "ode":
        want = gmkernels.sample(
            denoiser,
            noise,
            S_,
            solver="gm-ode",
            substeps=N_,
            order=2,
            shift=2.0,
            guidance_scale=guidance_scale,
            orthogonal=1.0,
        )
    else:
        sched = GMTensorStepScheduler(
            S.GMFlowSDEScheduler(shift=2.0, output_mode=output_mode),
            output_mode,
            order=2,
            guidance_scale=guidance_scale,
        )
        sched.set_timesteps(S_, N_)
        want, g = noise, torch.Generator().manual_seed(3)
        for t in sched.timesteps:
            want = sched.step(denoiser(want, t.expand(B)), t, want, generator=g)
    close(x_t, want, 1e-4)


def test_bad_input_names_the_argument():
    gm = make_gm(((2,), 3, 2, 3, 3), 0)
    with pytest.raises(ValueError, match=r"gm\['means'\].*gm\['logweights'\]"):
        G.gm_to_mean(dict(gm, logweights=torch.zeros(3, 3, 1, 3, 3, dtype=F64)))  # batch 3 vs 2
    with pytest.raises(ValueError, match="logweights"):
        G.gm_to_iso_gaussian(dict(gm, logweights=gm["logweights"][:, :2]))
    with pytest.raises(ValueError, match="prediction_type"):
        M.reverse_transition(gm, make_state(((2,), 3, 2, 3, 3), 0), 100.0, 200.0, prediction_type="eps")
    with pytest.raises(ValueError, match="sigma"):
        M.u_to_x_0(gm, make_state(((2,), 3, 2, 3, 3), 0), 2000.0)


def test_training_path_is_differentiable():
    """The original's transition loss differentiates through reverse_transition and the GM
    density: the compat versions pass gradcheck in float64."""
    shape = ((2,), 2, 2, 2, 2)
    gm = make_gm(shape, 3)
    x = make_state(shape, 3)
    t_high = torch.tensor([700.0, 400.0], dtype=F64)
    y = torch.randn((2, 1, 2, 2, 2), dtype=F64)

    def loss(means, logstds, logweights):
        out = M.reverse_transition(
            {"means": means, "logstds": logstds, "logweights": logweights}, x, t_high * 0.3, t_high
        )
        return G.gm_logprob(out, y)[0]

    inputs = tuple(gm[k].clone().requires_grad_() for k in ("means", "logstds", "logweights"))
    assert torch.autograd.gradcheck(loss, inputs)


def test_sample_forward_transition_composes_to_the_marginal():
    """x_low = a_low x0 + s_low e1, then the forward transition: x_high has the marginal
    a_high x0 + s_high e (variance s_high^2 per unit noise)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 128, 128, generator=g)
    t_low, t_high = torch.tensor([200.0]), torch.tensor([700.0])
    x_low = 0.8 * x0 + 0.2 * torch.randn(x0.shape, generator=g)
    x_high = Model().sample_forward_transition(x_low, t_low, t_high, torch.randn(x0.shape, generator=g))
    resid = x_high - 0.3 * x0
    assert abs(resid.std().item() / 0.7 - 1) < 0.03 and abs(resid.mean().item()) < 0.02
