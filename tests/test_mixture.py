"""Triton kernels of the mixture family (``gm_to_mean``, ``gm_to_iso_gaussian``) against the
float64 reference, under ``TRITON_INTERPRET=1`` on CPU; and their ``torch.library`` ops."""

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gmkernels
import reference
from gmkernels.ops import _launch, mixture
from tests.strategies import TOL, gm_shapes, make_gm, rel_err, seeds

pytest.importorskip("triton")

dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
layouts = st.sampled_from(["contiguous", "strided", "sliced", "transposed"])


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous tensor: ``strided`` takes every other element of a
    wider last axis (pixel stride 2: the launcher's views keep it), ``sliced`` strides every
    axis by 2 (batch axes cannot merge: the launcher's reshape copies), ``transposed`` stores W
    before H (H, W cannot merge: copied)."""
    if layout == "strided":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "sliced":
        big = torch.zeros(*(2 * n for n in t.shape), dtype=t.dtype)
        big[tuple(slice(None, None, 2) for _ in t.shape)] = t
        return big[tuple(slice(None, None, 2) for _ in t.shape)]
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def cast_gm(gm: dict, dtype: torch.dtype, layout: str = "contiguous") -> dict:
    return {k: relayout(v.to(dtype), layout) for k, v in gm.items()}


def as_f64(gm: dict) -> dict:
    """The exact reference input: the values the kernel sees (after rounding), in float64."""
    return {k: v.double() for k, v in gm.items()}


def small_blocks(enabled: bool):
    """Force tiny blocks (2 components, 2 channels, 4 pixels a tile) so small shapes take the
    multi-tile paths: K > BLOCK_K (online softmax across tiles), C > BLOCK_C, several pixel blocks."""
    if not enabled:
        return contextlib.nullcontext()
    return mock.patch.object(mixture, "_moments_blocks", lambda K, C, P, R, with_var: (2, 2, 4, 1))


@pytest.mark.triton
@given(
    shape=gm_shapes(max_k=12, max_c=5, max_hw=6),
    seed=seeds,
    dead=st.booleans(),
    power=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
    dtype=dtypes,
    layout=layouts,
    tiny=st.booleans(),
)
def test_gm_to_mean_matches_reference(shape, seed, dead, power, dtype, layout, tiny):
    gm = cast_gm(make_gm(shape, seed, dead=dead), dtype, layout)
    with gmkernels.use_backend("triton"), small_blocks(tiny):
        out = gmkernels.gm_to_mean(gm, power)
    ref = reference.gm_to_mean(as_f64(gm), power)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.triton
@given(
    shape=gm_shapes(max_k=12, max_c=5, max_hw=6),
    seed=seeds,
    dead=st.booleans(),
    per_pixel_std=st.booleans(),
    dtype=dtypes,
    layout=layouts,
    tiny=st.booleans(),
)
def test_gm_to_iso_gaussian_matches_reference(shape, seed, dead, per_pixel_std, dtype, layout, tiny):
    gm = cast_gm(make_gm(shape, seed, dead=dead, per_pixel_std=per_pixel_std, logstd_range=(-6.0, 3.0)), dtype, layout)
    with gmkernels.use_backend("triton"), small_blocks(tiny):
        out = gmkernels.gm_to_iso_gaussian(gm)
    ref = reference.gm_to_iso_gaussian(as_f64(gm))
    for key in ("mean", "var"):
        assert out[key].dtype == dtype and out[key].shape == ref[key].shape
        assert torch.isfinite(out[key]).all()
        assert rel_err(out[key], ref[key]) < TOL[dtype], key


@pytest.mark.triton
@pytest.mark.parametrize("tiny", [False, True])
def test_variance_without_cancellation(tiny):
    """Components spread by 1e-2 around an offset of 1e3 and tiny stds: a one-pass
    ``E[x^2] - E[x]^2`` in fp32 would lose every digit of the between-component variance."""
    gm = make_gm(((2,), 9, 3, 2, 3), 5, dead=True, logstd_range=(-12.0, -10.0))
    gm["means"] = 1e3 + 1e-2 * gm["means"]
    gm = cast_gm(gm, torch.float32)
    with gmkernels.use_backend("triton"), small_blocks(tiny):
        out = gmkernels.gm_to_iso_gaussian(gm)
    ref = reference.gm_to_iso_gaussian(as_f64(gm))
    w = torch.softmax(gm["logweights"], dim=-4)
    naive = ((w * gm["means"].square()).sum(-4) - (w * gm["means"]).sum(-4).square()).mean(-3, keepdim=True)
    assert rel_err(naive, ref["var"]) > 1.0  # the test can fail: one-pass fp32 moments are garbage here
    # the fp32 mean carries ~3e-5 absolute error at 1e3, ~3e-3 of a 1e-2 deviation
    assert rel_err(out["var"], ref["var"]) < 2e-2


@pytest.mark.triton
@pytest.mark.parametrize("power", [0.0, 1.0, 3.0])
def test_extreme_logweights_and_dead_tiles(power):
    """Log-weights of magnitude 1e4 and whole K tiles dead (running max -inf): finite, exact."""
    gm = make_gm(((3,), 11, 2, 3, 2), 9, dead=True)
    lw = gm["logweights"] * 1e4
    lw[:, 1:7] = float("-inf")  # with 2-component tiles, tiles 1..3 are dead
    lw[:, 0] = -3e4  # live but far below the others: its weight underflows where others live
    gm["logweights"] = lw
    gm = cast_gm(gm, torch.float32)
    with gmkernels.use_backend("triton"), small_blocks(True):
        out = gmkernels.gm_to_mean(gm, power)
        iso = gmkernels.gm_to_iso_gaussian(gm)
    ref = reference.gm_to_mean(as_f64(gm), power)
    ref_iso = reference.gm_to_iso_gaussian(as_f64(gm))
    assert torch.isfinite(out).all() and torch.isfinite(iso["var"]).all()
    assert rel_err(out, ref) < TOL[torch.float32]
    assert rel_err(iso["var"], ref_iso["var"]) < TOL[torch.float32]


def test_launcher_views_do_not_copy_mergeable_layouts():
    gm = cast_gm(make_gm(((2, 3), 4, 3, 2, 5), 1), torch.float32, "strided")
    m4, l3 = _launch.gm_views(gm["means"], gm["logweights"])
    assert m4.data_ptr() == gm["means"].data_ptr() and m4.stride()[-1] == 2
    assert l3.data_ptr() == gm["logweights"].data_ptr()
    m4, l3, o3 = _launch.pixel_rows(m4[..., :1], l3[..., :1], torch.empty(6, 3, 1))  # H = W = 1
    assert m4.shape == (1, 4, 3, 6) and m4.data_ptr() == gm["means"].data_ptr()


@pytest.mark.triton
def test_int64_offsets():
    """The 64-bit offset path (taken when a tensor spans more than 2**31 elements) computes the
    same values; forced here on a small GM."""
    gm = cast_gm(make_gm(((2,), 5, 3, 2, 3), 17, dead=True), torch.float32, "sliced")
    with (
        gmkernels.use_backend("triton"),
        small_blocks(True),
        mock.patch.object(mixture, "needs_int64", lambda *t: True),
    ):
        out = gmkernels.gm_to_mean(gm, 0.5)
        iso = gmkernels.gm_to_iso_gaussian(gm)
    assert rel_err(out, reference.gm_to_mean(as_f64(gm), 0.5)) < TOL[torch.float32]
    assert rel_err(iso["var"], reference.gm_to_iso_gaussian(as_f64(gm))["var"]) < TOL[torch.float32]


@pytest.mark.triton
def test_float64_and_grad_inputs_take_the_torch_path():
    gm = make_gm(((2,), 3, 2, 2, 2), 1)
    with gmkernels.use_backend("triton"):
        out64 = gmkernels.gm_to_mean(gm)  # float64: exact torch path, not fp32 kernels
        means = gm["means"].float().requires_grad_()
        out = gmkernels.gm_to_mean({**cast_gm(gm, torch.float32), "means": means})
    assert rel_err(out64, reference.gm_to_mean(gm)) < TOL[torch.float64]
    out.sum().backward()  # the kernels are inference-only; with a gradient the reference runs
    assert means.grad is not None and torch.isfinite(means.grad).all()


def test_custom_ops_pass_opcheck():
    gm = cast_gm(make_gm(((2,), 3, 2, 3, 2), 4, dead=True), torch.float32)
    torch.library.opcheck(torch.ops.gmkernels.gm_to_mean.default, (gm["means"], gm["logweights"], 0.5))
    torch.library.opcheck(
        torch.ops.gmkernels.gm_to_iso_gaussian.default, (gm["means"], gm["logstds"], gm["logweights"])
    )


def test_bad_power_names_the_argument():
    gm = make_gm(((1,), 2, 1, 1, 1), 0)
    with pytest.raises(ValueError, match="power"):
        gmkernels.gm_to_mean(gm, -1.0)
