"""Exactness of the samplers on analytic problems (docs/solvers.md).

The data is itself a Gaussian mixture with a shared isotropic std, the same at every pixel:
``x0 ~ sum_k pi_k N(m_k, s0^2 I_C)``. Under ``x_t = a x0 + sigma eps`` the true denoising
distribution ``p(x0 | x_t)`` is then a GM with the same shared std, which ``GMData.denoiser``
returns as a u-GM (the "oracle" network). With an exact model:

* GM-SDE draws exact transitions, so 1 or 2 steps already give the data distribution;
* GM-ODE integrates the exact probability-flow ODE with Euler substeps, converging as they grow;
* Euler (one x0 per network call) at few steps is far off;
* the 2nd-order correction estimates the model's error from the previous step's GM, which is
  zero here, so order 2 must not hurt.

Distances are sliced Wasserstein-1 between sample sets (the C axes plus random directions),
set against the noise floor: the same distance from the reference set to fresh data sets of the
same size, whose mean and spread (16 draws) give the acceptance bound ``mean + 4 sd`` (the
distance of a finite sample fluctuates a lot, e.g. with the share of each mode).
``python tests/test_exactness.py`` prints the full table.
"""

from __future__ import annotations

import pytest
import torch

import gmkernels

pytestmark = pytest.mark.slow  # statistical: thousands of samples per solver and problem

N_SAMPLES = 3000


class GMData:
    """A per-pixel GM data distribution and its exact denoiser.

    Args:
        means: ``(K, C)`` component means.
        logits: ``(K,)`` unnormalised log-weights.
        s0: shared isotropic std of the components.
    """

    def __init__(self, means, logits, s0: float):
        self.m = torch.as_tensor(means, dtype=torch.float64)
        self.logpi = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), 0)
        self.s0 = float(s0)

    @property
    def C(self) -> int:
        return self.m.shape[1]

    def sample(self, n: int, generator: torch.Generator, H: int = 1, W: int = 1) -> torch.Tensor:
        """``(n, C, H, W)`` float32 data samples, pixels independent."""
        k = torch.multinomial(self.logpi.exp(), n * H * W, replacement=True, generator=generator)
        x = self.m[k] + self.s0 * torch.randn(n * H * W, self.C, generator=generator, dtype=torch.float64)
        return x.view(n, H, W, self.C).permute(0, 3, 1, 2).float().contiguous()

    def posterior_x0(self, x_t: torch.Tensor, sigma: torch.Tensor) -> dict:
        """The exact x0-GM given ``x_t (B, C, H, W)`` at per-sample ``sigma (B,)``, float64.

        Component k: prior ``N(m_k, s0^2)`` times the likelihood ``N(x_t; a x0, sigma^2)``:
        ``mean = (sigma^2 m_k + a s0^2 x_t) / D``, ``var = s0^2 sigma^2 / D``,
        ``log w_k = log pi_k - |x_t - a m_k|^2 / (2 D)`` with ``D = sigma^2 + a^2 s0^2``.
        """
        B = x_t.shape[0]
        sig = sigma.double().view(B, 1, 1, 1, 1)
        a = 1 - sig
        s02 = self.s0**2
        xt = x_t.double().unsqueeze(1)  # (B, 1, C, H, W)
        m = self.m.view(1, -1, self.C, 1, 1)
        D = sig**2 + a**2 * s02
        means = (sig**2 * m + a * s02 * xt) / D
        lw = self.logpi.view(1, -1, 1, 1, 1) - 0.5 * ((xt - a * m) ** 2).sum(2, keepdim=True) / D
        return {"means": means, "logstds": 0.5 * torch.log(s02 * sig**2 / D), "logweights": torch.log_softmax(lw, 1)}

    def denoiser(self, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """The oracle network: the exact u-GM (``u = (x_t - x0) / sigma``) in float32."""
        sigma = t.double() / 1000
        gm = self.posterior_x0(x_t, sigma)
        sig = sigma.view(-1, 1, 1, 1, 1)
        return {
            "means": ((x_t.double().unsqueeze(1) - gm["means"]) / sig).float(),
            "logstds": (gm["logstds"] - torch.log(sig)).float(),
            "logweights": gm["logweights"].float(),
        }


MIXTURES = {
    "C1-bimodal": GMData([[-1.5], [1.5]], [0.0, 0.0], 0.25),
    "C1-skewed3": GMData([[-2.0], [0.5], [2.5]], [1.0, 0.0, -1.0], 0.2),
    "C2-three": GMData([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]], [0.0, 0.5, -0.3], 0.3),
    "C3-four": GMData([[1, 1, 0], [-1, 1, 1], [0, -1.5, 1], [1, -1, -1.5]], [0.2, 0.0, -0.2, 0.1], 0.15),
}


def sliced_w1(a: torch.Tensor, b: torch.Tensor, n_proj: int = 24, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between two equally sized sample sets ``(n, C, H, W)`` (pixels
    pooled): the mean over the C axes and ``n_proj`` random unit directions of the 1-D W1."""
    a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double()
    b = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]).double()
    C = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(C, n_proj, generator=g, dtype=torch.float64)
    P = torch.cat([torch.eye(C, dtype=torch.float64), P / P.norm(dim=0)], 1)
    return float(((a @ P).sort(0).values - (b @ P).sort(0).values).abs().mean())


def run(data: GMData, solver: str, steps: int, substeps: int = 1, order: int = 1, seed: int = 0, shift: float = 1.0):
    """Sample ``N_SAMPLES`` points with the oracle and return them."""
    g = torch.Generator().manual_seed(1000 + seed)
    noise = torch.randn(N_SAMPLES, data.C, 1, 1, generator=g)
    return gmkernels.sample(
        data.denoiser, noise, steps, solver=solver, substeps=substeps, order=order, shift=shift, generator=g
    )


def noise_floor(data: GMData, reference: torch.Tensor, n_pairs: int = 16) -> tuple[float, float]:
    """Mean and standard deviation of the distance from ``reference`` to fresh data sets of the
    same size: where an exact sampler's distance lies."""
    g = torch.Generator().manual_seed(77)
    d = torch.tensor([sliced_w1(reference, data.sample(N_SAMPLES, g)) for _ in range(n_pairs)])
    return float(d.mean()), float(d.std())


def bound(floor: tuple[float, float]) -> float:
    """Acceptance bound of an exact sampler: floor mean + 4 sd."""
    return floor[0] + 4 * floor[1]


@pytest.fixture(scope="module", params=["C1-bimodal", "C2-three", "C3-four"])
def problem(request):
    data = MIXTURES[request.param]
    reference = data.sample(N_SAMPLES, torch.Generator().manual_seed(5))
    return data, reference, noise_floor(data, reference)


def test_oracle_is_the_exact_posterior():
    """The oracle's GM has the posterior's moments: its mean matches a Monte-Carlo estimate of
    E[x0 | x_t] from joint samples binned on x_t (C=1)."""
    data = MIXTURES["C1-skewed3"]
    g = torch.Generator().manual_seed(3)
    x0 = data.sample(200_000, g)
    sigma = 0.6
    xt = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
    probe = torch.tensor([-1.0, 0.0, 0.4, 1.2]).view(-1, 1, 1, 1)
    gm = data.posterior_x0(probe, torch.full((4,), sigma))
    exact = (gm["logweights"].exp() * gm["means"]).sum(1).view(-1)
    for i, v in enumerate(probe.view(-1)):
        near = (xt - v).abs() < 0.02
        assert near.sum() > 500
        assert abs(float(x0[near].double().mean()) - float(exact[i])) < 0.05


@pytest.mark.parametrize("steps", [1, 2])
def test_gm_sde_is_exact_in_one_and_two_steps(problem, steps):
    data, reference, floor = problem
    d = sliced_w1(run(data, "gm-sde", steps), reference)
    assert d < bound(floor), (d, floor)


def test_gm_ode_converges_with_substeps(problem):
    data, reference, floor = problem
    d = [sliced_w1(run(data, "gm-ode", 2, n), reference) for n in (1, 4, 16)]
    assert d[0] > d[1] > d[2], d
    assert d[2] < bound(floor), (d, floor)


def test_euler_at_few_steps_is_clearly_worse(problem):
    data, reference, floor = problem
    d_euler = sliced_w1(run(data, "euler", 2), reference)
    d_sde = sliced_w1(run(data, "gm-sde", 2), reference)
    d_ode = sliced_w1(run(data, "gm-ode", 2, 16), reference)
    assert d_euler > 2 * bound(floor), (d_euler, floor)
    assert d_euler > 3.0 * max(d_sde, d_ode), (d_euler, d_sde, d_ode)


@pytest.mark.parametrize("solver,steps,substeps", [("gm-sde", 3, 1), ("gm-ode", 2, 4), ("gm-ode", 4, 2)])
def test_order_two_never_hurts_on_the_exact_problem(problem, solver, steps, substeps):
    """With an exact model the previous GM carried forward equals the current one, so the
    2nd-order bias is (numerically) zero: the samples barely move and the distance does not grow."""
    data, reference, floor = problem
    x1 = run(data, solver, steps, substeps, order=1)
    x2 = run(data, solver, steps, substeps, order=2)
    assert float((x2 - x1).norm() / x1.norm()) < 1e-3
    assert sliced_w1(x2, reference) <= sliced_w1(x1, reference) + 0.05 * floor[0]


def test_shifted_schedule_stays_exact():
    data, reference = MIXTURES["C2-three"], MIXTURES["C2-three"].sample(N_SAMPLES, torch.Generator().manual_seed(5))
    assert sliced_w1(run(data, "gm-sde", 2, shift=3.0), reference) < bound(noise_floor(data, reference))


def exactness_table() -> str:
    """The table of the report: one row per solver / steps / substeps / order, one column per
    data set, next to the noise floor and the acceptance bound."""
    configs = [
        ("gm-sde", 1, 1, 1),
        ("gm-sde", 2, 1, 1),
        ("gm-sde", 2, 1, 2),
        ("gm-sde", 4, 1, 2),
        ("gm-ode", 2, 1, 1),
        ("gm-ode", 2, 4, 1),
        ("gm-ode", 2, 16, 1),
        ("gm-ode", 2, 4, 2),
        ("gm-ode", 2, 16, 2),
        ("gm-ode", 8, 4, 1),
        ("euler", 2, 1, 1),
        ("euler", 8, 1, 1),
        ("euler", 32, 1, 1),
    ]
    refs = {name: data.sample(N_SAMPLES, torch.Generator().manual_seed(5)) for name, data in MIXTURES.items()}
    floors = {name: noise_floor(MIXTURES[name], refs[name]) for name in MIXTURES}
    lines = [
        "| solver | steps x substeps | order | " + " | ".join(MIXTURES) + " |",
        "|---|---|---|" + "---|" * len(MIXTURES),
    ]
    lines.append(
        "| noise floor (mean ± sd) | | | " + " | ".join(f"{m:.4f} ± {sd:.4f}" for m, sd in floors.values()) + " |"
    )
    lines.append("| bound (mean + 4 sd) | | | " + " | ".join(f"{bound(f):.4f}" for f in floors.values()) + " |")
    for solver, n, m, o in configs:
        d = [sliced_w1(run(data, solver, n, m, o), refs[name]) for name, data in MIXTURES.items()]
        lines.append(f"| {solver} | {n} x {m} | {o} | " + " | ".join(f"{v:.4f}" for v in d) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"sliced W1 to {N_SAMPLES} data samples, {N_SAMPLES} samples per run, oracle denoiser, CPU reference path")
    print(exactness_table())
