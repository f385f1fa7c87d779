"""The public surface: every documented public name is exported, and the dispatch layer behaves."""

import pytest
import torch

import gmkernels

PUBLIC_NAMES = [
    "gm_to_mean",
    "gm_to_iso_gaussian",
    "gm_mul_iso_gaussian",
    "iso_gaussian_mul_iso_gaussian",
    "u_to_x0",
    "x0_to_u",
    "gm_posterior_mean",
    "reverse_transition",
    "gm_logprob",
    "gm_nll_loss",
    "gm_sample",
    "probabilistic_guidance",
    "weight_guidance",
    "mean_cfg",
    "gm1d_inverse_cdf",
    "gaussian_samples_to_gm_samples",
    "gm_samples_to_gaussian_samples",
    "sample",
    "use_backend",
]


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_spec_names_exported(name):
    assert name in gmkernels.__all__
    assert callable(getattr(gmkernels, name))


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="use_backend"):
        with gmkernels.use_backend("cuda"):
            pass


def test_use_backend_nests_and_restores():
    assert gmkernels.current_backend() == "auto"
    with gmkernels.use_backend("torch"):
        with gmkernels.use_backend("triton"):
            assert gmkernels.current_backend() == "triton"
        assert gmkernels.current_backend() == "torch"
    assert gmkernels.current_backend() == "auto"


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    # as if gmkernels (and so its kernels) had been imported without TRITON_INTERPRET=1
    monkeypatch.setattr(gmkernels._dispatch, "_INTERPRETED", False)
    gm = {"means": torch.randn(2, 1, 1, 1), "logstds": torch.zeros(1, 1, 1, 1), "logweights": torch.zeros(2, 1, 1, 1)}
    with gmkernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gmkernels.gm_to_mean(gm)
