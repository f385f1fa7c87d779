"""The sampling helpers that the public GMFlow code base keeps on its model and pipeline classes
(``lib/models/diffusions/gmflow.py``: ``GMFlowMixin``; ``lib/pipelines/gmdit_pipeline.py``:
``GMFlowPipelineMixin``), on top of ``gmkernels``.

Free functions take the arguments of the methods of the same name plus a last keyword
``num_timesteps`` (``T``, the ``self.num_timesteps`` / ``self.scheduler.config.num_train_timesteps``
of the original). :class:`GMFlowMixin` carries them as methods with exactly the original
signatures, and the stateful 2nd-order update ``gm_2nd_order``. Timesteps ``t`` are in ``(0, T]``:
Python numbers, 0-d tensors or per-sample ``(B,)`` tensors; ``sigma = t / T``.

Shapes: GMs as in :mod:`gmkernels.compat.gmflow_ops`; states ``x_t (B, C, H, W)``.
"""

from __future__ import annotations

import torch

from reference.solver_steps import second_order_bias
from reference.transition import transition_coefficients

from ..ops import posterior as _posterior
from ..ops import transition as _transition
from ..schedulers import spectral_gm_sample
from .gmflow_ops import (
    _iso_gm_vars,
    _lib_gm,
    gm_mul_iso_gaussian,
    gm_to_mean,
    gm_to_sample,
    iso_gaussian_mul_iso_gaussian,
)

NUM_TIMESTEPS = 1000


def _sigma(t, x: torch.Tensor, num_timesteps: float) -> torch.Tensor:
    """``t / T`` as a tensor broadcastable to ``x`` (a ``(B,)`` or 0-d ``t`` gets trailing dims)."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=x.dtype if x.is_floating_point() else None, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.size(0))
    t = t.reshape(*t.shape, *([1] * (x.dim() - t.dim())))
    return t / num_timesteps


def _to_gm_dims(c: torch.Tensor) -> torch.Tensor:
    """A ``(B, 1, 1, 1)`` per-sample constant viewed as ``(B, 1, 1, 1, 1)``, against a GM."""
    return c.unsqueeze(-4)


def transition_sample(x_0, x_t, sigma, sigma_to, eps=1e-6, generator=None):
    """One exact draw of ``x_{sigma_to}`` given ``x_t`` at ``sigma`` and ``x_0``:
    ``c1 * x_t + c2 * x_0 + sqrt(c3) * z`` (reverse_transition's constants, docs/ops.md#reverse_transition), ``z ~ N(0, I)`` from
    ``generator``. ``sigma``/``sigma_to`` are tensors broadcastable to ``x_t``."""
    c1, c2, c3 = transition_coefficients(sigma, sigma_to, eps)
    device = x_t.device if generator is None else generator.device  # a CPU generator may drive CUDA states
    noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=device).to(x_t.device)
    return c1 * x_t + c2 * x_0 + c3.clamp(min=0).sqrt() * noise


def probabilistic_guidance_jit(
    cond_mean, total_var, uncond_mean, guidance_scale: float, orthogonal: float = 1.0, orthogonal_axis=None
):
    """The Gaussian step of GMFlow's probabilistic guidance (docs/ops.md#guidance).

    Args:
        cond_mean: ``(B, C, H, W)``, mean of the conditional x0-GM.
        total_var: ``(B, 1, 1, 1)`` (or ``(B, 1, H, W)``), its moment-matched variance.
        uncond_mean: ``(B, C, H, W)``, mean of the unconditional x0-GM.
        guidance_scale: in ``[0, 1)``. orthogonal: amount of the bias's component along
            ``orthogonal_axis`` that is removed (``0`` keeps the bias as it is).
        orthogonal_axis: optional ``(B, C, H, W)`` (broadcastable) direction the bias is made
            orthogonal to, in the mean over ``(C, H, W)``; ``None`` means ``cond_mean``.
    Returns:
        ``(gaussian_output, bias, avg_var)``: the target ``{mean: cond_mean + bias,
        var: total_var * (1 - guidance_scale^2)}``, the rescaled bias ``(B, C, H, W)`` and the
        average variance ``(B, 1, 1, 1)``.
    """
    dims = (-3, -2, -1)
    bias = cond_mean - uncond_mean
    if orthogonal > 0.0:
        axis = cond_mean if orthogonal_axis is None else orthogonal_axis
        proj = (bias * axis).mean(dim=dims, keepdim=True) / (axis * axis).mean(dim=dims, keepdim=True).clamp(min=1e-6)
        bias = bias - orthogonal * proj * axis
    bias_power = (bias * bias).mean(dim=dims, keepdim=True)
    avg_var = total_var.mean(dim=dims, keepdim=True)
    bias = bias * ((avg_var / bias_power.clamp(min=1e-6)).sqrt() * guidance_scale)
    gaussian_output = {"mean": cond_mean + bias, "var": total_var * (1 - guidance_scale * guidance_scale)}
    return gaussian_output, bias, avg_var


def sample_forward_transition(x_t_low, t_low, t_high, noise, num_timesteps=NUM_TIMESTEPS):
    """A draw of ``x_{t_high}`` given ``x_{t_low}`` (``t_low <= t_high``) on the rectified-flow
    path: ``x_t_low * a_high / a_low + noise * sqrt(sigma_high^2 - (a_high / a_low * sigma_low)^2)``
    with the caller's ``noise (B, C, H, W)`` (the training pair of the transition loss)."""
    sigma_low = _sigma(t_low, x_t_low, num_timesteps)
    sigma_high = _sigma(t_high, x_t_low, num_timesteps)
    mean_trans = (1 - sigma_high) / (1 - sigma_low)
    return x_t_low * mean_trans + noise * (sigma_high**2 - (mean_trans * sigma_low) ** 2).sqrt()


def u_to_x_0(denoising_output, x_t, t=None, sigma=None, eps=1e-6, num_timesteps=NUM_TIMESTEPS):
    """Velocity prediction -> x0 prediction at ``x_t``: ``x0 = x_t - sigma * u``.

    ``denoising_output`` is a u-GM (``gmkernels.u_to_x0``: ``logstds + log(max(sigma, eps))``),
    an isotropic Gaussian ``{mean, var}`` (``var * sigma^2``) or a tensor ``(B, C, H, W)``.
    ``sigma`` replaces ``t / T`` when given: broadcastable to ``(B, 1, 1, 1)``, or for a GM also
    ``(B, 1, 1, 1, 1)`` (the shape the original broadcasts against its ``x_t.unsqueeze(-4)``).
    """
    if sigma is None:
        sigma = _sigma(t, x_t, num_timesteps)
    elif (
        isinstance(denoising_output, dict)
        and "logweights" in denoising_output
        and isinstance(sigma, torch.Tensor)
        and sigma.dim() == x_t.dim() + 1
        and sigma.size(-4) == 1
    ):
        sigma = sigma.squeeze(-4)
    if isinstance(denoising_output, dict):
        if "logweights" in denoising_output:
            (gm,) = _lib_gm(denoising_output)
            return _transition.u_to_x0(gm, x_t, sigma, eps)
        if "var" in denoising_output:
            return {"mean": x_t - sigma * denoising_output["mean"], "var": denoising_output["var"] * sigma.square()}
        raise ValueError(f"denoising_output must be a GM or a Gaussian dict, got keys {sorted(denoising_output)}")
    return x_t - sigma * denoising_output


def reverse_transition(
    denoising_output, x_t_high, t_low, t_high, eps=1e-6, prediction_type="u", num_timesteps=NUM_TIMESTEPS
):
    """The distribution of ``x_{t_low}`` given ``x_{t_high}`` (docs/ops.md#reverse_transition), from a u- or x0-prediction.

    For a GM: means from ``gmkernels.reverse_transition`` (``c1 * x_t + c2 * mu_x0``); logstds
    ``0.5 * logaddexp(2 * (logstds + log(max(s * c2, eps))), log(max(c3, eps)))`` with ``s = sigma``
    for a u-GM and ``1`` for an x0-GM, the original's floors (the std never drops below
    ``sqrt(eps)``, which matters for the transition loss at ``t_low = 0``). For a tensor: one exact
    draw ``c1 * x_t + c2 * x0 + sqrt(c3) * z`` from the global RNG.
    """
    if prediction_type not in ("u", "x0"):
        raise ValueError(f"prediction_type must be 'u' or 'x0', got {prediction_type!r}")
    sigma = _sigma(t_high, x_t_high, num_timesteps)
    sigma_to = _sigma(t_low, x_t_high, num_timesteps)
    if not isinstance(denoising_output, dict):
        x_0 = x_t_high - sigma * denoising_output if prediction_type == "u" else denoising_output
        return transition_sample(x_0, x_t_high, sigma, sigma_to, eps)
    (gm,) = _lib_gm(denoising_output)
    if prediction_type == "u":
        gm_x0, scale = _transition.u_to_x0(gm, x_t_high, sigma, eps), sigma
    else:
        gm_x0, scale = gm, 1.0
    means = _transition.reverse_transition(gm_x0, x_t_high, sigma, sigma_to, eps)["means"]
    _, c2, c3 = (_to_gm_dims(c) for c in transition_coefficients(sigma, sigma_to, eps))
    scaled = (_to_gm_dims(scale) if isinstance(scale, torch.Tensor) else scale) * c2
    logstds = 0.5 * torch.logaddexp(2 * (gm["logstds"] + scaled.clamp(min=eps).log()), c3.clamp(min=eps).log())
    return {"means": means, "logstds": logstds, "logweights": gm["logweights"]}


def denoising_gm_convert(
    gm_src, x_t_tgt, x_t_src, t_tgt, t_src, eps=1e-6, prediction_type="x0", num_timesteps=NUM_TIMESTEPS
):
    """The x0-GM predicted at ``(x_t_src, t_src)`` carried to ``(x_t_tgt, t_tgt)``
    (``t_tgt <= t_src``) without a network call: the original's Gaussian quotient and product,
    on ``gmkernels.iso_gaussian_mul_iso_gaussian`` and ``gmkernels.gm_mul_iso_gaussian``."""
    sigma_src = _sigma(t_src, x_t_src, num_timesteps)
    sigma_tgt = _sigma(t_tgt, x_t_src, num_timesteps)
    alpha_src = (1 - sigma_src).clamp(min=eps)
    alpha_tgt = (1 - sigma_tgt).clamp(min=eps)
    if prediction_type == "u":
        gm_src = u_to_x_0(gm_src, x_t_src, sigma=sigma_src)
    elif prediction_type != "x0":
        raise ValueError(f"prediction_type must be 'u' or 'x0', got {prediction_type!r}")
    gaussian_mask = iso_gaussian_mul_iso_gaussian(
        {"mean": x_t_tgt / alpha_tgt, "var": (sigma_tgt / alpha_tgt).square()},
        {"mean": x_t_src / alpha_src, "var": (sigma_src / alpha_src).square()},
        1,
        -1,
    )
    return gm_mul_iso_gaussian(gm_src, gaussian_mask, 1, 1)[0]


def denoising_gm_convert_to_mean(
    gm_src,
    x_t_tgt,
    x_t_src,
    t_tgt=None,
    t_src=None,
    sigma_src=None,
    sigma_tgt=None,
    eps=1e-6,
    prediction_type="x0",
    num_timesteps=NUM_TIMESTEPS,
):
    """Mean of :func:`denoising_gm_convert`, fused: ``gmkernels.gm_posterior_mean`` (no K*C*H*W
    intermediate). ``sigma_src``/``sigma_tgt`` replace ``t_src / T``/``t_tgt / T`` when given.
    Stores ``gm_src['gm_vars']`` -> ``(B, C, H, W)``."""
    if sigma_src is None:
        sigma_src = _sigma(t_src, x_t_src, num_timesteps)
    if sigma_tgt is None:
        sigma_tgt = _sigma(t_tgt, x_t_src, num_timesteps)
    if prediction_type == "u":
        gm_src = u_to_x_0(gm_src, x_t_src, sigma=sigma_src)
    elif prediction_type != "x0":
        raise ValueError(f"prediction_type must be 'u' or 'x0', got {prediction_type!r}")
    _iso_gm_vars(gm_src)
    (gm,) = _lib_gm(gm_src)
    return _posterior.gm_posterior_mean(gm, x_t_src, sigma_src, x_t_tgt, sigma_tgt, eps)


class GMFlowMixin:
    """The sampling methods of the original ``GMFlowMixin`` / ``GMFlowPipelineMixin``, same
    signatures, on ``gmkernels``. ``T`` is ``self.num_timesteps`` when the class has it, else
    ``self.scheduler.config.num_train_timesteps`` (the pipeline), else 1000.

    ``gm_2nd_order`` keeps ``prev_gm``, ``prev_x_t``, ``prev_t``, ``prev_h`` on the instance;
    call ``init_gm_cache()`` before each sampling loop.
    """

    def _gm_num_timesteps(self):
        if hasattr(self, "num_timesteps"):
            return self.num_timesteps
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            return scheduler.config.num_train_timesteps
        return NUM_TIMESTEPS

    def sample_forward_transition(self, x_t_low, t_low, t_high, noise):
        return sample_forward_transition(x_t_low, t_low, t_high, noise, num_timesteps=self._gm_num_timesteps())

    def u_to_x_0(self, denoising_output, x_t, t=None, sigma=None, eps=1e-6):
        return u_to_x_0(denoising_output, x_t, t, sigma, eps, num_timesteps=self._gm_num_timesteps())

    def reverse_transition(self, denoising_output, x_t_high, t_low, t_high, eps=1e-6, prediction_type="u"):
        return reverse_transition(
            denoising_output, x_t_high, t_low, t_high, eps, prediction_type, num_timesteps=self._gm_num_timesteps()
        )

    def denoising_gm_convert(self, gm_src, x_t_tgt, x_t_src, t_tgt, t_src, eps=1e-6, prediction_type="x0"):
        return denoising_gm_convert(
            gm_src, x_t_tgt, x_t_src, t_tgt, t_src, eps, prediction_type, num_timesteps=self._gm_num_timesteps()
        )

    def denoising_gm_convert_to_mean(
        self,
        gm_src,
        x_t_tgt,
        x_t_src,
        t_tgt=None,
        t_src=None,
        sigma_src=None,
        sigma_tgt=None,
        eps=1e-6,
        prediction_type="x0",
    ):
        return denoising_gm_convert_to_mean(
            gm_src,
            x_t_tgt,
            x_t_src,
            t_tgt,
            t_src,
            sigma_src,
            sigma_tgt,
            eps,
            prediction_type,
            num_timesteps=self._gm_num_timesteps(),
        )

    @staticmethod
    def gm_sample(gm, power_spectrum=None, n_samples=1, generator=None):
        """``(samples (B, n_samples, C, H, W), spectral_samples)``: spectrally correlated draws
        through the Knothe-Rosenblatt transport when a log ``power_spectrum`` is given (then
        ``spectral_samples`` are the Fourier-domain noise), else ``gm_to_sample`` (and ``None``)."""
        if power_spectrum is None:
            return gm_to_sample(gm, n_samples=n_samples), None
        (iso,) = _lib_gm(gm)
        return spectral_gm_sample(iso, power_spectrum, n_samples, generator)

    def gm_to_model_output(self, gm, output_mode, power_spectrum=None, generator=None):
        """``gm_to_mean(gm)`` for ``output_mode='mean'``, one draw ``(B, C, H, W)`` for ``'sample'``."""
        if output_mode == "mean":
            return gm_to_mean(gm)
        if output_mode == "sample":
            return self.gm_sample(gm, power_spectrum, generator=generator)[0].squeeze(-4)
        raise ValueError(f"output_mode must be 'mean' or 'sample', got {output_mode!r}")

    def init_gm_cache(self):
        self.prev_gm = None
        self.prev_x_t = None
        self.prev_t = None
        self.prev_h = None

    def gm_2nd_order(
        self,
        gm_output,
        gaussian_output,
        x_t,
        t,
        h,
        guidance_scale=0.0,
        gm_cond=None,
        gaussian_cond=None,
        avg_var=None,
        cfg_bias=None,
        ca=0.005,
        cb=1.0,
        gm2_correction_steps=0,
    ):
        """GMFlow's 2nd-order update (docs/solvers.md), fused with the guidance bias into one Gaussian
        reweighting of the base GM. The first call (no previous GM) only records the state.

        Args:
            gm_output: the x0-GM of this step (guided when guidance is on).
            gaussian_output: its moment-matched Gaussian (the guidance target with guidance);
                without guidance its ``var`` is replaced in place by the spatial mean, as in the original.
            x_t, t, h: state ``(B, C, H, W)``, timestep, and step length in timesteps.
            guidance_scale, gm_cond, gaussian_cond, avg_var, cfg_bias: from the guidance step
                (``probabilistic_guidance_jit``), all ``None``/0 without guidance.
            ca, cb: the error-power coefficients. gm2_correction_steps: extra fixed-point steps
                matching the 2nd-order mean difference exactly.
        Returns:
            ``(gm_output, gaussian_output)``.
        """
        T = self._gm_num_timesteps()
        if self.prev_gm is not None:
            if cfg_bias is not None:
                gm_mean = gm_to_mean(gm_output)
                base_gaussian, base_gm = gaussian_cond, gm_cond
            else:
                gm_mean = gaussian_output["mean"]
                base_gaussian, base_gm = gaussian_output, gm_output
                base_gaussian["var"] = base_gaussian["var"].mean(dim=(-1, -2), keepdim=True)
                avg_var = base_gaussian["var"].mean(dim=(-3, -2, -1), keepdim=True)
            mean_from_prev = self.denoising_gm_convert_to_mean(self.prev_gm, x_t, self.prev_x_t, t, self.prev_t)
            self.prev_gm = gm_output

            bias, bias_power, mean_diff = second_order_bias(
                gm_mean, mean_from_prev, avg_var, h / T, self.prev_h / T, guidance_scale, cfg_bias, ca, cb
            )
            gm_output, gaussian_output = _reweight_by_bias(base_gm, base_gaussian, bias, bias_power, avg_var)

            if gm2_correction_steps > 0:
                tgt_bias = mean_diff + gm_mean - base_gaussian["mean"]
                for _ in range(gm2_correction_steps):
                    out_bias = gm_to_mean(gm_output) - base_gaussian["mean"]
                    ratio = bias.norm(dim=-3, keepdim=True) / out_bias.norm(dim=-3, keepdim=True).clamp(min=1e-6)
                    bias = bias - (out_bias - tgt_bias) * ratio.clamp(max=1)
                    bias_power = bias.square().mean(dim=(-3, -2, -1), keepdim=True)
                    bias = bias * (avg_var / bias_power.clamp(min=1e-6)).clamp(max=1).sqrt()
                    gm_output, _ = _reweight_by_bias(base_gm, base_gaussian, bias, bias_power, avg_var)
        else:
            self.prev_gm = gm_output
        self.prev_x_t = x_t
        self.prev_t = t
        self.prev_h = h
        return gm_output, gaussian_output


def _reweight_by_bias(base_gm, base_gaussian, bias, bias_power, avg_var):
    """Shift the base GM's mean by the (capped) ``bias`` and shrink its variance by
    ``1 - bias_power / avg_var`` (the power of the uncapped bias) through one Gaussian reweighting,
    in the original's form (op 4's quotient and its floors). Returns ``(gm, gaussian)``."""
    gaussian = {
        "mean": base_gaussian["mean"] + bias,
        "var": base_gaussian["var"] * (1 - bias_power / avg_var.clamp(min=1e-6)).clamp(min=1e-6),
    }
    gm = gm_mul_iso_gaussian(base_gm, iso_gaussian_mul_iso_gaussian(gaussian, base_gaussian, 1, -1), 1, 1)[0]
    return gm, gaussian


GMFlowPipelineMixin = GMFlowMixin
