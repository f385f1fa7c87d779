"""The product family (``gm_mul_iso_gaussian``, ``iso_gaussian_mul_iso_gaussian``): Triton kernels
against the float64 reference, under ``TRITON_INTERPRET=1`` on CPU; their ``torch.library`` ops;
degenerate inputs (infinite variances, dead pixels) and bad Gaussians on both backends."""

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gmkernels
import reference
from gmkernels.ops import product
from tests.strategies import TOL, gm_shapes, make_gm, make_state, rel_err, seeds
from tests.test_mixture import as_f64, cast_gm, relayout

pytest.importorskip("triton")

dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
layouts = st.sampled_from(["contiguous", "strided", "sliced", "transposed"])


def small_blocks(enabled: bool):
    """Tiny blocks (2 components, 2 channels, 4 pixels) so small shapes take the multi-tile
    paths: several K tiles (raw logits + second pass), several channel tiles, pixel blocks."""
    if not enabled:
        return contextlib.nullcontext()
    return mock.patch.object(product, "_gm_mul_blocks", lambda K, C, P, R: (2, 2, 4, 1))


def make_gaussian(gm: dict, seed: int, r: float, per_pixel: bool, offset: float = 0.0) -> dict:
    """A Gaussian for ``gm``: mean near the components (plus ``offset``), variance from 1/8 to 8
    times the largest ``s2``; for ``r < 0`` (division) kept above ``2 |r| s2`` so that
    ``v + r s2`` is well conditioned."""
    *batch, K, C, H, W = gm["means"].shape
    g = torch.Generator().manual_seed(seed)
    s2max = torch.exp(2 * gm["logstds"]).amax(dim=(-2, -1), keepdim=True).squeeze(-4)  # (*B, 1, 1, 1)
    shape = (*batch, 1, H, W) if per_pixel else (*batch, 1, 1, 1)
    scale = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-2, 2, generator=g))
    var = s2max * (scale + (2 * abs(r) if r < 0 else 0.0))
    mean = make_state((tuple(batch), K, C, H, W), seed) + gm["means"].mean(dim=-4) + offset
    return {"mean": mean, "var": var}


def assert_logweights_close(out: torch.Tensor, ref: torch.Tensor, tol: float):
    dead = ref == float("-inf")
    assert torch.equal(out == float("-inf"), dead), "dead components must stay exactly dead"
    assert torch.isfinite(out[~dead]).all()
    assert rel_err(out.masked_fill(dead, 0), ref.masked_fill(dead, 0)) < tol


@pytest.mark.triton
@settings(max_examples=10)
@given(
    shape=gm_shapes(max_k=9, max_c=4, max_hw=4, max_b=2),
    seed=seeds,
    dead=st.booleans(),
    per_pixel_std=st.booleans(),
    per_pixel_var=st.booleans(),
    powers=st.sampled_from([(1.0, 1.0), (0.7, 1.0), (1.0, 2.5), (1.0, -0.5)]),
    dtype=dtypes,
    layout=layouts,
    tiny=st.booleans(),
)
def test_gm_mul_iso_gaussian_matches_reference(
    shape, seed, dead, per_pixel_std, per_pixel_var, powers, dtype, layout, tiny
):
    a, b = powers
    gm = make_gm(shape, seed, dead=dead, per_pixel_std=per_pixel_std)
    gauss = make_gaussian(gm, seed + 1, b / a, per_pixel_var)
    gm, gauss = cast_gm(gm, dtype, layout), cast_gm(gauss, dtype, layout)
    with gmkernels.use_backend("triton"), small_blocks(tiny):
        out = gmkernels.gm_mul_iso_gaussian(gm, gauss, a, b)
    ref = reference.gm_mul_iso_gaussian(as_f64(gm), as_f64(gauss), a, b)
    for key in ("means", "logstds", "logweights"):
        assert out[key].dtype == dtype and out[key].shape == ref[key].shape, key
    assert rel_err(out["means"], ref["means"]) < TOL[dtype]
    assert rel_err(out["logstds"], ref["logstds"]) < TOL[dtype]
    assert_logweights_close(out["logweights"], ref["logweights"], TOL[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("tiny", [False, True])
def test_far_gaussian_and_shared_offset_keep_fp32_logits_exact(tiny):
    """g far from the components (a short posterior step) and g with the components at a large
    common offset: the reweighted log-weights stay at fp32 accuracy."""
    gm = make_gm(((2,), 7, 3, 2, 3), 11, dead=True)
    far = make_gaussian(gm, 12, 1.0, per_pixel=True, offset=300.0)
    far["var"] = far["var"] * 1e4
    shifted = {**gm, "means": gm["means"] + 1e3}
    near = make_gaussian(shifted, 13, 1.0, per_pixel=False)
    for g_, gauss in ((gm, far), (shifted, near)):
        g32, gauss32 = cast_gm(g_, torch.float32), cast_gm(gauss, torch.float32)
        with gmkernels.use_backend("triton"), small_blocks(tiny):
            out = gmkernels.gm_mul_iso_gaussian(g32, gauss32)
        ref = reference.gm_mul_iso_gaussian(as_f64(g32), as_f64(gauss32))
        assert_logweights_close(out["logweights"], ref["logweights"], 1e-5)
        assert rel_err(out["means"], ref["means"]) < 1e-5


@pytest.mark.triton
@settings(max_examples=10)
@given(
    shape=gm_shapes(max_k=1, max_c=11, max_hw=6, max_b=2),
    seed=seeds,
    per_pixel=st.tuples(st.booleans(), st.booleans()),
    powers=st.sampled_from([(1.0, 1.0), (1.0, -1.0), (0.5, 2.0)]),
    dtype=dtypes,
    layout=layouts,
)
def test_iso_gaussian_mul_iso_gaussian_matches_reference(shape, seed, per_pixel, powers, dtype, layout):
    p1, p2 = powers
    gm = make_gm(shape, seed)
    g1 = make_gaussian(gm, seed + 1, 1.0, per_pixel[0])
    g2 = make_gaussian(gm, seed + 2, 1.0, per_pixel[1])
    if p2 < 0:  # dividing by g2 needs n = v2 - v1 > 0: make g2 the broader one
        g2["var"] = g1["var"] * 1.5 + g2["var"]
    g1, g2 = cast_gm(g1, dtype, layout), cast_gm(g2, dtype, layout)
    with gmkernels.use_backend("triton"):
        out = gmkernels.iso_gaussian_mul_iso_gaussian(g1, g2, p1, p2)
    ref = reference.iso_gaussian_mul_iso_gaussian(as_f64(g1), as_f64(g2), p1, p2)
    for key in ("mean", "var"):
        assert out[key].dtype == dtype and out[key].shape == ref[key].shape, key
        assert rel_err(out[key], ref[key]) < TOL[dtype], key


@pytest.mark.triton
def test_int64_offsets():
    """The 64-bit offset path (tensors beyond 2**31 elements), forced on a small GM."""
    gm = make_gm(((2,), 5, 3, 2, 3), 17, dead=True)
    gauss = cast_gm(make_gaussian(gm, 18, 1.0, per_pixel=True), torch.float32)
    gm = cast_gm(gm, torch.float32, "sliced")
    with (
        gmkernels.use_backend("triton"),
        small_blocks(True),
        mock.patch.object(product, "needs_int64", lambda *t: True),
    ):
        out = gmkernels.gm_mul_iso_gaussian(gm, gauss)
        iso = gmkernels.iso_gaussian_mul_iso_gaussian(gauss, gauss, 1.0, 0.5)
    ref = reference.gm_mul_iso_gaussian(as_f64(gm), as_f64(gauss))
    assert rel_err(out["means"], ref["means"]) < TOL[torch.float32]
    assert_logweights_close(out["logweights"], ref["logweights"], TOL[torch.float32])
    ref_iso = reference.iso_gaussian_mul_iso_gaussian(as_f64(gauss), as_f64(gauss), 1.0, 0.5)
    assert rel_err(iso["mean"], ref_iso["mean"]) < TOL[torch.float32]


@pytest.mark.triton
def test_custom_ops_pass_opcheck():
    gm = make_gm(((2,), 3, 2, 3, 2), 4, dead=True)
    gauss = cast_gm(make_gaussian(gm, 5, 1.0, per_pixel=True), torch.float32)
    gm = cast_gm(gm, torch.float32)
    args = (gm["means"], gm["logstds"], gm["logweights"], gauss["mean"], gauss["var"], 1.0, 0.5, 1e-6)
    torch.library.opcheck(torch.ops.gmkernels.gm_mul_iso_gaussian.default, args)
    g2 = {"mean": relayout(gauss["mean"] + 1, "sliced"), "var": gauss["var"][..., :1, :1] * 2}
    args = (gauss["mean"], gauss["var"], g2["mean"], g2["var"], 1.0, -1.0, 1e-6)
    torch.library.opcheck(torch.ops.gmkernels.iso_gaussian_mul_iso_gaussian.default, args)


@pytest.mark.triton
def test_torch_compile_fullgraph_gives_the_eager_values():
    """The public functions traced by ``torch.compile(fullgraph=True)`` on the Triton path: one
    opaque node per op, no graph break, the eager values."""
    gm = cast_gm(make_gm(((2,), 3, 2, 3, 2), 7, dead=True), torch.float32)
    gauss = cast_gm(make_gaussian(gm, 8, 1.0, per_pixel=True), torch.float32)

    def step(gm, gauss):
        out = gmkernels.gm_mul_iso_gaussian(
            gm, gmkernels.iso_gaussian_mul_iso_gaussian(gauss, gauss, 1.0, 0.5), 1.0, 0.7
        )
        return out["means"], out["logstds"], out["logweights"]

    with gmkernels.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(gm, gauss)
        eager = step(gm, gauss)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_bad_powers_name_the_argument():
    gm = make_gm(((1,), 2, 1, 1, 1), 0)
    gauss = make_gaussian(gm, 1, 1.0, per_pixel=False)
    with pytest.raises(ValueError, match="gm_power"):
        gmkernels.gm_mul_iso_gaussian(gm, gauss, 0.0)
    with pytest.raises(TypeError, match="power2"):
        gmkernels.iso_gaussian_mul_iso_gaussian(gauss, gauss, 1.0, "1")


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("gaussian_power", [1.0, -0.5])
def test_infinite_variance_leaves_the_gm_unchanged(backend, tiny, gaussian_power):
    """``var = inf`` is no information: means and log-stds come back exactly, log-weights
    renormalised (equal to the input's up to rounding); pixels of finite variance next to it
    are reweighted as usual."""
    gm = cast_gm(make_gm(((2,), 5, 3, 2, 3), 51, dead=True), torch.float32)
    gauss = cast_gm(make_gaussian(gm, 52, 1.0, per_pixel=True), torch.float32)
    inf = torch.zeros_like(gauss["var"], dtype=torch.bool)
    inf[0] = True
    inf[1, ..., 0, :] = True
    gauss["var"] = gauss["var"].masked_fill(inf, float("inf"))
    with gmkernels.use_backend(backend), small_blocks(tiny and backend == "triton"):
        out = gmkernels.gm_mul_iso_gaussian(gm, gauss, 1.0, gaussian_power)
    at = inf.unsqueeze(-4).expand_as(gm["means"])  # (*B, K, C, H, W)
    assert torch.equal(out["means"][at], gm["means"][at])
    logstds = gm["logstds"].expand_as(out["logstds"])
    assert torch.equal(out["logstds"][inf.unsqueeze(-4)], logstds[inf.unsqueeze(-4)])
    lw_at = inf.unsqueeze(-4).expand_as(gm["logweights"])
    lw_in = torch.log_softmax(gm["logweights"].double(), dim=-4)
    assert_logweights_close(out["logweights"][lw_at], lw_in[lw_at], 1e-6)
    ref = reference.gm_mul_iso_gaussian(as_f64(gm), as_f64(gauss), 1.0, gaussian_power)
    assert rel_err(out["means"], ref["means"]) < TOL[torch.float32]
    assert_logweights_close(out["logweights"], ref["logweights"], TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("powers", [(1.0, 1.0), (0.5, 2.0)])
def test_infinite_variance_gives_the_other_gaussian(backend, powers):
    """One infinite variance: the product is the other factor, ``N(m, v / power)`` (exactly the
    other Gaussian at power 1); both infinite: ``var = inf`` and the power-weighted mean."""
    p1, p2 = powers
    gm = make_gm(((2,), 1, 3, 2, 3), 61)
    g1 = cast_gm(make_gaussian(gm, 62, 1.0, per_pixel=True), torch.float32)
    g2 = cast_gm(make_gaussian(gm, 63, 1.0, per_pixel=False), torch.float32)
    inf1 = torch.zeros_like(g1["var"], dtype=torch.bool)
    inf1[0] = True
    inf1[1, ..., 0, :] = True
    g1["var"] = g1["var"].masked_fill(inf1, float("inf"))
    with gmkernels.use_backend(backend):
        one = gmkernels.iso_gaussian_mul_iso_gaussian(g1, g2, p1, p2)
        other = gmkernels.iso_gaussian_mul_iso_gaussian(g2, g1, p2, p1)
        both = gmkernels.iso_gaussian_mul_iso_gaussian(
            {**g1, "var": torch.full_like(g2["var"], float("inf"))},
            {**g2, "var": torch.full_like(g2["var"], float("inf"))},
            p1,
            p2,
        )
    at = inf1.expand_as(g1["mean"])
    v2 = g2["var"].expand_as(g1["var"])
    for out in (one, other):
        assert torch.isfinite(out["mean"]).all() and torch.isfinite(out["var"]).all()
        if p2 == 1.0:
            assert torch.equal(out["mean"][at], g2["mean"][at]) and torch.equal(out["var"][inf1], v2[inf1])
        assert rel_err(out["mean"][at], g2["mean"][at]) < TOL[torch.float32]
        assert rel_err(out["var"][inf1], v2[inf1] / p2) < TOL[torch.float32]
        ref = reference.iso_gaussian_mul_iso_gaussian(as_f64(g1), as_f64(g2), p1, p2)
        assert rel_err(out["mean"], ref["mean"]) < TOL[torch.float32]
        assert rel_err(out["var"], ref["var"]) < TOL[torch.float32]
    assert torch.equal(both["var"], torch.full_like(both["var"], float("inf")))
    expected = (p1 * g1["mean"].double() + p2 * g2["mean"].double()) / (p1 + p2)
    assert rel_err(both["mean"], expected) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("var", [-1.0, 0.0, float("nan")])
def test_gaussian_product_rejects_nonpositive_variances(backend, var):
    """Each variance of ``iso_gaussian_mul_iso_gaussian`` is checked, as ``gm_mul_iso_gaussian``
    checks its Gaussian's, and the error names the argument."""
    ok = {"mean": torch.zeros(2, 3, 1, 2), "var": torch.full((2, 1, 1, 1), 0.5)}
    bad = {"mean": torch.ones(2, 3, 1, 2), "var": torch.full((2, 1, 1, 2), 0.5)}
    bad["var"][1, ..., 1] = var
    with gmkernels.use_backend(backend):
        with pytest.raises(ValueError, match=r"^g1\['var'\] must be > 0"):
            gmkernels.iso_gaussian_mul_iso_gaussian(bad, ok)
        with pytest.raises(ValueError, match=r"^g2\['var'\] must be > 0"):
            gmkernels.iso_gaussian_mul_iso_gaussian(ok, bad, 1.0, -1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiny", [False, True])
def test_all_dead_pixel_gives_nan_logweights(backend, tiny):
    """A pixel whose components are all dead is not a GM: NaN log-weights there (means and
    log-stds finite), on both backends; the other pixels, partly dead ones included, are finite."""
    gm = cast_gm(make_gm(((2,), 5, 3, 2, 3), 71, dead=True), torch.float32)
    gm["logweights"][1, :, :, 0, 1] = float("-inf")
    gm["logweights"][0, 1:, :, 1, 2] = float("-inf")  # one live component
    gm["logweights"][0, 0, :, 1, 2] = -0.5
    gauss = cast_gm(make_gaussian(gm, 72, 1.0, per_pixel=False), torch.float32)
    with gmkernels.use_backend(backend), small_blocks(tiny and backend == "triton"):
        out = gmkernels.gm_mul_iso_gaussian(gm, gauss)
    dead = torch.zeros_like(gm["logweights"], dtype=torch.bool)
    dead[1, :, :, 0, 1] = True
    assert out["logweights"][dead].isnan().all()
    assert not out["logweights"][~dead].isnan().any()
    assert torch.isfinite(out["means"]).all() and torch.isfinite(out["logstds"]).all()
    ref = reference.gm_mul_iso_gaussian(as_f64(gm), as_f64(gauss))
    assert_logweights_close(out["logweights"][~dead], ref["logweights"][~dead], TOL[torch.float32])


@pytest.mark.parametrize(
    "gaussian, exc, pattern",
    [
        (
            {"mean": torch.zeros(2, 3, 1, 2)},
            ValueError,
            r"^gaussian is missing key 'var' \(got keys \['mean'\]\); a Gaussian is \{mean, var\}$",
        ),
        (
            {"var": torch.ones(2, 1, 1, 1), "logstd": torch.zeros(2, 1, 1, 1)},
            ValueError,
            r"^gaussian is missing key 'mean' \(got keys \['var', 'logstd'\]\)",
        ),
        (
            make_gm(((2,), 3, 3, 1, 2), 0),
            ValueError,
            r"^gaussian looks like a GM \(keys means, logstds, logweights\); pass a Gaussian \{mean, var\}",
        ),
        (
            torch.zeros(2, 3, 1, 2),
            TypeError,
            r"^gaussian must be a dict \{mean, var\}.*got Tensor of shape \(2, 3, 1, 2\)",
        ),
    ],
)
def test_bad_gaussian_names_what_it_got(gaussian, exc, pattern):
    gm = make_gm(((2,), 3, 3, 1, 2), 0)
    with pytest.raises(exc, match=pattern):
        gmkernels.gm_mul_iso_gaussian(gm, gaussian)
    with pytest.raises(exc, match=pattern.replace("gaussian", "g2", 1)):
        gmkernels.iso_gaussian_mul_iso_gaussian(
            {"mean": torch.zeros(2, 3, 1, 2), "var": torch.ones(2, 1, 1, 1)}, gaussian
        )
