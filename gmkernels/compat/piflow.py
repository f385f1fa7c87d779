"""The GM policy of the public pi-Flow code base (LakonLab,
``lakonlab/models/diffusions/piflow_policies/gmflow.py`` and ``base.py``) on top of
:class:`gmkernels.policy.GMFlowPolicy`: the same constructor, methods, argument names, defaults
and return conventions, so swapping the import is the whole change::

    from gmkernels.compat.piflow import GMFlowPolicy

Differences, all invisible to the calling code: ``integrate`` runs the whole rollout in one fused
kernel on CUDA with no host synchronisation (the original reads the substep count with
``.item()``); training backpropagates through fused backward kernels that keep about
``sqrt(total_substeps)`` states per pixel, so ``checkpointing`` is accepted and has nothing left
to switch; ``denoising_output_x_0`` is built on access (the kernels apply the u-to-x0 map in
registers and never store it). The log-stds must be one per sample, ``(B, 1, 1, 1, 1)``.
"""

from __future__ import annotations

from typing import Dict

import torch

from .. import policy as _policy


class GMFlowPolicy(_policy.GMFlowPolicy):
    """GMFlow policy of pi-Flow. The number of components K is inferred from the denoising output.

    Args:
        denoising_output: the u-GM ``{means (B, K, C, H, W) | (B, K, C, T, H, W), logstds
            (B, 1, 1, 1, 1) | (B, 1, 1, 1, 1, 1), logweights (B, K, 1, H, W) | (B, K, 1, T, H, W)}``.
        x_t_src: ``(B, C, H, W)`` or ``(B, C, T, H, W)``, the noisy input it was predicted at.
        sigma_t_src: ``(B,)`` noise levels.
        checkpointing: accepted for compatibility (see the module docstring).
        eps: floor of the sigmas and of the posterior's denominator.
    """

    def __init__(
        self,
        denoising_output: Dict[str, torch.Tensor],
        x_t_src: torch.Tensor,
        sigma_t_src: torch.Tensor,
        checkpointing: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__(denoising_output, x_t_src, sigma_t_src, eps=eps)
        self.checkpointing = checkpointing
        self.ndim = x_t_src.dim()

    @property
    def x_t_src(self) -> torch.Tensor:
        return self.x_src

    @property
    def sigma_t_src(self) -> torch.Tensor:
        """``(B, 1, ..., 1)`` with the dims of ``x_t_src``."""
        return self.sigma_src.reshape(-1, *([1] * (self.x_src.dim() - 1)))

    @property
    def denoising_output_x_0(self) -> Dict[str, torch.Tensor]:
        """The x0-GM ``{means (B, K, C, *S), gm_vars (B, 1, 1, *1), logweights (B, K, 1, *S)}``,
        built on access."""
        sig = self.sigma_src.to(self.means_u.dtype).reshape(-1, *([1] * (self.means_u.dim() - 1)))
        return {
            "means": self.x_src.unsqueeze(1) - sig * self.means_u,
            "gm_vars": self.gm_vars.reshape(sig.shape),
            "logweights": self.logweights,
        }

    def pi(self, x_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        """The flow velocity ``u_t`` at ``(x_t, sigma_t)``; ``sigma_t`` of shape ``(B,)`` or
        ``(B, 1, ..., 1)``."""
        return super().pi(x_t, sigma_t)

    def integrate(
        self,
        x_t_start: torch.Tensor,
        sigma_t_start: torch.Tensor,
        raw_t_start: torch.Tensor,
        raw_t_end: torch.Tensor,
        timestep_sampler,
        seq_len=None,
        total_substeps: int = 128,
    ):
        """Euler rollout from ``raw_t_start`` to ``raw_t_end`` (``(B,)``), ``sigma =
        timestep_sampler.warp_t(raw_t, seq_len=seq_len)``, ``ceil((raw_t_start - raw_t_end) *
        total_substeps)`` substeps per sample (at least 1).

        Args:
            x_t_start: ``(B, C, *, H, W)``.
            sigma_t_start: ``(B, 1, *, 1, 1)``.
        Returns:
            ``(x_t_end, sigma_t_end, t_end)``: ``sigma_t_end`` in the shape of ``sigma_t_start``,
            ``t_end = sigma_t_end.flatten() * timestep_sampler.num_timesteps``.
        """
        x_end, sigma_end, _ = super().integrate(
            x_t_start,
            sigma_t_start,
            raw_t_start,
            raw_t_end,
            warp=lambda raw: timestep_sampler.warp_t(raw, seq_len=seq_len),
            total_substeps=total_substeps,
        )
        return x_end, sigma_end, sigma_end.flatten() * timestep_sampler.num_timesteps

    def temperature_(self, temp: float) -> "GMFlowPolicy":
        """Sharpen the GM in place for ``temp < 1`` (argument named as in the original)."""
        return super().temperature_(temp)

    def temperature(self, temp: float) -> "GMFlowPolicy":
        return super().temperature(temp)
