"""Triton kernels of the product family (``gm_mul_iso_gaussian``, ``iso_gaussian_mul_iso_gaussian``)
against the float64 reference, under ``TRITON_INTERPRET=1`` on CPU; and their ``torch.library`` ops."""

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
from tests.test_kernels_mixture import as_f64, cast_gm, relayout

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
    with gmkernels.use_backend("triton"), small_blocks(True), mock.patch.object(product, "needs_int64", lambda *t: True):
        out = gmkernels.gm_mul_iso_gaussian(gm, gauss)
        iso = gmkernels.iso_gaussian_mul_iso_gaussian(gauss, gauss, 1.0, 0.5)
    ref = reference.gm_mul_iso_gaussian(as_f64(gm), as_f64(gauss))
    assert rel_err(out["means"], ref["means"]) < TOL[torch.float32]
    assert_logweights_close(out["logweights"], ref["logweights"], TOL[torch.float32])
    ref_iso = reference.iso_gaussian_mul_iso_gaussian(as_f64(gauss), as_f64(gauss), 1.0, 0.5)
    assert rel_err(iso["mean"], ref_iso["mean"]) < TOL[torch.float32]


def test_custom_ops_pass_opcheck():
    gm = make_gm(((2,), 3, 2, 3, 2), 4, dead=True)
    gauss = cast_gm(make_gaussian(gm, 5, 1.0, per_pixel=True), torch.float32)
    gm = cast_gm(gm, torch.float32)
    args = (gm["means"], gm["logstds"], gm["logweights"], gauss["mean"], gauss["var"], 1.0, 0.5, 1e-6)
    torch.library.opcheck(torch.ops.gmkernels.gm_mul_iso_gaussian.default, args)
    g2 = {"mean": relayout(gauss["mean"] + 1, "sliced"), "var": gauss["var"][..., :1, :1] * 2}
    args = (gauss["mean"], gauss["var"], g2["mean"], g2["var"], 1.0, -1.0, 1e-6)
    torch.library.opcheck(torch.ops.gmkernels.iso_gaussian_mul_iso_gaussian.default, args)


def test_bad_powers_name_the_argument():
    gm = make_gm(((1,), 2, 1, 1, 1), 0)
    gauss = make_gaussian(gm, 1, 1.0, per_pixel=False)
    with pytest.raises(ValueError, match="gm_power"):
        gmkernels.gm_mul_iso_gaussian(gm, gauss, 0.0)
    with pytest.raises(TypeError, match="power2"):
        gmkernels.iso_gaussian_mul_iso_gaussian(gauss, gauss, 1.0, "1")
