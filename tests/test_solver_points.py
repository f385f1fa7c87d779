"""The solver-step kernels on point data (``H = W = 1``: a batch of single-pixel samples, as for
2-D toy data), where the launchers pack the batch rows into the pixel lanes of a program (the
fused step from triton 3.9, ``solver_steps._PACK_FUSED``): against the reference twins, and
against the same kernels launched unpacked (one row per program), which must give the same
random stream."""

import contextlib

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import TOL, make_gm, make_state, rel_err, seeds
from test_solver_steps import GUIDED, _outputs, _run_sampler, assert_fused_ode_matches_eager, f64, sigma_lists

import gmkernels
import reference.solver_steps as ref
from gmkernels.ops import solver_steps as ops
from reference.transition import transition_coefficients

pytestmark = pytest.mark.triton

#: point-data batches: odd sizes, one below and one above a program's 32-128 lanes
point_batches = st.sampled_from([2, 37, 133])
#: the same for comparisons with the unpacked launches (one interpreted program per row: kept small)
unpacked_batches = st.sampled_from([3, 7])
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


class _Unpacked:
    """Stands in for a packing kernel: each launch runs unpacked instead, one batch row per
    program (``PACK=False``, grid ``(B,)``, the same blocks), as the launchers did before."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.packed_launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.packed_launches += bool(kwargs.get("PACK"))
            B = args[self.kernel.arg_names.index("NPIX")]  # B * HW with HW = 1
            self.kernel[(B,)](*args, **{**kwargs, "PACK": False})

        return launch


@contextlib.contextmanager
def _unpacked(name):
    """Within the block ``ops.<name>`` (a kernel) launches unpacked; yields the stand-in."""
    with pytest.MonkeyPatch.context() as mp:
        stand_in = _Unpacked(getattr(ops, name))
        mp.setattr(ops, name, stand_in)
        yield stand_in


def _point_shape(B, K, C):
    return ((B,), K, C, 1, 1)


@settings(max_examples=8)
@given(B=point_batches, K=st.sampled_from([1, 3, 40]), C=st.integers(1, 5), seed=seeds, sigmas=sigma_lists(),
       dtype=dtypes, dead=st.booleans())  # fmt: skip
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


@settings(max_examples=8)
@given(B=point_batches, K=st.sampled_from([1, 3, 40]), C=st.integers(1, 5), seed=seeds, dtype=dtypes, dead=st.booleans(),
       power=st.sampled_from([0.0, 1.0, 2.0]), sig=st.tuples(st.floats(1e-3, 1.0), st.floats(0.0, 1.0)))  # fmt: skip
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
        out = ops._launch_sde(gm["means"], gm["logstds"], gm["logweights"], x, None, u, z, c1, c2, c3, power)
    expect = ref.gm_sde_step(f64(gm), x.double(), sigma, sigma_next, u.double(), z.double(), power)
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out, expect) < TOL[dtype]


@settings(max_examples=6)
@given(B=unpacked_batches, K=st.sampled_from([1, 5, 40]), C=st.integers(1, 4), seed=seeds, dtype=dtypes, dead=st.booleans())
def test_sde_step_on_point_data_draws_the_unpacked_stream(B, K, C, seed, dtype, dead):
    """Packing keeps every Philox offset: the seeded step equals the unpacked launch's (a
    different component or noise would differ at O(1))."""
    shape = _point_shape(B, K, C)
    gm = make_gm(shape, seed, dtype, dead=dead)
    x = make_state(shape, seed, dtype)
    with gmkernels.use_backend("triton"):
        packed = gmkernels.gm_sde_step(gm, x, 0.8, 0.3, generator=torch.Generator().manual_seed(seed))
        with _unpacked("_gm_sde_step_kernel") as kernel:
            unpacked = gmkernels.gm_sde_step(gm, x, 0.8, 0.3, generator=torch.Generator().manual_seed(seed))
    assert kernel.packed_launches == 1
    assert rel_err(packed, unpacked.double()) < 1e-6


@settings(max_examples=10)
@given(B=point_batches, K=st.sampled_from([1, 4, 24]), C=st.integers(1, 4), seed=seeds, dtype=dtypes, dead=st.booleans(),
       order=st.sampled_from([1, 2]), guided=st.sampled_from(GUIDED), orthogonal=st.sampled_from([0.0, 1.0]))  # fmt: skip
def test_sampler_ode_on_point_data_matches_eager_reference(B, K, C, seed, dtype, dead, order, guided, orthogonal):
    """``sample`` with the fused GM-ODE step on point data, every guidance mode (their
    statistics passes write one row per sample), against the eager float64 torch composition."""
    guidance, scale = guided
    assume(orthogonal == 0 or scale == 0 or C >= 3)  # else the orthogonal residual is pure rounding
    assert_fused_ode_matches_eager(_point_shape(B, K, C), seed, dtype, dead, False, order, guidance, scale, orthogonal)


@pytest.mark.skipif(not ops._PACK_FUSED, reason="this triton runs the fused step unpacked on point data")
@settings(max_examples=6)
@given(B=unpacked_batches, K=st.sampled_from([1, 4, 24]), C=st.integers(1, 3), seed=seeds, dtype=dtypes, dead=st.booleans(),
       solver=st.sampled_from(["gm-ode", "gm-sde"]), order=st.sampled_from([1, 2]), guided=st.sampled_from(GUIDED))  # fmt: skip
def test_sampler_on_point_data_equals_the_unpacked_launches(B, K, C, seed, dtype, dead, solver, order, guided):
    """Both solvers, every guidance mode, order 1 and 2: the packed fused steps equal the same
    kernel launched one row per program (same Philox stream for GM-SDE, same statistics)."""
    guidance, scale = guided
    shape = _point_shape(B, K, C)
    gms = _outputs(shape, seed, dtype, dead, False, scale > 0)
    x = make_state(shape, seed).float()
    packed = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, True, "triton", seed=seed)
    with _unpacked("_fused_step_kernel") as kernel:
        unpacked = _run_sampler(gms, x, solver, order, guidance, scale, 1.0, True, "triton", seed=seed)
    assert kernel.packed_launches >= 2  # every launch of the two steps asked for packing
    assert packed.isfinite().all()
    assert rel_err(packed, unpacked.double()) < 1e-6


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
