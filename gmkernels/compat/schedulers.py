"""``FlowEulerODEScheduler`` and ``GMFlowSDEScheduler`` of the public GMFlow code base
(``lib/models/diffusions/schedulers``), with the same constructor arguments, ``set_timesteps`` and
``step``, usable by its ``GMDiTPipeline``::

    # from lib.models.diffusions.schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler
    from gmkernels.compat.schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler
    pipe.scheduler = GMFlowSDEScheduler.from_config(pipe.scheduler.config)

With diffusers installed (``pip install -e '.[diffusers]'`` from a checkout) they are diffusers
``SchedulerMixin``/``ConfigMixin`` classes (``from_config``, ``save_config``, ``config`` as a
``FrozenDict``). Without it they keep the same interface through a small stand-in: ``config`` (a dict
with attribute access) and ``from_config(config, **overrides)``. Either way ``from_config`` warns
(``UserWarning``) about every config key or override the constructor does not take and drops it;
among them are the original ``GMFlowSDEScheduler``'s ``output_mode`` and ``variance_mode``, which
these classes do not implement: a config that sets them steps as described below, not as the
original would.

Schedule: ``set_timesteps(n)`` gives ``sigma_i = shift * s_i / (1 + (shift - 1) * s_i)`` with
``s_i = 1 - i / n`` (docs/solvers.md), ``timesteps = T * sigma`` and a final ``sigma = 0``.
``step(model_output, timestep, sample, generator=None, return_dict=True, prediction_type='u')``
moves ``sample`` from ``sigmas[i]`` to ``sigmas[i + 1]``; ``model_output`` is a velocity
(``'u'``) or a denoised sample (``'x0'``), e.g. ``gm_to_mean`` or a draw of the x0-GM.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Optional

import numpy as np
import torch

from ..schedulers import schedule_sigmas
from .gmflow import transition_sample

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
            """A new scheduler from another's ``config`` with ``kwargs`` overriding (keys the
            constructor does not take are left out)."""
            params = inspect.signature(cls.__init__).parameters
            merged = {k: v for k, v in dict(config or {}).items() if k in params and k != "self"}
            merged.update(kwargs)
            return cls(**merged)

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
    prev_sample: torch.Tensor


@dataclasses.dataclass
class GMFlowSDESchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class _FlowScheduler(SchedulerMixin, ConfigMixin):
    """Schedule, timestep bookkeeping and the ``step`` frame shared by both schedulers."""

    _compatibles = []
    order = 1
    _output_cls = FlowEulerODESchedulerOutput

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting=False,
        base_seq_len=256,
        max_seq_len=4096,
        base_logshift=0.5,
        max_logshift=1.15,
        terminal_sigma=None,
    ):
        self.sigmas = self._schedule(num_train_timesteps, shift)
        self.timesteps = self.sigmas * num_train_timesteps
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """A new scheduler from another's ``config`` (a dict or diffusers ``FrozenDict``) with
        ``kwargs`` overriding. Keys neither takes that the constructor does not take (private
        ``_``-prefixed keys aside) are dropped with a ``UserWarning`` that names them."""
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        config = dict(config or {})
        unknown = {k: v for k, v in {**config, **kwargs}.items() if not k.startswith("_") and k not in params}
        if unknown:
            warnings.warn(
                f"{cls.__name__}.from_config ignores {unknown}: gmkernels.compat does not implement these "
                f"options, so its steps may differ from those of a scheduler that does",
                UserWarning,
                stacklevel=2,
            )
        config = {k: v for k, v in config.items() if k not in unknown}
        kwargs = {k: v for k, v in kwargs.items() if k not in unknown}
        if HAS_DIFFUSERS:
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        return super().from_config(config, **kwargs)

    @staticmethod
    def _schedule(n, shift):
        """The ``n`` shifted noise levels of docs/solvers.md#schedule from 1 down (without the final 0), float32."""
        return torch.tensor(schedule_sigmas(n, 1, float(shift))[:-1], dtype=torch.float32)

    @property
    def step_index(self):
        """Index of the next step in ``sigmas`` (``None`` before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def get_shift(self, seq_len=None):
        """``config.shift``, or with ``use_dynamic_shifting`` and a ``seq_len``
        ``exp(log-shift)`` interpolated linearly in ``seq_len`` between the base and max values."""
        if self.config.use_dynamic_shifting and seq_len is not None:
            m = (self.config.max_logshift - self.config.base_logshift) / (self.config.max_seq_len - self.config.base_seq_len)
            logshift = (seq_len - self.config.base_seq_len) * m + self.config.base_logshift
            return torch.exp(logshift) if isinstance(logshift, torch.Tensor) else np.exp(logshift)
        return self.config.shift

    def stretch_to_terminal(self, sigma):
        """Rescale ``1 - sigma`` so that the last sigma equals ``config.terminal_sigma``."""
        one_minus = 1 - sigma
        return 1 - one_minus * (1 - self.config.terminal_sigma) / one_minus[-1]

    def set_timesteps(self, num_inference_steps: int, seq_len=None, device=None):
        """``num_inference_steps`` sigmas from 1 (docs/solvers.md#schedule), then a final 0."""
        self.num_inference_steps = num_inference_steps
        sigmas = self._schedule(num_inference_steps, self.get_shift(seq_len=seq_len))
        if self.config.terminal_sigma is not None:
            sigmas = self.stretch_to_terminal(sigmas)
        self.timesteps = (sigmas * self.config.num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not one of the scheduler's timesteps (call set_timesteps first)")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep):
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
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        prediction_type="u",
        eps=1e-6,
    ):
        """Move ``sample (B, C, H, W)`` from ``sigmas[step_index]`` to the next sigma.

        Arithmetic in float32; ``prev_sample`` in the dtype of ``model_output``. Returns the
        output dataclass, or ``(prev_sample,)`` with ``return_dict=False``.
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
        ori_dtype = model_output.dtype
        sample = sample.to(torch.float32)
        model_output = model_output.to(torch.float32)
        sigma = self.sigmas[self.step_index].to(sample.device)
        sigma_to = self.sigmas[self.step_index + 1].to(sample.device)
        prev_sample = self._step(model_output, sample, sigma, sigma_to, prediction_type, eps, generator).to(ori_dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return self._output_cls(prev_sample=prev_sample)

    def __len__(self):
        return self.config.num_train_timesteps


class FlowEulerODEScheduler(_FlowScheduler):
    """Euler steps of the flow ODE: ``x + u * (sigma_to - sigma)`` with ``u = (x - x0) / sigma``
    for an x0 prediction (the GM-ODE substep when ``x0`` is the GM's posterior mean)."""

    _output_cls = FlowEulerODESchedulerOutput

    @staticmethod
    def _step(model_output, sample, sigma, sigma_to, prediction_type, eps, generator):
        u = model_output if prediction_type == "u" else (sample - model_output) / sigma
        return sample + u * (sigma_to - sigma)


class GMFlowSDEScheduler(_FlowScheduler):
    """Exact reverse-transition steps (GM-SDE): ``c1 * x + c2 * x0 + sqrt(c3) * z`` with
    ``z ~ N(0, I)`` from ``generator`` (reverse_transition's constants, docs/ops.md#reverse_transition); with ``x0`` a draw of the x0-GM this
    samples the GM transition exactly."""

    _output_cls = GMFlowSDESchedulerOutput

    @staticmethod
    def _step(model_output, sample, sigma, sigma_to, prediction_type, eps, generator):
        x_0 = sample - sigma * model_output if prediction_type == "u" else model_output
        return transition_sample(x_0, sample, sigma, sigma_to, eps, generator)
