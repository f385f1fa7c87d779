"""GM-consuming scheduler objects for code that owns its sampling loop, in the style of the diffusers
schedulers (no dependency on diffusers): ``set_timesteps``, ``timesteps``, ``step(gm_u, t, x)``.
``step`` takes the network's u-GM (not a tensor, unlike the official GMFlow schedulers
``FlowEulerODEScheduler`` / ``GMFlowSDEScheduler`` of :mod:`gmkernels.gmflow_schedulers`).

* :class:`GMSDEScheduler` — GM-SDE, one exact draw from the GM transition per network call;
* :class:`GMODEScheduler` — GM-ODE, ``substeps`` posterior-mean Euler substeps per call;
* :class:`GMEulerScheduler` — the flow-matching Euler baseline on the GM's mean;
* :class:`GMTensorStepScheduler` — the official pipeline's loop body: an x0 from the GM (its mean,
  a draw, a spectrally correlated draw) stepped by an official tensor scheduler.

Example (what ``gmkernels.sample`` does)::

    sched = GMODEScheduler(order=2)
    sched.set_timesteps(8, substeps=4, shift=3.0, device=noise.device)
    x = noise
    for t in sched.timesteps:
        gm_u = model(x, t.expand(x.shape[0]))      # u-GM, or (gm_cond, gm_uncond) with guidance
        x = sched.step(gm_u, t, x)
    # x: samples at sigma = 0

Schedule (docs/solvers.md): for ``S`` steps of ``N`` substeps, ``s_i = 1 - i / (S*N)``,
``sigma_i = shift * s_i / (1 + (shift - 1) * s_i)`` for ``i < S*N``, then ``sigma = 0``;
``t = 1000 * sigma``. ``timesteps`` holds the ``S`` main-step timesteps.

Triton path: ``step`` runs ``gmkernels.ops.solver.fused_step``, one kernel on the
network's GM in its own dtype (plus statistics launches of it under guidance and at 2nd order):
no x0-GM, guided GM or float32 copy of the network output is formed. The torch path composes the
ops eagerly (``_x0_gm``); the two agree to fp32 accuracy (``tests/test_solver.py``).

No host synchronisation: ``step`` advances an internal step index (``t`` is not looked up in
the table, which would read a device value), all sigmas are Python floats or a device table
built with device ops, and no Python branch depends on tensor values; the loop can therefore
be captured in a CUDA graph (see ``gmkernels.sample``).
"""

from __future__ import annotations

import abc
import math

import torch

import reference.solver_steps as _ref_steps

from ._dispatch import select_backend
from ._validate import check_positive, check_power, check_step_output
from .ops._launch import kernels_wanted
from .ops.guidance import mean_cfg, probabilistic_guidance, weight_guidance
from .ops.inverse_cdf import gaussian_samples_to_gm_samples
from .ops.mixture import gm_to_iso_gaussian, gm_to_mean
from .ops.posterior import gm_posterior_mean
from .ops.product import gm_mul_iso_gaussian
from .ops.sampling import gm_sample
from .ops.solver import CA, CB, RHO_MIN, fused_step, gm_ode_substeps, gm_sde_step
from .ops.transition import u_to_x0

T = 1000.0
GUIDANCE = ("probabilistic", "weight", "mean-cfg")
_DIMS = (-3, -2, -1)
_RHO_MIN = RHO_MIN  # floor of the relative variance reduction of a Gaussian reweighting (``_reweight``)


def schedule_sigmas(num_steps: int, substeps: int = 1, shift: float = 1.0) -> list[float]:
    """The ``num_steps * substeps + 1`` noise levels of docs/solvers.md#schedule as Python floats (last one 0)."""
    n = num_steps * substeps
    s = [1 - i / n for i in range(n)]
    return [shift * v / (1 + (shift - 1) * v) for v in s] + [0.0]


def _schedule_table(n: int, shift: float, device: torch.device) -> torch.Tensor:
    """The same levels as a float32 device tensor, built with device ops only (no host-to-device
    copy, so it can be created while a CUDA graph is captured)."""
    s = 1 - torch.arange(n, dtype=torch.float64, device=device) / n
    sig = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64, device=device)]).to(torch.float32)


def _check_int(v, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _fp32(gm: dict) -> dict:
    """The network's GM in float32: ``x0 = x_t - sigma * u`` cancels, so it is not formed in bf16."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in gm.items()}


def _reweight(
    base_gm: dict, base_mean: torch.Tensor, base_var: torch.Tensor, bias: torch.Tensor, rho: torch.Tensor
) -> dict:
    """Reweight ``base_gm`` (moment match ``(base_mean, base_var)``) by the Gaussian quotient
    ``N(base_mean + bias, base_var * (1 - rho)) / N(base_mean, base_var)``.

    The quotient is written in closed form, ``N(base_mean + bias / rho, base_var * (1 - rho) / rho)``,
    with ``rho (*B, 1, 1, 1)`` in ``[_RHO_MIN, 1 - _RHO_MIN]``, a floor relative to ``base_var``
    (op 4 floors the denominator ``base_var * rho`` at an absolute 1e-6, which distorts the GM
    when ``base_var`` is small and the bias vanishes, e.g. the 2nd-order correction on an exact
    model).
    """
    g = {"mean": base_mean + bias / rho, "var": base_var * ((1 - rho) / rho)}
    return gm_mul_iso_gaussian(base_gm, g)


def _guidance_parts(gm_cond: dict, gm_uncond: dict, scale: float, orthogonal: float):
    """Pieces of probabilistic guidance (docs/ops.md#guidance) that the 2nd-order rule combines with its
    own bias: ``m_c (*B, C, H, W)``, ``v_c (*B, 1, 1, 1)`` and the scaled guidance bias."""
    cond = gm_to_iso_gaussian(gm_cond)
    m_c, v_c = cond["mean"], cond["var"].mean(dim=(-2, -1), keepdim=True)
    bias = m_c - gm_to_mean(gm_uncond)
    if orthogonal > 0:
        proj = (bias * m_c).mean(_DIMS, keepdim=True) / (m_c * m_c).mean(_DIMS, keepdim=True).clamp(min=1e-6)
        bias = bias - orthogonal * proj * m_c
    P = (bias * bias).mean(_DIMS, keepdim=True)
    bias = bias * (scale * torch.sqrt(v_c / P.clamp(min=1e-6)))
    return m_c, v_c, bias


class _GMSchedulerBase(abc.ABC):
    """Shared part of the schedulers: schedule, guidance and the 2nd-order correction on the
    x0-GM; subclasses move the state (``_advance``)."""

    solver = ""
    #: run a step as one fused kernel on the Triton path (False: the eager composition of ops)
    fused = True
    _orders = (1, 2)
    _substeps_allowed = True
    #: ``_advance`` reads the Gaussian the x0-GM aims at (``_x0_gm(..., with_target=True)``)
    _wants_target = False

    def __init__(
        self,
        shift: float = 1.0,
        order: int = 1,
        guidance: str = "probabilistic",
        guidance_scale: float = 0.0,
        orthogonal: float = 1.0,
    ):
        self.shift = self._check_shift(shift)
        if order not in self._orders:
            raise ValueError(f"order must be one of {self._orders} for solver {self.solver!r}, got {order!r}")
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")
        self.order = order
        self.guidance = guidance
        self.guidance_scale = check_power(guidance_scale, "guidance_scale")
        if guidance == "probabilistic" and self.guidance_scale >= 1:
            raise ValueError(f"guidance_scale must lie in [0, 1) for probabilistic guidance, got {guidance_scale}")
        self.orthogonal = check_power(orthogonal, "orthogonal")
        self.num_train_timesteps = int(T)
        self.timesteps = None
        self.sigmas: list[float] = []

    @staticmethod
    def _check_shift(shift) -> float:
        return check_positive(shift, "shift")

    def set_timesteps(self, num_steps: int, substeps: int = 1, shift: float | None = None, device=None) -> None:
        """Fix the schedule of ``num_steps`` main steps (network calls) with ``substeps`` each.

        Sets ``timesteps`` (float32 ``(num_steps,)`` on ``device``), ``sigmas`` (Python floats,
        ``num_steps * substeps + 1`` of them) and resets the step index and the 2nd-order memory.
        """
        self.num_steps = _check_int(num_steps, "num_steps")
        self.substeps = _check_int(substeps, "substeps")
        if substeps != 1 and not self._substeps_allowed:
            raise ValueError(
                f"substeps must be 1 for solver {self.solver!r} (only gm-ode has substeps), got {substeps}"
            )
        if shift is not None:
            self.shift = self._check_shift(shift)
        n = num_steps * substeps
        self.sigmas = schedule_sigmas(num_steps, substeps, self.shift)
        device = torch.device("cpu") if device is None else torch.device(device)
        self._table = _schedule_table(n, self.shift, device)
        self.timesteps = self._table[0:n:substeps] * T
        self.step_index = 0
        self._prev = None

    def _sigma_table(self, device: torch.device) -> torch.Tensor:
        if self._table.device != device:
            self._table = _schedule_table(self.num_steps * self.substeps, self.shift, device)
        return self._table

    def _split(self, gm_u) -> tuple[dict, dict | None]:
        """``(gm_cond, gm_uncond)`` of a model output; ``gm_uncond`` is None without guidance."""
        scale = self.guidance_scale
        paired = isinstance(gm_u, (tuple, list))
        if paired and len(gm_u) != 2:
            raise TypeError(f"a guided model output must be (gm_cond, gm_uncond), got a sequence of {len(gm_u)}")
        if scale > 0 and not paired:
            raise TypeError(
                f"guidance_scale={scale} > 0: the model output must be a pair (gm_cond, gm_uncond), got {type(gm_u).__name__}"
            )
        if scale == 0:  # no guidance; a pair's conditional GM is used as is
            return (gm_u[0] if paired else gm_u), None
        return gm_u[0], gm_u[1]

    def _x0_gm(
        self, gm_u, x: torch.Tensor, sigma: float, h: float, with_target: bool = False
    ) -> tuple[dict, dict | None]:
        """The x0-GM the state moves with: u -> x0 (op 5), guidance (op 11), 2nd order (docs/solvers.md),
        composed eagerly (the torch path; the Triton path fuses it, see ``_fused_step``).

        Returns ``(gm, target)``: ``target`` is None unless ``with_target`` or a 2nd-order step
        gives it; else the Gaussian ``{mean (*B, C, H, W), var}`` the step aimed at, as the
        official pipeline's ``gaussian_output`` (the spectrum network's input): the moment match
        of ``gm`` (``var (*B, 1, H, W)``), or under probabilistic guidance or at 2nd order the
        Gaussian of that reweighting (``var (*B, 1, 1, 1)``).
        """
        scale = self.guidance_scale
        cond_u, uncond_u = self._split(gm_u)
        target = None
        if uncond_u is None:
            gm = u_to_x0(_fp32(cond_u), x, sigma)
            cond = uncond = None
        else:
            cond = u_to_x0(_fp32(cond_u), x, sigma)
            uncond = u_to_x0(_fp32(uncond_u), x, sigma)
            if self.guidance == "probabilistic":
                gm = probabilistic_guidance(cond, uncond, scale, self.orthogonal)
                if with_target:
                    m_c, v_c, bias = _guidance_parts(cond, uncond, scale, self.orthogonal)
                    target = {"mean": m_c + bias, "var": v_c * (1 - scale * scale)}
            elif self.guidance == "weight":
                gm = weight_guidance(cond, uncond, scale)
            else:
                gm = mean_cfg(cond, uncond, scale, orthogonal=self.orthogonal > 0)
        if with_target and target is None:
            target = gm_to_iso_gaussian(gm)
        if self.order == 1:
            return gm, target
        gm, reweighted = self._second_order(gm, cond, uncond, x, sigma, h)
        return gm, target if reweighted is None else reweighted

    def _second_order(
        self, gm: dict, cond, uncond, x: torch.Tensor, sigma: float, h: float
    ) -> tuple[dict, dict | None]:
        """the 2nd-order rule of docs/solvers.md#2nd-order (``reference.solver_steps.second_order_bias``)
        on the first-order (guided) x0-GM ``gm``. Returns ``(gm, target)``: the reweighted GM and
        the Gaussian it aims at, or ``(gm, None)`` on the first step (no previous GM).

        The mean of the previous step's first-order GM carried to the current state (op 6) is
        compared with the current mean; the damped difference plus, under probabilistic
        guidance, the guidance bias is applied to the base GM (the conditional one under
        probabilistic guidance, else ``gm``) as one Gaussian reweighting: bias power ``P`` capped
        at ``V``, variance shrunk by ``1 - P / V``. Weight guidance and mean-CFG have no Gaussian
        bias of their own: their guided GM is the base and ``E`` uses ``ca`` only (their scale is
        not a fraction of V).
        """
        prev, self._prev = self._prev, (gm, x, sigma, h)
        if prev is None:
            return gm, None
        if cond is not None and self.guidance == "probabilistic":
            base_gm = cond
            base_mean, base_var, cfg_bias = _guidance_parts(cond, uncond, self.guidance_scale, self.orthogonal)
            mean_now = gm_to_mean(gm)
            scale = self.guidance_scale
        else:
            base_gm = gm
            g = gm_to_iso_gaussian(gm)
            base_mean, base_var, cfg_bias = g["mean"], g["var"].mean(dim=(-2, -1), keepdim=True), None
            mean_now = base_mean
            scale = 0.0
        V = base_var  # (*B, 1, 1, 1): already averaged over H, W, and C has one variance
        prev_gm, prev_x, prev_sigma, prev_h = prev
        mean_prev = gm_posterior_mean(prev_gm, prev_x, prev_sigma, x, sigma)
        bias, P, _ = _ref_steps.second_order_bias(mean_now, mean_prev, V, h, prev_h, scale, cfg_bias, CA, CB)
        rho = (P / V.clamp(min=1e-6)).clamp(min=_RHO_MIN, max=1 - _RHO_MIN)
        target = {"mean": base_mean + bias, "var": base_var * (1 - rho)}
        return _reweight(base_gm, base_mean, base_var, bias, rho), target

    def step(self, gm_u, t, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Advance ``x`` by one main step with the model output at that step.

        Args:
            gm_u: the u-GM the model predicted at ``(x, t)``, or ``(gm_cond, gm_uncond)`` when
                ``guidance_scale > 0``.
            t: the current timestep, ``timesteps[step_index]``; the index advances internally, so
                ``t`` is only compared with the schedule when it is a Python number.
            x: ``(*B, C, H, W)`` state.
            generator: randomness of the GM-SDE draw.
        Returns:
            The state at the next main step's noise level (at sigma 0 after the last step).
        """
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_steps, substeps, shift) before step()")
        i = self.step_index
        if i >= self.num_steps:
            raise RuntimeError(f"all {self.num_steps} steps are done; call set_timesteps again")
        N = self.substeps
        sigma, sigma_next = self.sigmas[i * N], self.sigmas[(i + 1) * N]
        if isinstance(t, (int, float)) and not math.isclose(float(t), T * sigma, rel_tol=1e-5, abs_tol=1e-3):
            raise ValueError(f"t={t} does not match step {i} of the schedule (t={T * sigma})")
        cond, uncond = self._split(gm_u)
        check_step_output(cond, uncond, x, generator, i, T * sigma)
        if self.fused and kernels_wanted(cond["means"], x):
            x = self._fused_step(cond, uncond, x, i, generator)
        else:
            gm, target = self._x0_gm(gm_u, x, sigma, sigma - sigma_next, with_target=self._wants_target)
            x = self._advance(gm, x, i, generator, target)
        self.step_index = i + 1
        return x

    def _fused_step(self, cond: dict, uncond: dict | None, x: torch.Tensor, i: int, generator) -> torch.Tensor:
        """The Triton path of ``step``: one fused kernel on the network's GMs in their own dtype
        (plus statistics launches of it under guidance or at 2nd order), no x0-GM formed. At 2nd
        order the memory is the previous first-order GM's posterior mean at this state
        (``(*B, C, H, W)`` float32, written by the previous step's kernel) and its step size."""
        N = self.substeps
        levels = (self.sigmas[i * N], self.sigmas[(i + 1) * N])
        prev = self._prev if self.order == 2 else None
        post = self.order == 2 and i + 1 < self.num_steps
        x, post_mean = fused_step(
            cond if uncond is None else (cond, uncond),
            x,
            self._sigma_table(x.device)[i * N : (i + 1) * N + 1],
            levels,
            sde=self.solver == "gm-sde",
            guidance=self.guidance if uncond is not None else "none",
            scale=self.guidance_scale,
            orthogonal=self.orthogonal,
            prev_mean=None if prev is None else prev[0],
            h=levels[0] - levels[1],
            h_prev=0.0 if prev is None else prev[1],
            post=post,
            generator=generator,
        )
        self._prev = (post_mean, levels[0] - levels[1]) if post else None
        return x

    @abc.abstractmethod
    def _advance(self, gm: dict, x: torch.Tensor, i: int, generator, target: dict | None) -> torch.Tensor:
        """Move ``x`` from main step ``i`` to ``i + 1`` with the x0-GM ``gm`` (``target``: the
        Gaussian of ``_x0_gm``, given when ``_wants_target``)."""


class GMODEScheduler(_GMSchedulerBase):
    """GM-ODE (docs/solvers.md): per main step, ``substeps`` Euler substeps whose x0 is the posterior mean
    of the step's GM at the substep's state (one fused kernel, no network call)."""

    solver = "gm-ode"

    def _advance(self, gm, x, i, generator, target):
        N = self.substeps
        if select_backend(gm["means"]) == "torch":
            sigmas = self.sigmas[i * N : (i + 1) * N + 1]
        else:
            sigmas = self._sigma_table(x.device)[i * N : (i + 1) * N + 1]
        return gm_ode_substeps(gm, x, sigmas)


class GMSDEScheduler(_GMSchedulerBase):
    """GM-SDE (docs/solvers.md): an exact draw from the GM reverse transition per step (one fused kernel)."""

    solver = "gm-sde"
    _substeps_allowed = False

    def _advance(self, gm, x, i, generator, target):
        return gm_sde_step(gm, x, self.sigmas[i], self.sigmas[i + 1], generator=generator)


class GMEulerScheduler(GMODEScheduler):
    """The flow-matching Euler baseline: ``x0 = gm_to_mean(gm)``, one Euler step per network call."""

    solver = "euler"
    _orders = (1,)
    _substeps_allowed = False


def spectral_gm_sample(
    gm: dict, log_power_spectrum: torch.Tensor, n_samples: int = 1, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatially correlated draws of a per-pixel GM (GMFlow's ``output_mode="sample"`` with a spectrum
    network): Fourier-domain standard normals scaled by ``exp(log_power_spectrum / 2)``, made
    Hermitian and inverse-FFT'd (orthonormal), then carried to the GM by the Knothe-Rosenblatt
    transport (``gaussian_samples_to_gm_samples``, axis-aligned).

    Args:
        gm: x0-GM ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1), logweights (*B, K, 1, H, W)}``.
        log_power_spectrum: ``(*B, C, H, W)`` (or broadcastable) log power per frequency, e.g.
            :class:`gmkernels.models.SpectrumMLP`'s output.
        n_samples: draws per GM. generator: randomness of the noise (on the GM's device).
    Returns:
        ``(samples (*B, N, C, H, W), spectral_noise (*B, N, C, H, W) float32)``.
    """
    spectrum = log_power_spectrum.to(torch.float32).unsqueeze(-4)
    shape = list(gm["means"].shape)
    shape[-4] = n_samples
    half = shape[-1] // 2 + 1
    noise = (
        torch.randn(shape, dtype=torch.float32, device=gm["means"].device, generator=generator) * (spectrum / 2).exp()
    )
    z_1 = noise.roll((-1, -1), dims=(-2, -1)).flip((-2, -1))[..., :half]
    z_0 = noise[..., :half]
    gaussian = torch.fft.irfft2(torch.complex(z_0 + z_1, z_0 - z_1) / 2, s=shape[-2:], norm="ortho")
    return gaussian_samples_to_gm_samples(gm, gaussian, axis_aligned=True), noise


class GMTensorStepScheduler(_GMSchedulerBase):
    """The official ``GMDiTPipeline``'s loop body, eagerly: per network call the (guided, 2nd-order)
    x0-GM gives an x0 and an official tensor scheduler (``FlowEulerODEScheduler``,
    ``GMFlowSDEScheduler``) steps on it with ``prediction_type='x0'``.

    The x0 of substep 0 is the GM's mean (``x0_mode="mean"``) or a draw of it (``"sample"``:
    per pixel, or spatially correlated by :func:`spectral_gm_sample` when ``spectrum_net`` is
    given); substep ``j > 0`` (``"mean"`` only) takes the GM's posterior mean at the substep's
    state (op 6). With ``FlowEulerODEScheduler`` and ``"mean"`` this is GM-ODE and with
    ``GMFlowSDEScheduler(output_mode="sample")`` and per-pixel draws GM-SDE, which
    :class:`GMODEScheduler` / :class:`GMSDEScheduler` run fused; this class serves the other
    pairings the official pipeline allows.

    Args:
        tensor_scheduler: the official-contract scheduler that steps; its config gives the
            schedule (``shift``, dynamic shifting). ``set_timesteps`` sets it to
            ``num_steps * substeps`` steps.
        x0_mode: ``"mean"`` or ``"sample"`` (the official pipeline's ``output_mode``).
        spectrum_net: with ``"sample"``, a callable ``{mean (*B, C, H, W), var} -> log power
            spectrum (*B, C, H, W)`` fed the Gaussian the step aims at (the guidance / 2nd-order
            target, as officially); None draws per pixel.
        order, guidance, guidance_scale, orthogonal: as :class:`GMSDEScheduler`.
    """

    solver = "tensor-step"
    fused = False

    def __init__(
        self,
        tensor_scheduler,
        x0_mode: str = "mean",
        spectrum_net=None,
        order: int = 1,
        guidance: str = "probabilistic",
        guidance_scale: float = 0.0,
        orthogonal: float = 1.0,
    ):
        # imported here, not by `import gmkernels`: with diffusers installed these are diffusers
        # classes, and importing diffusers (and torch._dynamo with it) takes seconds
        from .gmflow_schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler

        if not isinstance(tensor_scheduler, (FlowEulerODEScheduler, GMFlowSDEScheduler)):
            raise TypeError(
                "tensor_scheduler must be a FlowEulerODEScheduler or GMFlowSDEScheduler, "
                f"got {type(tensor_scheduler).__name__}"
            )
        if x0_mode not in ("mean", "sample"):
            raise ValueError(f"x0_mode must be 'mean' or 'sample', got {x0_mode!r}")
        if spectrum_net is not None and (x0_mode != "sample" or not callable(spectrum_net)):
            raise ValueError(
                "spectrum_net must be a callable and is used with x0_mode='sample' only, got "
                f"{type(spectrum_net).__name__} with x0_mode={x0_mode!r}"
            )
        super().__init__(
            shift=float(tensor_scheduler.config.shift),
            order=order,
            guidance=guidance,
            guidance_scale=guidance_scale,
            orthogonal=orthogonal,
        )
        self.tensor_scheduler = tensor_scheduler
        self.x0_mode = x0_mode
        self.spectrum_net = spectrum_net
        self._wants_target = spectrum_net is not None
        self._substeps_allowed = x0_mode == "mean"

    def set_timesteps(self, num_steps: int, substeps: int = 1, device=None, *, seq_len: int | None = None) -> None:
        """Fix ``num_steps`` network calls of ``substeps`` steps each, for this scheduler and
        ``tensor_scheduler`` alike; the shift is ``tensor_scheduler.get_shift(seq_len)``."""
        config = self.tensor_scheduler.config
        if config.num_train_timesteps != int(T):
            raise ValueError(
                f"tensor_scheduler: num_train_timesteps must be {int(T)} (timesteps are 1000 * sigma), "
                f"got {config.num_train_timesteps}"
            )
        if config.terminal_sigma is not None:
            raise ValueError(
                f"tensor_scheduler: terminal_sigma={config.terminal_sigma} is not supported "
                f"(the schedule ends at sigma = 0)"
            )
        super().set_timesteps(num_steps, substeps, shift=float(self.tensor_scheduler.get_shift(seq_len)), device=device)
        self.tensor_scheduler.set_timesteps(num_steps * substeps, device=device, seq_len=seq_len)

    def _advance(self, gm, x, i, generator, target):
        N, steps = self.substeps, self.tensor_scheduler
        x_in, x_base = x, x
        for j in range(N):
            if j > 0:
                x0 = gm_posterior_mean(gm, x_base, self.sigmas[i * N], x, self.sigmas[i * N + j])
            elif self.x0_mode == "mean":
                x0 = gm_to_mean(gm)
            elif self.spectrum_net is not None:
                x0 = spectral_gm_sample(gm, self.spectrum_net(target), generator=generator)[0].squeeze(-4)
            else:
                x0 = gm_sample(gm, generator=generator).squeeze(-4)
            x = steps.step(
                x0, steps.timesteps[i * N + j], x, generator=generator, return_dict=False, prediction_type="x0"
            )[0]
        return x.to(x_in.dtype)


SCHEDULERS = {"gm-sde": GMSDEScheduler, "gm-ode": GMODEScheduler, "euler": GMEulerScheduler}
