"""Few-step sampling with a toy denoiser that is exact.

Data: every pixel independently takes the value -1, 0 or 1 with probabilities 0.2, 0.3, 0.5. For
such data the denoising distribution of x0 given x_t is known in closed form, per pixel: the
component at value v_k has weight pi_k * N(x_t; (1 - sigma) v_k, sigma^2). The denoiser returns
it as the u-GM a GMFlow network would (u = (x_t - x0) / sigma). With this exact GM, GM-SDE
samples the data distribution in 2 steps; Euler, which only uses the GM's mean, blurs the values.

Run: python examples/sample_toy.py
"""

import torch

import gmkernels

VALUES = torch.tensor([-1.0, 0.0, 1.0])
PROBS = torch.tensor([0.2, 0.3, 0.5])
X0_STD = 1e-3  # the components are (nearly) point masses


def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> dict:
    """``x_t (B, C, H, W)``, ``t (B,)`` in (0, 1000] -> the exact u-GM, K = 3."""
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    v = VALUES.view(1, 3, 1, 1, 1)
    x = x_t.unsqueeze(1)  # (B, 1, C, H, W)
    logits = PROBS.log().view(1, 3, 1, 1, 1) - 0.5 * ((x - (1 - sigma) * v) / sigma).square()
    return {
        "means": (x - v) / sigma,  # u of each component
        "logstds": (X0_STD / sigma).log(),  # x0 std / sigma
        "logweights": logits.sum(2, keepdim=True).log_softmax(1),
    }  # (B, 3, 1, H, W)


def value_shares(x: torch.Tensor) -> list[float]:
    """Share of pixels within 0.05 of each value (what is left is between the values)."""
    return [round(((x - v).abs() < 0.05).float().mean().item(), 3) for v in VALUES.tolist()]


if __name__ == "__main__":
    noise = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    print(f"data:              shares of -1, 0, 1 = {[round(p, 3) for p in PROBS.tolist()]}")
    for solver, steps in (("gm-sde", 2), ("gm-ode", 2), ("euler", 2), ("euler", 32)):
        x = gmkernels.sample(
            denoiser,
            noise,
            steps,
            solver=solver,
            substeps=8 if solver == "gm-ode" else 1,
            generator=torch.Generator().manual_seed(1),
        )
        print(f"{solver:6s} {steps:2d} steps:   shares of -1, 0, 1 = {value_shares(x)}")
