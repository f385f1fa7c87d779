"""The solver steps (``gmkernels.ops.solver``): the kernels of ``gm_ode_substeps``, ``gm_sde_step``
and the sampler's fused step against their reference twins (``reference/solver_steps.py``) and
the eager composition of the public ops, their random streams, point data (``H = W = 1``, where
the launchers pack batch rows into a program's pixel lanes), gradients, ``torch.compile`` and
bad input."""

import contextlib

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import TOL, gm_shapes, make_gm, make_state, rel_err, seeds

import gmkernels
import reference
import reference.solver_steps as ref
from gmkernels.ops.solver import common, ode, sde, step
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
        tl.store(b_ptr + off, common.philox_randn(seed, off), mask=off < n)


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


class _StandIn:
    """Stands in for a solver kernel: records each launch's keyword arguments and runs it, or with
    ``unpack`` runs it unpacked instead, one batch row per program (``PACK=False``, grid ``(B,)``,
    the same blocks), as the launchers do where they do not pack point data."""

    def __init__(self, kernel, unpack: bool):
        self.kernel, self.unpack, self.calls = kernel, unpack, []

    @property
    def packed_launches(self) -> int:
        return sum(bool(kw.get("PACK")) for kw in self.calls)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            if self.unpack:
                B = args[self.kernel.arg_names.index("NPIX")]  # B * HW with HW = 1
                self.kernel[(B,)](*args, **{**kwargs, "PACK": False})
            else:
                self.kernel[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def _launches(*names: str, unpack: bool = False):
    """Within the block the named kernels of ``sde`` and ``step`` launch through ``_StandIn``s;
    yields the stand-in (a list of them for several names)."""
    with pytest.MonkeyPatch.context() as mp:
        stand_ins = []
        for name in names:
            module = sde if hasattr(sde, name) else step
            stand_ins.append(_StandIn(getattr(module, name), unpack))
            mp.setattr(module, name, stand_ins[-1])
        yield stand_ins[0] if len(names) == 1 else stand_ins


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
@given(
    shape=gm_shapes(max_k=40, max_c=9, max_hw=5),
    seed=seeds,
    sigmas=sigma_lists(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dead=st.booleans(),
    per_pixel=st.booleans(),
)
def test_ode_kernel_matches_reference(shape, seed, sigmas, dtype, dead, per_pixel):
    gm = make_gm(shape, seed, dtype, dead=dead, per_pixel_std=per_pixel)
    x = make_state(shape, seed, dtype)
    with gmkernels.use_backend("triton"):
        out = gmkernels.gm_ode_substeps(gm, x, sigmas)
    assert out.dtype == dtype and out.shape == x.shape
    expect = ref.gm_ode_substeps(f64(gm), x.double(), sigmas)
    assert rel_err(out, expect) < TOL[dtype]


@pytest.mark.triton
@pytest.mark.parametrize(
    "K,C,per_pixel,path",
    [
        (8, 4, False, "registers"),
        (2, 40, False, "registers"),
        (70, 3, False, "wide"),
        (9, 40, False, "wide"),
        (70, 3, True, "wide"),
        (300, 5, False, "streamed"),
    ],
)
def test_ode_kernel_every_register_path_noncontiguous(K, C, per_pixel, path):
    """All K in one thread's registers, the GM spread over a program's threads, and K streamed
    in tiles; strided (non-contiguous) GM and state."""
    if path == "registers" and C > 16 and common.SPLIT_K1:  # triton < 3.9: channel splits stream K one at a time
        path = "wide"
    assert ode.ode_path(K, C, 6) == path
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
@given(
    shape=gm_shapes(max_k=40, max_c=9, max_hw=5),
    seed=seeds,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dead=st.booleans(),
    per_pixel=st.booleans(),
    power=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    sig=st.tuples(st.floats(1e-3, 1.0), st.floats(0.0, 1.0)),
)
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
        out = sde._launch_sde(gm["means"], gm["logstds"], gm["logweights"], x, None, u, z, c1, c2, c3, power)
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
    gm = {
        "means": base["means"].expand(4, K, C, H, W),
        "logstds": torch.full((4, 1, 1, 1, 1), -30.0),
        "logweights": lw.expand(4, K, 1, H, W),
    }
    x = torch.zeros(4, C, H, W)
    with gmkernels.use_backend("triton"):
        a = gmkernels.gm_sde_step(gm, x, 0.5, 0.0, generator=torch.Generator().manual_seed(7))
        b = gmkernels.gm_sde_step(gm, x, 0.5, 0.0, generator=torch.Generator().manual_seed(7))
        c = gmkernels.gm_sde_step(gm, x, 0.5, 0.0, generator=torch.Generator().manual_seed(8))
        noisy = gmkernels.gm_sde_step(
            {**gm, "logstds": torch.zeros(4, 1, 1, 1, 1)}, x + 1, 0.6, 0.3, generator=torch.Generator().manual_seed(9)
        )
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
    iso = reference.gm_to_iso_gaussian(
        {**f64(base), "logstds": torch.zeros(1, 1, 1, 1, dtype=torch.float64), "logweights": lw.double()}
    )
    n = noisy.shape[0] * H * W
    mean = c1 + c2 * iso["mean"].view(C)
    var = c2 * c2 * float(iso["var"]) + c3
    got = noisy.permute(1, 0, 2, 3).reshape(C, -1).double()
    assert torch.all((got.mean(1) - mean).abs() < 5 * (var / n) ** 0.5)
    assert torch.all((got.var(1) / var - 1).abs() < 0.15)


@pytest.mark.triton
@settings(max_examples=30)
@given(
    B=st.integers(1, 5),
    npb=st.sampled_from([1, 2, 3, 40]),
    HW=st.integers(1, 300),
    C=st.integers(1, 16),
    guidance=st.sampled_from(["none", "probabilistic", "weight", "mean-cfg"]),
    order2=st.booleans(),
    mode2=st.booleans(),
    amount=st.sampled_from([0.0, 1.0, 0.3]),
    scale=st.floats(0.05, 0.95),
    h=st.floats(0.01, 0.2),
    h_prev=st.floats(0.01, 0.2),
    seed=seeds,
)
def test_step_coefficient_kernel_matches_its_twin(
    B, npb, HW, C, guidance, order2, mode2, amount, scale, h, h_prev, seed
):
    """The fused step's per-sample coefficients (float64 sums of the statistics partials, then the
    guidance and 2nd-order formulas) equal their torch twin, every entry it writes, and leave the
    others as they were."""
    prob, meancfg = guidance == "probabilistic", guidance == "mean-cfg"
    bias_pass = order2 and (prob or (meancfg and amount > 0))
    assume(prob or meancfg or order2)  # the step launches no statistics pass otherwise
    mode = 2 if mode2 and bias_pass else 1
    g = torch.Generator().manual_seed(seed)
    stats = torch.rand(B * npb, ref.N_STAT, generator=g) * torch.tensor([3.0, 1.0, 2.0, 1.5, 0.2, 0.3])
    stats[:, 1] -= 0.5  # <d, m_c> of either sign
    coef = torch.randn(B, ref.N_COEF, generator=g)
    amount = amount if (prob or meancfg) else 0.0
    kw = dict(
        uncond=prob or meancfg,
        meancfg=meancfg,
        prob=prob,
        order2=order2,
        bias_pass=bias_pass,
        amount=amount,
        scale=scale,
        h=h,
        h_prev=h_prev,
    )
    want = ref.step_coefficients(stats, coef, npb, HW, C, mode, **kw)
    got = coef.clone()
    block_r = min(1 << (B - 1).bit_length(), 64)
    step._step_coef_kernel[(1,)](
        stats,
        got,
        B,
        npb,
        HW,
        C * HW,
        *step._coef_scalars(guidance, order2, amount, scale, h, h_prev),
        MODE=mode,
        GUIDANCE=guidance,
        ORDER2=order2,
        BIAS_PASS=bias_pass,
        BLOCK_R=block_r,
        BLOCK_N=4,
    )
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


@pytest.mark.triton
def test_ops_pass_opcheck_on_cpu():
    shape = ((2,), 3, 2, 2, 2)
    gm, x = make_gm(shape, 1, torch.float32), make_state(shape, 1, torch.float32)
    args = (gm["means"], gm["logstds"], gm["logweights"], x)
    torch.library.opcheck(torch.ops.gmkernels.gm_ode_substeps, (*args, torch.tensor([0.9, 0.6, 0.3]), 1e-6))
    torch.library.opcheck(torch.ops.gmkernels.gm_sde_step, (*args, torch.tensor([123]), 0.9, 0.6, 1.0, 1e-6))
    u = make_gm(shape, 2, torch.bfloat16)
    sig, seed, prev = torch.tensor([0.9, 0.7, 0.6]), torch.tensor([5]), make_state(shape, 3, torch.float32)
    m, ls, lw = gm["means"], gm["logstds"], gm["logweights"]
    for step_args in [
        (m, ls, lw, None, None, x, sig, None, None, "none", False, 0.0, 0.0, 0.3, 0.0, 0.9, 0.6, 1e-6),
        (
            m,
            ls,
            lw,
            u["means"],
            u["logweights"],
            x,
            sig,
            prev,
            None,
            "probabilistic",
            True,
            0.5,
            1.0,
            0.3,
            0.2,
            0.9,
            0.6,
            1e-6,
        ),
        (
            m,
            ls,
            lw,
            u["means"],
            u["logweights"],
            x,
            sig[:2],
            prev,
            seed,
            "weight",
            False,
            2.0,
            0.0,
            0.3,
            0.2,
            0.9,
            0.7,
            1e-6,
        ),
    ]:
        torch.library.opcheck(torch.ops.gmkernels.fused_step, step_args)


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


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
def test_inputs_that_need_a_gradient_take_the_differentiable_path(backend):
    """Inputs that need a gradient run the reference on either backend (the kernels have no
    backward): the gradients are the torch path's, and the values too."""
    shape = ((2,), 3, 2, 2, 3)
    gm, x = make_gm(shape, 6, torch.float32, per_pixel_std=True), make_state(shape, 6, torch.float32)
    grads = {}
    for be in (backend, "torch"):
        leaves = {k: v.clone().requires_grad_() for k, v in gm.items()}
        xl = x.clone().requires_grad_()
        with gmkernels.use_backend(be):
            ode_out = gmkernels.gm_ode_substeps(leaves, xl, [0.9, 0.6, 0.2])
            sde_out = gmkernels.gm_sde_step(leaves, xl, 0.8, 0.4, generator=torch.Generator().manual_seed(3))
        (ode_out.square().sum() + sde_out.square().sum()).backward()
        grads[be] = [ode_out.detach(), sde_out.detach(), xl.grad, *(v.grad for v in leaves.values())]
    for got, want in zip(grads[backend], grads["torch"]):
        assert got is not None and torch.equal(got, want)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
@pytest.mark.parametrize("generator", [42, "numpy"])
def test_a_seed_or_foreign_generator_is_a_clear_type_error_on_every_path(backend, generator):
    """``generator=42`` (or a numpy generator) in ``gm_sde_step``, a scheduler step of either
    solver and ``sample``: one TypeError, on both backends."""
    if generator == "numpy":
        generator = pytest.importorskip("numpy").random.default_rng(0)
    shape = ((2,), 3, 2, 2, 2)
    gm, x = make_gm(shape, 1, torch.float32), make_state(shape, 1, torch.float32)
    message = r"generator must be a torch.Generator or None, got"
    with gmkernels.use_backend(backend):
        with pytest.raises(TypeError, match=message):
            gmkernels.gm_sde_step(gm, x, 0.5, 0.3, generator=generator)
        for solver in ("gm-sde", "gm-ode"):
            sched = gmkernels.schedulers.SCHEDULERS[solver]()
            sched.set_timesteps(2)
            with pytest.raises(TypeError, match=message):
                sched.step(gm, sched.timesteps[0], x, generator=generator)
            with pytest.raises(TypeError, match=message):
                gmkernels.sample(lambda x_t, t: gm, x, 2, solver=solver, generator=generator)


def _bad_outputs():
    """Denoisers whose output does not fit the state ``(2, 2, 2, 2)``, with the error they must
    raise (at step 1, t = 500 of a 2-step schedule: the first output is good)."""
    shape = ((2,), 3, 2, 2, 2)
    good = make_gm(shape, 1, torch.float32)
    wrong_c = make_gm(((2,), 3, 3, 2, 2), 1, torch.float32)
    wrong_b = make_gm(((3,), 3, 2, 2, 2), 1, torch.float32)
    no_means = {k: v for k, v in good.items() if k != "means"}
    bad_ls = {**good, "logstds": good["logstds"][:1]}
    at = r"^the denoiser's output at step 1 \(t=500\): "
    return [
        ("no means", no_means, 0.0, ValueError, at + r"gm_u is missing keys \['means'\]"),
        (
            "channels",
            wrong_c,
            0.0,
            ValueError,
            at + r"gm_u\['means'\] \(2, 3, 3, 2, 2\) does not match the state x_t \(2, 2, 2, 2\)",
        ),
        ("batch", wrong_b, 0.0, ValueError, at + r"gm_u\['means'\] \(3, 3, 2, 2, 2\) does not match the state x_t"),
        ("guided logstds", (good, bad_ls), 0.5, ValueError, at + r"gm_uncond\['logstds'\] must have shape"),
        ("guided cond logstds", (bad_ls, good), 0.5, ValueError, at + r"gm_cond\['logstds'\] must have shape"),
        (
            "guided batch",
            (wrong_b, wrong_b),
            0.5,
            ValueError,
            at + r"gm_cond\['means'\] \(3, 3, 2, 2, 2\) does not match",
        ),
        ("not a dict", [good, torch.zeros(2)], 0.5, TypeError, r"the model output, must be a u-GM dict"),
    ]


@pytest.mark.parametrize("case", _bad_outputs(), ids=lambda c: c[0])
@pytest.mark.parametrize("solver", ["gm-ode", "gm-sde"])
def test_a_wrong_denoiser_output_is_named_with_its_step_on_both_backends(case, solver):
    """A denoiser output that does not fit the state: the error names the denoiser's output and
    the step (not ``x_t``), with the same text on the torch and the Triton path."""
    _, bad, scale, exc, match = case
    shape = ((2,), 3, 2, 2, 2)
    good = make_gm(shape, 1, torch.float32)
    x = make_state(shape, 1, torch.float32)
    messages = []
    for backend in ("torch", "triton") if triton is not None else ("torch",):
        outputs = iter([(good, good) if scale > 0 else good, bad])
        with gmkernels.use_backend(backend), pytest.raises(exc, match=match) as err:
            gmkernels.sample(lambda x_t, t, outs=outputs: next(outs), x, 2, solver=solver, guidance_scale=scale)
        messages.append(str(err.value))
    assert len(set(messages)) == 1, messages


@pytest.mark.triton
def test_ops_compile_fullgraph_on_the_triton_path():
    """``gm_ode_substeps`` and ``gm_sde_step`` under ``torch.compile(fullgraph=True)``: opaque
    custom ops, no graph break, the eager values (the SDE draw from the same global seed)."""
    shape = ((2,), 3, 2, 2, 3)
    gm, x = make_gm(shape, 8, torch.float32), make_state(shape, 8, torch.float32)
    sig = torch.tensor([0.9, 0.5, 0.2])

    def f(gm, x):
        return gmkernels.gm_ode_substeps(gm, x, sig), gmkernels.gm_sde_step(gm, x, 0.9, 0.4)

    with gmkernels.use_backend("triton"):
        torch.manual_seed(0)
        eager = f(gm, x)
        torch.manual_seed(0)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(gm, x)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


@pytest.mark.triton
@pytest.mark.parametrize(
    "solver,order,scale",
    [("gm-ode", 1, 0.0), ("gm-ode", 1, 0.5), ("gm-ode", 2, 0.0), ("gm-ode", 2, 0.5), ("gm-sde", 2, 0.5)],
)
def test_scheduler_step_compiles_fullgraph_on_the_triton_path(solver, order, scale):
    """One ``scheduler.step`` (plain, probabilistic guidance, 2nd order; three steps, so the
    2nd-order memory is used) under ``torch.compile(fullgraph=True)``: the fused step's launches
    are one custom op, and the compiled steps give the eager values."""
    shape = ((2,), 4, 2, 3, 2)
    gms = _outputs(shape, 2, torch.bfloat16, True, False, scale > 0)
    gms.append(gms[0])
    x = make_state(shape, 2).float()

    def run(compiled: bool) -> torch.Tensor:
        sched = gmkernels.schedulers.SCHEDULERS[solver](order=order, guidance="probabilistic", guidance_scale=scale)
        sched.set_timesteps(3, 2 if solver == "gm-ode" else 1)
        step_fn = torch.compile(sched.step, backend="aot_eager", fullgraph=True) if compiled else sched.step
        torch.manual_seed(1)
        y = x
        for t, out in zip(sched.timesteps, gms):
            y = step_fn(out, t, y)
        return y

    torch.compiler.reset()  # each step compiles anew (its index is a constant): start below the recompile limit
    with gmkernels.use_backend("triton"):
        eager = run(False)
        compiled = run(True)
    assert compiled.isfinite().all() and torch.equal(compiled, eager)


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
            return gmkernels.sample(
                lambda x_t, t: next(calls),
                x,
                len(gms),
                solver=solver,
                substeps=3 if solver == "gm-ode" else 1,
                order=order,
                guidance="probabilistic" if guidance == "none" else guidance,
                guidance_scale=scale,
                orthogonal=orthogonal,
                shift=1.5,
                generator=torch.Generator().manual_seed(seed),
            )
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
            uncond = make_gm(
                ushape,
                seed + 100 + i,
                dtype,
                dead=dead and K_uncond is not None,
                per_pixel_std=per_pixel,
                logstd_range=(-2.0, 0.5),
            )
            if K_uncond is None:
                lw = torch.where(cond["logweights"] == float("-inf"), float("-inf"), uncond["logweights"].float())
                uncond["logweights"] = torch.log_softmax(lw, dim=-4).to(dtype)
            cond = (cond, uncond)
        out.append(cond)
    return out


@pytest.mark.triton
@settings(max_examples=10)
@given(
    shape=gm_shapes(max_k=24, max_c=5, max_hw=4, max_b=2),
    seed=seeds,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dead=st.booleans(),
    per_pixel=st.booleans(),
    order=st.sampled_from([1, 2]),
    guided=st.sampled_from(GUIDED),
    orthogonal=st.sampled_from([0.0, 1.0]),
)
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
    assert ode.ode_path(40, 3, 6) == "wide"
    gms = _outputs(shape, 5, dtype, True, per_pixel, False)
    x = make_state(shape, 5).float()
    out = _run_sampler(gms, x, "gm-ode", 1, "none", 0.0, 0.0, True, "triton")
    expect = _run_sampler([f64(g) for g in gms], x.double(), "gm-ode", 1, "none", 0.0, 0.0, False, "torch")
    assert out.dtype == torch.float32 and rel_err(out, expect) < TOL[torch.float32]


@pytest.mark.triton
@pytest.mark.parametrize("k1", [False, True])
@pytest.mark.parametrize(
    "solver,order,guided", [("gm-ode", 2, GUIDED[1]), ("gm-ode", 1, GUIDED[0]), ("gm-sde", 2, GUIDED[3])]
)
def test_fused_step_channel_split_layouts(k1, solver, order, guided, monkeypatch):
    """C = 20: channels over the warps, K in tiles (5 components, dead ones included; streamed in
    the heavy steps) or, as on triton < 3.9 (``common.SPLIT_K1``), one component at a time; both
    equal the eager path."""
    guidance, scale = guided
    shape = ((1,), 5, 20, 2, 3)
    bk = common.fused_blocks(5, 20, 6, solver == "gm-sde", order == 2 or scale > 0, split_k1=k1)[0]
    assert bk == 1 if k1 else bk > 1
    gms = _outputs(shape, 7, torch.float32, True, False, scale > 0, K_uncond=4 if scale > 0 else None)
    x = make_state(shape, 7).float()
    monkeypatch.setattr(common, "SPLIT_K1", k1)
    with _launches("_step_kernel") as kernel:
        out = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, True, "triton", seed=3)
    # the plain GM-ODE step of a GM past one thread's registers takes the rollout kernel
    wide = solver == "gm-ode" and order == 1 and scale == 0 and ode.ode_path(5, 20, 6, split_k1=k1) == "wide"
    assert {kw["BLOCK_K"] for kw in kernel.calls} == (set() if wide else {bk})
    if solver == "gm-sde":  # the same Philox stream as gm_sde_step
        expect = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, False, "triton", seed=3)
    else:
        g64 = [tuple(f64(g) for g in o) if isinstance(o, tuple) else f64(o) for o in gms]
        expect = _run_sampler(g64, x.double(), solver, order, guidance, scale, 1.0, False, "torch")
    assert out.isfinite().all() and rel_err(out, expect) < TOL[torch.float32]


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


# ----------------------------------------------------------------------------- point data
# H = W = 1 (a batch of single-pixel samples, as 2-D toy data): the launchers pack the batch rows
# into a program's pixel lanes (the fused step from triton 3.9, ``common.PACK_FUSED``). Against
# the reference twins, and against the same kernels launched unpacked, which must give the same
# random stream.

#: point-data batches: odd sizes, one below and one above a program's 32-128 lanes
point_batches = st.sampled_from([2, 37, 133])
#: the same for comparisons with the unpacked launches (one interpreted program per row: kept small;
#: both sizes fill part of one packed program of 32 lanes)
unpacked_batches = st.sampled_from([3, 5])
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


def _point_shape(B, K, C):
    return ((B,), K, C, 1, 1)


@pytest.mark.triton
@settings(max_examples=8)
@given(
    B=point_batches,
    K=st.sampled_from([1, 3, 40]),
    C=st.integers(1, 5),
    seed=seeds,
    sigmas=sigma_lists(),
    dtype=dtypes,
    dead=st.booleans(),
)
def test_ode_substeps_on_point_data_match_reference(B, K, C, seed, sigmas, dtype, dead):
    """K = 40 with C >= 2 streams K in tiles (more than a thread's register tile), K = 1 is a
    single Gaussian."""
    shape = _point_shape(B, K, C)
    gm = make_gm(shape, seed, dtype, dead=dead)
    x = make_state(shape, seed, dtype)
    with gmkernels.use_backend("triton"):
        out = gmkernels.gm_ode_substeps(gm, x, sigmas)
    assert out.dtype == dtype and out.shape == x.shape and out.isfinite().all()
    assert rel_err(out, ref.gm_ode_substeps(f64(gm), x.double(), sigmas)) < TOL[dtype]


@pytest.mark.triton
@settings(max_examples=8)
@given(
    B=point_batches,
    K=st.sampled_from([1, 3, 40]),
    C=st.integers(1, 5),
    seed=seeds,
    dtype=dtypes,
    dead=st.booleans(),
    power=st.sampled_from([0.0, 1.0, 2.0]),
    sig=st.tuples(st.floats(1e-3, 1.0), st.floats(0.0, 1.0)),
)
def test_sde_step_on_point_data_matches_reference_at_given_noise(B, K, C, seed, dtype, dead, power, sig):
    sigma, sigma_next = sig[0], sig[0] * sig[1]
    shape = _point_shape(B, K, C)
    gm = make_gm(shape, seed, dtype, dead=dead)
    x = make_state(shape, seed, dtype)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((B, 1, 1, 1), generator=g)
    z = torch.randn((B, C, 1, 1), generator=g)
    c1, c2, c3 = transition_coefficients(sigma, sigma_next, 1e-6)
    with gmkernels.use_backend("triton"):
        out = sde._launch_sde(gm["means"], gm["logstds"], gm["logweights"], x, None, u, z, c1, c2, c3, power)
    expect = ref.gm_sde_step(f64(gm), x.double(), sigma, sigma_next, u.double(), z.double(), power)
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out, expect) < TOL[dtype]


@pytest.mark.triton
@settings(max_examples=6)
@given(
    B=unpacked_batches, K=st.sampled_from([1, 5, 40]), C=st.integers(1, 4), seed=seeds, dtype=dtypes, dead=st.booleans()
)
def test_sde_step_on_point_data_draws_the_unpacked_stream(B, K, C, seed, dtype, dead):
    """Packing keeps every Philox offset: the seeded step equals the unpacked launch's (a
    different component or noise would differ at O(1))."""
    shape = _point_shape(B, K, C)
    gm = make_gm(shape, seed, dtype, dead=dead)
    x = make_state(shape, seed, dtype)
    with gmkernels.use_backend("triton"):
        packed = gmkernels.gm_sde_step(gm, x, 0.8, 0.3, generator=torch.Generator().manual_seed(seed))
        with _launches("_gm_sde_step_kernel", unpack=True) as kernel:
            unpacked = gmkernels.gm_sde_step(gm, x, 0.8, 0.3, generator=torch.Generator().manual_seed(seed))
    assert kernel.packed_launches == 1
    assert rel_err(packed, unpacked.double()) < 1e-6


@pytest.mark.triton
@settings(max_examples=10)
@given(
    B=point_batches,
    K=st.sampled_from([1, 4, 24]),
    C=st.integers(1, 4),
    seed=seeds,
    dtype=dtypes,
    dead=st.booleans(),
    order=st.sampled_from([1, 2]),
    guided=st.sampled_from(GUIDED),
    orthogonal=st.sampled_from([0.0, 1.0]),
)
def test_sampler_ode_on_point_data_matches_eager_reference(B, K, C, seed, dtype, dead, order, guided, orthogonal):
    """``sample`` with the fused GM-ODE step on point data, every guidance mode (their
    statistics passes write one row per sample), against the eager float64 torch composition."""
    guidance, scale = guided
    assume(orthogonal == 0 or scale == 0 or C >= 3)  # else the orthogonal residual is pure rounding
    assert_fused_ode_matches_eager(_point_shape(B, K, C), seed, dtype, dead, False, order, guidance, scale, orthogonal)


@pytest.mark.triton
@pytest.mark.skipif(not common.PACK_FUSED, reason="this triton runs the fused step unpacked on point data")
@settings(max_examples=6)
@given(
    B=unpacked_batches,
    K=st.sampled_from([1, 4, 24]),
    C=st.integers(1, 3),
    seed=seeds,
    dtype=dtypes,
    dead=st.booleans(),
    solver=st.sampled_from(["gm-ode", "gm-sde"]),
    order=st.sampled_from([1, 2]),
    guided=st.sampled_from(GUIDED),
)
def test_sampler_on_point_data_equals_the_unpacked_launches(B, K, C, seed, dtype, dead, solver, order, guided):
    """Both solvers, every guidance mode, order 1 and 2: the packed fused steps equal the same
    kernel launched one row per program (same Philox stream for GM-SDE, same statistics)."""
    guidance, scale = guided
    shape = _point_shape(B, K, C)
    gms = _outputs(shape, seed, dtype, dead, False, scale > 0)
    x = make_state(shape, seed).float()
    packed = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, True, "triton", seed=seed)
    with _launches("_step_stats_kernel", "_step_kernel", unpack=True) as kernels:
        unpacked = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, True, "triton", seed=seed)
    assert sum(k.packed_launches for k in kernels) >= 2  # every launch of the two steps asked for packing
    assert packed.isfinite().all()
    assert rel_err(packed, unpacked.double()) < 1e-6


@pytest.mark.triton
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("guided", GUIDED)
def test_sampler_sde_on_point_data_equals_eager_composition(order, guided):
    """The fused GM-SDE step on point data equals the eager composition of Triton ops (whose
    ``gm_sde_step`` is checked against its reference above), dead components included."""
    guidance, scale = guided
    shape = _point_shape(37, 5, 2)
    gms = _outputs(shape, 5, torch.bfloat16, True, False, scale > 0, K_uncond=4 if guidance != "weight" else None)
    x = make_state(shape, 5).float()
    out = _run_sampler(gms, x, "gm-sde", order, guidance, scale, 1.0, True, "triton", seed=9)
    expect = _run_sampler(gms, x, "gm-sde", order, guidance, scale, 1.0, False, "triton", seed=9)
    assert out.isfinite().all()
    assert rel_err(out, expect) < TOL[torch.float32]
