"""Test-suite set-up: Triton's CPU interpreter (before triton is imported anywhere) when no GPU
is present, hypothesis profiles: ``ci`` (bounded, the default) and ``dev`` (more examples;
``HYPOTHESIS_PROFILE=dev pytest``), and the ``slow`` marker on the tests listed in ``SLOW``
(``pytest -m "not slow"`` is the fast subset; the full suite stays the one CI runs)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Under CI (CI=true) the draws come from a fixed seed, so a red run reproduces; elsewhere every
# run draws fresh examples.
settings.register_profile("ci", max_examples=20, derandomize=bool(os.environ.get("CI")), print_blob=True, **_common)
settings.register_profile("dev", max_examples=200, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests marked slow here, by node id prefix, so their files stay as they are (tests may also carry
# @pytest.mark.slow themselves): statistical, ahead-of-time compile and end-to-end checks.
SLOW = {
    "tests/test_aot.py": "compiles every kernel for sm_80 and sm_90",
    "tests/test_exactness.py": "statistical: thousands of samples per solver and problem",
    "tests/test_bench_cli.py::test_train_and_solvers_with_compile": "torch.compile of the reference",
    "tests/test_bench_cli.py::test_torchrun_data_parallel_solvers": "starts torchrun processes",
    "tests/test_model.py::test_training_reduces_loss": "trains a network for 300 steps",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.nodeid.startswith(prefix) for prefix in SLOW):
            item.add_marker(pytest.mark.slow)
