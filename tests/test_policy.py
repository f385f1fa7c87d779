"""pi-Flow GM policies. On the torch path: the reference twin against an analytic oracle and the
GM-ODE substeps, the rollout's per-sample substep counts, temperature / dropout / copy
semantics, no host reads, video shapes and bad input. Then the fused kernels
(``gmkernels.ops.policy``) against the float64 twin under ``TRITON_INTERPRET=1``: the velocity,
the whole rollout (in-register and K-streamed), the fused backward of both against float64
autograd gradients, the custom ops and ``torch.compile``."""

import contextlib
import functools
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gmkernels
import reference.policy as ref
from gmkernels.ops import policy as ops
from gmkernels.policy import GMFlowPolicy
from reference.solver_steps import gm_ode_substeps
from tests.strategies import (
    TOL,
    assert_compiled_training_matches_eager,
    assert_int64_offsets_change_nothing,
    make_gm,
    make_state,
    rel_err,
    seeds,
)


def warp_fn(shift):
    return lambda t: shift * t / (1 + (shift - 1) * t)


def data_gm(B, K, C, H, W, seed):
    """A GM over clean data x0 per pixel: means ``(B, K, C, H, W)``, one variance per sample,
    log-weights ``(B, K, 1, H, W)`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(B, K, C, H, W, generator=g, dtype=torch.float64)
    var = torch.empty(B, dtype=torch.float64).uniform_(0.05, 0.5, generator=g)
    lw = torch.log_softmax(torch.randn(B, K, 1, H, W, generator=g, dtype=torch.float64), dim=1)
    return means, var, lw


def exact_posterior(means, var, lw, x, sigma):
    """The denoising posterior p(x0 | x_sigma) of the data GM: an x0-GM (``x = a x0 + sigma eps``)."""
    a = (1 - sigma).view(-1, 1, 1, 1, 1)
    s = sigma.view(-1, 1, 1, 1, 1)
    v = var.view(-1, 1, 1, 1, 1)
    n = a * a * v + s * s
    mu = (v * a * x.unsqueeze(1) + s * s * means) / n
    logw = lw - 0.5 * ((x.unsqueeze(1) - a * means) ** 2).sum(2, keepdim=True) / n
    return {"means": mu, "logstds": 0.5 * torch.log(v * s * s / n), "logweights": torch.log_softmax(logw, dim=1)}


def u_gm_of(gm_x0, x, sigma):
    """Op 5 inverted: the u-GM whose x0-GM at ``(x, sigma)`` is ``gm_x0``."""
    s = sigma.view(-1, 1, 1, 1, 1)
    return {
        "means": (x.unsqueeze(1) - gm_x0["means"]) / s,
        "logstds": gm_x0["logstds"] - torch.log(s),
        "logweights": gm_x0["logweights"],
    }


@pytest.fixture
def oracle():
    B, K, C, H, W = 3, 4, 3, 2, 3
    means, var, lw = data_gm(B, K, C, H, W, 0)
    g = torch.Generator().manual_seed(1)
    sigma_src = torch.tensor([0.9, 0.6, 0.35], dtype=torch.float64)
    x0 = means[:, 0] + var.sqrt().view(-1, 1, 1, 1) * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    x_src = (1 - sigma_src).view(-1, 1, 1, 1) * x0 + sigma_src.view(-1, 1, 1, 1) * torch.randn(
        B, C, H, W, generator=g, dtype=torch.float64
    )
    gm_x0 = exact_posterior(means, var, lw, x_src, sigma_src)
    return means, var, lw, x_src, sigma_src, gm_x0


def test_pi_of_the_exact_posterior_is_the_true_velocity(oracle):
    """With the exact denoising GM of a GM data distribution, the policy's velocity at any later
    state is the true flow velocity ``(x - E[x0 | x]) / sigma`` of that distribution."""
    means, var, lw, x_src, sigma_src, gm_x0 = oracle
    policy = GMFlowPolicy(u_gm_of(gm_x0, x_src, sigma_src), x_src, sigma_src)
    g = torch.Generator().manual_seed(2)
    sigma = sigma_src * torch.tensor([0.8, 0.5, 0.1], dtype=torch.float64)
    x = x_src + 0.3 * torch.randn(x_src.shape, generator=g, dtype=torch.float64)
    post = exact_posterior(means, var, lw, x, sigma)
    x0_true = (torch.softmax(post["logweights"], 1) * post["means"]).sum(1)
    u_true = (x - x0_true) / sigma.view(-1, 1, 1, 1)
    assert rel_err(policy.pi(x, sigma), u_true) < 1e-10


def test_rollout_of_the_exact_oracle_equals_gm_ode_substeps(oracle):
    """One rollout on a shared schedule is the GM-ODE substep loop of the same x0-GM."""
    means, var, lw, x_src, sigma_src, gm_x0 = oracle
    sigma_src = torch.full((3,), 0.8, dtype=torch.float64)
    gm_x0 = exact_posterior(means, var, lw, x_src, sigma_src)
    policy = GMFlowPolicy(u_gm_of(gm_x0, x_src, sigma_src), x_src, sigma_src)
    shift, n = 3.0, 12
    r0 = torch.full((3,), 0.8 / (shift - (shift - 1) * 0.8), dtype=torch.float64)  # warp(r0) = 0.8
    r1 = torch.full((3,), 0.25, dtype=torch.float64)
    x_end, sigma_end, t_end = policy.integrate(x_src, sigma_src, r0, r1, shift=shift, total_substeps=n)
    steps = math.ceil(float(r0[0] - r1[0]) * n)
    raws = [max(float(r0[0]) - j * float(r0[0] - r1[0]) / steps, 0.0) for j in range(steps + 1)]
    sig = [0.8] + [warp_fn(shift)(r) for r in raws[1:]]
    assert rel_err(x_end, gm_ode_substeps(gm_x0, x_src, sig)) < 1e-9
    assert torch.allclose(sigma_end, torch.full((3,), sig[-1], dtype=torch.float64))
    assert torch.allclose(t_end, 1000 * sigma_end)


def lakonlab_loop(policy, x, sigma, r0, r1, warp, total):
    """The public pi-Flow ``integrate`` loop (host-side count, repeated subtraction of the step)."""
    delta = r0 - r1
    n = (delta * total).ceil().long().clamp(min=1)
    h = delta / n
    raw = r0
    for j in range(int(n.max())):
        u = policy.pi(x, sigma)
        raw_m = (raw - h).clamp(min=0)
        sig_m = warp(raw_m)
        active = n > j
        x = torch.where(active.view(-1, 1, 1, 1), x + u * (sig_m - sigma).view(-1, 1, 1, 1), x)
        sigma = torch.where(active, sig_m, sigma)
        raw = torch.where(active, raw_m, raw)
    return x, sigma


def test_per_sample_substep_counts():
    """Samples with different raw intervals take their own number of substeps in one call and
    match the public loop and single-sample rollouts."""
    shape = ((3,), 5, 2, 3, 2)
    gm, x = make_gm(shape, 3, dead=True), make_state(shape, 3)
    sigma_src = torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64)
    policy = GMFlowPolicy(gm, x, sigma_src)
    r0 = torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64)
    r1 = torch.tensor([0.0, 0.6, 0.45], dtype=torch.float64)  # 15, 2 and 1 substeps of 16
    sig0 = warp_fn(2.0)(r0)
    x_end, sigma_end, _ = policy.integrate(x, sig0, r0, r1, shift=2.0, total_substeps=16)
    sigmas, n = ref.rollout_sigmas(sig0, r0, r1, 16, warp_fn(2.0))
    assert n.tolist() == [15, 2, 1]
    x_ll, s_ll = lakonlab_loop(policy, x, sig0, r0, r1, warp_fn(2.0), 16)
    assert rel_err(x_end, x_ll) < 1e-12 and torch.allclose(sigma_end, s_ll)
    for b in range(3):
        one = GMFlowPolicy({k: v[b : b + 1] for k, v in gm.items()}, x[b : b + 1], sigma_src[b : b + 1])
        xb, _, _ = one.integrate(
            x[b : b + 1], sig0[b : b + 1], r0[b : b + 1], r1[b : b + 1], shift=2.0, total_substeps=16
        )
        assert rel_err(x_end[b : b + 1], xb) < 1e-12


def test_sigma_tables_hold_after_the_last_substep():
    r0 = torch.tensor([1.0, 0.5])
    r1 = torch.tensor([0.0, 0.25])
    sigmas, n = ref.rollout_sigmas(r0, r0, r1, 8, warp_fn(1.0))
    assert n.tolist() == [8, 2]
    assert torch.allclose(sigmas[1], torch.tensor([0.5, 0.375, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]))
    assert torch.allclose(sigmas[0], torch.linspace(1, 0, 9))


def test_temperature_semantics():
    shape = ((2,), 4, 2, 2, 2)
    gm, x = make_gm(shape, 5), make_state(shape, 5)
    policy = GMFlowPolicy(gm, x, torch.tensor([0.8, 0.5], dtype=torch.float64))
    hot = policy.temperature(0.5)
    assert torch.equal(policy.logweights, gm["logweights"])  # the original is untouched
    assert torch.allclose(hot.logweights, torch.log_softmax(gm["logweights"] / 0.5, dim=1))
    assert torch.allclose(hot.gm_vars, policy.gm_vars * 0.5)
    assert hot.temperature(1.0).logweights is hot.logweights  # T >= 1: unchanged
    sig = torch.tensor([0.5, 0.3], dtype=torch.float64)
    want = ref.policy_pi(
        gm["means"],
        policy.gm_vars * 0.5,
        torch.log_softmax(gm["logweights"] / 0.5, 1),
        x,
        policy.sigma_src,
        x * 0.9,
        sig,
    )
    assert rel_err(hot.pi(x * 0.9, sig), want) < 1e-12
    with pytest.raises(ValueError, match="temperature"):
        policy.temperature(0.0)


def test_dropout_semantics():
    shape = ((64,), 3, 1, 2, 2)
    gm, x = make_gm(shape, 6), make_state(shape, 6)
    policy = GMFlowPolicy(gm, x, 0.5)
    dropped = policy.dropout(0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(policy.logweights, gm["logweights"])
    dead = torch.isinf(dropped.logweights)
    assert torch.equal(dead, dead[..., :1, :1].expand_as(dead))  # per sample and component, all pixels
    per_sample = dead[:, :, 0, 0, 0]
    assert per_sample.any(dim=1).any() and not per_sample.all(dim=1).any()  # some dropped, never all
    assert 0.3 < per_sample.float().mean() < 0.7
    assert torch.equal(dropped.logweights[~dead], gm["logweights"][~dead])
    again = policy.dropout(0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.logweights, dropped.logweights)
    for p in (0.0, 1.0):
        assert policy.dropout(p).logweights is policy.logweights
    single = GMFlowPolicy(make_gm(((8,), 1, 1, 1, 1), 0), make_state(((8,), 1, 1, 1, 1), 0), 0.5)
    assert not torch.isinf(single.dropout(0.99).logweights).any()  # K = 1 never drops its only component
    assert torch.isfinite(dropped.pi(x * 0.5, 0.3)).all()


def test_copy_and_detach():
    shape = ((2,), 3, 2, 2, 2)
    gm = {k: v.clone().requires_grad_() for k, v in make_gm(shape, 7).items()}
    x = make_state(shape, 7)
    policy = GMFlowPolicy(gm, x, 0.7)
    det = policy.detach()
    assert policy.means_u.requires_grad and not det.means_u.requires_grad and not det.gm_vars.requires_grad
    assert not det.pi(x, 0.5).requires_grad
    cp = policy.copy()
    cp.temperature_(0.5)
    assert policy.logweights is gm["logweights"] and cp.means_u is policy.means_u


class NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor value on the host."""

    FORBIDDEN = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.item.default,
        torch.ops.aten.is_nonzero.default,
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_reads_in_integrate():
    shape = ((3,), 4, 2, 3, 3)
    gm, x = make_gm(shape, 8, dtype=torch.float32), make_state(shape, 8, dtype=torch.float32)
    policy = GMFlowPolicy(gm, x, torch.tensor([0.9, 0.8, 0.6]))
    r0 = torch.tensor([0.9, 0.8, 0.6])
    r1 = torch.tensor([0.3, 0.0, 0.55])
    want, _, _ = policy.integrate(x, r0, r0, r1, total_substeps=8)
    with NoHostReads():
        got, sigma_end, t_end = policy.integrate(x, r0, r0, r1, total_substeps=8)
        policy.pi(x, r1)
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        bool(r0.sum() > 0)  # the mode catches a host read


def test_video_shapes_equal_flattened_frames():
    B, K, C, T, H, W = 2, 3, 2, 3, 2, 2
    gm5 = make_gm(((B,), K, C, T * H, W), 9)
    gm6 = {
        "means": gm5["means"].reshape(B, K, C, T, H, W),
        "logstds": gm5["logstds"].reshape(B, 1, 1, 1, 1, 1),
        "logweights": gm5["logweights"].reshape(B, K, 1, T, H, W),
    }
    x5 = make_state(((B,), K, C, T * H, W), 9)
    x6 = x5.reshape(B, C, T, H, W)
    r0, r1 = torch.tensor([0.8, 0.6], dtype=torch.float64), torch.tensor([0.1, 0.2], dtype=torch.float64)
    out5, _, _ = GMFlowPolicy(gm5, x5, r0).integrate(x5, r0, r0, r1, total_substeps=6)
    out6, _, _ = GMFlowPolicy(gm6, x6, r0).integrate(x6, r0, r0, r1, total_substeps=6)
    assert out6.shape == x6.shape and torch.equal(out6.reshape(out5.shape), out5)


def test_gradcheck_torch_path():
    shape = ((2,), 3, 2, 2, 1)
    gm = {k: v.clone().requires_grad_() for k, v in make_gm(shape, 10, dead=True).items()}
    gm["logweights"] = gm["logweights"].detach().nan_to_num(neginf=-1e30).requires_grad_()
    x = make_state(shape, 10).requires_grad_()
    x_src = x.detach().clone()
    sig = torch.tensor([0.9, 0.6], dtype=torch.float64)

    def f(means, logstds, logweights, xx):
        p = GMFlowPolicy({"means": means, "logstds": logstds, "logweights": logweights}, x_src, sig)
        return p.integrate(xx, sig, sig, sig * 0.2, total_substeps=6)[0], p.pi(xx, sig * 0.5)

    assert torch.autograd.gradcheck(f, (gm["means"], gm["logstds"], gm["logweights"], x))


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda gm, x: GMFlowPolicy({"means": gm["means"]}, x, 0.5), TypeError, "gm_u"),
        (lambda gm, x: GMFlowPolicy({**gm, "means": gm["means"][0]}, x, 0.5), ValueError, "gm_u\\['means'\\]"),
        (lambda gm, x: GMFlowPolicy({**gm, "logweights": gm["logweights"][:, :2]}, x, 0.5), ValueError, "logweights"),
        (
            lambda gm, x: GMFlowPolicy({**gm, "logstds": gm["logstds"].expand(2, 1, 1, 3, 2)}, x, 0.5),
            ValueError,
            "logstds",
        ),
        (lambda gm, x: GMFlowPolicy(gm, x[:, :1], 0.5), ValueError, "x_src"),
        (lambda gm, x: GMFlowPolicy(gm, x.long(), 0.5), TypeError, "x_src"),
        (lambda gm, x: GMFlowPolicy(gm, x, 1.5), ValueError, "sigma_src"),
        (lambda gm, x: GMFlowPolicy(gm, x, torch.ones(3, dtype=torch.float64)), ValueError, "sigma_src"),
        (lambda gm, x: GMFlowPolicy(gm, x, torch.tensor([0.5, 1.5], dtype=torch.float64)), RuntimeError, "sigma_src"),
        (lambda gm, x: GMFlowPolicy(gm, x, 0.5).pi(x[..., :1], 0.5), ValueError, "x must have shape"),
        (lambda gm, x: GMFlowPolicy(gm, x, 0.5).integrate(x, 0.5, 0.2, 0.4), RuntimeError, "raw_t_end must not exceed"),
        (
            lambda gm, x: GMFlowPolicy(gm, x, 0.5).integrate(x, 0.5, 0.5, 0.0, total_substeps=0),
            ValueError,
            "total_substeps",
        ),
        (lambda gm, x: GMFlowPolicy(gm, x, 0.5).integrate(x, 0.5, 0.5, 0.0, shift=0.0), ValueError, "shift"),
        (lambda gm, x: GMFlowPolicy(gm, x, 0.5).integrate(x, 0.5, 0.5, -0.1), ValueError, "raw_t_end"),
    ],
)
def test_bad_input(build, exc, match):
    shape = ((2,), 3, 2, 3, 2)
    with pytest.raises(exc, match=match):
        build(make_gm(shape, 11), make_state(shape, 11))


def test_extreme_values_stay_finite():
    """Sigma at 0 and 1, huge and tiny stds, dead components: no NaN or inf."""
    shape = ((4,), 5, 2, 2, 2)
    gm, x = make_gm(shape, 12, dead=True), make_state(shape, 12)
    gm["logstds"] = torch.tensor([-20.0, 20.0, 0.0, -5.0], dtype=torch.float64).view(4, 1, 1, 1, 1)
    policy = GMFlowPolicy(gm, x, torch.tensor([1.0, 0.0, 1e-7, 0.5], dtype=torch.float64))
    for s in (0.0, 1.0, 1e-7):
        assert torch.isfinite(policy.pi(x, s)).all()
    out, _, _ = policy.integrate(x, 1.0, 1.0, 0.0, shift=3.0, total_substeps=16)
    assert torch.isfinite(out).all()


class DynamicShiftSampler:
    """A timestep sampler in the style of the public pi-Flow code: ``warp_t(raw_t, seq_len)`` with
    a shift that depends on the sequence length, and ``num_timesteps``."""

    num_timesteps = 1000

    def warp_t(self, raw_t, seq_len=None):
        shift = 1.0 if seq_len is None else 1.0 + seq_len / 8
        return shift * raw_t / (1 + (shift - 1) * raw_t)


def test_compat_policy_is_the_public_interface():
    from gmkernels.compat.piflow import GMFlowPolicy as CompatPolicy

    shape = ((3,), 4, 2, 3, 2)
    gm, x = make_gm(shape, 13, dead=True), make_state(shape, 13)
    sigma_src = torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64)
    pol = CompatPolicy(gm, x, sigma_src, checkpointing=True, eps=1e-6)
    assert pol.ndim == 4 and pol.sigma_t_src.shape == (3, 1, 1, 1) and pol.x_t_src is x
    x0 = pol.denoising_output_x_0
    assert torch.allclose(x0["means"], x.unsqueeze(1) - sigma_src.view(3, 1, 1, 1, 1) * gm["means"])
    assert torch.allclose(x0["gm_vars"].flatten(), torch.exp(2 * gm["logstds"]).flatten() * sigma_src**2)
    sampler = DynamicShiftSampler()
    r0 = torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64)
    r1 = torch.tensor([0.2, 0.0, 0.45], dtype=torch.float64)
    sig0 = sampler.warp_t(r0, seq_len=6).view(3, 1, 1, 1)
    x_end, s_end, t_end = pol.integrate(x, sig0, r0, r1, sampler, seq_len=6, total_substeps=16)
    x_ll, s_ll = lakonlab_loop(pol, x, sig0.flatten(), r0, r1, lambda r: sampler.warp_t(r, seq_len=6), 16)
    assert rel_err(x_end, x_ll) < 1e-12
    assert s_end.shape == (3, 1, 1, 1) and torch.allclose(s_end.flatten(), s_ll)
    assert torch.allclose(t_end, s_ll * 1000)
    assert rel_err(pol.pi(x, sig0), GMFlowPolicy(gm, x, sigma_src).pi(x, sig0.flatten())) == 0
    for derived in (pol.copy(), pol.detach(), pol.temperature(0.5), pol.dropout(0.5)):
        assert type(derived) is CompatPolicy and derived.ndim == 4
    assert torch.allclose(pol.temperature(temp=0.5).gm_vars, pol.gm_vars * 0.5)


# ----------------------------------------------------------------------------- the fused kernels


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
    return (
        gm,
        x,
        GMFlowPolicy(gm, x, sig_src),
        GMFlowPolicy({k: v.double() for k, v in gm.items()}, x.double(), sig_src.double()),
    )


def streamed(enabled: bool):
    """Force the K-streamed rollout (GM re-read per substep) on small shapes (the block function
    is a key of the stored launch plans, so the patched one plans anew)."""
    if not enabled:
        return contextlib.nullcontext()
    return mock.patch.object(ops, "_blocks", functools.partial(ops._blocks, one_tile_kc=1))


@pytest.mark.triton
@settings(max_examples=25)
@given(
    shape=cases(),
    seed=seeds,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dead=st.booleans(),
    frac=st.floats(0.05, 1.0),
    big_k=st.booleans(),
)
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
@given(
    shape=cases(),
    seed=seeds,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dead=st.booleans(),
    n=st.integers(1, 10),
    shift=st.sampled_from([1.0, 3.0]),
    stream=st.booleans(),
    temp=st.sampled_from([1.0, 0.7]),
)
def test_rollout_kernel_matches_reference(shape, seed, dtype, dead, n, shift, stream, temp):
    B = shape[0][0]
    g = torch.Generator().manual_seed(seed)
    r0 = torch.rand(B, generator=g) * 0.9 + 0.1
    r1 = r0 * torch.rand(B, generator=g) * torch.randint(0, 2, (B,), generator=g)  # some end at 0
    sig0 = shift * r0 / (1 + (shift - 1) * r0)
    gm, x, pol, pol64 = build(shape, seed, dtype, dead, sig0)
    pol, pol64 = pol.temperature(temp), pol64.temperature(temp)
    want, s_want, _ = pol64.integrate(
        x.double(), sig0.double(), r0.double(), r1.double(), shift=shift, total_substeps=n
    )
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


@pytest.mark.triton
def test_int64_offsets():
    """The 64-bit offset path of every policy kernel (forced: the int64 predicate is a key of
    the stored plans) gives the 32-bit path's values and gradients."""
    shape = ((2,), 4, 3, 3, 2)
    gm = make_gm(shape, 14, dtype=torch.float32, dead=True)
    x = make_state(shape, 14, dtype=torch.float32)

    def run():
        g = {k: v.clone().requires_grad_() for k, v in gm.items()}
        pol = GMFlowPolicy(g, x, 0.8)
        out = pol.integrate(x, 0.8, 0.8, 0.1, total_substeps=5)[0]
        u = pol.pi(x * 0.9, 0.4)
        return out, u, *torch.autograd.grad((out.square().sum(), u.sum()), list(g.values()))

    with gmkernels.use_backend("triton"):
        assert_int64_offsets_change_nothing(run, ops)


def _policy_args(shape, seed, grad: bool):
    """The validated arguments of the policy ops for a float32 GM of ``shape``: ``means_u,
    gm_vars, logweights, x_src, sigma_src``, a state ``x``, a sigma ``(B,)`` and a sigma table
    ``(B, 5)``."""
    gm = make_gm(shape, seed, dtype=torch.float32, dead=True)
    x = make_state(shape, seed, dtype=torch.float32)
    pol = GMFlowPolicy(gm, x, torch.linspace(0.9, 0.6, shape[0][0]))
    B = shape[0][0]
    sigmas = torch.linspace(0.9, 0.1, 5).expand(B, 5).contiguous()
    gm_args = [t.detach().clone().requires_grad_(grad) for t in (pol.means_u, pol.gm_vars, pol.logweights, pol.x_src)]
    return (*gm_args, pol.sigma_src, (x * 0.9).requires_grad_(grad), pol.sigma_src * 0.5, sigmas)


@pytest.mark.triton
def test_policy_custom_ops_opcheck():
    """Schema, fake tensors and autograd registration of the policy's torch.library ops (the
    velocity, the rollout with and without its checkpoints, and both backward ops)."""
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    means_u, gm_vars, logweights, x_src, sigma_src, x, sigma, sigmas = _policy_args(((2,), 3, 2, 2, 3), 15, True)
    gm = (means_u, gm_vars, logweights, x_src, sigma_src)
    with gmkernels.use_backend("triton"):
        torch.library.opcheck(torch.ops.gmkernels.policy_pi, (*gm, x, sigma, 1e-6), test_utils=utils)
        for save in (True, False):
            torch.library.opcheck(torch.ops.gmkernels.policy_rollout, (*gm, x, sigmas, 1e-6, save), test_utils=utils)
        plain = [t.detach() for t in (*gm, x)]
        g = torch.randn_like(x)
        torch.library.opcheck(torch.ops.gmkernels.policy_pi_backward, (g, *plain, sigma, 1e-6), test_utils=utils[:2])
        _, ck = ops._launch_rollout(*plain, sigmas, 1e-6, True)
        torch.library.opcheck(
            torch.ops.gmkernels.policy_rollout_backward, (g, *plain, sigmas, ck, 1e-6), test_utils=utils[:2]
        )


@pytest.mark.triton
def test_policy_compiles_with_fullgraph_forward_and_backward():
    """``torch.compile(fullgraph=True, backend="aot_eager")`` of ``GMFlowPolicy.pi`` and of a
    training rollout on the Triton path: no graph break, the backward graph runs the fused
    backward kernel, and values and gradients are the eager ones."""
    shape = ((2,), 3, 2, 2, 3)
    gm = make_gm(shape, 16, dtype=torch.float32, dead=True)
    x = make_state(shape, 16, dtype=torch.float32)
    sigma_src = torch.tensor([0.9, 0.7])

    def pi(means, logstds, logweights, x):
        pol = GMFlowPolicy({"means": means, "logstds": logstds, "logweights": logweights}, x, sigma_src)
        return pol.pi(x * 0.9, sigma_src * 0.5)

    def rollout(means, logstds, logweights, x):
        pol = GMFlowPolicy({"means": means, "logstds": logstds, "logweights": logweights}, x, sigma_src)
        return pol.integrate(x, sigma_src, sigma_src, sigma_src * 0.3, shift=2.0, total_substeps=6)[0]

    def value_and_grads(fn):
        leaves = [gm[k].clone().requires_grad_() for k in ("means", "logstds", "logweights")] + [
            x.clone().requires_grad_()
        ]
        out = fn(*leaves)
        return out.detach(), *torch.autograd.grad(out.square().sum(), leaves)

    with gmkernels.use_backend("triton"):
        assert_compiled_training_matches_eager((pi, rollout), value_and_grads, ops, "_launch_backward")
