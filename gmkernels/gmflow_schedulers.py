"""``FlowEulerODEScheduler`` and ``GMFlowSDEScheduler`` with the contract of the public GMFlow code
base (``lib/models/diffusions/schedulers``): schedulers that step on **tensors**. The official
pipeline turns the GM into an x0 (its mean or a draw) and calls
``step(model_output, timestep, sample, generator=None, return_dict=True, prediction_type='u'|'x0',
eps=1e-6)``. These are the classes that ``gmkernels.compat.schedulers`` and
``gmkernels.pipelines`` expose (``GMDiTPipeline.scheduler`` holds one); the GM-consuming fused
solvers have names of their own in :mod:`gmkernels.schedulers`.

With diffusers installed they are diffusers ``SchedulerMixin``/``ConfigMixin`` classes
(``from_config``, ``from_pretrained``, ``save_config``, ``config`` a ``FrozenDict``). Without it a
small stand-in keeps the same interface: ``config`` (a dict with attribute access) and
``from_config(config, **overrides)``, which drops, with a ``UserWarning`` naming them, the keys the
constructor does not take (diffusers logs them).

Schedule: ``set_timesteps(n)`` gives ``s_i = 1 - i / n`` (float32), ``sigma_i = shift * s_i / (1 +
(shift - 1) * s_i)``, ``timesteps = sigma * num_train_timesteps`` and ``sigmas`` with a final 0
appended. ``shift`` is ``config.shift``, or with ``use_dynamic_shifting`` (LakonLab's extension,
keyword-only arguments) the one ``get_shift(seq_len)`` gives for ``set_timesteps(n, seq_len=...)``.
``step`` moves ``sample`` from ``sigmas[i]`` to ``sigmas[i + 1]`` in float32 and returns it in
``model_output``'s dtype; the index ``i`` is found from the first timestep passed after
``set_timesteps`` and then advances by one per call.

* ``FlowEulerODEScheduler``: ``x' = x + d * (sigma' - sigma)``, ``d = model_output`` (``'u'``) or
  ``(x - model_output) / sigma`` (``'x0'``).
* ``GMFlowSDEScheduler``: with ``alpha = 1 - sigma``, ``r = sigma' / max(sigma, eps)``,
  ``q = alpha / max(alpha', eps)``, ``beta = 1 - (r q)^2``, ``x0 = x - sigma * model_output``
  (``'u'``) or ``model_output`` (``'x0'``) and ``z`` a float32 standard normal from ``generator``:
  ``x' = r^2 q x + beta alpha' x0 + s z``, ``s = sqrt(beta) sigma'`` (the exact reverse transition,
  docs/ops.md#reverse_transition) when ``output_mode == 'sample'`` or ``variance_mode == 'small'``,
  else ``s = sqrt(beta) sigma sqrt((alpha'^2 + sigma'^2) / max(alpha^2 + sigma^2, eps))`` (DDPM's
  large variance, for an x0 that is the GM's mean rather than a draw).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings

import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput

    HAS_DIFFUSERS = True
except ImportError:
    HAS_DIFFUSERS = False

    class _Config(dict):
        """The constructor arguments of a scheduler, readable as attributes."""

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    def register_to_config(init):
        """Record the (defaulted) constructor arguments in ``self.config``."""

        @functools.wraps(init)
        def wrapper(self, *args, **kwargs):
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self.config = _Config((k, v) for k, v in bound.arguments.items() if k != "self")
            init(self, *args, **kwargs)

        return wrapper

    class ConfigMixin:
        """Stand-in for diffusers' ``ConfigMixin``: ``from_config`` only."""

        @classmethod
        def from_config(cls, config=None, **kwargs):
            """A new scheduler from another's ``config`` with ``kwargs`` overriding; keys the
            constructor does not take (private ``_``-prefixed ones aside) are dropped with a
            ``UserWarning`` naming them."""
            params = set(inspect.signature(cls.__init__).parameters) - {"self"}
            merged = {**dict(config or {}), **kwargs}
            unknown = sorted(k for k in merged if k not in params and not k.startswith("_"))
            if unknown:
                warnings.warn(
                    f"{cls.__name__}.from_config ignores {unknown}: the constructor does not take them",
                    UserWarning,
                    stacklevel=2,
                )
            return cls(**{k: v for k, v in merged.items() if k in params})

    class SchedulerMixin:
        """Stand-in for diffusers' ``SchedulerMixin`` (no behaviour of its own)."""

    class BaseOutput:
        """Stand-in for diffusers' ``BaseOutput``: indexable like a tuple of its fields."""

        def to_tuple(self):
            return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

        def __getitem__(self, index):
            return self.to_tuple()[index]


@dataclasses.dataclass
class FlowEulerODESchedulerOutput(BaseOutput):
    """``prev_sample (B, C, H, W)``: the state at the next noise level."""

    prev_sample: torch.Tensor


@dataclasses.dataclass
class GMFlowSDESchedulerOutput(BaseOutput):
    """``prev_sample (B, C, H, W)``: the state at the next noise level."""

    prev_sample: torch.Tensor


_SHIFT_TYPES = ("exp", "sqrt")


def _standard_normal(shape, generator, device: torch.device) -> torch.Tensor:
    """Float32 ``N(0, 1)`` of ``shape`` on ``device`` drawn as diffusers' ``randn_tensor`` draws it:
    on the generator's device (a CPU generator may drive a CUDA state), one draw of the sample's
    shape per generator when ``generator`` is a list of one per sample."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([_standard_normal((1, *shape[1:]), g, device) for g in generator])
    rand_device = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=torch.float32).to(device)


class _FlowScheduler(SchedulerMixin, ConfigMixin):
    """Schedule, timestep bookkeeping and the ``step`` frame of both schedulers; a subclass gives
    ``_output_cls`` and ``_step`` (the float32 update of one step)."""

    order = 1

    def _init_schedule(
        self,
        num_train_timesteps,
        shift,
        use_dynamic_shifting,
        dynamic_shifting_type,
        base_seq_len,
        max_seq_len,
        terminal_sigma,
    ) -> None:
        name = type(self).__name__
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"{name}: num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
        if not (isinstance(shift, (int, float)) and shift > 0):
            raise ValueError(f"{name}: shift must be a number > 0, got {shift!r}")
        if dynamic_shifting_type not in _SHIFT_TYPES:
            raise ValueError(
                f"{name}: dynamic_shifting_type must be one of {_SHIFT_TYPES}, got {dynamic_shifting_type!r}"
            )
        if use_dynamic_shifting and max_seq_len == base_seq_len:
            raise ValueError(f"{name}: max_seq_len must differ from base_seq_len with use_dynamic_shifting")
        if terminal_sigma is not None and not 0 <= terminal_sigma < 1:
            raise ValueError(f"{name}: terminal_sigma must lie in [0, 1) or be None, got {terminal_sigma!r}")
        self.sigmas = self._schedule(num_train_timesteps, shift)
        self.timesteps = self.sigmas * num_train_timesteps
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _schedule(n: int, shift) -> torch.Tensor:
        """The ``n`` shifted noise levels from 1 down (without the final 0), float32 ``(n,)``."""
        s = (1 - torch.arange(n, dtype=torch.float64) / n).to(torch.float32)
        return shift * s / (1 + (shift - 1) * s)

    @property
    def step_index(self) -> int | None:
        """Index of the next step in ``sigmas`` (``None`` until the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The step index the first ``step`` starts at (``None``: found from its timestep)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def get_shift(self, seq_len=None) -> float:
        """``config.shift``; with ``use_dynamic_shifting`` and a ``seq_len`` (tokens of the image),
        ``exp`` type: ``exp(logshift)`` with the log-shift linear in ``seq_len`` through
        ``(base_seq_len, base_logshift)`` and ``(max_seq_len, max_logshift)``; ``sqrt`` type: the
        shift linear in ``sqrt(seq_len)`` through ``exp`` of those log-shifts."""
        c = self.config
        if not (c.use_dynamic_shifting and seq_len is not None):
            return c.shift
        if c.dynamic_shifting_type == "exp":
            slope = (c.max_logshift - c.base_logshift) / (c.max_seq_len - c.base_seq_len)
            return math.exp((seq_len - c.base_seq_len) * slope + c.base_logshift)
        base, top = math.exp(c.base_logshift), math.exp(c.max_logshift)
        slope = (top - base) / (math.sqrt(c.max_seq_len) - math.sqrt(c.base_seq_len))
        return (math.sqrt(seq_len) - math.sqrt(c.base_seq_len)) * slope + base

    def stretch_to_terminal(self, sigma: torch.Tensor) -> torch.Tensor:
        """Rescale ``1 - sigma`` so that the last sigma equals ``config.terminal_sigma``."""
        one_minus = 1 - sigma
        return 1 - one_minus * (1 - self.config.terminal_sigma) / one_minus[-1]

    def set_timesteps(self, num_inference_steps: int, device=None, *, seq_len: int | None = None) -> None:
        """Fix ``num_inference_steps`` steps: ``timesteps`` (float32 ``(n,)`` on ``device``) and
        ``sigmas`` (float32 ``(n + 1,)``, the last one 0); the step index is found again from the
        next ``step``'s timestep. ``seq_len``: the token count for ``use_dynamic_shifting``."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {n!r}")
        sigmas = self._schedule(n, self.get_shift(seq_len))
        if self.config.terminal_sigma is not None:
            sigmas = self.stretch_to_terminal(sigmas)
        self.num_inference_steps = n
        self.timesteps = (sigmas * self.config.num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule (the second one where it occurs twice)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of the scheduler's timesteps "
                f"(pass one of scheduler.timesteps after set_timesteps)"
            )
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
        prediction_type: str = "u",
        eps: float = 1e-6,
    ):
        """Move ``sample`` from ``sigmas[step_index]`` to the next noise level.

        Args:
            model_output: ``(B, C, H, W)`` velocity (``prediction_type='u'``) or denoised sample
                (``'x0'``: e.g. the GM's mean or a draw of it).
            timestep: the current one of ``timesteps`` (a float or a float tensor; an integer is
                an index, not a timestep, and raises ``ValueError``).
            sample: ``(B, C, H, W)`` state at that timestep.
            generator: ``torch.Generator``, a list of one per sample, or None (the global RNG) for
                ``GMFlowSDEScheduler``'s noise; unused by ``FlowEulerODEScheduler``.
            return_dict: the output dataclass, or the tuple ``(prev_sample,)``.
            prediction_type: ``'u'`` or ``'x0'``. eps: floor of the divisors.
        Returns:
            ``prev_sample (B, C, H, W)`` in ``model_output``'s dtype (float32 arithmetic).
        """
        if prediction_type not in ("u", "x0"):
            raise ValueError(f"prediction_type must be 'u' or 'x0', got {prediction_type!r}")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `step()` is not "
                "supported; pass one of `scheduler.timesteps`."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i + 1 >= len(self.sigmas):
            raise ValueError(
                f"{type(self).__name__}: all {len(self.sigmas) - 1} steps are done; call set_timesteps again"
            )
        x = sample.to(torch.float32)
        out = model_output.to(torch.float32)
        sigma = self.sigmas[i].to(x.device)
        sigma_to = self.sigmas[i + 1].to(x.device)
        prev_sample = self._step(out, x, sigma, sigma_to, prediction_type, eps, generator).to(model_output.dtype)
        self._step_index = i + 1
        return self._output_cls(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class FlowEulerODEScheduler(_FlowScheduler):
    """Euler steps of the flow ODE on tensors (module docstring): ``x + d * (sigma' - sigma)``.
    With ``x0`` the GM's mean (the posterior mean at substeps), as the official pipeline passes
    it, the loop is GM-ODE."""

    _compatibles = ["GMFlowSDEScheduler"]
    _output_cls = FlowEulerODESchedulerOutput

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        *,
        use_dynamic_shifting: bool = False,
        dynamic_shifting_type: str = "exp",
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        base_logshift: float = 0.5,
        max_logshift: float = 1.15,
        terminal_sigma: float | None = None,
    ):
        self._init_schedule(
            num_train_timesteps,
            shift,
            use_dynamic_shifting,
            dynamic_shifting_type,
            base_seq_len,
            max_seq_len,
            terminal_sigma,
        )

    @staticmethod
    def _step(model_output, sample, sigma, sigma_to, prediction_type, eps, generator):
        d = model_output if prediction_type == "u" else (sample - model_output) / sigma
        return sample + d * (sigma_to - sigma)


class GMFlowSDEScheduler(_FlowScheduler):
    """Reverse-transition steps of the flow SDE on tensors (module docstring). With ``x0`` a draw
    of the x0-GM and ``output_mode='sample'`` each step is an exact draw from the GM transition
    (GM-SDE); with ``output_mode='mean'`` an x0 that is the GM's mean gets DDPM's ``'large'`` (or
    ``'small'``) variance instead."""

    _compatibles = ["FlowEulerODEScheduler"]
    _output_cls = GMFlowSDESchedulerOutput

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        output_mode: str = "sample",
        variance_mode: str = "large",
        *,
        use_dynamic_shifting: bool = False,
        dynamic_shifting_type: str = "exp",
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        base_logshift: float = 0.5,
        max_logshift: float = 1.15,
        terminal_sigma: float | None = None,
    ):
        if output_mode not in ("sample", "mean"):
            raise ValueError(f"GMFlowSDEScheduler: output_mode must be 'sample' or 'mean', got {output_mode!r}")
        if variance_mode not in ("large", "small"):
            raise ValueError(f"GMFlowSDEScheduler: variance_mode must be 'large' or 'small', got {variance_mode!r}")
        self._init_schedule(
            num_train_timesteps,
            shift,
            use_dynamic_shifting,
            dynamic_shifting_type,
            base_seq_len,
            max_seq_len,
            terminal_sigma,
        )

    @property
    def exact_transition(self) -> bool:
        """Whether the noise is the exact reverse transition's, ``s = sqrt(beta) * sigma'``."""
        return self.config.output_mode == "sample" or self.config.variance_mode == "small"

    def _step(self, model_output, sample, sigma, sigma_to, prediction_type, eps, generator):
        x0 = sample - sigma * model_output if prediction_type == "u" else model_output
        alpha, alpha_to = 1 - sigma, 1 - sigma_to
        r = sigma_to / sigma.clamp(min=eps)
        q = alpha / alpha_to.clamp(min=eps)
        beta = 1 - (r * q).square()
        if self.exact_transition:
            spread = sigma_to
        else:
            spread = (
                sigma
                * ((alpha_to.square() + sigma_to.square()) / (alpha.square() + sigma.square()).clamp(min=eps)).sqrt()
            )
        z = _standard_normal(tuple(model_output.shape), generator, sample.device)
        # beta < 0 only by rounding (sigma' <= sigma): no noise rather than NaN
        return r * r * q * sample + beta * alpha_to * x0 + beta.clamp(min=0).sqrt() * spread * z
