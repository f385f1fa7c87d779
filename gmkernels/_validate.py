"""Input validation, in one place, for every public op.

Rules (docs/layout.md, docs/numerics.md#bad-input): a GM is a dict with ``means (*B, K, C, H, W)``, ``logstds`` of shape
``(*B, 1, 1, 1, 1)`` (or ``(*B, 1, 1, H, W)``, what a product with a per-pixel Gaussian gives)
and ``logweights (*B, K, 1, H, W)``. Batch dims of every other tensor must equal ``*B``
exactly: nothing is broadcast silently. Floating dtypes only, one device. Sigmas are Python
floats or tensors broadcastable to ``(*B, 1, 1, 1)`` with values in ``[0, 1]``.

Value checks never synchronise a device (:func:`require`): Python numbers and CPU tensors are
checked on the host and raise ``ValueError``; tensors on CUDA (or any other device) are checked
by a device-side assert (``torch._assert_async``), which fails the stream asynchronously with
the same message instead of stalling the host, so a training or sampling loop keeps its
asynchrony and can be captured in a CUDA graph. While ``torch.compile`` traces, tensor value
checks are skipped (a host read would break the graph); the eager call checks them.

Mixed float dtypes are allowed: arithmetic is float32 (float64 when an input is float64) and
outputs take the dtype of ``means`` (of ``mean`` for a Gaussian-only op).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import torch

from .ops._launch import checked_once

Sigma = Union[float, torch.Tensor]


class GMShape(NamedTuple):
    """Sizes of a validated GM: leading batch dims ``batch`` and ``K, C, H, W`` (a named tuple:
    built on every op call, it costs a third of a frozen dataclass)."""

    batch: tuple[int, ...]
    K: int
    C: int
    H: int
    W: int
    device: torch.device
    dtype: torch.dtype


def pixel_shape(s: GMShape) -> tuple[int, ...]:
    """``(*B, C, H, W)``: the shape of a state or a mixture mean of a GM of sizes ``s`` (a
    function, not a property of the named tuple: torch 2.8's dynamo misreads such properties
    inside ``torch.compile(fullgraph=True)``)."""
    return (*s.batch, s.C, s.H, s.W)


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_float_tensor(t: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """``t`` must be a floating-point tensor (on ``device`` when given)."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype} with shape {_shape(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the GM is on {device}; all inputs must share one device")
    return t


def check_gm(gm: Any, name: str = "gm") -> GMShape:
    """Validate a GM dict and return its sizes."""
    if type(gm) is not dict and not isinstance(gm, Mapping):
        raise TypeError(f"{name} must be a dict with keys means, logstds, logweights; got {type(gm).__name__}")
    if "means" not in gm or "logstds" not in gm or "logweights" not in gm:
        missing = [k for k in ("means", "logstds", "logweights") if k not in gm]
        raise ValueError(f"{name} is missing keys {missing}; a GM needs means, logstds, logweights")
    means, logstds, logweights = gm["means"], gm["logstds"], gm["logweights"]
    if not (type(means) is torch.Tensor and means.is_floating_point()):
        means = check_float_tensor(means, f"{name}['means']")
    if means.dim() < 4:
        raise ValueError(f"{name}['means'] must have shape (*B, K, C, H, W), got {_shape(means)}")
    dev = means.device
    if not (type(logstds) is torch.Tensor and logstds.is_floating_point() and logstds.device == dev):
        check_float_tensor(logstds, f"{name}['logstds']", dev)
    if not (type(logweights) is torch.Tensor and logweights.is_floating_point() and logweights.device == dev):
        check_float_tensor(logweights, f"{name}['logweights']", dev)
    if logweights.dim() != means.dim() and logweights.dim() >= 4:
        # one of the two lacks (or has an extra) axis; means carries K, C, H, W and is the one
        # users get wrong (a (B, C, H, W) state passed as means), so it is named first
        raise ValueError(
            f"{name}['means'] must have shape (*B, K, C, H, W) with the batch dims of {name}['logweights'] "
            f"(*B, K, 1, H, W): got means {_shape(means)} ({means.dim()} dims) and logweights "
            f"{_shape(logweights)} ({logweights.dim()} dims)"
        )
    shape = tuple(means.shape)
    batch = shape[:-4]
    K, C, H, W = shape[-4:]
    if K < 1 or C < 1:
        raise ValueError(f"{name}['means'] needs K >= 1 and C >= 1, got shape {_shape(means)}")
    if tuple(logweights.shape) != (*batch, K, 1, H, W):
        raise ValueError(
            f"{name}['logweights'] must have shape (*B, K, 1, H, W) = {(*batch, K, 1, H, W)} to match "
            f"{name}['means'] {_shape(means)}, got {_shape(logweights)}"
        )
    ls = tuple(logstds.shape)
    if ls != (*batch, 1, 1, 1, 1) and ls != (*batch, 1, 1, H, W):
        raise ValueError(
            f"{name}['logstds'] must have shape (*B, 1, 1, 1, 1) = {(*batch, 1, 1, 1, 1)} (or per pixel "
            f"(*B, 1, 1, H, W)) to match {name}['means'] {_shape(means)}, got {_shape(logstds)}"
        )
    return GMShape(batch, K, C, H, W, dev, means.dtype)


def check_state(x: Any, name: str, s: GMShape, n_samples: bool = False) -> torch.Tensor:
    """A state or sample tensor of shape ``(*B, C, H, W)`` (``(*B, N, C, H, W)`` if ``n_samples``)."""
    if not (
        type(x) is torch.Tensor and x.is_floating_point() and x.device == s.device
    ):  # the common case without a call
        x = check_float_tensor(x, name, s.device)
    ok = (
        x.dim() == len(s.batch) + 4
        and tuple(x.shape[: len(s.batch)]) == s.batch
        and tuple(x.shape[-3:]) == (s.C, s.H, s.W)
        if n_samples
        else tuple(x.shape) == (*s.batch, s.C, s.H, s.W)
    )
    if not ok:
        want = (
            f"(*B, N, C, H, W) = {(*s.batch, 'N', s.C, s.H, s.W)}" if n_samples else f"(*B, C, H, W) = {pixel_shape(s)}"
        )
        raise ValueError(
            f"{name} must have shape {want} to match the GM (means {(*s.batch, s.K, s.C, s.H, s.W)}), got {_shape(x)}"
        )
    return x


def check_gaussian(g: Any, name: str, s: GMShape | None = None) -> GMShape:
    """Validate an isotropic Gaussian ``{mean (*B, C, H, W), var (*B, 1, H, W) | (*B, 1, 1, 1)}``.

    With ``s`` given, its batch and pixel sizes must match the GM's. Returns the Gaussian's
    sizes as a ``GMShape`` with ``K = 1``.
    """
    if (type(g) is not dict and not isinstance(g, Mapping)) or "mean" not in g or "var" not in g:
        _gaussian_keys_error(g, name)
    mean, var = g["mean"], g["var"]
    if not (type(mean) is torch.Tensor and mean.is_floating_point() and (s is None or mean.device == s.device)):
        check_float_tensor(mean, f"{name}['mean']", None if s is None else s.device)
    if mean.dim() < 3:
        raise ValueError(f"{name}['mean'] must have shape (*B, C, H, W), got {_shape(mean)}")
    if not (type(var) is torch.Tensor and var.is_floating_point() and var.device == mean.device):
        check_float_tensor(var, f"{name}['var']", mean.device)
    shape = tuple(mean.shape)
    batch = shape[:-3]
    C, H, W = shape[-3:]
    if s is not None and shape != (*s.batch, s.C, s.H, s.W):
        raise ValueError(
            f"{name}['mean'] must have shape (*B, C, H, W) = {pixel_shape(s)} to match the GM, got {_shape(mean)}"
        )
    gs = GMShape(batch, 1, C, H, W, mean.device, mean.dtype)
    vs = tuple(var.shape)
    if vs != (*batch, 1, H, W) and vs != (*batch, 1, 1, 1):
        raise ValueError(
            f"{name}['var'] must have shape (*B, 1, H, W) = {(*batch, 1, H, W)} or (*B, 1, 1, 1) = "
            f"{(*batch, 1, 1, 1)} to match {name}['mean'] {_shape(mean)}, got {_shape(var)}"
        )
    return gs


def _gaussian_keys_error(g: Any, name: str) -> None:
    """Raise the error for ``g``, which is not a dict with keys ``mean`` and ``var``: a
    ``TypeError`` naming its type, or a ``ValueError`` naming the missing key, or saying that
    it is a GM."""
    if type(g) is not dict and not isinstance(g, Mapping):
        got = f"{type(g).__name__} of shape {_shape(g)}" if isinstance(g, torch.Tensor) else type(g).__name__
        raise TypeError(f"{name} must be a dict {{mean, var}} (an isotropic Gaussian), got {got}")
    keys = [str(k) for k in g]
    if "mean" not in g and ("means" in g or "logweights" in g):
        raise ValueError(
            f"{name} looks like a GM (keys {', '.join(keys)}); pass a Gaussian {{mean, var}} "
            f"(gm_to_iso_gaussian gives the moment-matched one)"
        )
    missing = [k for k in ("mean", "var") if k not in g]
    key = f"key {missing[0]!r}" if len(missing) == 1 else f"keys {missing}"
    raise ValueError(f"{name} is missing {key} (got keys {keys}); a Gaussian is {{mean, var}}")


def host_checks_values(t: torch.Tensor) -> bool:
    """True when the values of ``t`` are checked by reading them on the host: a CPU tensor
    (reading it costs no synchronisation) outside ``torch.compile`` tracing. Tensors on CUDA
    (or meta, or any other device) are checked by a device-side assert instead."""
    return t.is_cpu and not torch.compiler.is_compiling()


def require(ok: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Require every element of the boolean tensor ``ok``.

    On the host (:func:`host_checks_values`): ``ValueError(message + detail())`` (``detail``
    may read values: it runs only on CPU, to word the error). On CUDA: a device-side assert,
    ``torch._assert_async(ok.all(), message)``: no host synchronisation, valid in CUDA-graph
    capture; a failure surfaces as an asynchronous CUDA error carrying the message (at the
    next synchronisation), which leaves the CUDA context unusable, as any device-side assert
    does. Skipped while ``torch.compile`` traces (a value read would break the graph). On meta
    tensors the assert is a no-op (there are no values)."""
    if torch.compiler.is_compiling():
        return
    if host_checks_values(ok):
        if not bool(ok.all()):
            raise ValueError(message + (detail() if detail is not None else ""))
        return
    torch._assert_async(ok.all(), message)


#: tensors of at most this many elements are value-checked on the host as a Python list
_HOST_LIST_MAX = 64


def require_range(t: torch.Tensor, low: float, high: float, message: str, low_open: bool = False) -> None:
    """Require ``low <= t <= high`` (``low < t`` when ``low_open``; ``high`` may be ``inf``)
    elementwise, NaN failing, as :func:`require` does: on the host (a CPU tensor) from the
    tensor's minimum and maximum (one small op instead of a boolean tensor per bound; the
    error adds the values' range), on CUDA a device-side assert."""
    if torch.compiler.is_compiling():
        return
    if host_checks_values(t):
        n = t.numel()
        if n == 0:
            return
        if n <= _HOST_LIST_MAX:  # a per-sample sigma or timestep: read as a list (a loop: no generator calls)
            for v in t.reshape(-1).tolist():
                if not ((low < v if low_open else low <= v) and v <= high):  # NaN fails
                    break
            else:
                return
        else:  # NaN anywhere gives NaN in the minimum and the maximum, which then fail
            if high == float("inf"):
                lo, hi = t.min().item(), high
            else:  # unpacked, not through a generator (three Python calls more)
                lo, hi = torch.aminmax(t)
                lo, hi = lo.item(), hi.item()
            if (lo > low if low_open else lo >= low) and hi <= high:
                return
        raise ValueError(f"{message}; got values {value_range(t)}")
    ok = (t > low) if low_open else (t >= low)
    torch._assert_async((ok & (t <= high)).all(), message)


def value_range(t: torch.Tensor) -> str:
    """``from MIN to MAX`` of a CPU tensor (only called to word an error)."""
    return f"from {t.min().item()} to {t.max().item()}"


def check_sigma(
    sigma: Any, name: str, s: GMShape, check_values: bool = True, top: float = 1.0, per_sample: bool = False
) -> Sigma:
    """A noise level: a Python float in [0, 1] or a float tensor broadcastable to ``(*B, 1, 1, 1)``
    (with ``top``, in [0, top]: timesteps take ``top = 1000``; ``per_sample`` also accepts a
    tensor of shape ``(*B,)``, one value per sample, returned as given).

    Tensors are returned viewed as ``(*B, 1, 1, 1)``-broadcastable without a copy. Their values
    are checked against [0, top] by :func:`require_range` (a ``ValueError`` on CPU, a
    device-side assert on CUDA: no host synchronisation).
    """
    usual = (  # a float tensor on the GM's device of the usual shapes: accepted without the walk below
        type(sigma) is torch.Tensor
        and sigma.is_floating_point()
        and sigma.device == s.device
        and ((shape := tuple(sigma.shape)) == (*s.batch, 1, 1, 1) or (per_sample and shape == s.batch))
    )
    if not usual:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a float or a float tensor, got {type(sigma).__name__}")
        if not isinstance(sigma, torch.Tensor):
            sigma = float(sigma)
            if not 0.0 <= sigma <= top:
                raise ValueError(f"{name} must lie in [0, {top:g}], got {sigma}")
            return sigma
        check_float_tensor(sigma, name, s.device)
        target = (*s.batch, 1, 1, 1)
        shape = tuple(sigma.shape)
        # broadcastable to target with target's shape as the result: aligned from the right, every
        # size is 1 or the target's
        if not (len(shape) <= len(target) and all(n == 1 or n == m for n, m in zip(reversed(shape), reversed(target)))):
            raise ValueError(
                f"{name} must be broadcastable to (*B, 1, 1, 1) = {target}, got shape {_shape(sigma)}; "
                f"a per-sample sigma of shape (B,) is passed as sigma.view(-1, 1, 1, 1)"
            )
    if check_values:
        require_range(sigma, 0.0, top, f"{name} must lie in [0, {top:g}]")
    return sigma


def check_sigma_order(low: Sigma, low_name: str, high: Sigma, high_name: str) -> None:
    """``low <= high`` elementwise for two checked sigmas (floats or tensors), e.g.
    ``sigma_to <= sigma``: a ``ValueError`` for floats and CPU tensors, a device-side assert
    on CUDA (:func:`require`)."""
    message = f"{low_name} must be <= {high_name} (the transition runs from {high_name} down to {low_name})"
    if not isinstance(low, torch.Tensor) and not isinstance(high, torch.Tensor):
        if low > high:
            raise ValueError(f"{message}; got {low_name}={low} > {high_name}={high}")
        return
    if torch.compiler.is_compiling():
        return
    tensor = low if isinstance(low, torch.Tensor) else high
    if host_checks_values(tensor):
        if not isinstance(low, torch.Tensor) or not isinstance(high, torch.Tensor):
            # a float against a CPU tensor: its maximum (minimum) decides, NaN failing as in `<=`
            if tensor.numel() == 0 or (low.max().item() <= high if tensor is low else low <= high.min().item()):
                return
        elif low.shape == high.shape and low.numel() <= _HOST_LIST_MAX:  # per-sample values: as lists
            if all(a <= b for a, b in zip(low.reshape(-1).tolist(), high.reshape(-1).tolist())):
                return
    ok = torch.as_tensor(low <= high)
    require(ok, message, lambda: f"; {low_name} exceeds {high_name} at {int((~ok).sum())} of {ok.numel()} entries")


def per_sample_view(t: Sigma, s: GMShape) -> Sigma:
    """A per-sample ``(*B,)`` tensor viewed as ``(*B, 1, 1, 1)``; anything else as given."""
    if isinstance(t, torch.Tensor) and s.batch and tuple(t.shape) == s.batch:
        return t.view(*s.batch, 1, 1, 1)
    return t


def check_sigma_pair(
    sigma: Any, name: str, sigma_to: Any, to_name: str, s: GMShape, top: float = 1.0, per_sample: bool = False
) -> tuple[Sigma, Sigma]:
    """The two levels of a transition, ``0 <= sigma_to <= sigma <= top`` (noise levels, or
    timesteps with ``top = 1000``; ``per_sample`` as in :func:`check_sigma`): :func:`check_sigma`
    of each and :func:`check_sigma_order`, with one host read of each small CPU tensor for all
    three (three otherwise) and, on CUDA, one device-side assert (three comparisons,
    ``0 <= sigma_to``, ``sigma_to <= sigma``, ``sigma <= top``, imply the rest). Errors, on CPU
    and for floats, are the two functions' own. Returns the two as given (a per-sample ``(*B,)``
    one viewed as ``(*B, 1, 1, 1)`` when the other's shape differs, so that they compare
    elementwise)."""
    high_t, low_t = isinstance(sigma, torch.Tensor), isinstance(sigma_to, torch.Tensor)
    if (high_t or low_t) and not torch.compiler.is_compiling():
        checked = _checked_pair(sigma, name, sigma_to, to_name, s, top, per_sample)
        if checked is not None:
            return checked
    sigma = check_sigma(sigma, name, s, top=top, per_sample=per_sample)  # one by one, with their errors
    sigma_to = check_sigma(sigma_to, to_name, s, top=top, per_sample=per_sample)
    if high_t and low_t and sigma.shape != sigma_to.shape:
        sigma, sigma_to = per_sample_view(sigma, s), per_sample_view(sigma_to, s)
    check_sigma_order(sigma_to, to_name, sigma, name)
    return sigma, sigma_to


def _pair_message(name: str, to_name: str, top: float) -> str:
    return f"{name} and {to_name} must satisfy 0 <= {to_name} <= {name} <= {top:g}"


def _checked_pair(
    sigma: Sigma, name: str, sigma_to: Sigma, to_name: str, s: GMShape, top: float, per_sample: bool
) -> tuple[Sigma, Sigma] | None:
    """:func:`check_sigma_pair` for at least one tensor: the pair when every check passes (or,
    on a device, is asserted there), None when a value fails or is not read as a list (the
    caller then runs the checks one by one, raising their errors in order). Type, device and
    shape errors of tensors raise here, as the one-by-one checks would."""
    if isinstance(sigma, torch.Tensor) and isinstance(sigma_to, torch.Tensor):  # the usual case
        hi = check_sigma(sigma, name, s, check_values=False, top=top, per_sample=per_sample)
        lo = check_sigma(sigma_to, to_name, s, check_values=False, top=top, per_sample=per_sample)
        if hi.shape != lo.shape:
            hi, lo = per_sample_view(hi, s), per_sample_view(lo, s)
        if not host_checks_values(hi):
            torch._assert_async(((lo >= 0.0) & (lo <= hi) & (hi <= top)).all(), _pair_message(name, to_name, top))
            return hi, lo
        if hi.shape != lo.shape or hi.numel() > _HOST_LIST_MAX:
            return None
        pairs = zip(hi.reshape(-1).tolist(), lo.reshape(-1).tolist())
    else:  # a tensor and a float
        t, n, f = (sigma, name, sigma_to) if isinstance(sigma, torch.Tensor) else (sigma_to, to_name, sigma)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= top:
            return None
        t, f = check_sigma(t, n, s, check_values=False, top=top, per_sample=per_sample), float(f)
        hi, lo = (t, f) if t is sigma else (f, t)
        if not host_checks_values(t):
            ok = (hi >= lo) & (hi <= top) if t is sigma else (lo >= 0.0) & (lo <= hi)
            torch._assert_async(ok.all(), _pair_message(name, to_name, top))
            return hi, lo
        if t.numel() > _HOST_LIST_MAX:
            return None
        values = t.reshape(-1).tolist()
        pairs = ((v, f) for v in values) if t is sigma else ((f, v) for v in values)
    for a, b in pairs:
        if not 0.0 <= b <= a <= top:  # NaN fails
            return None
    return hi, lo


def check_generator(generator: Any, name: str = "generator") -> torch.Generator | None:
    """``None`` or a ``torch.Generator`` (an int seed is not accepted: seed one with
    ``torch.Generator(device).manual_seed(seed)``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None, got {type(generator).__name__} {generator!r}; "
            f"for a seed pass torch.Generator(device).manual_seed(seed)"
        )
    return generator


def check_model_output(out: Any, name: str = "gm_u") -> None:
    """The output of a GMFlow model handed to a sampler step: a GM dict, or a pair (tuple or
    list) of GM dicts ``(gm_cond, gm_uncond)`` for guidance. Shapes are checked by the ops."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    for item in items:
        if not isinstance(item, Mapping):
            got = (
                f"{type(item).__name__} of shape {_shape(item)}"
                if isinstance(item, torch.Tensor)
                else type(item).__name__
            )
            raise TypeError(
                f"{name}, the model output, must be a u-GM dict with keys means, logstds, logweights "
                f"(or the pair (gm_cond, gm_uncond) when guidance_scale > 0), got {got}"
                + (" inside a sequence" if item is not out else "")
            )


def check_step_output(cond: Any, uncond: Any, x: Any, generator: Any, step: int, t: float) -> None:
    """What a sampler step consumes, on every backend alike: the denoiser's output at ``step``
    (timestep ``t``), ``cond`` (and ``uncond`` under guidance, else None) u-GMs that match the
    state ``x (*B, C, H, W)`` in ``*B, C, H, W`` and device, and ``generator`` None or a
    ``torch.Generator``. The errors name the output and the step. The checks run once per
    metadata of the tensors (``checked_once``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        check_generator(generator)
    if type(cond) is dict and (uncond is None or type(uncond) is dict):
        tensors = [cond.get("means"), cond.get("logstds"), cond.get("logweights"), x]
        if uncond is not None:
            tensors += [uncond.get("means"), uncond.get("logstds"), uncond.get("logweights")]
        checked_once("step output", lambda: _check_step_output(cond, uncond, x, step, t), *tensors)
    else:
        _check_step_output(cond, uncond, x, step, t)


def _check_step_output(cond: Any, uncond: Any, x: Any, step: int, t: float) -> GMShape:
    check_model_output(cond if uncond is None else (cond, uncond))
    check_float_tensor(x, "x")
    name = "gm_u" if uncond is None else "gm_cond"
    try:
        s = check_gm(cond, name)
        if uncond is not None:
            u = check_gm(uncond, "gm_uncond")
            if (u.batch, u.C, u.H, u.W) != (s.batch, s.C, s.H, s.W) or u.device != s.device:
                raise ValueError(
                    f"gm_uncond['means'] {(*u.batch, u.K, u.C, u.H, u.W)} on {u.device} must match "
                    f"gm_cond['means'] {(*s.batch, s.K, s.C, s.H, s.W)} on {s.device} in *B, C, H, W and device"
                )
        if x.device != s.device:
            raise ValueError(f"{name} is on {s.device} but the state x_t is on {x.device}")
        if tuple(x.shape) != pixel_shape(s):
            B, C, H, W = x.shape[:-3], *x.shape[-3:]
            raise ValueError(
                f"{name}['means'] {_shape(cond['means'])} does not match the state x_t {_shape(x)}: a u-GM for it has "
                f"means (*B, K, C, H, W) = {(*B, 'K', C, H, W)}"
            )
    except (TypeError, ValueError) as e:
        raise type(e)(f"the denoiser's output at step {step} (t={t:g}): {e}") from None
    return s


def check_power(power: Any, name: str) -> float:
    """A non-negative finite Python float (mixture powers and guidance scales)."""
    if isinstance(power, bool) or not isinstance(power, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(power).__name__}")
    power = float(power)
    if not power >= 0.0 or power == float("inf"):
        raise ValueError(f"{name} must be a finite float >= 0, got {power}")
    return power


def check_gm1d(gm1d: Any, samples: Any, samples_name: str, name: str = "gm1d") -> GMShape:
    """Validate a 1-D GM ``{means (*B, K, H, W), logstds (*B, 1, 1, 1) | (*B, 1, H, W),
    logweights (*B, K, H, W)}`` and ``samples (*B, N, H, W)``; returns its sizes with ``C = 1``."""
    if not isinstance(gm1d, Mapping) or any(k not in gm1d for k in ("means", "logstds", "logweights")):
        raise TypeError(f"{name} must be a dict with keys means, logstds, logweights; got {type(gm1d).__name__}")
    means = check_float_tensor(gm1d["means"], f"{name}['means']")
    if means.dim() < 3:
        raise ValueError(f"{name}['means'] must have shape (*B, K, H, W), got {_shape(means)}")
    dev = means.device
    logstds = check_float_tensor(gm1d["logstds"], f"{name}['logstds']", dev)
    logweights = check_float_tensor(gm1d["logweights"], f"{name}['logweights']", dev)
    samples = check_float_tensor(samples, samples_name, dev)
    *batch, K, H, W = means.shape
    if tuple(logweights.shape) != tuple(means.shape):
        raise ValueError(
            f"{name}['logweights'] must have the shape of {name}['means'] {_shape(means)}, got {_shape(logweights)}"
        )
    if tuple(logstds.shape) not in ((*batch, 1, 1, 1), (*batch, 1, H, W)):
        raise ValueError(
            f"{name}['logstds'] must have shape (*B, 1, 1, 1) = {(*batch, 1, 1, 1)} or (*B, 1, H, W) to match "
            f"{name}['means'] {_shape(means)}, got {_shape(logstds)}"
        )
    if samples.dim() != means.dim() or tuple(samples.shape[:-3]) != tuple(batch) or tuple(samples.shape[-2:]) != (H, W):
        raise ValueError(
            f"{samples_name} must have shape (*B, N, H, W) = {(*batch, 'N', H, W)} to match {name}['means'] "
            f"{_shape(means)}, got {_shape(samples)}"
        )
    return GMShape(tuple(batch), K, 1, H, W, dev, means.dtype)


def check_count(n: Any, name: str, minimum: int) -> int:
    """A Python int ``>= minimum`` (sample and iteration counts)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(n).__name__} {n!r}")
    if n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {n!r}")
    return n


def check_positive(x: Any, name: str) -> float:
    """A finite Python float ``> 0`` (tolerances and step sizes)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(x).__name__}")
    x = float(x)
    if not 0.0 < x < float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {x}")
    return x
