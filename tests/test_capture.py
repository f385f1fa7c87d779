"""``gmkernels.CapturedSampler`` on a CPU: its arguments, the clear error off CUDA and the eager
fallback. The capture itself needs a GPU (the version-matrix issue's GPU check runs it)."""

from __future__ import annotations

import pytest
import torch
from strategies import make_gm, make_state

import gmkernels as G

SHAPE = ((2,), 3, 2, 4, 4)


def den(x, t):
    g = make_gm(SHAPE, 0, torch.float32)
    g["means"] = g["means"] + 0.1 * x.unsqueeze(1)
    return g


def test_exported():
    assert "CapturedSampler" in G.__all__ and G.CapturedSampler is G.capture.CapturedSampler


def test_cpu_noise_is_a_clear_error():
    sampler = G.CapturedSampler(den, 2, solver="gm-ode")
    with pytest.raises(RuntimeError, match=r"CUDA graphs, and noise is on cpu.*fallback=True"):
        sampler(make_state(SHAPE, 0, torch.float32))


@pytest.mark.parametrize("solver", ["gm-ode", "gm-sde", "euler"])
def test_fallback_runs_sample_eagerly(solver):
    noise = make_state(SHAPE, 1, torch.float32)
    kw = dict(solver=solver, shift=2.0)
    sampler = G.CapturedSampler(den, 3, fallback=True, generator=torch.Generator().manual_seed(5), **kw)
    out = sampler(noise)
    ref = G.sample(den, noise, 3, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert "graphs=0" in repr(sampler)


def test_bad_arguments():
    with pytest.raises(TypeError, match="denoiser must be callable"):
        G.CapturedSampler(None, 2)
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        G.CapturedSampler(den, 0)
    with pytest.raises(TypeError, match=r"unexpected arguments \['progress'\].*progress bar"):
        G.CapturedSampler(den, 2, progress=True)
    with pytest.raises(TypeError, match=r"unexpected arguments \['steps'\]"):
        G.CapturedSampler(den, 2, steps=3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        G.CapturedSampler(den, 2, generator=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        G.CapturedSampler(den, 2, warmup=0)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        G.CapturedSampler(den, 2, fallback=True)([1.0])
    with pytest.raises(ValueError, match="solver must be one of"):  # sample's own checks run at the call
        G.CapturedSampler(den, 2, fallback=True, solver="heun")(make_state(SHAPE, 0, torch.float32))
