"""Test-suite set-up: Triton's CPU interpreter (before triton is imported anywhere) when no GPU
is present, hypothesis profiles: ``ci`` (bounded, the default) and ``dev`` (more examples;
``HYPOTHESIS_PROFILE=dev pytest``). Slow tests carry ``@pytest.mark.slow`` where they are defined
(``pytest -m "not slow"`` is the fast subset; the full suite stays the one CI runs)."""

import os

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
