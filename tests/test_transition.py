"""Triton transition kernels (``u_to_x0``, ``x0_to_u``, ``reverse_transition``) against the float64
reference under the interpreter: random shapes, float and tensor sigmas (incl. 0, 1 and values
next to them), dead components, per-pixel stds, bf16, non-contiguous inputs; plus opcheck."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import TOL, gm_shapes, make_gm, make_state, rel_err, seeds, sigmas

import gmkernels
import reference

pytest.importorskip("triton")

EDGE_SIGMAS = st.sampled_from([0.0, 1e-7, 1e-3, 0.5, 1.0 - 1e-6, 1.0])
any_sigma = st.one_of(sigmas, EDGE_SIGMAS)


def noncontig(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in a non-contiguous layout: 0 keeps ``t``, 1 doubles the pixel stride
    (H*W still mergeable, a strided view), 2 swaps the H/W strides (H*W not mergeable)."""
    if how == 1:
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def as_sigma(value: float, batch: tuple, form: str, seed: int):
    """``value`` as a Python float, a 0-dim tensor or a per-sample ``(*B, 1, 1, 1)`` tensor whose
    entries spread around ``value`` (staying in [0, 1]). ``value`` is first rounded to float32,
    the precision the kernels use for Python-float sigmas too, so that float and tensor sigmas
    drawn equal stay equal in the float64 reference."""
    value = float(torch.tensor(value, dtype=torch.float32))
    if form == "float":
        return value
    if form == "scalar":
        return torch.tensor(value, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    jitter = torch.rand((*batch, 1, 1, 1), generator=g, dtype=torch.float64) * 0.2 - 0.1
    return (value + jitter * min(value, 1 - value)).clamp(0, 1).to(torch.float32)


def to64(x):
    if isinstance(x, dict):
        return {k: v.double() for k, v in x.items()}
    return x.double() if isinstance(x, torch.Tensor) else x


def check_gm_close(out: dict, ref: dict, dtype, gm_in: dict):
    assert out["means"].dtype == dtype and out["logstds"].dtype == dtype
    assert out["means"].shape == ref["means"].shape and out["logstds"].shape == ref["logstds"].shape
    for key in ("means", "logstds"):
        assert torch.isfinite(out[key]).all(), key
        err = rel_err(out[key], ref[key])
        assert err < TOL[dtype], (key, err)
    assert torch.equal(out["logweights"], gm_in["logweights"].to(dtype))


def draw_case(data, dtype):
    shape = data.draw(gm_shapes(max_k=12, max_c=5, max_hw=6), label="shape")
    seed = data.draw(seeds, label="seed")
    gm = make_gm(
        shape,
        seed,
        dtype,
        dead=data.draw(st.booleans(), label="dead"),
        logstd_range=data.draw(st.sampled_from([(-3.0, 1.0), (-12.0, -8.0), (6.0, 12.0)]), label="logstd_range"),
        per_pixel_std=data.draw(st.booleans(), label="per_pixel_std"),
    )
    how = data.draw(st.integers(0, 2), label="layout")
    gm = {k: noncontig(v, how) for k, v in gm.items()}
    x = noncontig(make_state(shape, seed, dtype), how)
    return shape, seed, gm, x


@pytest.mark.triton
@settings(max_examples=10)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    form=st.sampled_from(["float", "scalar", "batch"]),
)
def test_u_to_x0_and_back(data, dtype, form):
    shape, seed, gm, x = draw_case(data, dtype)
    sigma = as_sigma(data.draw(any_sigma, label="sigma"), shape[0], form, seed)
    with gmkernels.use_backend("triton"):
        x0 = gmkernels.u_to_x0(gm, x, sigma)
        u = gmkernels.x0_to_u(gm, x, sigma)
    check_gm_close(x0, reference.u_to_x0(to64(gm), to64(x), to64(sigma)), dtype, gm)
    check_gm_close(u, reference.x0_to_u(to64(gm), to64(x), to64(sigma)), dtype, gm)


@pytest.mark.triton
@settings(max_examples=10)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    forms=st.tuples(st.sampled_from(["float", "scalar", "batch"]), st.sampled_from(["float", "scalar", "batch"])),
)
def test_reverse_transition(data, dtype, forms):
    shape, seed, gm, x = draw_case(data, dtype)
    s_hi = data.draw(any_sigma, label="sigma")
    s_lo = data.draw(st.one_of(st.just(s_hi), st.floats(0.0, s_hi), st.just(0.0)), label="sigma_to")
    # per-sample tensors: sigma_to jittered below its sigma, keeping sigma_to <= sigma elementwise
    sigma = as_sigma(s_hi, shape[0], forms[0], seed)
    sigma_to = as_sigma(s_lo, shape[0], forms[1], seed + 1)
    if isinstance(sigma, torch.Tensor) and isinstance(sigma_to, torch.Tensor):
        sigma_to = torch.minimum(sigma_to, sigma)
    elif isinstance(sigma_to, torch.Tensor):
        sigma_to = sigma_to.clamp(max=sigma)
    elif isinstance(sigma, torch.Tensor):
        sigma = sigma.clamp(min=sigma_to)
    with gmkernels.use_backend("triton"):
        out = gmkernels.reverse_transition(gm, x, sigma, sigma_to)
    ref = reference.reverse_transition(to64(gm), to64(x), to64(sigma), to64(sigma_to))
    check_gm_close(out, ref, dtype, gm)


@pytest.mark.triton
def test_reverse_transition_close_sigmas_fp32():
    """``sigma_to`` one step below ``sigma``: ``beta = 1 - (q p)^2`` must not lose its digits."""
    shape = ((3,), 4, 3, 5, 4)
    gm = make_gm(shape, 3, torch.float32)
    x = make_state(shape, 3, torch.float32)
    sigma = torch.tensor([0.5, 0.9, 0.01], dtype=torch.float32).view(3, 1, 1, 1)
    sigma_to = sigma - torch.tensor([1e-4, 3e-5, 1e-6]).view(3, 1, 1, 1)
    with gmkernels.use_backend("triton"):
        out = gmkernels.reverse_transition(gm, x, sigma, sigma_to)
    ref = reference.reverse_transition(to64(gm), to64(x), to64(sigma), to64(sigma_to))
    check_gm_close(out, ref, torch.float32, gm)


@pytest.mark.triton
def test_large_k_and_no_batch_dims():
    """K * C rows beyond one program's block, and a GM without leading batch dims."""
    shape = ((), 300, 3, 2, 3)
    gm = make_gm(shape, 5, torch.float32, dead=True)
    x = make_state(shape, 5, torch.float32)
    with gmkernels.use_backend("triton"):
        out = gmkernels.reverse_transition(gm, x, 0.7, 0.2)
    check_gm_close(out, reference.reverse_transition(to64(gm), to64(x), 0.7, 0.2), torch.float32, gm)


@pytest.mark.triton
def test_opcheck():
    shape = ((2,), 3, 2, 3, 2)
    gm = make_gm(shape, 0, torch.float32)
    x = make_state(shape, 0, torch.float32)
    sig = torch.tensor([0.3, 0.8]).view(2, 1, 1, 1)
    m, ls = gm["means"], gm["logstds"]
    # the ops run their kernel whatever the backend (the public functions pick the backend)
    torch.library.opcheck(torch.ops.gmkernels.u_to_x0.default, (m, ls, x, sig, 0.0, 1e-6))
    torch.library.opcheck(torch.ops.gmkernels.x0_to_u.default, (m, ls, x, None, 0.4, 1e-6))
    torch.library.opcheck(torch.ops.gmkernels.reverse_transition.default, (m, ls, x, sig, 0.0, None, 0.1, 1e-6))


def test_bad_input_names_the_argument():
    shape = ((2,), 3, 2, 3, 2)
    gm = make_gm(shape, 0, torch.float32)
    x = make_state(shape, 0, torch.float32)
    with pytest.raises(ValueError, match="x_t"):
        gmkernels.u_to_x0(gm, x[..., :1], 0.5)
    with pytest.raises(ValueError, match="sigma_to"):
        gmkernels.reverse_transition(gm, x, 0.5, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        gmkernels.x0_to_u(gm, x, torch.full((3, 1, 1, 1), 0.5))


@pytest.mark.triton
def test_ops_trace_fullgraph_under_torch_compile():
    """The torch.library ops trace into one graph (fake impls, no graph break)."""
    shape = ((2,), 3, 2, 2, 3)
    gm = make_gm(shape, 1, torch.float32)
    x = make_state(shape, 1, torch.float32)
    sig = torch.tensor([0.6, 0.3]).view(2, 1, 1, 1)

    def f(m, ls, x, sig):
        m, ls = torch.ops.gmkernels.u_to_x0(m, ls, x, sig, 0.0, 1e-6)
        m, ls = torch.ops.gmkernels.reverse_transition(m, ls, x, sig, 0.0, None, 0.1, 1e-6)
        return torch.ops.gmkernels.x0_to_u(m, ls, x, None, 0.1, 1e-6)

    args = (gm["means"], gm["logstds"], x, sig)
    with gmkernels.use_backend("triton"):
        eager = f(*args)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_grad_and_float64_take_the_torch_path():
    """Inputs that need a gradient (sigma included) or are float64 run the differentiable,
    exact reference even when Triton is forced."""
    shape = ((2,), 3, 2, 2, 3)
    gm = make_gm(shape, 1, torch.float64)
    x = make_state(shape, 1, torch.float64)
    sig = torch.tensor([0.6, 0.3], dtype=torch.float64).view(2, 1, 1, 1).requires_grad_()
    with gmkernels.use_backend("triton"):
        out = gmkernels.reverse_transition(gm, x, sig, 0.1)
        (g,) = torch.autograd.grad(out["means"].sum() + out["logstds"].sum(), sig)
    ref = reference.reverse_transition(gm, x, sig, 0.1)
    (g_ref,) = torch.autograd.grad(ref["means"].sum() + ref["logstds"].sum(), sig)
    assert torch.allclose(g, g_ref)
