"""The fused policy kernels (``gmkernels.ops.policy``) against the float64 reference twin under
``TRITON_INTERPRET=1``: the velocity, the whole rollout (in-register and K-streamed), and the
fused backward of both against float64 autograd gradients."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gmkernels
from gmkernels.ops import policy as ops
from gmkernels.policy import GMFlowPolicy
from tests.strategies import TOL, make_gm, make_state, rel_err, seeds

pytest.importorskip("triton")

GRAD_TOL = {torch.float32: 1e-4}  # gradients: sums over substeps of softmax derivatives


@st.composite
def cases(draw, max_k=12, max_c=5, max_hw=4):
    B = draw(st.integers(1, 3))
    K = draw(st.one_of(st.just(1), st.integers(1, max_k)))
    C = draw(st.integers(1, max_c))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    return (B,), K, C, H, W


def build(shape, seed, dtype, dead, sig_src):
    gm = make_gm(shape, seed, dtype=dtype, dead=dead, logstd_range=(-2.0, 0.5))
    x = make_state(shape, seed, dtype=dtype)
    return gm, x, GMFlowPolicy(gm, x, sig_src), GMFlowPolicy({k: v.double() for k, v in gm.items()}, x.double(), sig_src.double())


def streamed(enabled: bool):
    """Force the K-streamed rollout (GM re-read per substep) on small shapes."""
    return mock.patch.object(ops, "_ONE_TILE_KC", 1 if enabled else ops._ONE_TILE_KC)


@pytest.mark.triton
@settings(max_examples=25)
@given(shape=cases(), seed=seeds, dtype=st.sampled_from([torch.float32, torch.bfloat16]), dead=st.booleans(),
       frac=st.floats(0.05, 1.0), big_k=st.booleans())
def test_pi_kernel_matches_reference(shape, seed, dtype, dead, frac, big_k):
    """``sigma`` from 5% of ``sigma_src`` up: ``u = (x - x0_hat) / sigma`` amplifies the rounding of
    ``x0_hat`` by ``|x| / (sigma |u|)``, so near ``sigma = 0`` no float32 evaluation can keep a
    relative 1e-5 (the rollout's states do: they add ``u * (sigma_next - sigma)``). The same holds
    for a small ``sigma_src``, so the bar is the larger of 1e-5 and three float32 unit roundoffs
    (2^-24) times that amplification: a float32 evaluation of the reference formula itself misses
    1e-5 there (5.6e-5 at ``sigma_src = 0.058``, ``sigma = 0.015``, ``|x| = 1.1``, ``|u| = 0.38``,
    where the kernel gives 1.3e-5); over the draws seen the kernel stays within 1.8 roundoffs
    times the amplification (1.1e-5 at 104x, which a bar of 1e-7 per unit of it failed)."""
    if big_k:  # several K tiles of the streamed softmax
        shape = (shape[0], 300, 2, 1, 3)
    B = shape[0][0]
    g = torch.Generator().manual_seed(seed)
    sig_src = torch.rand(B, generator=g) * 0.98 + 0.01
    gm, x, pol, pol64 = build(shape, seed, dtype, dead, sig_src)
    sigma = sig_src * frac
    xq = (x.double() * 0.8 + 0.1).to(dtype)
    want = pol64.pi(xq.double(), sigma.double())
    with gmkernels.use_backend("triton"):
        got = pol.pi(xq, sigma)
    assert got.dtype == dtype and got.shape == x.shape
    amplification = float(xq.double().norm() / (sigma.double().min() * want.norm()))
    assert rel_err(got, want) < max(TOL[dtype], 3 * 2.0**-24 * amplification)


@pytest.mark.triton
@settings(max_examples=25)
@given(shape=cases(), seed=seeds, dtype=st.sampled_from([torch.float32, torch.bfloat16]), dead=st.booleans(),
       n=st.integers(1, 10), shift=st.sampled_from([1.0, 3.0]), stream=st.booleans(), temp=st.sampled_from([1.0, 0.7]))
def test_rollout_kernel_matches_reference(shape, seed, dtype, dead, n, shift, stream, temp):
    B = shape[0][0]
    g = torch.Generator().manual_seed(seed)
    r0 = torch.rand(B, generator=g) * 0.9 + 0.1
    r1 = r0 * torch.rand(B, generator=g) * torch.randint(0, 2, (B,), generator=g)  # some end at 0
    sig0 = shift * r0 / (1 + (shift - 1) * r0)
    gm, x, pol, pol64 = build(shape, seed, dtype, dead, sig0)
    pol, pol64 = pol.temperature(temp), pol64.temperature(temp)
    want, s_want, _ = pol64.integrate(x.double(), sig0.double(), r0.double(), r1.double(), shift=shift, total_substeps=n)
    with gmkernels.use_backend("triton"), streamed(stream):
        got, s_got, t_got = pol.integrate(x, sig0, r0, r1, shift=shift, total_substeps=n)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, want) < TOL[dtype]
    assert torch.allclose(s_got.double(), s_want, atol=1e-6)


def grads(policy_args, x_start, sig0, r0, r1, n, weights_pi, weights_x, backend):
    """Gradients of ``<w, integrate(...)> + <w', pi(...)>`` w.r.t. the u-GM, x_src and x_start."""
    gm, x_src = policy_args
    gm = {k: v.detach().clone().requires_grad_() for k, v in gm.items()}
    x_src = x_src.detach().clone().requires_grad_()
    x_start = x_start.detach().clone().requires_grad_()
    with gmkernels.use_backend(backend):
        pol = GMFlowPolicy(gm, x_src, sig0)
        out, _, _ = pol.integrate(x_start, sig0, r0, r1, shift=2.0, total_substeps=n)
        u = pol.pi(x_start * 0.9, sig0 * 0.5)
        loss = (out.double() * weights_x).sum() + (u.double() * weights_pi).sum()
    loss.backward()
    return [gm["means"].grad, gm["logstds"].grad, gm["logweights"].grad, x_src.grad, x_start.grad]


@pytest.mark.triton
@settings(max_examples=15)
@given(shape=cases(max_k=9, max_c=4, max_hw=3), seed=seeds, dead=st.booleans(), n=st.integers(1, 11))
def test_fused_backward_matches_float64_autograd(shape, seed, dead, n):
    """Gradients of the fused kernels (fp32) against autograd through the float64 reference;
    ``n`` substeps cover segment counts with a partial last segment."""
    B = shape[0][0]
    g = torch.Generator().manual_seed(seed)
    r0 = torch.rand(B, generator=g) * 0.8 + 0.2
    r1 = r0 * torch.rand(B, generator=g) * 0.5
    sig0 = 2.0 * r0 / (1 + r0)
    gm = make_gm(shape, seed, dtype=torch.float64, dead=dead, logstd_range=(-1.5, 0.0))
    x = make_state(shape, seed)
    wx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    wp = torch.randn(x.shape, generator=g, dtype=torch.float64)
    want = grads((gm, x), x, sig0.double(), r0.double(), r1.double(), n, wp, wx, "torch")
    gm32 = {k: v.float() for k, v in gm.items()}
    got = grads((gm32, x.float()), x.float(), sig0, r0, r1, n, wp, wx, "triton")
    for name, a, b in zip(("means", "logstds", "logweights", "x_src", "x_start"), got, want):
        assert a is not None and a.dtype == torch.float32, name
        live = torch.isfinite(b)
        assert torch.isfinite(a).all(), name
        assert rel_err(a[live], b[live]) < GRAD_TOL[torch.float32], name


@pytest.mark.triton
def test_training_rollout_saves_states_not_gm_copies():
    """A training rollout saves ``ceil(N / ceil(sqrt(N)))`` states per pixel (the checkpoints)
    and the inputs, nothing of size K x C x H x W per substep."""
    shape = ((2,), 4, 3, 3, 3)
    gm = {k: v.requires_grad_() for k, v in make_gm(shape, 1, dtype=torch.float32).items()}
    x = make_state(shape, 1, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with gmkernels.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pol = GMFlowPolicy(gm, x, 0.9)
        out, _, _ = pol.integrate(x, 0.9, 0.9, 0.0, total_substeps=50)
    inputs = {t.untyped_storage().data_ptr() for t in (*gm.values(), x)}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    ck = [t for t in new if t.dim() == 4]
    assert out.requires_grad and len(ck) == 1 and tuple(ck[0].shape) == (2, 7, 3, 9)  # S = 8, 7 segments
    small = sum(t.numel() for t in new) - ck[0].numel()  # sigma tables, variances: O(B * N)
    assert small <= 2 * 51 + 16


@pytest.mark.triton
def test_gradients_above_the_register_tile_take_the_torch_path():
    """``next_pow2(K) * next_pow2(C) > 1024`` with a gradient: the differentiable torch path, same
    values and gradients as under ``use_backend("torch")``; without a gradient the streamed kernel."""
    shape = ((1,), 300, 4, 1, 2)
    gm = make_gm(shape, 2, dtype=torch.float32, dead=True)
    x = make_state(shape, 2, dtype=torch.float32)
    assert not ops.one_tile(300, 4)
    results = []
    for backend in ("triton", "torch"):
        g = {k: v.clone().requires_grad_() for k, v in gm.items()}
        with gmkernels.use_backend(backend):
            out, _, _ = GMFlowPolicy(g, x, 0.8).integrate(x, 0.8, 0.8, 0.1, total_substeps=4)
        out.square().sum().backward()
        results.append([out.detach(), *(g[k].grad for k in gm)])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-6
    with gmkernels.use_backend("triton"), torch.no_grad():
        streamed_out, _, _ = GMFlowPolicy(gm, x, 0.8).integrate(x, 0.8, 0.8, 0.1, total_substeps=4)
    assert rel_err(streamed_out, results[1][0]) < TOL[torch.float32]
