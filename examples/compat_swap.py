"""Switching GMFlow code to gmkernels: change the imports, keep the calls.

The function below is written against the public GMFlow code base (its ``gmflow_ops`` module and
its ``GMFlowSDEScheduler``): a GM-SDE sampling loop that draws x0 from the predicted GM at every
step. Only the two import lines differ; with GMFlow's own modules importable, the original
imports work in their place and the loop is unchanged.

Run: python examples/compat_swap.py
"""

import torch

from gmkernels.compat.gmflow import u_to_x_0

# from lib.ops.gmflow_ops.gmflow_ops import gm_to_mean, gm_to_sample
# from lib.models.diffusions.schedulers import GMFlowSDEScheduler
from gmkernels.compat.gmflow_ops import gm_to_mean, gm_to_sample
from gmkernels.compat.schedulers import GMFlowSDEScheduler


def sample_loop(model, noise: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """GMFlow-style loop: the model returns a u-GM; x0 is drawn from the x0-GM, then one exact
    transition step (the scheduler's ``prediction_type='x0'``)."""
    scheduler = GMFlowSDEScheduler(shift=1.0)
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        gm_x0 = u_to_x_0(model(x, t.expand(x.shape[0])), x, t=t)
        x0 = gm_to_sample(gm_x0, n_samples=1).squeeze(1)  # (B, C, H, W)
        x = scheduler.step(x0, t, x, generator=generator, prediction_type="x0").prev_sample
    return x


def toy_model(x: torch.Tensor, t: torch.Tensor) -> dict:
    """A u-GM with two x0 components at -0.5 and +0.5 (equal weights, std 0.1)."""
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    v = torch.tensor([-0.5, 0.5]).view(1, 2, 1, 1, 1)
    B, C, H, W = x.shape
    return {
        "means": (x.unsqueeze(1) - v) / sigma,
        "logstds": (0.1 / sigma).log(),
        "logweights": torch.full((B, 2, 1, H, W), -0.6931471805599453),
    }


if __name__ == "__main__":
    noise = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = sample_loop(toy_model, noise, steps=4, generator=torch.Generator().manual_seed(1))
    gm = u_to_x_0(toy_model(noise, torch.full((8,), 1000.0)), noise, t=torch.tensor(1000.0))
    print(f"samples {tuple(x.shape)}: mean {x.mean():+.3f}, mean |x| {x.abs().mean():.3f} (components at +-0.5)")
    print(f"gm_to_mean at t = 1000: {tuple(gm_to_mean(gm).shape)}, mean {gm_to_mean(gm).mean():+.3f}")
