"""The fused sampler-step kernels against their reference twins (``reference/solver_steps.py``),
their random streams, and the twins against the unfused public ops they stand for."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import TOL, gm_shapes, make_gm, make_state, rel_err, seeds

import gmkernels
import reference
import reference.solver_steps as ref
from gmkernels.ops import solver_steps as ops
from reference.transition import transition_coefficients

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _randn_pair_kernel(seed_ptr, a_ptr, b_ptr, n, BLOCK: tl.constexpr):
        off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr)
        tl.store(a_ptr + off, tl.randn(seed, off), mask=off < n)
        tl.store(b_ptr + off, ops._philox_randn(seed, off), mask=off < n)


def f64(gm):
    return {k: v.double() for k, v in gm.items()}


@st.composite
def sigma_lists(draw, max_n=4):
    """``N + 1`` non-increasing levels in (0, 1], the last one possibly 0."""
    n = draw(st.integers(1, max_n))
    vals = sorted((draw(st.floats(1e-3, 1.0)) for _ in range(n + 1)), reverse=True)
    if draw(st.booleans()):
        vals[-1] = 0.0
    return vals


# ----------------------------------------------------------------------------- reference twins


def test_ode_twin_is_the_loop_of_spec_ops():
    """Substep 0 = gm_to_mean, substep j = gm_posterior_mean from the base state, Euler each time."""
    shape = ((2,), 3, 2, 2, 3)
    gm, x = make_gm(shape, 0), make_state(shape, 0)
    sig = [0.9, 0.7, 0.4, 0.1]
    xs = x
    for j in range(3):
        x0 = reference.gm_to_mean(gm) if j == 0 else reference.gm_posterior_mean(gm, x, sig[0], xs, sig[j])
        xs = xs + (xs - x0) / sig[j] * (sig[j + 1] - sig[j])
    assert rel_err(ref.gm_ode_substeps(gm, x, sig), xs) < 1e-12


def test_sde_twin_is_gm_sample_then_transition_in_distribution():
    """Mean and variance of the merged-noise step equal those of ``x0 ~ gm_sample`` followed by
    ``c1 x + c2 x0 + sqrt(c3) z``: ``c1 x + c2 E[x0]`` and ``c2^2 Var[x0] + c3``."""
    shape = ((), 3, 1, 1, 1)
    gm = make_gm(shape, 4)
    n = 200_000
    gmn = {k: v.expand(n, *v.shape).contiguous() for k, v in gm.items()}
    x = torch.full((n, 1, 1, 1), 0.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64)
    z = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    out = ref.gm_sde_step(gmn, x, 0.7, 0.4, u, z)
    c1, c2, c3 = transition_coefficients(0.7, 0.4)
    iso = reference.gm_to_iso_gaussian(gm)
    mean = c1 * 0.3 + c2 * float(iso["mean"])
    var = c2 * c2 * float(iso["var"]) + c3
    assert abs(float(out.mean()) - mean) < 5 * (var / n) ** 0.5
    assert abs(float(out.var()) / var - 1) < 0.02


def test_select_components_never_picks_dead_and_matches_weights():
    lw = torch.log(torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2], dtype=torch.float64)).view(1, 5, 1, 1, 1)
    u = torch.rand(50_000, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    idx = ref.select_components(lw.expand(50_000, 5, 1, 1, 1), u).view(-1)
    freq = torch.bincount(idx, minlength=5).double() / idx.numel()
    assert freq[0] == 0 and freq[2] == 0
    assert torch.allclose(freq, torch.tensor([0, 0.5, 0, 0.3, 0.2], dtype=torch.float64), atol=0.01)
    # u at the top of [0, 1): the target can round past the CDF's end -> last live component
    top = ref.select_components(lw, torch.full((1, 1, 1, 1), 1 - 1e-17, dtype=torch.float64))
    assert int(top) in (3, 4)


# ----------------------------------------------------------------------------- kernels == twins


@pytest.mark.triton
@settings(max_examples=8)
@given(shape=gm_shapes(max_k=40, max_c=9, max_hw=5), seed=seeds, sigmas=sigma_lists(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), dead=st.booleans(), per_pixel=st.booleans())
def test_ode_kernel_matches_reference(shape, seed, sigmas, dtype, dead, per_pixel):
    gm = make_gm(shape, seed, dtype, dead=dead, per_pixel_std=per_pixel)
    x = make_state(shape, seed, dtype)
    with gmkernels.use_backend("triton"):
        out = gmkernels.gm_ode_substeps(gm, x, sigmas)
    assert out.dtype == dtype and out.shape == x.shape
    expect = ref.gm_ode_substeps(f64(gm), x.double(), sigmas)
    assert rel_err(out, expect) < TOL[dtype]


@pytest.mark.triton
@pytest.mark.parametrize("K,C,per_pixel,path", [(8, 4, False, "registers"), (2, 40, False, "registers"), (70, 3, False, "wide"),
                                                 (9, 40, False, "wide"), (70, 3, True, "wide"), (300, 5, False, "streamed")])
def test_ode_kernel_every_register_path_noncontiguous(K, C, per_pixel, path):
    """All K in one thread's registers, the GM spread over a program's threads, and K streamed
    in tiles; strided (non-contiguous) GM and state."""
    if path == "registers" and C > 16 and ops._SPLIT_K1:  # triton < 3.9: channel splits stream K one at a time
        path = "wide"
    assert ops.ode_path(K, C, 6) == path
    gm = make_gm(((2,), K, C, 2, 3), 11, torch.float32, dead=True, per_pixel_std=per_pixel)
    gm = {k: v.transpose(-1, -2) for k, v in gm.items()}
    x = make_state(((2,), K, C, 2, 3), 11, torch.float32).transpose(-1, -2)
    assert not gm["means"].is_contiguous() and not x.is_contiguous() and x.shape == (2, C, 3, 2)
    sig = torch.tensor([0.8, 0.6, 0.5, 0.2, 0.0])
    with gmkernels.use_backend("triton"):
        out = gmkernels.gm_ode_substeps(gm, x, sig)
    assert rel_err(out, ref.gm_ode_substeps(f64(gm), x.double(), sig.double().tolist())) < TOL[torch.float32]


@pytest.mark.triton
@settings(max_examples=8)
@given(shape=gm_shapes(max_k=40, max_c=9, max_hw=5), seed=seeds, dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       dead=st.booleans(), per_pixel=st.booleans(), power=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
       sig=st.tuples(st.floats(1e-3, 1.0), st.floats(0.0, 1.0)))
def test_sde_kernel_matches_reference_at_given_noise(shape, seed, dtype, dead, per_pixel, power, sig):
    sigma, sigma_next = sig[0], sig[0] * sig[1]
    batch, K, C, H, W = shape
    gm = make_gm(shape, seed, dtype, dead=dead, per_pixel_std=per_pixel)
    x = make_state(shape, seed, dtype)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((*batch, 1, H, W), generator=g)
    z = torch.randn((*batch, C, H, W), generator=g)
    c1, c2, c3 = transition_coefficients(sigma, sigma_next, 1e-6)
    with gmkernels.use_backend("triton"):
        out = ops._launch_sde(gm["means"], gm["logstds"], gm["logweights"], x, None, u, z, c1, c2, c3, power)
    expect = ref.gm_sde_step(f64(gm), x.double(), sigma, sigma_next, u.double(), z.double(), power)
    assert out.dtype == dtype
    assert rel_err(out, expect) < TOL[dtype]


@pytest.mark.triton
def test_sde_kernel_philox_same_seed_same_samples_and_moments():
    """Seeded from the generator: same seed -> identical samples, another seed -> others; the
    Philox draws have the transition's mean and variance, and no dead component is ever drawn."""
    K, C, H, W = 5, 2, 16, 16
    base = make_gm(((), K, C, 1, 1), 3, torch.float32)
    lw = torch.log(torch.tensor([0.0, 0.4, 0.0, 0.35, 0.25])).view(K, 1, 1, 1)
    gm = {"means": base["means"].expand(4, K, C, H, W), "logstds": torch.full((4, 1, 1, 1, 1), -30.0),
          "logweights": lw.expand(4, K, 1, H, W)}
    x = torch.zeros(4, C, H, W)
    with gmkernels.use_backend("triton"):
        a = gmkernels.gm_sde_step(gm, x, 0.5, 0.0, generator=torch.Generator().manual_seed(7))
        b = gmkernels.gm_sde_step(gm, x, 0.5, 0.0, generator=torch.Generator().manual_seed(7))
        c = gmkernels.gm_sde_step(gm, x, 0.5, 0.0, generator=torch.Generator().manual_seed(8))
        noisy = gmkernels.gm_sde_step({**gm, "logstds": torch.zeros(4, 1, 1, 1, 1)}, x + 1, 0.6, 0.3,
                                      generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # sigma_next = 0 and a negligible std: each output is one component's mean, never a dead one
    dist = (a.unsqueeze(1) - base["means"].view(1, K, C, 1, 1)).abs().amax(2)  # (4, K, H, W)
    idx = dist.argmin(1)
    assert float(dist.amin(1).max()) < 1e-5
    freq = torch.bincount(idx.view(-1), minlength=K).double() / idx.numel()
    assert freq[0] == 0 and freq[2] == 0
    assert torch.allclose(freq, torch.tensor([0, 0.4, 0, 0.35, 0.25], dtype=torch.float64), atol=0.05)
    # the full transition: moments of c1 x + c2 x0 + sqrt(c3) z
    c1, c2, c3 = transition_coefficients(0.6, 0.3)
    iso = reference.gm_to_iso_gaussian({**f64(base), "logstds": torch.zeros(1, 1, 1, 1, dtype=torch.float64),
                                        "logweights": lw.double()})
    n = noisy.shape[0] * H * W
    mean = c1 + c2 * iso["mean"].view(C)
    var = c2 * c2 * float(iso["var"]) + c3
    got = noisy.permute(1, 0, 2, 3).reshape(C, -1).double()
    assert torch.all((got.mean(1) - mean).abs() < 5 * (var / n) ** 0.5)
    assert torch.all((got.var(1) / var - 1).abs() < 0.15)


@pytest.mark.triton
@settings(max_examples=30)
@given(B=st.integers(1, 5), npb=st.sampled_from([1, 2, 3, 40]), HW=st.integers(1, 300), C=st.integers(1, 16),
       guidance=st.sampled_from(["none", "probabilistic", "weight", "mean-cfg"]), order2=st.booleans(), mode2=st.booleans(),
       amount=st.sampled_from([0.0, 1.0, 0.3]), scale=st.floats(0.05, 0.95), h=st.floats(0.01, 0.2), h_prev=st.floats(0.01, 0.2),
       seed=seeds)  # fmt: skip
def test_step_coefficient_kernel_matches_its_twin(B, npb, HW, C, guidance, order2, mode2, amount, scale, h, h_prev, seed):
    """The fused step's per-sample coefficients (float64 sums of the statistics partials, then the
    guidance and 2nd-order formulas) equal their torch twin, every entry it writes, and leave the
    others as they were."""
    prob, meancfg = guidance == "probabilistic", guidance == "mean-cfg"
    bias_pass = order2 and (prob or (meancfg and amount > 0))
    assume(prob or meancfg or order2)  # the step launches no statistics pass otherwise
    mode = 2 if mode2 and bias_pass else 1
    g = torch.Generator().manual_seed(seed)
    stats = torch.rand(B * npb, 8, generator=g) * torch.tensor([3.0, 1.0, 2.0, 1.5, 0.2, 0.3, 0, 0])
    stats[:, 1] -= 0.5  # <d, m_c> of either sign
    coef = torch.randn(B, ops._NCOEF, generator=g)
    kw = dict(uncond=prob or meancfg, meancfg=meancfg, prob=prob, order2=order2, bias_pass=bias_pass,
              amount=amount if (prob or meancfg) else 0.0, scale=scale, h=h, h_prev=h_prev)  # fmt: skip
    want = ref.step_coefficients(stats, coef, npb, HW, C, mode, **kw, ca=ops.CA, cb=ops.CB, rho_min=ops.RHO_MIN)
    got = coef.clone()
    with gmkernels.use_backend("triton"):
        ops._launch_step_coefficients(stats, got, npb, HW, C, mode, **kw)
    changed = (want != coef).any(0)
    for col in changed.nonzero().flatten().tolist():  # each entry on its own scale
        assert rel_err(got[:, col], want[:, col]) < TOL[torch.float32], col
    assert torch.equal(got[:, ~changed], coef[:, ~changed])


@pytest.mark.triton
@pytest.mark.parametrize("seed", [0, 12345, 2**61 + 7])
def test_philox_randn_is_tl_randn_to_an_ulp(seed):
    """The kernels' normal draw (its own cosine, no local memory) is ``tl.randn`` of the same
    seed and offset up to rounding: every quadrant of the Box-Muller angle, the tails included."""
    n = 1 << 14
    a, b = torch.empty(n), torch.empty(n)
    _randn_pair_kernel[(n // 1024,)](torch.tensor([seed]), a, b, n, BLOCK=1024)
    assert torch.all((a - b).abs() <= 1e-6 * a.abs().clamp_min(1.0))
    assert a.abs().max() > 3.0 and (a > 0).float().mean().sub(0.5).abs() < 0.02


def test_torch_path_same_seed_same_samples():
    shape = ((3,), 4, 2, 3, 3)
    gm, x = make_gm(shape, 2, torch.float32), make_state(shape, 2, torch.float32)
    a = gmkernels.gm_sde_step(gm, x, 0.8, 0.5, generator=torch.Generator().manual_seed(1))
    b = gmkernels.gm_sde_step(gm, x, 0.8, 0.5, generator=torch.Generator().manual_seed(1))
    c = gmkernels.gm_sde_step(gm, x, 0.8, 0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.triton
@pytest.mark.parametrize("logstd", [-40.0, 40.0])
def test_kernels_finite_for_extreme_stds(logstd):
    shape = ((2,), 4, 3, 2, 2)
    gm = make_gm(shape, 5, torch.float32, dead=True)
    gm["logstds"] = torch.full_like(gm["logstds"], logstd)
    x = make_state(shape, 5, torch.float32)
    with gmkernels.use_backend("triton"):
        ode = gmkernels.gm_ode_substeps(gm, x, [0.9, 0.5, 0.2, 0.0])
        sde = gmkernels.gm_sde_step(gm, x, 0.9, 0.5, generator=torch.Generator().manual_seed(0))
    assert ode.isfinite().all() and sde.isfinite().all()
    assert rel_err(ode, ref.gm_ode_substeps(f64(gm), x.double(), [0.9, 0.5, 0.2, 0.0])) < TOL[torch.float32]


# ----------------------------------------------------------------------------- API


def test_ops_pass_opcheck_on_cpu():
    shape = ((2,), 3, 2, 2, 2)
    gm, x = make_gm(shape, 1, torch.float32), make_state(shape, 1, torch.float32)
    args = (gm["means"], gm["logstds"], gm["logweights"], x)
    torch.library.opcheck(torch.ops.gmkernels.gm_ode_substeps, (*args, torch.tensor([0.9, 0.6, 0.3]), 1e-6))
    torch.library.opcheck(torch.ops.gmkernels.gm_sde_step, (*args, torch.tensor([123]), 0.9, 0.6, 1.0, 1e-6))


def test_bad_input_names_the_argument():
    shape = ((2,), 3, 2, 2, 2)
    gm, x = make_gm(shape, 1, torch.float32), make_state(shape, 1, torch.float32)
    with pytest.raises(ValueError, match="x must have shape"):
        gmkernels.gm_ode_substeps(gm, x[:1], [0.5, 0.2])
    with pytest.raises(ValueError, match="sigmas"):
        gmkernels.gm_ode_substeps(gm, x, [0.5])
    with pytest.raises(ValueError, match="non-increasing"):
        gmkernels.gm_ode_substeps(gm, x, [0.2, 0.5])
    with pytest.raises(ValueError, match=r"sigmas\[1\]"):
        gmkernels.gm_ode_substeps(gm, x, [0.5, -0.1])
    with pytest.raises(ValueError, match="1-D tensor"):
        gmkernels.gm_ode_substeps(gm, x, torch.ones(2, 2))
    with pytest.raises(TypeError, match="sigma must be a Python float"):
        gmkernels.gm_sde_step(gm, x, torch.tensor(0.5), 0.2)
    with pytest.raises(ValueError, match="must not exceed"):
        gmkernels.gm_sde_step(gm, x, 0.2, 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        gmkernels.gm_sde_step(gm, x.long(), 0.5, 0.2)


# ----------------------------------------------------------------------------- fused sampler step

GUIDED = [("none", 0.0), ("probabilistic", 0.6), ("weight", 2.5), ("mean-cfg", 2.0)]


def _run_sampler(gms, x, solver, order, guidance, scale, orthogonal, fused, backend, seed=0):
    """Two main steps (the second one 2nd order when ``order == 2``) of ``gmkernels.sample``
    with the network outputs ``gms`` (one per step), on the given backend and path."""
    calls = iter(gms)
    cls = gmkernels.schedulers.SCHEDULERS[solver]
    old, cls.fused = cls.fused, fused
    try:
        with gmkernels.use_backend(backend):
            return gmkernels.sample(lambda x_t, t: next(calls), x, len(gms), solver=solver, substeps=3 if solver == "gm-ode" else 1,
                                    order=order, guidance="probabilistic" if guidance == "none" else guidance,
                                    guidance_scale=scale, orthogonal=orthogonal, shift=1.5,
                                    generator=torch.Generator().manual_seed(seed))
    finally:
        cls.fused = old


def _outputs(shape, seed, dtype, dead, per_pixel, guided, K_uncond=None):
    """Two network outputs; a pair's components die together when their K match (weight
    guidance needs corresponding components: one dead only in ``gm_uncond`` gets a log-weight
    of ``+1e30``-scale, where no float32 evaluation resolves the others)."""
    out = []
    for i in range(2):
        cond = make_gm(shape, seed + i, dtype, dead=dead, per_pixel_std=per_pixel, logstd_range=(-2.0, 0.5))
        if guided:
            ushape = shape if K_uncond is None else (shape[0], K_uncond, *shape[2:])
            uncond = make_gm(ushape, seed + 100 + i, dtype, dead=dead and K_uncond is not None, per_pixel_std=per_pixel,
                             logstd_range=(-2.0, 0.5))
            if K_uncond is None:
                lw = torch.where(cond["logweights"] == float("-inf"), float("-inf"), uncond["logweights"].float())
                uncond["logweights"] = torch.log_softmax(lw, dim=-4).to(dtype)
            cond = (cond, uncond)
        out.append(cond)
    return out


@pytest.mark.triton
@settings(max_examples=10)
@given(shape=gm_shapes(max_k=24, max_c=5, max_hw=4, max_b=2), seed=seeds, dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       dead=st.booleans(), per_pixel=st.booleans(), order=st.sampled_from([1, 2]), guided=st.sampled_from(GUIDED),
       orthogonal=st.sampled_from([0.0, 1.0]))
def test_fused_ode_step_matches_eager_reference(shape, seed, dtype, dead, per_pixel, order, guided, orthogonal):
    """The fused GM-ODE sampler step (network GM in its own dtype, nothing GM-sized formed)
    against the eager composition of the public ops in float64 on the torch path. The network's
    values are the same in both (bf16 ones are exact in float64), so fp32 accuracy applies."""
    guidance, scale = guided
    _, _, C, H, W = shape
    assume(orthogonal == 0 or scale == 0 or C * H * W >= 3)  # else the orthogonal residual is pure rounding
    assert_fused_ode_matches_eager(shape, seed, dtype, dead, per_pixel, order, guidance, scale, orthogonal)


def assert_fused_ode_matches_eager(shape, seed, dtype, dead, per_pixel, order, guidance, scale, orthogonal):
    """Two fused GM-ODE sampler steps on ``_outputs(shape, ...)`` equal the eager float64
    composition on the torch path to float32 accuracy."""
    gms = _outputs(shape, seed, dtype, dead, per_pixel, scale > 0)
    x = make_state(shape, seed).float()
    out = _run_sampler(gms, x, "gm-ode", order, guidance, scale, orthogonal, True, "triton")
    g64 = [tuple(f64(g) for g in o) if isinstance(o, tuple) else f64(o) for o in gms]
    expect = _run_sampler(g64, x.double(), "gm-ode", order, guidance, scale, orthogonal, False, "torch")
    assert out.dtype == torch.float32 and out.isfinite().all()
    assert rel_err(out, expect) < TOL[torch.float32]


@pytest.mark.triton
@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_ode_step_of_a_wide_gm_matches_eager_reference(per_pixel, dtype):
    """The plain first-order GM-ODE sampler step of a GM past one thread's registers runs on the
    rollout kernel with the u -> x0 map applied as it loads (``ode_path`` "wide")."""
    shape = ((2,), 40, 3, 2, 3)
    assert ops.ode_path(40, 3, 6) == "wide"
    gms = _outputs(shape, 5, dtype, True, per_pixel, False)
    x = make_state(shape, 5).float()
    out = _run_sampler(gms, x, "gm-ode", 1, "none", 0.0, 0.0, True, "triton")
    expect = _run_sampler([f64(g) for g in gms], x.double(), "gm-ode", 1, "none", 0.0, 0.0, False, "torch")
    assert out.dtype == torch.float32 and rel_err(out, expect) < TOL[torch.float32]


@pytest.mark.triton
@pytest.mark.parametrize("k1", [False, True])
@pytest.mark.parametrize("solver,order,guided", [("gm-ode", 2, GUIDED[1]), ("gm-ode", 1, GUIDED[0]), ("gm-sde", 2, GUIDED[3])])
def test_fused_step_channel_split_layouts(k1, solver, order, guided, monkeypatch):
    """C = 20: channels over the warps, K in tiles (5 components, dead ones included; streamed in
    the heavy steps) or, as on triton < 3.9 (``_SPLIT_K1``), one component at a time; both equal
    the eager path."""
    monkeypatch.setattr(ops, "_SPLIT_K1", k1)
    ops._fused_blocks.cache_clear()
    try:
        guidance, scale = guided
        shape = ((1,), 5, 20, 2, 3)
        bk = ops._fused_blocks(5, 20, 6, solver == "gm-sde", heavy=order == 2 or scale > 0)[0]
        assert bk == 1 if k1 else bk > 1
        gms = _outputs(shape, 7, torch.float32, True, False, scale > 0, K_uncond=4 if scale > 0 else None)
        x = make_state(shape, 7).float()
        out = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, True, "triton", seed=3)
        if solver == "gm-sde":  # the same Philox stream as gm_sde_step
            expect = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, False, "triton", seed=3)
        else:
            g64 = [tuple(f64(g) for g in o) if isinstance(o, tuple) else f64(o) for o in gms]
            expect = _run_sampler(g64, x.double(), solver, order, guidance, scale, 1.0, False, "torch")
        assert out.isfinite().all() and rel_err(out, expect) < TOL[torch.float32]
    finally:
        ops._fused_blocks.cache_clear()


@pytest.mark.triton
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("guided", GUIDED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sde_step_matches_eager_composition(order, guided, dtype):
    """The fused GM-SDE step draws the same Philox stream as ``gm_sde_step`` (whose kernel is
    tested against its reference above), so it equals the eager composition of Triton ops."""
    guidance, scale = guided
    shape = ((2,), 5, 3, 3, 2)
    gms = _outputs(shape, 5, dtype, True, False, scale > 0, K_uncond=4 if guidance != "weight" else None)
    x = make_state(shape, 5).float()
    out = _run_sampler(gms, x, "gm-sde", order, guidance, scale, 1.0, True, "triton", seed=9)
    expect = _run_sampler(gms, x, "gm-sde", order, guidance, scale, 1.0, False, "triton", seed=9)
    assert rel_err(out, expect) < TOL[torch.float32]
