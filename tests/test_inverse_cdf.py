"""``gm1d_inverse_cdf`` and the Knothe-Rosenblatt transports: the differentiable reference path
(gradcheck in float64), the Triton kernels against it under the interpreter, the transports as
inverses of each other and as maps N(0, I) -> GM (Kolmogorov-Smirnov on 1-D marginals and the
covariance), and finiteness on dead components, K = 1 and tiny stds."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import TOL, gm_shapes, make_gm, rel_err, seeds

import gmkernels
import reference.inverse_cdf as ref
from gmkernels.ops import inverse_cdf


def _gm1d(shape, seed, dtype=torch.float64, dead=False, logstd_range=(-1.0, 0.5), per_pixel_std=False):
    """A 1-D GM ``{means (*B, K, H, W), logstds (*B, 1, 1, 1) | (*B, 1, H, W), logweights (*B, K, H, W)}``."""
    gm = make_gm(
        (shape[0], shape[1], 1, *shape[2:]),
        seed,
        dtype=dtype,
        dead=dead,
        logstd_range=logstd_range,
        per_pixel_std=per_pixel_std,
    )
    return {k: v.squeeze(-3) for k, v in gm.items()}


def _uniform(batch, N, H, W, seed, dtype=torch.float64, lim=0.995):
    g = torch.Generator().manual_seed(seed + 17)
    return ((torch.rand((*batch, N, H, W), generator=g, dtype=torch.float64) * 2 - 1) * lim).to(dtype)


def _normal(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 31), dtype=torch.float64).to(dtype)


def _d64(gm):
    return {k: v.double() for k, v in gm.items()}


# --------------------------------------------------------------------------- reference path


def test_reference_inverse_cdf_gradcheck():
    """Autograd through the Newton steps against float64 finite differences, in every input."""
    gm = _gm1d(((), 3, 1, 2), seed=3)
    u = _uniform((), 2, 1, 2, seed=3, lim=0.9)
    inputs = [gm["means"], gm["logstds"], gm["logweights"], u]
    inputs = [t.clone().requires_grad_(True) for t in inputs]

    def f(means, logstds, logweights, u):
        return ref.gm1d_inverse_cdf({"means": means, "logstds": logstds, "logweights": logweights}, u, n_steps=20)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_public_inverse_cdf_is_differentiable():
    """Inputs that need a gradient take the torch path on every backend; the gradient of ``x``
    in ``u`` is ``1 / (2 pdf(x))`` (the inverse function theorem)."""
    gm = _gm1d(((), 4, 2, 3), seed=4, dtype=torch.float32)
    u = _uniform((), 3, 2, 3, seed=4, dtype=torch.float32, lim=0.9).requires_grad_(True)
    with gmkernels.use_backend("triton"):
        x = gmkernels.gm1d_inverse_cdf(gm, u, n_steps=30)
    (g,) = torch.autograd.grad(x.sum(), u)
    pdf, cdf = ref.gm1d_pdf_cdf(_d64(gm), x.detach().double())
    assert (cdf - u.detach().double()).abs().max() < 1e-5
    assert rel_err(g, 0.5 / pdf) < 1e-4


def test_reference_transport_gradcheck():
    """The KR transport (C = 2, so the slice weights enter) is differentiable in the GM."""
    gm = make_gm(((), 3, 2, 1, 2), seed=5, logstd_range=(-0.5, 0.0))
    z = _normal((1, 2, 1, 2), seed=5)
    inputs = [gm["means"].clone().requires_grad_(True), gm["logweights"].clone().requires_grad_(True)]

    def f(means, logweights):
        g = {"means": means, "logstds": gm["logstds"], "logweights": logweights}
        return ref.kr_gaussian_to_gm(g, z, n_steps=20)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# --------------------------------------------------------------------------- kernels vs reference


@pytest.mark.triton
@settings(max_examples=6)
@given(
    shape=gm_shapes(max_k=40, max_c=1, max_hw=5),
    seed=seeds,
    bf16=st.booleans(),
    dead=st.booleans(),
    n=st.integers(1, 3),
)
def test_kernel_inverse_cdf_matches_reference(shape, seed, bf16, dead, n):
    batch, K, _, H, W = shape
    dtype = torch.bfloat16 if bf16 else torch.float32
    gm = _gm1d((batch, K, H, W), seed, dtype=dtype, dead=dead, per_pixel_std=seed % 2 == 1)
    u = _uniform(batch, n, H, W, seed, dtype=dtype)
    with gmkernels.use_backend("triton"):
        out = gmkernels.gm1d_inverse_cdf(gm, u, n_steps=10)
    want = ref.gm1d_inverse_cdf(_d64(gm), u.double(), n_steps=10)
    assert out.dtype == dtype and out.shape == want.shape
    assert rel_err(out, want) < TOL[dtype]


@pytest.mark.triton
@settings(max_examples=6)
@given(shape=gm_shapes(max_k=20, max_c=3, max_hw=4, max_b=2), seed=seeds, bf16=st.booleans(), aligned=st.booleans())
def test_kernel_transports_match_reference(shape, seed, bf16, aligned):
    batch, K, C, H, W = shape
    dtype = torch.bfloat16 if bf16 else torch.float32
    gm = make_gm(shape, seed, dtype=dtype, dead=True, logstd_range=(-1.0, 0.5), per_pixel_std=seed % 2 == 1)
    # |z| <= 3: further out the float32 target u = erf(z / sqrt 2) (and, back, the float32 CDF
    # near +-1) is rounded by its ulp near 1, 6e-8, against a tail mass 1 - |u| below 3e-3,
    # which moves x by about ulp / pdf: past the float32 tolerance against the float64
    # reference at seed 557 (z = 4.18: 1e-4), with any correct float32 kernel
    z = _normal((*batch, 2, C, H, W), seed, dtype).clamp(-3.0, 3.0)
    with gmkernels.use_backend("triton"):
        x = gmkernels.gaussian_samples_to_gm_samples(gm, z, n_steps=8, axis_aligned=aligned)
        back = gmkernels.gm_samples_to_gaussian_samples(gm, x, axis_aligned=aligned)
    x_ref = ref.gaussian_samples_to_gm_samples(_d64(gm), z.double(), n_steps=8, axis_aligned=aligned)
    back_ref = ref.gm_samples_to_gaussian_samples(_d64(gm), x.double(), axis_aligned=aligned)
    assert x.dtype == dtype and back.dtype == dtype
    assert rel_err(x, x_ref) < TOL[dtype]
    assert rel_err(back, back_ref) < TOL[dtype]


# --------------------------------------------------------------------------- transport properties


def _mixture_marginal_cdf(w, mu, s, x):
    """CDF of ``sum_k w_k N(mu_k, s^2)`` at ``x`` (float64)."""
    return (w * 0.5 * (1 + torch.erf((x.unsqueeze(-1) - mu) / (s * math.sqrt(2))))).sum(-1)


def _ks(cdf_values):
    """Kolmogorov-Smirnov distance of samples whose model CDF values are ``cdf_values``."""
    v, _ = cdf_values.flatten().sort()
    n = v.numel()
    i = torch.arange(1, n + 1, dtype=v.dtype)
    return max((i / n - v).max().item(), (v - (i - 1) / n).max().item())


def _correlated_gm(H, W, dtype=torch.float64):
    """3 components in C = 2 with correlated means and one dead, repeated over the image."""
    logits = torch.tensor([0.3, -0.2, 0.0, float("-inf")], dtype=torch.float64)
    mu = torch.tensor([[1.5, 1.0], [-1.0, -1.5], [0.5, -1.0], [9.0, 9.0]], dtype=torch.float64)  # (K, C)
    s = 0.4
    K, C = mu.shape
    gm = {
        "means": mu.view(1, K, C, 1, 1).expand(1, K, C, H, W).to(dtype).contiguous(),
        "logstds": torch.full((1, 1, 1, 1, 1), math.log(s), dtype=dtype),
        "logweights": torch.log_softmax(logits, 0).view(1, K, 1, 1, 1).expand(1, K, 1, H, W).to(dtype).contiguous(),
    }
    return gm, torch.softmax(logits, 0), mu, s


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("aligned", [True, False])
def test_transport_maps_normal_to_gm(backend, aligned):
    """``gaussian_samples_to_gm_samples(N(0, I))`` has the GM's 1-D marginals (KS distance below
    the 0.1% critical value ``1.95 / sqrt(n)``) and covariance (5 standard errors); mapped back,
    the samples are the input again."""
    H, W, N = (16, 16, 4) if backend == "torch" else (8, 8, 2)
    gm, w, mu, s = _correlated_gm(H, W, torch.float32)
    z = _normal((1, N, 2, H, W), seed=0, dtype=torch.float32)
    with gmkernels.use_backend(backend):
        x = gmkernels.gaussian_samples_to_gm_samples(gm, z, n_steps=16, axis_aligned=aligned)
        back = gmkernels.gm_samples_to_gaussian_samples(gm, x, axis_aligned=aligned)
    x = x.double()
    n = N * H * W
    for c in range(2):
        assert _ks(_mixture_marginal_cdf(w, mu[:, c], s, x[:, :, c])) < 1.95 / math.sqrt(n)
    m = (w[:, None] * mu).sum(0)
    cov = (w[:, None, None] * (mu - m)[:, :, None] * (mu - m)[:, None, :]).sum(0) + s**2 * torch.eye(
        2, dtype=torch.float64
    )
    xs = x.movedim(2, -1).reshape(-1, 2)
    emp = torch.cov(xs.T)
    se = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    assert ((emp - cov).abs() < 5 * se).all(), (emp, cov)
    small = z.abs() < 3  # erfinv is well conditioned there
    assert (back.double() - z.double())[small].abs().max() < 2e-4


@pytest.mark.parametrize("aligned", [True, False])
def test_gm_samples_map_to_normal(aligned):
    """Ancestral GM samples mapped by ``gm_samples_to_gaussian_samples`` are N(0, 1) on every axis
    (KS) and uncorrelated across axes."""
    H, W, N = 16, 16, 4
    gm, *_ = _correlated_gm(H, W)
    x = gmkernels.gm_sample(gm, N, generator=torch.Generator().manual_seed(2))
    z = gmkernels.gm_samples_to_gaussian_samples(gm, x, axis_aligned=aligned)
    n = N * H * W
    for c in range(2):
        assert _ks(0.5 * (1 + torch.erf(z[:, :, c] / math.sqrt(2)))) < 1.95 / math.sqrt(n)
    assert abs((z[:, :, 0] * z[:, :, 1]).mean().item()) < 5 / math.sqrt(n)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("case", ["dead", "k1", "tiny_std", "edge_cdfs"])
def test_no_nan(backend, case):
    K = 1 if case == "k1" else 6
    logstd_range = (-12.0, -11.0) if case == "tiny_std" else (-3.0, 1.0)
    gm = make_gm(((), K, 2, 3, 2), seed=9, dtype=torch.float32, dead=case != "k1", logstd_range=logstd_range)
    gm1d = {k: v.select(-3, 0) for k, v in gm.items()}  # channel 0 as a 1-D GM
    lim = 1.0 if case == "edge_cdfs" else 0.999
    u = _uniform((), 2, 3, 2, seed=9, dtype=torch.float32, lim=lim)
    if case == "edge_cdfs":
        u[..., 0, :] = 1.0
        u[..., 1, :] = -1.0
    z = _normal((2, 2, 3, 2), seed=9, dtype=torch.float32) * (8 if case == "edge_cdfs" else 1)
    with gmkernels.use_backend(backend):
        outs = [
            gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=4),
            gmkernels.gaussian_samples_to_gm_samples(gm, z, n_steps=4),
            gmkernels.gm_samples_to_gaussian_samples(gm, z, axis_aligned=False),
        ]
    for o in outs:
        assert o.isfinite().all()


# --------------------------------------------------------------------------- bad input and ops


def test_bad_inputs_name_the_argument():
    gm1d = _gm1d(((2,), 3, 2, 2), seed=0, dtype=torch.float32)
    u = _uniform((2,), 2, 2, 2, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="scaled_cdfs"):
        gmkernels.gm1d_inverse_cdf(gm1d, u[..., :1])
    with pytest.raises(ValueError, match="logweights"):
        gmkernels.gm1d_inverse_cdf({**gm1d, "logweights": gm1d["logweights"][:, :2]}, u)
    with pytest.raises(ValueError, match="n_steps"):
        gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=-1)
    with pytest.raises(ValueError, match="max_step_size"):
        gmkernels.gm1d_inverse_cdf(gm1d, u, max_step_size=0.0)
    with pytest.raises(TypeError, match="scaled_cdfs"):
        gmkernels.gm1d_inverse_cdf(gm1d, u.long())
    gm = make_gm(((2,), 3, 2, 2, 2), seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="gaussian_samples"):
        gmkernels.gaussian_samples_to_gm_samples(gm, torch.zeros(2, 1, 3, 2, 2))
    with pytest.raises(ValueError, match="gm_samples"):
        gmkernels.gm_samples_to_gaussian_samples(gm, torch.zeros(1, 2, 2, 2, 2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan")])
def test_targets_outside_the_scaled_cdf_range_raise(backend, bad):
    """Targets ``u`` outside ``[-1, 1]`` (or NaN) have no inverse: a ValueError naming
    ``scaled_cdfs`` and the range, on either backend, for a small and a large tensor (host read
    of a list and of the minimum and maximum); the edges themselves are valid."""
    for shape in ((2, 2, 2), (3, 8, 9)):
        gm1d = _gm1d(((2,), 3, *shape[1:]), seed=0, dtype=torch.float32)
        u = _uniform((2,), *shape, seed=0, dtype=torch.float32)
        u[1, 0, 1, 1] = bad
        with gmkernels.use_backend(backend), pytest.raises(ValueError, match=r"scaled_cdfs must lie in \[-1, 1\]"):
            gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=2)
        u[1, 0, 1, 1] = 1.0
        u[0, 0, 0, 0] = -1.0
        with gmkernels.use_backend(backend):
            assert gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=2).isfinite().all()


def test_custom_ops_opcheck():
    gm = make_gm(((2,), 3, 2, 2, 3), seed=0, dtype=torch.float32)
    z = _normal((2, 2, 2, 2, 3), seed=0, dtype=torch.float32)
    args = (gm["means"], gm["logstds"], gm["logweights"])
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    u = torch.erf(z / math.sqrt(2))
    torch.library.opcheck(torch.ops.gmkernels.kr_inverse.default, (*args, z, None, 4, 1e-6, 1.5), test_utils=utils)
    torch.library.opcheck(torch.ops.gmkernels.kr_inverse.default, (*args, z, u, 4, 1e-6, 1.5), test_utils=utils)
    torch.library.opcheck(torch.ops.gmkernels.kr_scaled_cdfs.default, (*args, z), test_utils=utils)
    gm1d = {k: v.select(-3, 0) for k, v in gm.items()}
    args1d = (gm1d["means"], gm1d["logstds"], gm1d["logweights"], u[:, :, 0])
    torch.library.opcheck(torch.ops.gmkernels.gm1d_inverse_cdf.default, (*args1d, None, 4, 1e-6, 1.5), test_utils=utils)
    torch.library.opcheck(
        torch.ops.gmkernels.gm1d_inverse_cdf.default, (*args1d, z[:, :, 0], 4, 1e-6, 1.5), test_utils=utils
    )


@pytest.mark.triton
def test_inverse_cdf_launch_plan_is_stored_per_shape(monkeypatch):
    """A repeated shape reuses the stored launch plan (its views' strides, grid, blocks) and
    gives the same result; a layout whose flattening copies (H, W not mergeable) recomputes
    its views per call; a valid repeated shape skips the structure check, a changed one does
    not (the error still names the argument)."""
    built = []
    args_fn = inverse_cdf._gm1d_args
    monkeypatch.setattr(inverse_cdf, "_gm1d_args", lambda *a: built.append(1) or args_fn(*a))
    gm1d = _gm1d(((2,), 3, 3, 4), seed=1, dtype=torch.float32)
    u = _uniform((2,), 2, 3, 4, seed=1, dtype=torch.float32)
    want = ref.gm1d_inverse_cdf(_d64(gm1d), u.double(), n_steps=6)
    with gmkernels.use_backend("triton"):
        first = gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=6)
        second = gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=6)
        assert len(built) == 1 and torch.equal(first, second) and rel_err(first, want) < TOL[torch.float32]
        swapped = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) for k, v in gm1d.items()}
        third = gmkernels.gm1d_inverse_cdf(swapped, u, n_steps=6)
        fourth = gmkernels.gm1d_inverse_cdf(swapped, u, n_steps=6)
        assert len(built) == 4 and torch.equal(third, first) and torch.equal(fourth, first)
        with pytest.raises(ValueError, match="scaled_cdfs"):
            gmkernels.gm1d_inverse_cdf(gm1d, u[..., :2])
        with pytest.raises(ValueError, match="scaled_cdfs"):
            gmkernels.gm1d_inverse_cdf(gm1d, u.to("meta"))
