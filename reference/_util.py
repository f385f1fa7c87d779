"""Small helpers shared by the reference modules."""

from __future__ import annotations

import math
from typing import Union

import torch

Sigma = Union[float, torch.Tensor]


def to_gm_dims(x: Sigma) -> Sigma:
    """View a per-sample quantity broadcastable to ``(*B, 1, 1, 1)`` as broadcastable to the GM's
    ``(*B, K, C, H, W)`` by inserting the K axis. Python floats pass through."""
    if isinstance(x, torch.Tensor) and x.dim() >= 3:
        return x.unsqueeze(-4)
    return x


def clamp_min(x: Sigma, lo: float) -> Sigma:
    """``max(x, lo)`` for floats and tensors alike."""
    return x.clamp(min=lo) if isinstance(x, torch.Tensor) else max(x, lo)


def log(x: Sigma) -> Sigma:
    """``log(x)`` for floats and tensors alike: ``-inf`` at 0 and NaN below, as ``Tensor.log``.

    A Python float stays a Python float (``math.log``): no tensor and no ``.item()``, which
    ``torch.compile`` would have to break its graph for."""
    if isinstance(x, torch.Tensor):
        return x.log()
    if x > 0:
        return math.log(x)
    return -math.inf if x == 0 else math.nan


def scaled_logits(logweights: torch.Tensor, power: float) -> torch.Tensor:
    """``power * logweights`` with dead components (``-inf``) kept dead for every power >= 0
    (``0 * -inf`` would be NaN)."""
    if power == 1.0:
        return logweights
    return torch.where(logweights == float("-inf"), logweights, logweights * power)
