"""diffusers schedulers (``SchedulerMixin`` + ``ConfigMixin``) with the names and config keys of the
public GMFlow code base, stepping with the GM solvers of :mod:`gmkernels.schedulers`.

* :class:`FlowEulerODEScheduler` — GM-ODE: per network call, ``num_substeps`` Euler substeps on the
  GM's posterior mean (the official pipeline's ``output_mode="mean"``).
* :class:`GMFlowSDEScheduler` — GM-SDE: per network call one exact draw from the GM reverse
  transition (the official ``output_mode="sample"``), optionally with spectrally correlated
  noise from a spectrum network.

Both read the official ``scheduler_config.json`` keys (``num_train_timesteps``, ``shift``,
``use_dynamic_shifting``, ``base_seq_len``, ``max_seq_len``, ``base_logshift``, ``max_logshift``,
``terminal_sigma``) and take the u-GM as ``model_output``::

    sched = FlowEulerODEScheduler.from_pretrained(path, subfolder="scheduler")
    sched.set_timesteps(32, num_substeps=4, device="cuda", order=2, guidance_scale=0.45)
    for t in sched.timesteps:
        gm_u = model(x, t)                          # u-GM, or (gm_cond, gm_uncond) with guidance
        x = sched.step(gm_u, t, x, generator=g).prev_sample

Schedule: ``sigma_i = shift * s_i / (1 + (shift - 1) * s_i)``, ``s_i = 1 - i / (S * N)`` for
``S`` steps of ``N`` substeps, then 0; ``timesteps`` are the ``S`` main-step values ``1000 * sigma``,
``sigmas`` all ``S * N + 1`` levels.
"""

from __future__ import annotations

import math

import torch

from ..compat.gmflow import GMFlowMixin, probabilistic_guidance_jit, transition_sample
from ..compat.gmflow_ops import gm_mul_iso_gaussian, gm_to_iso_gaussian, gm_to_mean, iso_gaussian_mul_iso_gaussian
from ..ops.transition import u_to_x0
from ..schedulers import T
from ..schedulers import GMFlowODEScheduler as _CoreODE
from ..schedulers import GMFlowSDEScheduler as _CoreSDE

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gmkernels.pipelines needs diffusers: pip install -e '.[diffusers]' from a checkout, or pip install diffusers") from e


class _GMDiffusersScheduler(SchedulerMixin, ConfigMixin):
    """Config, schedule and the ``step`` frame; the solver is the ``_core`` scheduler's."""

    _core_cls = _CoreODE
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        base_logshift: float = 0.5,
        max_logshift: float = 1.15,
        terminal_sigma: float | None = None,
    ):
        name = type(self).__name__
        if num_train_timesteps != int(T):
            raise ValueError(f"{name}: num_train_timesteps must be {int(T)} (timesteps are 1000 * sigma), got {num_train_timesteps}")
        if terminal_sigma is not None:
            raise ValueError(f"{name}: terminal_sigma={terminal_sigma} is not supported (the schedule ends at sigma = 0)")
        if not shift > 0:
            raise ValueError(f"{name}: shift must be > 0, got {shift}")
        if use_dynamic_shifting and max_seq_len == base_seq_len:
            raise ValueError(f"{name}: max_seq_len must differ from base_seq_len with use_dynamic_shifting")
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self.num_substeps = None
        self._core = None

    def get_shift(self, seq_len: int | None = None) -> float:
        """``config.shift``; with ``use_dynamic_shifting`` and a ``seq_len`` (tokens of the image),
        ``exp(logshift)`` with the log-shift linear in ``seq_len`` through
        ``(base_seq_len, base_logshift)`` and ``(max_seq_len, max_logshift)``."""
        c = self.config
        if c.use_dynamic_shifting and seq_len is not None:
            slope = (c.max_logshift - c.base_logshift) / (c.max_seq_len - c.base_seq_len)
            return math.exp(c.base_logshift + (seq_len - c.base_seq_len) * slope)
        return float(c.shift)

    def set_timesteps(self, num_inference_steps: int, num_substeps: int = 1, device=None, *, seq_len: int | None = None,
                      order: int = 1, guidance_scale: float = 0.0, orthogonal_guidance: float = 1.0) -> None:
        """Fix ``num_inference_steps`` network calls of ``num_substeps`` substeps each.

        Args:
            num_inference_steps: main steps (network calls). num_substeps: GM-ODE substeps per
                call (1 for GM-SDE). device: where ``timesteps`` live.
            seq_len: token count for ``use_dynamic_shifting``.
            order: 1, or 2 for GMFlow's 2nd-order correction (the first step is first order).
            guidance_scale: probabilistic guidance in ``[0, 1)``; 0 disables it, else ``step`` takes
                the pair ``(gm_cond, gm_uncond)``. orthogonal_guidance: the share of the guidance
                bias made orthogonal to the conditional mean.
        Sets ``timesteps`` (float32 ``(num_inference_steps,)``), ``sigmas`` (float32
        ``(num_inference_steps * num_substeps + 1,)``) and resets ``step_index`` to 0.
        """
        self._core = self._core_cls(shift=self.get_shift(seq_len), order=order, guidance="probabilistic",
                                    guidance_scale=guidance_scale, orthogonal=orthogonal_guidance)
        self._core.set_timesteps(num_inference_steps, num_substeps, device=device)
        self.timesteps = self._core.timesteps
        self.sigmas = torch.tensor(self._core.sigmas, dtype=torch.float32, device=self.timesteps.device)
        self.num_inference_steps = num_inference_steps
        self.num_substeps = num_substeps

    @property
    def step_index(self) -> int | None:
        """Index of the next main step (``None`` before ``set_timesteps``)."""
        return None if self._core is None else self._core.step_index

    def _check_ready(self) -> None:
        if self._core is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps, num_substeps, device) before step()")

    def step(self, model_output, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """Move ``sample (B, C, H, W)`` from ``timestep`` (``timesteps[step_index]``) to the next main
        step's noise level (sigma 0 after the last).

        ``model_output``: the u-GM ``{means (B, K, C, H, W), logstds (B, 1, 1, 1, 1),
        logweights (B, K, 1, H, W)}`` the network predicted at ``(sample, timestep)``, or
        ``(gm_cond, gm_uncond)`` when ``guidance_scale > 0``. ``generator``: randomness of the
        GM-SDE draws (on ``sample``'s device). Returns ``SchedulerOutput(prev_sample=...)`` (dtype
        of ``sample``), or ``(prev_sample,)`` with ``return_dict=False``.
        """
        self._check_ready()
        prev = self._core.step(model_output, timestep, sample, generator=generator)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class FlowEulerODEScheduler(_GMDiffusersScheduler):
    """GM-ODE steps (``gmkernels.schedulers.GMFlowODEScheduler``): each network call is followed by
    ``num_substeps`` Euler substeps whose x0 is the GM's posterior mean at the substep's state."""

    _core_cls = _CoreODE


class _SpectralHelper(GMFlowMixin):
    """The official pipeline's guidance and 2nd-order update on ``gmkernels.compat`` (T = 1000)."""

    num_timesteps = int(T)


class GMFlowSDEScheduler(_GMDiffusersScheduler):
    """GM-SDE steps: an exact draw from the reverse transition of the (guided, 2nd-order) x0-GM.

    Without a spectrum network ``step`` is ``gmkernels.schedulers.GMFlowSDEScheduler`` (fused
    per-pixel draw). With ``spectrum_net`` (a callable ``{mean (B, C, H, W), var} -> log power
    spectrum (B, C, H, W)``, e.g. :class:`gmkernels.models.SpectrumMLP`) the x0 draw is spatially
    correlated as in the official ``output_mode="sample"``: Fourier-domain normal noise scaled by
    the spectrum, back to pixels, and through the Knothe-Rosenblatt transport to the GM; then
    ``c1 * x + c2 * x0 + sqrt(c3) * z``. The network's Gaussian input is the guidance / 2nd-order
    target Gaussian, as officially.
    """

    _core_cls = _CoreSDE

    def set_timesteps(self, num_inference_steps: int, num_substeps: int = 1, device=None, *, seq_len: int | None = None,
                      order: int = 1, guidance_scale: float = 0.0, orthogonal_guidance: float = 1.0) -> None:
        super().set_timesteps(num_inference_steps, num_substeps, device, seq_len=seq_len, order=order,
                              guidance_scale=guidance_scale, orthogonal_guidance=orthogonal_guidance)
        self._spectral = _SpectralHelper()
        self._spectral.init_gm_cache()

    def step(self, model_output, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True, spectrum_net=None):
        """:meth:`FlowEulerODEScheduler.step`'s contract; ``spectrum_net`` switches to spectrally
        correlated draws (see the class docstring). Mixing both kinds of step in one loop is an
        error (the 2nd-order memory would be split)."""
        if spectrum_net is None:
            if self._core is not None and self._spectral.prev_x_t is not None:
                raise RuntimeError("GMFlowSDEScheduler: this loop started with spectrum_net; pass it at every step")
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        self._check_ready()
        core = self._core
        i = core.step_index
        if i >= core.num_steps:
            raise RuntimeError(f"GMFlowSDEScheduler: all {core.num_steps} steps are done; call set_timesteps again")
        if i > 0 and self._spectral.prev_x_t is None:
            raise RuntimeError("GMFlowSDEScheduler: this loop started without spectrum_net; do not pass it midway")
        prev = self._spectral_step(model_output, sample, core.sigmas[i], core.sigmas[i + 1], generator, spectrum_net)
        core.step_index = i + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _spectral_step(self, model_output, sample, sigma: float, sigma_to: float, generator, spectrum_net):
        core, helper = self._core, self._spectral
        scale = core.guidance_scale
        paired = isinstance(model_output, (tuple, list))
        if scale > 0 and not (paired and len(model_output) == 2):
            raise TypeError(f"guidance_scale={scale} > 0: model_output must be the pair (gm_cond, gm_uncond)")
        x = sample.float()
        as_x0 = lambda gm: u_to_x0({k: v.float() for k, v in gm.items()}, x, sigma)  # noqa: E731
        gm_cond = gaussian_cond = avg_var = cfg_bias = None
        if scale > 0:
            gm_cond, gm_uncond = as_x0(model_output[0]), as_x0(model_output[1])
            gaussian_cond = gm_to_iso_gaussian(gm_cond)[0]
            gaussian_cond["var"] = gaussian_cond["var"].mean(dim=(-2, -1), keepdim=True)
            gaussian, cfg_bias, avg_var = probabilistic_guidance_jit(
                gaussian_cond["mean"], gaussian_cond["var"], gm_to_mean(gm_uncond), scale, orthogonal=core.orthogonal)
            gm = gm_mul_iso_gaussian(gm_cond, iso_gaussian_mul_iso_gaussian(gaussian, gaussian_cond, 1, -1), 1, 1)[0]
        else:
            gm = as_x0(model_output[0] if paired else model_output)
            gaussian = gm_to_iso_gaussian(gm)[0]
        if core.order == 2:
            t = T * sigma
            h = t - T * sigma_to
            gm, gaussian = helper.gm_2nd_order(gm, gaussian, x, t, h, scale, gm_cond, gaussian_cond, avg_var, cfg_bias)
        else:
            helper.prev_x_t = x  # marks the loop as spectral
        power_spectrum = spectrum_net(gaussian)
        x0 = helper.gm_sample(gm, power_spectrum, generator=generator)[0].squeeze(-4)
        s = torch.tensor(sigma, dtype=torch.float32, device=x.device)
        s_to = torch.tensor(sigma_to, dtype=torch.float32, device=x.device)
        return transition_sample(x0, x, s, s_to, generator=generator).to(sample.dtype)


FlowEulerODEScheduler._compatibles = ["GMFlowSDEScheduler"]
GMFlowSDEScheduler._compatibles = ["FlowEulerODEScheduler"]
