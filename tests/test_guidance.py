"""Triton guidance kernels (``probabilistic_guidance``, ``weight_guidance``, ``mean_cfg``) against the
float64 reference under the interpreter: random shapes (K and C beyond one tile, different K for
the unconditional GM), dead components, per-pixel stds, tiny and huge stds, bf16, non-contiguous
inputs; the scale-0 identity; opcheck of the three torch.library ops."""

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from strategies import TOL, gm_shapes, make_gm, rel_err, seeds

import gmkernels
import reference
from gmkernels.ops import _launch, guidance

pytest.importorskip("triton")

SHAPES = gm_shapes(max_k=20, max_c=10, max_hw=5)  # K > 16 and C > 8 exceed one kernel tile


def to64(gm: dict) -> dict:
    return {k: v.double() for k, v in gm.items()}


def noncontig(t: torch.Tensor, how: int) -> torch.Tensor:
    """0: as is; 1: pixel stride 2 (a strided view); 2: H/W strides swapped (H*W not mergeable)."""
    if how == 1:
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def close(out: torch.Tensor, ref: torch.Tensor, dtype, name: str):
    """Same shape and dtype, ``-inf`` exactly where the reference has it, finite elsewhere, and
    ``rel_err`` over the finite entries below ``TOL``."""
    assert out.dtype == dtype and out.shape == ref.shape, (name, out.dtype, out.shape, ref.shape)
    dead = ref == float("-inf")
    assert torch.equal(out == float("-inf"), dead), name
    assert torch.isfinite(out[~dead]).all(), name
    err = rel_err(out[~dead], ref[~dead])
    assert err < TOL[dtype], (name, err)


def draw_pair(data, dtype, same_k: bool = False):
    shape = data.draw(SHAPES, label="shape")
    batch, K, C, H, W = shape
    Ku = K if same_k else data.draw(st.integers(1, 20), label="K_uncond")
    seed = data.draw(seeds, label="seed")
    dead = data.draw(st.booleans(), label="dead")
    stds = data.draw(st.sampled_from([(-3.0, 1.0), (-10.0, -7.0), (4.0, 8.0)]), label="logstd_range")
    per_pixel = data.draw(st.booleans(), label="per_pixel_std")
    how = data.draw(st.integers(0, 2), label="layout")
    gm_c = make_gm(shape, seed, dtype, dead=dead, logstd_range=stds, per_pixel_std=per_pixel)
    gm_u = make_gm((batch, Ku, C, H, W), seed + 1, dtype, dead=dead, logstd_range=stds)
    gm_c = {k: noncontig(v, how) for k, v in gm_c.items()}
    gm_u = {k: noncontig(v, how) for k, v in gm_u.items()}
    return shape, gm_c, gm_u


@pytest.mark.triton
@settings(max_examples=10)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.one_of(st.floats(0.01, 0.95), st.sampled_from([1e-3, 0.5, 0.99])),
    orthogonal=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_probabilistic_guidance(data, dtype, scale, orthogonal):
    shape, gm_c, gm_u = draw_pair(data, dtype)
    _, _, C, H, W = shape
    # with C*H*W of 1 or 2 the orthogonalised bias can be (nearly) a pure rounding residual that
    # the normalisation then blows up: ill-conditioned in any float32 evaluation (module docstring)
    assume(orthogonal == 0 or C * H * W >= 3)
    with gmkernels.use_backend("triton"):
        out = gmkernels.probabilistic_guidance(gm_c, gm_u, scale, orthogonal)
    ref = reference.probabilistic_guidance(to64(gm_c), to64(gm_u), scale, orthogonal)
    for key in ("means", "logstds", "logweights"):
        close(out[key], ref[key], dtype, key)


@pytest.mark.triton
def test_probabilistic_guidance_large_k_and_c():
    """Several K tiles (second log-weight sweep) and channel tiles, K of the two GMs different."""
    gm_c = make_gm(((2,), 37, 9, 3, 2), 11, torch.float32, dead=True)
    gm_u = make_gm(((2,), 19, 9, 3, 2), 12, torch.float32, dead=True)
    with gmkernels.use_backend("triton"):
        out = gmkernels.probabilistic_guidance(gm_c, gm_u, 0.7, 1.0)
    ref = reference.probabilistic_guidance(to64(gm_c), to64(gm_u), 0.7, 1.0)
    for key in ("means", "logstds", "logweights"):
        close(out[key], ref[key], torch.float32, key)


def test_probabilistic_guidance_scale_zero_is_identity():
    gm_c = make_gm(((2,), 3, 2, 2, 2), 0, torch.float32)
    gm_u = make_gm(((2,), 3, 2, 2, 2), 1, torch.float32)
    assert gmkernels.probabilistic_guidance(gm_c, gm_u, 0.0) is gm_c
    outs = torch.ops.gmkernels.probabilistic_guidance(
        gm_c["means"], gm_c["logstds"], gm_c["logweights"], gm_u["means"], gm_u["logweights"], 0.0, 1.0
    )
    for o, key in zip(outs, ("means", "logstds", "logweights")):
        assert torch.equal(o, gm_c[key]) and o.data_ptr() != gm_c[key].data_ptr()


@pytest.mark.triton
@settings(max_examples=10)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), scale=st.floats(0.0, 6.0))
def test_weight_guidance(data, dtype, scale):
    _, gm_c, gm_u = draw_pair(data, dtype, same_k=True)
    with gmkernels.use_backend("triton"):
        out = gmkernels.weight_guidance(gm_c, gm_u, scale)
    ref = reference.weight_guidance(to64(gm_c), to64(gm_u), scale)
    close(out["logweights"], ref["logweights"], dtype, "logweights")
    assert out["means"] is gm_c["means"] and torch.equal(out["logstds"], gm_c["logstds"])


@pytest.mark.triton
@settings(max_examples=5)
@given(
    batch=st.integers(2, 300),
    K=st.sampled_from([1, 3, 16, 40]),
    dead=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_weight_guidance_point_data(batch, K, dead, dtype):
    """Point data (H = W = 1) runs as one row of ``batch`` pixels: every point still gets its own softmax."""
    gm_c = make_gm(((batch,), K, 2, 1, 1), 3, dtype, dead=dead)
    gm_u = make_gm(((batch,), K, 2, 1, 1), 4, dtype, dead=dead)
    with gmkernels.use_backend("triton"):
        out = gmkernels.weight_guidance(gm_c, gm_u, 2.5)
    ref = reference.weight_guidance(to64(gm_c), to64(gm_u), 2.5)
    close(out["logweights"], ref["logweights"], dtype, "logweights")


@pytest.mark.triton
@settings(max_examples=6)
@given(
    batch=st.integers(1, 32).map(lambda n: 2 * n + 1),
    K=st.sampled_from([1, 3, 16, 40]),
    Ku=st.sampled_from([1, 5]),
    dead=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    orthogonal=st.sampled_from([0.0, 1.0]),
    seed=seeds,
)
@example(batch=65, K=40, Ku=5, dead=True, dtype=torch.bfloat16, orthogonal=1.0, seed=0)
def test_guidance_point_data(batch, K, Ku, dead, dtype, orthogonal, seed):
    """Point data (H = W = 1, odd B) packs the samples into the pixel axis: each lane is its own
    sample, with its own statistics, projection and variance, in all three guidance ops.

    Sizes: point data runs 32 points a program (``BLOCK_P``, one warp, one point a lane) in every
    guidance kernel, with K tiles of at most 8 components, so B from 3 to 65 covers one partly
    empty program up to three programs with a partly empty last one, and K = 40 several K tiles;
    a larger B only adds programs, each a further interpreter run. The explicit example pins
    three programs, several K tiles, dead components and the orthogonal projection."""
    gm_c = make_gm(((batch,), K, 3, 1, 1), seed, dtype, dead=dead)
    gm_u = make_gm(((batch,), Ku, 3, 1, 1), seed + 1, dtype, dead=dead)
    with gmkernels.use_backend("triton"):
        out = gmkernels.probabilistic_guidance(gm_c, gm_u, 0.6, orthogonal)
        cfg = gmkernels.mean_cfg(gm_c, gm_u, 2.5, orthogonal > 0)
    ref = reference.probabilistic_guidance(to64(gm_c), to64(gm_u), 0.6, orthogonal)
    for key in ("means", "logstds", "logweights"):
        close(out[key], ref[key], dtype, key)
    close(cfg["means"], reference.mean_cfg(to64(gm_c), to64(gm_u), 2.5, orthogonal > 0)["means"], dtype, "mean_cfg")


@pytest.mark.triton
def test_guidance_many_partial_sums_per_sample():
    """An image with more pixel blocks per sample than one read of the partial sums (32):
    every program totals its sample's partials in several steps."""
    gm_c = make_gm(((2,), 2, 2, 64, 65), 5, torch.float32, dead=True, per_pixel_std=True)
    gm_u = make_gm(((2,), 3, 2, 64, 65), 6, torch.float32, dead=True)
    with gmkernels.use_backend("triton"):
        out = gmkernels.probabilistic_guidance(gm_c, gm_u, 0.8, 1.0)
        cfg = gmkernels.mean_cfg(gm_c, gm_u, 3.0, True)
    ref = reference.probabilistic_guidance(to64(gm_c), to64(gm_u), 0.8, 1.0)
    for key in ("means", "logstds", "logweights"):
        close(out[key], ref[key], torch.float32, key)
    close(cfg["means"], reference.mean_cfg(to64(gm_c), to64(gm_u), 3.0, True)["means"], torch.float32, "mean_cfg")


@pytest.mark.triton
@settings(max_examples=10)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scale=st.floats(0.0, 6.0),
    orthogonal=st.booleans(),
)
def test_mean_cfg(data, dtype, scale, orthogonal):
    _, gm_c, gm_u = draw_pair(data, dtype)
    with gmkernels.use_backend("triton"):
        out = gmkernels.mean_cfg(gm_c, gm_u, scale, orthogonal)
    ref = reference.mean_cfg(to64(gm_c), to64(gm_u), scale, orthogonal)
    close(out["means"], ref["means"], dtype, "means")
    assert torch.equal(out["logweights"], gm_c["logweights"]) and torch.equal(out["logstds"], gm_c["logstds"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    gm_c = make_gm(((2,), 3, 2, 3, 2), 0, torch.float32, dead=True)
    gm_u = make_gm(((2,), 3, 2, 3, 2), 1, torch.float32)
    mc, lsc, lc, mu, lu = gm_c["means"], gm_c["logstds"], gm_c["logweights"], gm_u["means"], gm_u["logweights"]
    with gmkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.gmkernels.probabilistic_guidance.default, (mc, lsc, lc, mu, lu, 0.6, 1.0))
        torch.library.opcheck(torch.ops.gmkernels.weight_guidance.default, (lc, lu, 2.0))
        torch.library.opcheck(torch.ops.gmkernels.mean_cfg.default, (mc, lc, mu, lu, 3.0, True))


def test_bad_input_names_the_argument():
    gm_c = make_gm(((2,), 3, 2, 3, 2), 0, torch.float32)
    gm_u = make_gm(((2,), 4, 2, 3, 2), 1, torch.float32)
    with pytest.raises(ValueError, match="matching K"):
        gmkernels.weight_guidance(gm_c, gm_u, 2.0)
    with pytest.raises(ValueError, match="scale"):
        gmkernels.probabilistic_guidance(gm_c, gm_u, 1.0)
    gm_bad = make_gm(((2,), 3, 3, 3, 2), 1, torch.float32)
    with pytest.raises(ValueError, match="gm_uncond"):
        gmkernels.mean_cfg(gm_c, gm_bad, 2.0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_mean_cfg_orthogonal_is_a_bool(backend):
    """``orthogonal`` of mean_cfg is a flag (docs/ops.md#mean_cfg): a number such as 0.5, which
    would read as probabilistic_guidance's fraction, raises a TypeError naming the argument
    instead of acting as ``True``; the bools give the reference's results."""
    gm_c = make_gm(((2,), 3, 2, 3, 2), 0, torch.float32)
    gm_u = make_gm(((2,), 4, 2, 3, 2), 1, torch.float32)
    with gmkernels.use_backend(backend):
        for bad in (0.5, 1, 0.0, torch.tensor(True)):
            with pytest.raises(TypeError, match="orthogonal"):
                gmkernels.mean_cfg(gm_c, gm_u, 2.0, bad)
        for orthogonal in (False, True):
            out = gmkernels.mean_cfg(gm_c, gm_u, 2.0, orthogonal)
            close(
                out["means"],
                reference.mean_cfg(to64(gm_c), to64(gm_u), 2.0, orthogonal)["means"],
                torch.float32,
                "means",
            )


def test_pair_check_is_stored_per_metadata_only_when_valid():
    """The pair check runs once per metadata (types, shapes, dtypes, devices of the six tensors):
    a valid pair is stored, while a pair differing in any of them is checked again and still
    fails with its message; a failing pair is never stored."""
    gm_c = make_gm(((2,), 3, 2, 3, 2), 0, torch.float32)
    gm_u = make_gm(((2,), 4, 2, 3, 2), 1, torch.float32)
    before = _launch.CHECKED.cache_info()
    assert guidance._check_pair(gm_c, gm_u) == guidance._check_pair(gm_c, gm_u)
    after = _launch.CHECKED.cache_info()
    assert after.hits >= before.hits + 1 and after.misses <= before.misses + 1
    for bad, match in [
        ({**gm_u, "means": gm_u["means"][..., :1]}, "gm_uncond"),
        ({**gm_u, "logstds": gm_u["logstds"].to("meta")}, "gm_uncond"),
        ({**gm_u, "logweights": gm_u["logweights"].long()}, "gm_uncond"),
        ({**gm_u, "logstds": gm_u["logstds"].view(2, 1, 1, 1)}, "gm_uncond"),
    ]:
        for _ in range(2):
            with pytest.raises((ValueError, TypeError), match=match):
                gmkernels.mean_cfg(gm_c, bad, 2.0)
    assert _launch.CHECKED.cache_info().currsize == after.currsize


@pytest.mark.triton
def test_ops_trace_fullgraph_under_torch_compile():
    """The torch.library ops trace into one graph (fake impls, no graph break)."""
    gm_c = make_gm(((2,), 3, 2, 2, 3), 1, torch.float32, dead=True)
    gm_u = make_gm(((2,), 3, 2, 2, 3), 2, torch.float32)

    def f(mc, lsc, lc, mu, lu):
        m, ls, lw = torch.ops.gmkernels.probabilistic_guidance(mc, lsc, lc, mu, lu, 0.5, 1.0)
        lw = torch.ops.gmkernels.weight_guidance(lw, lu, 1.5)
        return torch.ops.gmkernels.mean_cfg(m, lw, mu, lu, 2.0, True), ls, lw

    args = (gm_c["means"], gm_c["logstds"], gm_c["logweights"], gm_u["means"], gm_u["logweights"])
    with gmkernels.use_backend("triton"):
        eager = f(*args)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
