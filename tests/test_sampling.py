"""``gm_sample``: the Triton kernel (Gumbel-max component draw, Philox noise) against the GM it
samples. Samples cannot match the torch reference value by value, so the tests check
reproducibility, support (every draw sits at a live component), component frequencies against
the tempered weights and the moments and independence of the noise."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import gm_shapes, make_gm, seeds

import gmkernels


def _const_gm(logweights: torch.Tensor, means: torch.Tensor, logstd: float, H: int, W: int) -> dict:
    """One GM (``logweights (K,)``, ``means (K, C)``) repeated over an ``H x W`` image, float32."""
    K, C = means.shape
    return {
        "means": means.float().view(1, K, C, 1, 1).expand(1, K, C, H, W).contiguous(),
        "logstds": torch.full((1, 1, 1, 1, 1), logstd),
        "logweights": logweights.float().view(1, K, 1, 1, 1).expand(1, K, 1, H, W).contiguous(),
    }


@pytest.mark.triton
def test_same_seed_same_samples_other_seed_other_samples():
    gm = make_gm(((2,), 5, 3, 3, 5), seed=1, dtype=torch.float32, dead=True)
    with gmkernels.use_backend("triton"):
        a = gmkernels.gm_sample(gm, 2, generator=torch.Generator().manual_seed(7))
        b = gmkernels.gm_sample(gm, 2, generator=torch.Generator().manual_seed(7))
        c = gmkernels.gm_sample(gm, 2, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 2, 3, 3, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.triton
@pytest.mark.parametrize("power", [1.0, 0.0, 2.5])
def test_component_frequencies_and_noise_moments(power):
    """Means 10 apart, std 1: the component of a draw is ``round(x / 10)`` (wrong with
    probability 6e-7). Frequencies within 5 binomial standard errors of
    ``softmax(power * logweights)``, never a dead one; the noise ``x - mu_k`` has mean 0, variance
    1 and no correlation across channels or across the N samples (5 standard errors)."""
    logits = torch.tensor([0.0, 1.0, -1.0, float("-inf"), 0.5])
    K = logits.numel()
    means = torch.stack([10.0 * torch.arange(K), -10.0 * torch.arange(K)], dim=1)  # (K, C=2)
    gm = _const_gm(torch.log_softmax(logits, 0), means, 0.0, 16, 32)
    with gmkernels.use_backend("triton"):
        x = gmkernels.gm_sample(gm, 2, power, generator=torch.Generator().manual_seed(3))  # (1, 2, 2, 16, 32)
    k = (x[:, :, 0] / 10).round().long()  # (1, N, H, W)
    assert torch.equal(k, -(x[:, :, 1] / 10).round().long())  # both channels from one component
    D = k.numel()
    freq = torch.bincount(k.flatten(), minlength=K).double() / D
    live = logits > float("-inf")
    p = torch.softmax(torch.where(live, logits * power, logits).double(), 0)
    assert freq[~live].sum() == 0
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / D).sqrt() + 1e-12).all(), (freq, p)
    z = x.double() - torch.stack([10.0 * k, -10.0 * k], dim=2)  # (1, N, C, H, W)
    se = 5 / math.sqrt(z.numel())
    assert abs(z.mean().item()) < se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    cdf, _ = (0.5 * (1 + torch.erf(z.flatten() / math.sqrt(2)))).sort()  # Kolmogorov-Smirnov vs N(0, 1)
    i = torch.arange(1, cdf.numel() + 1, dtype=torch.float64)
    ks = max((i / cdf.numel() - cdf).max().item(), (cdf - (i - 1) / cdf.numel()).max().item())
    assert ks < 1.95 / math.sqrt(cdf.numel())
    corr_c = (z[:, :, 0] * z[:, :, 1]).mean().item()
    corr_n = (z[:, 0] * z[:, 1]).mean().item()
    assert abs(corr_c) < 5 / math.sqrt(z[:, :, 0].numel()) and abs(corr_n) < 5 / math.sqrt(z[:, 0].numel())


@pytest.mark.triton
@settings(max_examples=8)
@given(shape=gm_shapes(max_k=80, max_c=5, max_hw=5), seed=seeds, bf16=st.booleans(), per_pixel=st.booleans())
def test_every_draw_sits_at_a_live_component(shape, seed, bf16, per_pixel):
    """With tiny stds each draw is within ``8 s`` (plus output rounding) of the mean of a live
    component at its own pixel, in every channel: right gather, never a dead component."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    gm = make_gm(shape, seed, dtype=dtype, dead=True, logstd_range=(-9.0, -8.0), per_pixel_std=per_pixel)
    with gmkernels.use_backend("triton"):
        x = gmkernels.gm_sample(gm, 2, generator=torch.Generator().manual_seed(seed))
    batch, K, C, H, W = shape
    assert x.shape == (*batch, 2, C, H, W) and x.dtype == dtype
    assert x.isfinite().all()
    mu = gm["means"].double().unsqueeze(-5)  # (*B, 1, K, C, H, W)
    err = (x.double().unsqueeze(-4) - mu).abs()  # (*B, N, K, C, H, W)
    rounding = 2.0**-7 if bf16 else 2.0**-22
    tol = 8 * gm["logstds"].double().exp().unsqueeze(-5) + rounding * mu.abs()
    close = (err <= tol).all(dim=-3)  # (*B, N, K, H, W)
    live = (gm["logweights"] > float("-inf")).squeeze(-3).unsqueeze(-4)  # (*B, 1, K, H, W)
    assert (close & live).any(dim=-3).all()


def test_torch_backend_reproducible_and_shaped():
    gm = make_gm(((3,), 4, 2, 2, 3), seed=5, dtype=torch.float32, dead=True)
    a = gmkernels.gm_sample(gm, 3, power=0.5, generator=torch.Generator().manual_seed(1))
    b = gmkernels.gm_sample(gm, 3, power=0.5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 2, 2, 3) and torch.equal(a, b)


@pytest.mark.parametrize("n_samples, exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_n_samples(n_samples, exc):
    gm = make_gm(((), 2, 1, 2, 2), seed=0, dtype=torch.float32)
    with pytest.raises(exc, match="n_samples"):
        gmkernels.gm_sample(gm, n_samples)


def test_bad_power():
    gm = make_gm(((), 2, 1, 2, 2), seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="power"):
        gmkernels.gm_sample(gm, 1, power=-1.0)


def test_custom_op_opcheck():
    gm = make_gm(((2,), 3, 2, 2, 3), seed=0, dtype=torch.float32)
    seeds_t = torch.tensor([11, 12], dtype=torch.int64)
    torch.library.opcheck(
        torch.ops.gmkernels.gm_sample.default,
        (gm["means"], gm["logstds"], gm["logweights"], seeds_t, 2, 1.0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
