"""pi-Flow GM policies: a u-GM predicted once at ``(x_src, sigma_src)``, queried as a velocity
field at any later state and integrated over many substeps without another network call.

Example::

    policy = GMFlowPolicy(gm_u, x_t, sigma_t)            # gm_u: the network's output
    x_next, sigma_next, t_next = policy.integrate(x_t, sigma_t, raw_t, raw_t_next, shift=3.0)

CUDA tensors run fused Triton kernels (the whole rollout is one kernel; the GM is read once per
pixel when ``next_pow2(K) * next_pow2(C) <= 1024``); CPU tensors run the plain-PyTorch twin.
Both are differentiable w.r.t. the GM's means, log-stds and log-weights and the states.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch

import reference.policy as ref

from ._dispatch import compute_dtype
from ._validate import check_float_tensor
from .ops.policy import policy_rollout, policy_velocity

Scalar = Union[float, torch.Tensor]


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _assert_in_unit(t: torch.Tensor, name: str) -> None:
    """Values in [0, 1], checked without a host read (``torch._assert_async``: an error on CPU
    at once, a device-side assert on CUDA)."""
    torch._assert_async(((t >= 0) & (t <= 1)).all(), f"{name} must lie in [0, 1]")


class GMFlowPolicy:
    """The GM policy of pi-Flow.

    Args:
        gm_u: the network's u-GM ``{means (B, K, C, H, W), logstds (B, 1, 1, 1, 1),
            logweights (B, K, 1, H, W)}``; video: ``(B, K, C, T, H, W)``, ``(B, 1, 1, 1, 1, 1)``,
            ``(B, K, 1, T, H, W)``. Float dtypes, one device.
        x_src: ``(B, C, H, W)`` (video ``(B, C, T, H, W)``): the state it was predicted at.
        sigma_src: ``(B,)`` (or any shape with B elements, e.g. ``(B, 1, 1, 1)``) noise levels in
            [0, 1], or a Python float.
        eps: floor of the sigmas and of the posterior's denominator.

    The x0-GM of the policy is ``mu_k = x_src - sigma_src * u_k`` with variance
    ``exp(2 * logstd) * sigma_src^2``; it is kept as the u-means (the affine map runs inside the
    kernels), a ``(B,)`` variance and the log-weights.
    """

    def __init__(self, gm_u: Mapping[str, torch.Tensor], x_src: torch.Tensor, sigma_src: Scalar, eps: float = 1e-6):
        if not isinstance(gm_u, Mapping) or any(k not in gm_u for k in ("means", "logstds", "logweights")):
            raise TypeError(f"gm_u must be a dict with keys means, logstds, logweights; got {type(gm_u).__name__}")
        means = check_float_tensor(gm_u["means"], "gm_u['means']")
        if means.dim() not in (5, 6):
            raise ValueError(
                f"gm_u['means'] must have shape (B, K, C, H, W) or (B, K, C, T, H, W), got {_shape(means)}"
            )
        dev = means.device
        logstds = check_float_tensor(gm_u["logstds"], "gm_u['logstds']", dev)
        logweights = check_float_tensor(gm_u["logweights"], "gm_u['logweights']", dev)
        B, K, C, *spatial = means.shape
        if tuple(logweights.shape) != (B, K, 1, *spatial):
            raise ValueError(
                f"gm_u['logweights'] must have shape {(B, K, 1, *spatial)} to match gm_u['means'] {_shape(means)}, "
                f"got {_shape(logweights)}"
            )
        if tuple(logstds.shape) != (B, *([1] * (means.dim() - 1))):
            raise ValueError(
                f"gm_u['logstds'] must have shape {(B, *([1] * (means.dim() - 1)))} (one std per sample) to match "
                f"gm_u['means'] {_shape(means)}, got {_shape(logstds)}"
            )
        x_src = self._check_state(x_src, "x_src", means)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"eps must be a float in (0, 1), got {eps!r}")
        sigma_src = self._per_sample(sigma_src, "sigma_src", means)
        self.means_u = means
        self.logweights = logweights
        self.x_src = x_src
        self.sigma_src = sigma_src
        self.eps = float(eps)
        cdt = compute_dtype(means.dtype, logstds.dtype)
        self.gm_vars = torch.exp(2 * logstds.reshape(B).to(cdt)) * sigma_src.to(cdt) ** 2

    # ------------------------------------------------------------------ validation helpers

    @staticmethod
    def _check_state(x: Any, name: str, means: torch.Tensor) -> torch.Tensor:
        # a plain float tensor on the GM's device, the common case, without a call
        if not (type(x) is torch.Tensor and x.is_floating_point() and x.device == means.device):
            x = check_float_tensor(x, name, means.device)
        B, K, C, *spatial = means.shape
        if tuple(x.shape) != (B, C, *spatial):
            raise ValueError(
                f"{name} must have shape {(B, C, *spatial)} to match the GM means {_shape(means)}, got {_shape(x)}"
            )
        return x

    @staticmethod
    def _per_sample(v: Any, name: str, means: torch.Tensor) -> torch.Tensor:
        """A ``(B,)`` float32 (float64 if given so) contiguous tensor from a float or a tensor
        with B elements; values checked against [0, 1] without a host read."""
        B = means.shape[0]
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a float or a float tensor with {B} elements, got {type(v).__name__}")
        if not isinstance(v, torch.Tensor):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
            return torch.full((B,), float(v), device=means.device)
        check_float_tensor(v, name, means.device)
        if v.numel() != B or (v.dim() > 1 and any(n != 1 for n in v.shape[1:])):
            raise ValueError(f"{name} must have shape (B,) = ({B},) (or (B, 1, ..., 1)), got {_shape(v)}")
        v = v.reshape(B)
        v = v if v.dtype == torch.float64 else v.float()
        _assert_in_unit(v, name)
        return v.contiguous()

    # ------------------------------------------------------------------ the policy

    @property
    def shape(self) -> tuple[int, ...]:
        """``(B, K, C, *S)`` of the GM."""
        return tuple(self.means_u.shape)

    def pi(self, x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
        """The velocity ``u = (x - x0_hat) / max(sigma, eps)`` at ``(x, sigma)``, with ``x0_hat``
        the posterior mean of the policy's x0-GM at that state. One fused pass on CUDA.

        Args:
            x: ``(B, C, *S)``.
            sigma: ``(B,)`` (or B elements) or a float, in [0, 1].
        Returns:
            ``(B, C, *S)`` in the dtype of ``x``.
        """
        x = self._check_state(x, "x", self.means_u)
        sigma = self._per_sample(sigma, "sigma", self.means_u)
        return policy_velocity(
            self.means_u, self.gm_vars, self.logweights, self.x_src, self.sigma_src, x, sigma, self.eps
        )

    def integrate(
        self,
        x_start: torch.Tensor,
        sigma_start: Scalar,
        raw_t_start: Scalar,
        raw_t_end: Scalar,
        shift: float = 1.0,
        warp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        total_substeps: int = 128,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Euler rollout of the policy from raw time ``raw_t_start`` to ``raw_t_end``.

        Sample ``b`` takes ``n_b = max(ceil((raw_t_start - raw_t_end) * total_substeps), 1)``
        substeps of equal raw size; ``sigma = warp(raw_t)``, by default
        ``shift * t / (1 + (shift - 1) * t)``; the first substep starts at ``sigma_start``.
        ``x <- x + pi(x, sigma) * (sigma_next - sigma)``. No host reads: the tables are built on
        the device, the loop runs ``total_substeps`` times and finished samples are held.

        Args:
            x_start: ``(B, C, *S)``.
            sigma_start: ``(B,)`` or ``(B, 1, ..., 1)`` or a float.
            raw_t_start, raw_t_end: ``(B,)`` or floats, ``0 <= raw_t_end <= raw_t_start <= 1``.
            shift: of the default warp (ignored when ``warp`` is given).
            warp: elementwise map of a raw-time tensor to sigmas in [0, 1].
            total_substeps: substeps of a rollout over the whole raw interval [0, 1].
        Returns:
            ``(x_end (B, C, *S), sigma_end, t_end (B,))``: ``sigma_end`` in the shape of a
            tensor ``sigma_start`` (``(B,)`` for a float), ``t_end = 1000 * sigma_end``.
        """
        x_start = self._check_state(x_start, "x_start", self.means_u)
        if isinstance(total_substeps, bool) or not isinstance(total_substeps, int) or total_substeps < 1:
            raise ValueError(f"total_substeps must be an int >= 1, got {total_substeps!r}")
        if warp is None:
            if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
                raise ValueError(f"shift must be a float > 0, got {shift!r}")
            shift = float(shift)

            def warp(t: torch.Tensor) -> torch.Tensor:
                return shift * t / (1 + (shift - 1) * t)

        elif not callable(warp):
            raise TypeError(f"warp must be callable (raw time tensor -> sigma tensor), got {type(warp).__name__}")
        s0 = self._per_sample(sigma_start, "sigma_start", self.means_u)
        r0 = self._per_sample(raw_t_start, "raw_t_start", self.means_u)
        r1 = self._per_sample(raw_t_end, "raw_t_end", self.means_u)
        torch._assert_async((r1 <= r0).all(), "raw_t_end must not exceed raw_t_start")
        sigmas, _ = ref.rollout_sigmas(s0, r0, r1, total_substeps, warp)
        sigmas = sigmas.to(s0.dtype).contiguous()
        x_end = policy_rollout(
            self.means_u, self.gm_vars, self.logweights, self.x_src, self.sigma_src, x_start, sigmas, self.eps
        )
        sigma_end = sigmas[:, -1]
        if isinstance(sigma_start, torch.Tensor):
            sigma_end = sigma_end.reshape(sigma_start.shape).to(sigma_start.dtype)
        return x_end, sigma_end, sigma_end.flatten() * 1000

    # ------------------------------------------------------------------ derived policies

    def copy(self) -> "GMFlowPolicy":
        """A new policy sharing the tensors (the in-place methods of the copy do not touch this one)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def detach_(self) -> "GMFlowPolicy":
        """Detach the GM from the autograd graph, in place."""
        for k in ("means_u", "logweights", "x_src", "gm_vars"):
            setattr(self, k, getattr(self, k).detach())
        return self

    def detach(self) -> "GMFlowPolicy":
        """A detached copy."""
        return self.copy().detach_()

    def temperature_(self, temperature: float) -> "GMFlowPolicy":
        """Sharpen the GM in place: for ``T < 1``, ``logweights <- log_softmax(logweights / T)``
        and variances times ``T`` (``T`` floored at ``eps``); ``T >= 1`` leaves it unchanged
        (as the public pi-Flow code does)."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        if temperature >= 1.0:
            return self
        cdt = compute_dtype(self.logweights.dtype)
        lw, self.gm_vars = ref.gm_temperature(self.logweights.to(cdt), self.gm_vars, temperature, self.eps)
        self.logweights = lw
        return self

    def temperature(self, temperature: float) -> "GMFlowPolicy":
        """``temperature_`` on a copy."""
        return self.copy().temperature_(temperature)

    def dropout_(self, p: float, generator: Optional[torch.Generator] = None) -> "GMFlowPolicy":
        """Component dropout in place: each component's weight of each sample is set to 0
        (log-weight ``-inf``) with probability ``p``, never all of a sample's components;
        ``p <= 0`` or ``p >= 1`` leaves the policy unchanged."""
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a float, got {type(p).__name__}")
        if p <= 0 or p >= 1:
            return self
        B, K = self.means_u.shape[:2]
        gen_dev = self.means_u.device if generator is None else generator.device
        drop = (torch.rand((B, K), generator=generator, device=gen_dev) < p).to(self.means_u.device)
        drop &= ~drop.all(dim=1, keepdim=True)
        mask = drop.reshape(B, K, *([1] * (self.logweights.dim() - 2)))
        self.logweights = self.logweights.masked_fill(mask, float("-inf"))
        return self

    def dropout(self, p: float, generator: Optional[torch.Generator] = None) -> "GMFlowPolicy":
        """``dropout_`` on a copy."""
        return self.copy().dropout_(p, generator)
