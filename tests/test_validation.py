"""Bad input raises ``ValueError``/``TypeError`` naming the argument and the shapes (docs/numerics.md)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import make_gm, make_state

import gmkernels as G

SHAPE = ((2,), 3, 4, 5, 6)


def gm(**over):
    g = make_gm(SHAPE, 0, dtype=torch.float32)
    g.update(over)
    return g


X = make_state(SHAPE, 0, torch.float32)


def _ops_taking_gm(g):
    """Every public op that takes a GM, called with valid other arguments."""
    return [
        lambda: G.gm_to_mean(g),
        lambda: G.gm_to_iso_gaussian(g),
        lambda: G.gm_mul_iso_gaussian(g, {"mean": X, "var": torch.ones(2, 1, 1, 1)}),
        lambda: G.u_to_x0(g, X, 0.5),
        lambda: G.x0_to_u(g, X, 0.5),
        lambda: G.reverse_transition(g, X, 0.5, 0.3),
        lambda: G.gm_posterior_mean(g, X, 0.5, X, 0.3),
        lambda: G.gm_logprob(g, X.unsqueeze(1)),
        lambda: G.gm_nll_loss(g, X),
        lambda: G.gm_sample(g),
        lambda: G.probabilistic_guidance(g, g, 0.5),
        lambda: G.weight_guidance(g, g, 2.0),
        lambda: G.mean_cfg(g, g, 2.0),
    ]


BAD_GMS = {
    "means rank": (dict(means=torch.randn(4, 5)), ValueError, r"means.*\(\*B, K, C, H, W\).*\(4, 5\)"),
    "logweights shape": (
        dict(logweights=torch.randn(2, 3, 4, 5, 6)),
        ValueError,
        r"logweights.*\(2, 3, 1, 5, 6\).*\(2, 3, 4, 5, 6\)",
    ),
    "mismatched K": (dict(logweights=torch.randn(2, 2, 1, 5, 6)), ValueError, r"logweights.*\(2, 2, 1, 5, 6\)"),
    "logstds shape": (dict(logstds=torch.randn(2, 1, 1, 1)), ValueError, r"logstds.*\(2, 1, 1, 1, 1\)"),
    "batch mismatch": (dict(logstds=torch.randn(3, 1, 1, 1, 1)), ValueError, r"logstds.*\(3, 1, 1, 1, 1\)"),
    "integer means": (dict(means=torch.zeros(2, 3, 4, 5, 6, dtype=torch.int64)), TypeError, r"means.*floating.*int64"),
    "integer logweights": (
        dict(logweights=torch.zeros(2, 3, 1, 5, 6, dtype=torch.int32)),
        TypeError,
        r"logweights.*floating",
    ),
    "not a tensor": (dict(logstds=0.5), TypeError, r"logstds.*torch.Tensor"),
    "mixed devices": (dict(logweights=torch.zeros(2, 3, 1, 5, 6, device="meta")), ValueError, r"logweights.*meta.*cpu"),
}


@pytest.mark.parametrize("bad", list(BAD_GMS))
def test_bad_gm_raises_everywhere(bad):
    over, exc, pattern = BAD_GMS[bad]
    for call in _ops_taking_gm(gm(**over)):
        with pytest.raises(exc, match=pattern):
            call()


def test_missing_key_and_not_a_dict():
    g = gm()
    del g["logstds"]
    with pytest.raises(ValueError, match="missing keys.*logstds"):
        G.gm_to_mean(g)
    with pytest.raises(TypeError, match="gm must be a dict"):
        G.gm_to_mean(torch.randn(2, 3, 4, 5, 6))


@pytest.mark.parametrize(
    "sigma", [-0.1, 1.5, float("nan"), torch.full((2, 1, 1, 1), 1.2), torch.tensor([[[[-1.0]]], [[[0.5]]]])]
)
def test_sigma_outside_unit_interval(sigma):
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        G.u_to_x0(gm(), X, sigma)
    with pytest.raises(ValueError, match=r"sigma_tgt must lie in \[0, 1\]"):
        G.gm_posterior_mean(gm(), X, 0.5, X, sigma)


@pytest.mark.parametrize(
    "sigma, exc, pattern",
    [
        (torch.full((2,), 0.5), ValueError, r"broadcastable to \(\*B, 1, 1, 1\).*\(2,\)"),
        (torch.full((3, 1, 1, 1), 0.5), ValueError, r"\(2, 1, 1, 1\).*\(3, 1, 1, 1\)"),
        (torch.full((2, 1, 1, 1), 1, dtype=torch.int64), TypeError, r"sigma.*floating"),
        ("0.5", TypeError, r"sigma must be a float"),
        (True, TypeError, r"sigma must be a float"),
    ],
)
def test_sigma_bad_shape_or_type(sigma, exc, pattern):
    with pytest.raises(exc, match=pattern):
        G.u_to_x0(gm(), X, sigma)


def test_state_shape_and_dtype():
    with pytest.raises(ValueError, match=r"x_t must have shape \(\*B, C, H, W\) = \(2, 4, 5, 6\).*\(2, 4, 5, 7\)"):
        G.u_to_x0(gm(), torch.randn(2, 4, 5, 7), 0.5)
    with pytest.raises(ValueError, match=r"x_tgt.*\(2, 4, 5, 6\).*\(4, 5, 6\)"):
        G.gm_posterior_mean(gm(), X, 0.5, X[0], 0.3)
    with pytest.raises(TypeError, match=r"target.*floating"):
        G.gm_nll_loss(gm(), X.long())
    with pytest.raises(ValueError, match=r"samples.*\(\*B, N, C, H, W\)"):
        G.gm_logprob(gm(), X)
    with pytest.raises(ValueError, match="x_t is on meta"):
        G.u_to_x0(gm(), X.to("meta"), 0.5)


def test_gaussian_shapes():
    with pytest.raises(ValueError, match=r"gaussian\['var'\].*\(2, 1, 5, 6\).*\(2, 1, 1, 1\).*\(2, 4, 5, 6\)"):
        G.gm_mul_iso_gaussian(gm(), {"mean": X, "var": torch.ones(2, 4, 5, 6)})
    with pytest.raises(ValueError, match=r"gaussian\['mean'\].*\(2, 4, 5, 6\).*\(2, 4, 5, 5\)"):
        G.gm_mul_iso_gaussian(gm(), {"mean": torch.randn(2, 4, 5, 5), "var": torch.ones(2, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"gaussian is missing key 'var' \(got keys \['mean'\]\)"):
        G.gm_mul_iso_gaussian(gm(), {"mean": X})
    with pytest.raises(ValueError, match=r"g2\['mean'\]"):
        G.iso_gaussian_mul_iso_gaussian(
            {"mean": X, "var": torch.ones(2, 1, 1, 1)}, {"mean": X[:1], "var": torch.ones(1, 1, 1, 1)}
        )


def test_scalar_arguments():
    with pytest.raises(ValueError, match="power must be a finite float >= 0"):
        G.gm_to_mean(gm(), -1.0)
    with pytest.raises(ValueError, match="gm_power must be > 0"):
        G.gm_mul_iso_gaussian(gm(), {"mean": X, "var": torch.ones(2, 1, 1, 1)}, 0.0)
    with pytest.raises(ValueError, match=r"scale must lie in \[0, 1\)"):
        G.probabilistic_guidance(gm(), gm(), 1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        G.gm_nll_loss(gm(), X, reduction="avg")
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        G.gm_sample(gm(), 0)
    with pytest.raises(TypeError, match="n_samples must be an int >= 1, got float"):
        G.gm_sample(gm(), 2.0)


def test_guidance_pairs_must_match():
    other = make_gm(((2,), 3, 4, 5, 5), 1, dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"gm_uncond\['means'\] \(2, 3, 4, 5, 5\).*gm_cond\['means'\] \(2, 3, 4, 5, 6\)"
    ):
        G.probabilistic_guidance(gm(), other, 0.5)
    with pytest.raises(ValueError, match="matching K"):
        G.weight_guidance(gm(), make_gm(((2,), 5, 4, 5, 6), 1, dtype=torch.float32), 2.0)


def test_mixed_float_dtypes_are_promoted():
    """bf16 means with fp32 log-weights and a float64 state: fp32 (here float64) math, output in
    the dtype of ``means``."""
    g = gm(means=gm()["means"].to(torch.bfloat16))
    out = G.u_to_x0(g, X.double(), 0.5)
    assert out["means"].dtype == torch.bfloat16
    ref = X.double().unsqueeze(1) - 0.5 * g["means"].double()
    assert torch.allclose(out["means"].double(), ref, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------
# documented conditions that are checked, and errors that blame the right argument


def test_documented_sigma_orders_are_checked():
    """``sigma_to <= sigma`` (reverse transition) and ``sigma_tgt <= sigma_src`` (posterior
    mean), for floats and CPU tensors; equal sigmas stay valid."""
    with pytest.raises(ValueError, match=r"sigma_to must be <= sigma.*sigma_to=0.9 > sigma=0.3"):
        G.reverse_transition(gm(), X, 0.3, 0.9)
    with pytest.raises(ValueError, match=r"sigma_tgt must be <= sigma_src.*sigma_tgt=0.9 > sigma_src=0.3"):
        G.gm_posterior_mean(gm(), X, 0.3, X, 0.9)
    lo, hi = torch.tensor([[[[0.2]]], [[[0.9]]]]), torch.full((2, 1, 1, 1), 0.5)
    with pytest.raises(ValueError, match=r"sigma_to must be <= sigma.*at 1 of 2 entries"):
        G.reverse_transition(gm(), X, hi, lo)
    with pytest.raises(ValueError, match=r"sigma_tgt must be <= sigma_src"):
        G.gm_posterior_mean(gm(), X, 0.5, X, lo)
    G.reverse_transition(gm(), X, 0.5, 0.5)
    G.gm_posterior_mean(gm(), X, hi, X, 0.5)


_LEVELS = st.sampled_from([0.0, 0.3, 0.5, 1.0, -0.1, 1.2, float("nan")])


@settings(max_examples=60)
@given(
    hi=st.lists(_LEVELS, min_size=2, max_size=2),
    lo=st.lists(_LEVELS, min_size=2, max_size=2),
    hi_tensor=st.booleans(),
    lo_tensor=st.booleans(),
)
def test_sigma_pair_check_equals_the_three_checks(hi, lo, hi_tensor, lo_tensor):
    """``check_sigma_pair`` (one read of each per-sample tensor) accepts exactly what the range
    checks of both sigmas and the order check accept, and raises their error when not."""
    from gmkernels._validate import check_gm, check_sigma, check_sigma_order, check_sigma_pair

    s = check_gm(gm())
    sig = torch.tensor(hi).view(2, 1, 1, 1) if hi_tensor else hi[0]
    sig_to = torch.tensor(lo).view(2, 1, 1, 1) if lo_tensor else lo[0]

    def one_by_one():  # in the ops' order: sigma, sigma_to, then the order
        checked = check_sigma(sig, "sigma", s)
        check_sigma_order(check_sigma(sig_to, "sigma_to", s), "sigma_to", checked, "sigma")

    try:
        one_by_one()
    except ValueError as e:
        with pytest.raises(ValueError) as caught:
            check_sigma_pair(sig, "sigma", sig_to, "sigma_to", s)
        assert str(caught.value) == str(e)
    else:
        assert check_sigma_pair(sig, "sigma", sig_to, "sigma_to", s) == (sig, sig_to)


def test_sigma_pair_on_a_device_asserts_without_reading():
    """Tensors off the CPU take one device-side assert (here meta tensors: no values, no read)."""
    from gmkernels._validate import check_gm, check_sigma_pair

    s = check_gm({k: v.to("meta") for k, v in gm().items()})
    hi, lo = torch.empty(2, 1, 1, 1, device="meta"), torch.empty(2, 1, 1, 1, device="meta")
    assert check_sigma_pair(hi, "sigma", lo, "sigma_to", s) == (hi, lo)


@pytest.mark.parametrize("var", [-1.0, 0.0, float("nan")])
def test_gaussian_variance_must_be_positive(var):
    with pytest.raises(ValueError, match=r"gaussian\['var'\] must be > 0"):
        G.gm_mul_iso_gaussian(gm(), {"mean": X, "var": torch.full((2, 1, 1, 1), var)})
    G.gm_mul_iso_gaussian(gm(), {"mean": X, "var": torch.full((2, 1, 1, 1), float("inf"))})  # no reweighting


def test_means_missing_an_axis_blames_means():
    g = gm(means=torch.randn(2, 4, 5, 6))  # a state passed as means: the K axis is missing
    with pytest.raises(
        ValueError, match=r"^gm\['means'\] must have shape \(\*B, K, C, H, W\).*\(2, 4, 5, 6\) \(4 dims\)"
    ):
        G.gm_to_mean(g)


def test_sample_with_a_seed_instead_of_a_generator():
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int 123"):
        G.gm_sample(gm(), 1, generator=123)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator"):
        G.gm_sde_step(gm(), X, 0.5, 0.3, generator=123)


@pytest.mark.parametrize("shift", [-1.0, 0.0, float("inf"), float("nan")])
def test_shift_has_one_message(shift):
    with pytest.raises(ValueError, match=r"^shift must be a finite float > 0, got"):
        G.sample(lambda x, t: gm(), X, 2, shift=shift)


def test_denoiser_returning_a_tensor():
    with pytest.raises(
        TypeError, match=r"the model output, must be a u-GM dict.*got Tensor of shape \(2, 3, 4, 5, 6\)"
    ):
        G.sample(lambda x, t: torch.randn(2, 3, 4, 5, 6), X, 2)
    with pytest.raises(TypeError, match=r"the model output, must be a u-GM dict.*got Tensor.*inside a sequence"):
        G.sample(lambda x, t: (gm(), torch.randn(2, 3, 4, 5, 6)), X, 2, guidance_scale=0.5)


def test_ops_on_meta_tensors():
    """Shape-only runs (meta tensors have no values): tensor sigmas and timesteps are not read
    (the checks that would read them are device-side asserts, no-ops on meta)."""
    g = {k: v.to("meta") for k, v in gm().items()}
    x, sig = X.to("meta"), torch.full((2, 1, 1, 1), 0.5, device="meta")
    t = torch.full((2,), 500.0, device="meta")
    assert G.gm_to_mean(g).shape == X.shape
    assert G.gm_to_iso_gaussian(g)["var"].shape == (2, 1, 5, 6)
    assert G.u_to_x0(g, x, sig)["means"].shape == g["means"].shape
    assert G.reverse_transition(g, x, sig, sig)["means"].shape == g["means"].shape
    assert G.gm_posterior_mean(g, x, sig, x, sig).shape == X.shape
    assert G.gm_mul_iso_gaussian(g, {"mean": x, "var": sig})["means"].shape == g["means"].shape
    assert G.transition_loss(g, x, t, x, t * 0.5).shape == ()
    assert G.gm_nll_loss(g, x, reduction="none").shape == (2, 5, 6)
