"""The GM operations module of the public GMFlow code base (``lib/ops/gmflow_ops/gmflow_ops.py``),
on top of ``gmkernels``.

Switching is one import line::

    # from lib.ops.gmflow_ops.gmflow_ops import gm_to_mean, gm_mul_iso_gaussian, ...
    from gmkernels.compat.gmflow_ops import gm_to_mean, gm_mul_iso_gaussian, ...

Names, argument names and orders, defaults and return conventions are those of that module.
Shapes (``*B`` any leading batch dims, as its ``(bs, *)``):

* isotropic GM: ``means (*B, K, C, H, W)``, ``logstds (*B, 1, 1, 1, 1)``, ``logweights (*B, K, 1, H, W)``;
* ``covs`` GM: ``means (*B, K, H, W, C)``, ``covs (*B, 1 | K, H, W, C, C)``, ``logweights (*B, K, H, W)``;
* isotropic Gaussian: ``mean (*B, C, H, W)``, ``var (*B, 1, H, W)`` or ``(*B, 1, 1, 1)``;
* full Gaussian: ``mean (*B, H, W, C)``, ``cov (*B, H, W, C, C)``.

Batch dims of the tensors of one dict may broadcast against each other, as they do there.

Dict side effects are the same: ``gm_to_iso_gaussian``, ``gm_to_gaussian``, ``gm_mul_gaussian``,
``gm_mul_iso_gaussian`` and ``gm_mul_gm`` store ``gm['gm_vars'] = exp(2 * logstds)`` (and the first
two ``gm['gm_weights'] = exp(logweights)``) when absent, ``gm_mul_iso_gaussian`` stores
``gaussian['logstd']``, ``gm_logprob`` on a ``covs`` GM stores ``invcov_trils`` and ``logdets``.
Those keys are caches: here the library recomputes from ``means``/``logstds``/``logweights``
instead of reading them (they are equal whenever these functions wrote them).

Two tuple results are lazy: ``gm_to_iso_gaussian`` returns ``(gaussian, gm_diffs, gm_vars)`` and
``gm_logprob`` returns ``(logprob, gaussian_logprobs)`` as a :class:`LazyResults` — indexing and
unpacking work as for a tuple, and the second item (``K*C*H*W`` resp. ``N*K*H*W`` values, which
the fused kernels never write) is only computed when it is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import torch

from reference.sampling import sample_components

from ..ops import inverse_cdf as _inverse_cdf
from ..ops import likelihood as _likelihood
from ..ops import mixture as _mixture
from ..ops import product as _product
from ..ops import sampling as _sampling

_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# helpers


class LazyResults(Sequence):
    """A tuple-like result whose items given as :class:`Deferred` are computed on first access.

    ``a, b, c = result`` and ``result[0]`` behave as for a tuple; ``result[0]`` never computes
    the deferred items.
    """

    def __init__(self, *items: Any) -> None:
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        item = self._items[index]
        if isinstance(item, Deferred):
            item = self._items[index] = item.fn()
        return item

    def __repr__(self) -> str:
        return f"LazyResults({', '.join('<deferred>' if isinstance(i, Deferred) else repr(i) for i in self._items)})"


class Deferred:
    """Marks an item of :class:`LazyResults` computed by ``fn()`` when first read."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


def _cache(d: dict, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``d[key]``, stored as ``fn()`` first when absent (the original module's cache keys)."""
    if key not in d:
        d[key] = fn()
    return d[key]


def _joint_batch(*pairs: tuple[str, torch.Tensor, int]) -> torch.Size:
    """Broadcast of the leading batch dims of ``(name, tensor, n_trailing_dims)`` triples."""
    try:
        return torch.broadcast_shapes(*(t.shape[: max(t.dim() - n, 0)] for _, t, n in pairs))
    except RuntimeError:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t, _ in pairs)
        raise ValueError(f"the batch dims of {shapes} do not broadcast") from None


def _expand(t: torch.Tensor, batch: torch.Size, n: int) -> torch.Tensor:
    """``t`` with its batch dims expanded (a view) to ``batch``; left alone when it is too small
    to hold ``n`` trailing dims (validation in the library op then names it)."""
    if not isinstance(t, torch.Tensor) or t.dim() < n:
        return t
    return t.expand(*batch, *t.shape[t.dim() - n :])


def _lib_gm(gm: dict, *gaussians: dict) -> tuple[dict, ...]:
    """The isotropic GM (and Gaussians) as the library takes them: only the three GM keys, batch
    dims broadcast to one shape. Returns ``(gm, *gaussians)``."""
    pairs = [(f"gm[{k!r}]", gm[k], 4) for k in ("means", "logstds", "logweights")]
    for i, g in enumerate(gaussians):
        pairs += [(f"gaussian{i + 1}[{k!r}]", g[k], 3) for k in ("mean", "var")]
    batch = _joint_batch(*pairs)
    out = [{k: _expand(gm[k], batch, 4) for k in ("means", "logstds", "logweights")}]
    out += [{k: _expand(g[k], batch, 3) for k in ("mean", "var")} for g in gaussians]
    return tuple(out)


def _lib_gaussians(*gaussians: dict) -> tuple[dict, ...]:
    """Isotropic Gaussians with batch dims broadcast to one shape (views)."""
    pairs = [(f"gaussian_{i + 1}[{k!r}]", g[k], 3) for i, g in enumerate(gaussians) for k in ("mean", "var")]
    batch = _joint_batch(*pairs)
    return tuple({k: _expand(g[k], batch, 3) for k in ("mean", "var")} for g in gaussians)


def _channels_first(means: torch.Tensor) -> torch.Tensor:
    """``(*B, K, H, W, C)`` -> ``(*B, K, C, H, W)`` (a view)."""
    return means.movedim(-1, -3)


def _channels_last(means: torch.Tensor) -> torch.Tensor:
    """``(*B, K, C, H, W)`` -> ``(*B, K, H, W, C)`` (a view)."""
    return means.movedim(-3, -1)


def _covs_as_iso_gm(gm: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A ``covs`` GM seen by its isotropic part: channel-first means, per-pixel variance
    ``mean(diag(cov))`` (weight-averaged over K for per-component covs).

    Returns ``(iso_gm, gm_weights (*B, K, 1, H, W), gm_vars (*B, 1, 1, H, W))``.
    """
    means = _channels_first(gm["means"])
    logweights = gm["logweights"].unsqueeze(-3)
    gm_weights = logweights.exp()
    gm_vars = gm["covs"].diagonal(dim1=-2, dim2=-1).mean(dim=-1).unsqueeze(-3)  # (*B, 1|K, 1, H, W)
    if gm_vars.size(-4) > 1:
        gm_vars = (gm_weights * gm_vars).sum(dim=-4, keepdim=True)
    return {"means": means, "logstds": 0.5 * gm_vars.log(), "logweights": logweights}, gm_weights, gm_vars


def _iso_gm_vars(gm: dict) -> torch.Tensor:
    return _cache(gm, "gm_vars", lambda: (gm["logstds"] * 2).exp())


def _iso_component_logprobs(means: torch.Tensor, logstds: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Per-component isotropic log-densities ``(*B, N, K, H, W)`` of ``samples (*B, N, C, H, W)``;
    ``logstds`` is ``(*B, 1, 1, 1, 1)``, ``(*B, 1, 1, H, W)`` or per component ``(*B, K, 1, H, W)``."""
    C = means.size(-3)
    logstds = logstds.unsqueeze(-5)  # (*B, 1, 1|K, 1, 1|H, 1|W)
    z = (samples.unsqueeze(-4) - means.unsqueeze(-5)) * torch.exp(-logstds)  # (*B, N, K, C, H, W)
    return -0.5 * z.square().sum(dim=-3) - C * logstds.squeeze(-3) - 0.5 * C * _LOG_2PI


# --------------------------------------------------------------------------------------------
# linear algebra and 1-D mixtures


def psd_inverse(x: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric positive-definite matrices ``(..., C, C)`` through Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(x))


def gm1d_pdf_cdf(gm1d: dict, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Density and CDF of a 1-D GM per pixel.

    Args:
        gm1d: ``means (*B, K, H, W)``, ``logstds (*B, 1, 1, 1)``, ``logweights (*B, K, H, W)``.
        samples: ``(*B, N, H, W)``.
    Returns:
        ``(pdf, cdf)``, each ``(*B, N, H, W)``; the CDF is scaled to ``[-1, 1]`` (``2 F - 1``).
    """
    logstds = gm1d["logstds"].unsqueeze(-4)  # (*B, 1, 1, 1, 1)
    logweights = gm1d["logweights"].unsqueeze(-4)  # (*B, 1, K, H, W)
    z = (samples.unsqueeze(-3) - gm1d["means"].unsqueeze(-4)) * torch.exp(-logstds)  # (*B, N, K, H, W)
    pdf = torch.exp(logweights - 0.5 * z.square() - logstds).sum(dim=-3) / math.sqrt(2 * math.pi)
    cdf = (logweights.exp() * torch.erf(z / math.sqrt(2))).sum(dim=-3)
    return pdf, cdf


def _newton_steps(n_steps, backward_steps) -> int:
    """Newton steps in all of the original's ``gm1d_inverse_cdf``: ``n_steps - backward_steps`` in
    its CUDA kernel, then, when ``backward_steps > 0``, ``n_steps`` more in PyTorch."""
    for name, v in (("n_steps", n_steps), ("backward_steps", backward_steps)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 0 <= backward_steps <= n_steps:
        raise ValueError(f"backward_steps must be in [0, n_steps={n_steps}], got {backward_steps}")
    return n_steps - backward_steps + (n_steps if backward_steps > 0 else 0)


def gm1d_inverse_cdf(
    gm1d, scaled_cdfs, n_steps=8, eps=1e-6, max_step_size=1.5, gaussian_samples=None, backward_steps=2
):
    """Inverse CDF of a 1-D GM by Newton iterations: ``gmkernels.gm1d_inverse_cdf``.

    ``gm1d`` as in :func:`gm1d_pdf_cdf`, ``scaled_cdfs (*B, N, H, W)`` in ``[-1, 1]``; returns
    samples ``(*B, N, H, W)``. Stores ``gm1d['gm_weights']`` and ``gm1d['gm_vars']``.

    The step count is the original's: it runs ``n_steps - backward_steps`` steps in its CUDA
    kernel and then, when ``backward_steps > 0``, ``n_steps`` more in PyTorch (those carry the
    gradient), so ``n_steps - backward_steps + (n_steps if backward_steps > 0 else 0)`` steps in
    all: 14 with the defaults. The library runs that many steps, on the GPU kernel or, whenever
    an input requires a gradient, on its PyTorch path, which differentiates through all of them.
    ``backward_steps`` must be in ``[0, n_steps]``.
    """
    total = _newton_steps(n_steps, backward_steps)
    _cache(gm1d, "gm_weights", lambda: gm1d["logweights"].exp())
    _cache(gm1d, "gm_vars", lambda: (gm1d["logstds"] * 2).exp())
    lib_gm1d = {k: gm1d[k] for k in ("means", "logstds", "logweights")}
    return _inverse_cdf.gm1d_inverse_cdf(
        lib_gm1d, scaled_cdfs, n_steps=total, eps=eps, max_step_size=max_step_size, gaussian_samples=gaussian_samples
    )


def _check_all_axes(n_axes, gm: dict) -> None:
    C = gm["means"].size(-3)
    if n_axes is not None and n_axes != C:
        raise NotImplementedError(
            f"n_axes={n_axes} < C={C} (a partial Knothe-Rosenblatt transport) is not provided by gmkernels; "
            "pass n_axes=None to transport every channel"
        )


# --------------------------------------------------------------------------------------------
# moments


def gm_to_iso_gaussian(gm: dict) -> LazyResults:
    """Moment-matched isotropic Gaussian (``gmkernels.gm_to_iso_gaussian``).

    Returns:
        ``(gaussian, gm_diffs, gm_vars)``: ``gaussian = {mean (*B, C, H, W), var (*B, 1, H, W)}``,
        ``gm_diffs = means - mean`` ``(*B, K, C, H, W)`` (computed only when read), ``gm_vars``
        ``(*B, 1, 1, 1, 1)`` (``(*B, 1, 1, H, W)`` for a ``covs`` GM: the weighted mean of the
        covariance diagonals).
    """
    if "covs" in gm:
        iso, _, gm_vars = _covs_as_iso_gm(gm)
    else:
        _cache(gm, "gm_weights", lambda: gm["logweights"].exp())
        gm_vars = _iso_gm_vars(gm)
        (iso,) = _lib_gm(gm)
    gaussian = _mixture.gm_to_iso_gaussian(iso)
    means = iso["means"]
    return LazyResults(gaussian, Deferred(lambda: means - gaussian["mean"].unsqueeze(-4)), gm_vars)


def gm_to_gaussian(gm: dict, cov_scale: float = 1.0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Moment-matched full-covariance Gaussian (plain PyTorch).

    Returns:
        ``(gaussian, gm_diffs, gm_covs)``: ``gaussian = {mean (*B, H, W, C), cov (*B, H, W, C, C)}``
        (``cov`` times ``cov_scale``), ``gm_diffs (*B, K, H, W, C)``, ``gm_covs`` the within-component
        covariance ``(*B, 1, 1, 1, C, C)`` (``(*B, 1, H, W, C, C)`` where it varies per pixel).
    """
    if "covs" in gm:
        means = gm["means"]  # (*B, K, H, W, C)
        weights = gm["logweights"].exp()  # (*B, K, H, W)
        covs = gm["covs"]
        if covs.size(-5) > 1:
            gm_covs = (weights[..., None, None] * covs).sum(dim=-5)  # (*B, H, W, C, C)
        else:
            gm_covs = covs.squeeze(-5)
    else:
        means = _channels_last(gm["means"])
        weights = _cache(gm, "gm_weights", lambda: gm["logweights"].exp()).squeeze(-3)  # (*B, K, H, W)
        gm_vars = _iso_gm_vars(gm).squeeze(-3).squeeze(-3)  # (*B, 1|H, 1|W)
        eye = torch.eye(means.size(-1), dtype=means.dtype, device=means.device)
        gm_covs = gm_vars[..., None, None] * eye  # (*B, 1|H, 1|W, C, C)
    mean = (weights.unsqueeze(-1) * means).sum(dim=-4)  # (*B, H, W, C)
    gm_diffs = means - mean.unsqueeze(-4)  # (*B, K, H, W, C)
    cov = torch.einsum("...khw,...khwc,...khwd->...hwcd", weights, gm_diffs, gm_diffs) + gm_covs
    return {"mean": mean, "cov": cov * cov_scale}, gm_diffs, gm_covs.unsqueeze(-5)


def gm_to_mean(gm: dict, gm_power=1) -> torch.Tensor:
    """Mean of the tempered GM, ``sum_k softmax_k(gm_power * logweights) mu_k`` (``gmkernels.gm_to_mean``).

    Returns:
        ``(*B, C, H, W)`` (channel-first also for a ``covs`` GM, as in the original).
    """
    if "covs" in gm:
        iso = {
            "means": _channels_first(gm["means"]),
            "logweights": gm["logweights"].unsqueeze(-3),
            "logstds": gm["means"].new_zeros((*gm["means"].shape[:-4], 1, 1, 1, 1)),
        }
    else:
        (iso,) = _lib_gm(gm)
    return _mixture.gm_to_mean(iso, power=gm_power)


def gm_to_onehot(gm: dict, gm_power=1) -> torch.Tensor:
    """Mean of the most probable component per pixel (plain PyTorch) -> ``(*B, C, H, W)``."""
    means, logweights = gm["means"], gm["logweights"]
    if "covs" in gm:
        means, logweights = _channels_first(means), logweights.unsqueeze(-3)
    scores = torch.where(logweights == float("-inf"), logweights, logweights * gm_power)
    idx = scores.argmax(dim=-4, keepdim=True)  # (*B, 1, 1, H, W)
    return means.gather(-4, idx.expand(*idx.shape[:-4], 1, *means.shape[-3:])).squeeze(-4)


# --------------------------------------------------------------------------------------------
# products


def gm_mul_iso_gaussian(gm: dict, gaussian: dict, gm_power, gaussian_power, eps=1e-6) -> tuple[dict, Any]:
    """Normalised product ``(p_gm^gm_power * N^gaussian_power)^(1 / gm_power)``
    (``gmkernels.gm_mul_iso_gaussian``).

    Returns:
        ``(gm_out, gm_power)``; ``gm_out['logstds']`` is ``(*B, 1, 1, H, W)`` for a per-pixel ``var``.
        Stores ``gm['gm_vars']`` and ``gaussian['logstd']``.
    """
    _iso_gm_vars(gm)
    _cache(gaussian, "logstd", lambda: torch.log(gaussian["var"]) / 2)
    lib_gm, lib_gaussian = _lib_gm(gm, gaussian)
    return _product.gm_mul_iso_gaussian(lib_gm, lib_gaussian, gm_power, gaussian_power, eps), gm_power


def iso_gaussian_mul_iso_gaussian(
    gaussian_1: dict, gaussian_2: dict, gaussian_1_power, gaussian_2_power, eps=1e-6
) -> dict:
    """Normalised product of isotropic Gaussians ``N1^p1 * N2^p2`` (a power of -1 divides)
    (``gmkernels.iso_gaussian_mul_iso_gaussian``) -> ``{mean (*B, C, H, W), var}``."""
    g1, g2 = _lib_gaussians(gaussian_1, gaussian_2)
    return _product.iso_gaussian_mul_iso_gaussian(g1, g2, gaussian_1_power, gaussian_2_power, eps)


def gaussian_mul_gaussian(gaussian_1: dict, gaussian_2: dict, gaussian_1_power, gaussian_2_power) -> dict:
    """Normalised product of full-covariance Gaussians ``N1^p1 * N2^p2`` (plain PyTorch).

    Args:
        gaussian_1, gaussian_2: ``{mean (*B, H, W, C), cov (*B, H, W, C, C)}``.
    Returns:
        ``{mean (*B, H, W, C), cov (*B, H, W, C, C)}``.
    """
    prec_1 = gaussian_1_power * psd_inverse(gaussian_1["cov"])
    prec_2 = gaussian_2_power * psd_inverse(gaussian_2["cov"])
    cov = psd_inverse(prec_1 + prec_2)
    rhs = prec_1 @ gaussian_1["mean"].unsqueeze(-1) + prec_2 @ gaussian_2["mean"].unsqueeze(-1)
    return {"mean": (cov @ rhs).squeeze(-1), "cov": cov}


def gm_mul_gaussian(
    gm: dict, gaussian: dict, gm_power, gaussian_power, gm_diffs=None, gm_covs=None
) -> tuple[dict, Any]:
    """Normalised product of an isotropic GM and a full-covariance Gaussian,
    ``(p_gm^a * N^b)^(1 / a)`` with ``a = gm_power``, ``b = gaussian_power`` (plain PyTorch).

    Args:
        gm: isotropic GM (``logstds`` per sample or per pixel).
        gaussian: ``{mean (*B, H, W, C), cov (*B, H, W, C, C)}``.
        gm_diffs: optional ``(*B, K, H, W, C)`` used in place of ``means - gaussian['mean']`` in
            the weight update (as in the original).
        gm_covs: optional within-component covariance ``(*B, 1, 1|H, 1|W, C, C)``, used in place of
            ``exp(2 logstds) I`` in the weight update.
    Returns:
        ``(gm_out, gm_power)`` with ``gm_out = {means (*B, K, H, W, C), covs (*B, 1, H, W, C, C),
        logweights (*B, K, H, W)}``. Stores ``gm['gm_vars']``.
    """
    means = _channels_last(gm["means"])  # (*B, K, H, W, C)
    gm_vars = _iso_gm_vars(gm).squeeze(-3).squeeze(-3)[..., None, None]  # (*B, 1|H, 1|W, 1, 1)
    eye = torch.eye(means.size(-1), dtype=means.dtype, device=means.device)
    g_mean, g_cov = gaussian["mean"], gaussian["cov"]
    if gm_diffs is None:
        gm_diffs = means - g_mean.unsqueeze(-4)
    if gm_covs is None:
        gm_covs = (gm_vars * eye).unsqueeze(-5)  # (*B, 1, 1|H, 1|W, C, C)
    g_prec = (gaussian_power / gm_power) * psd_inverse(g_cov)  # (*B, H, W, C, C)
    out_covs = psd_inverse(eye / gm_vars + g_prec)  # (*B, H, W, C, C)
    rhs = means / gm_vars.squeeze(-1).unsqueeze(-4) + (g_prec @ g_mean.unsqueeze(-1)).squeeze(-1).unsqueeze(-4)
    out_means = (out_covs.unsqueeze(-5) @ rhs.unsqueeze(-1)).squeeze(-1)  # (*B, K, H, W, C)
    # the normaliser of component k: N(mu_k; g, A/a + S/b); with powers of either sign the matrix
    # b A + a S may be indefinite, so it is solved rather than Cholesky-inverted
    system = gm_covs * gaussian_power + g_cov.unsqueeze(-5) * gm_power  # (*B, 1, H, W, C, C)
    solved = torch.linalg.solve(system, gm_diffs.unsqueeze(-1))  # (*B, K, H, W, C, 1)
    delta = (gm_diffs * solved.squeeze(-1)).sum(dim=-1) * (-0.5 * gaussian_power)  # (*B, K, H, W)
    logweights = torch.log_softmax(gm["logweights"].squeeze(-3) + delta, dim=-3)
    return {"means": out_means, "covs": out_covs.unsqueeze(-5), "logweights": logweights}, gm_power


def gm_mul_gm(gm1: dict, gm2: dict) -> dict:
    """Normalised product of two isotropic GMs: ``K1 * K2`` components (plain PyTorch).

    Returns:
        ``{means (*B, K1*K2, C, H, W), logstds, logweights (*B, K1*K2, 1, H, W)}``, component
        ``k1 * K2 + k2`` the product of ``k1`` and ``k2``. Stores ``gm_vars`` in both inputs.
    """
    v1 = _iso_gm_vars(gm1).unsqueeze(-4)  # (*B, 1, 1, 1, 1|H, 1|W)
    v2 = _iso_gm_vars(gm2).unsqueeze(-5)
    mu1, mu2 = gm1["means"].unsqueeze(-4), gm2["means"].unsqueeze(-5)  # (*B, K1, 1, ...), (*B, 1, K2, ...)
    n = v1 + v2
    means = ((v2 * mu1 + v1 * mu2) / n).flatten(-5, -4)
    delta = (mu1 - mu2).square().sum(dim=-3, keepdim=True) * (-0.5 / n)
    logits = gm1["logweights"].unsqueeze(-4) + gm2["logweights"].unsqueeze(-5) + delta
    logweights = torch.log_softmax(logits.flatten(-5, -4), dim=-4)
    l1, l2 = gm1["logstds"], gm2["logstds"]
    logstds = l1 + l2 - 0.5 * torch.logaddexp(2 * l1, 2 * l2)
    return {"means": means, "logstds": logstds, "logweights": logweights}


# --------------------------------------------------------------------------------------------
# sampling and densities


def gm_to_sample(gm: dict, gm_power=1, n_samples=1, cov_sharpen=False) -> torch.Tensor:
    """``n_samples`` draws per pixel -> ``(*B, n_samples, C, H, W)`` (``gmkernels.gm_sample`` for an
    isotropic GM with shared std; plain PyTorch for per-component ``logstds (*B, K, 1, H, W)`` and
    for a ``covs`` GM). Components are drawn from ``softmax(gm_power * logweights)``;
    ``cov_sharpen`` divides the covariances by ``gm_power``, except, as in the original, those of a
    ``covs`` GM with one shared covariance ``(*B, 1, H, W, C, C)``, which it leaves as they are.
    Uses the global RNG.
    """
    means = gm["means"]
    if "covs" in gm:
        *batch, K, H, W, C = means.shape
        idx = sample_components(gm["logweights"].unsqueeze(-3), n_samples, gm_power)  # (*B, N, 1, H, W)
        idx = idx.squeeze(-3)[..., None]  # (*B, N, H, W, 1)
        mu = means.gather(-4, idx.expand(*batch, n_samples, H, W, C))
        covs = gm["covs"]
        if cov_sharpen and covs.size(-5) > 1:
            covs = covs / gm_power
        tril = torch.linalg.cholesky(covs)  # (*B, 1|K, H, W, C, C)
        if tril.size(-5) > 1:
            tril = tril.gather(-5, idx[..., None].expand(*batch, n_samples, H, W, C, C))
        z = torch.randn((*batch, n_samples, H, W, C, 1), dtype=means.dtype, device=means.device)
        return _channels_first((tril @ z).squeeze(-1) + mu)
    logstds = gm["logstds"]
    if cov_sharpen:
        logstds = logstds - 0.5 * math.log(gm_power)
    K = means.size(-4)
    if logstds.size(-4) == K and K > 1:
        *batch, _, C, H, W = means.shape
        idx = sample_components(gm["logweights"], n_samples, gm_power)  # (*B, N, 1, H, W)
        mu = means.gather(-4, idx.expand(*batch, n_samples, C, H, W))
        stds = logstds.exp().expand(*batch, K, 1, H, W).gather(-4, idx)
        return mu + stds * torch.randn(mu.shape, dtype=means.dtype, device=means.device)
    (iso,) = _lib_gm({"means": means, "logstds": logstds, "logweights": gm["logweights"]})
    return _sampling.gm_sample(iso, n_samples=n_samples, power=gm_power)


def iso_gaussian_logprob(iso_gaussian: dict, samples: torch.Tensor) -> torch.Tensor:
    """Log-density of ``samples (*B, N, C, H, W)`` under ``{mean (*B, C, H, W), var (*B, 1, H|1, W|1)}``
    -> ``(*B, N, H, W)`` (plain PyTorch)."""
    mean, var = iso_gaussian["mean"].unsqueeze(-4), iso_gaussian["var"]
    C = mean.size(-3)
    return -0.5 * (samples - mean).square().sum(dim=-3) / var - 0.5 * C * var.log() - 0.5 * C * _LOG_2PI


def gm_logprob(gm: dict, samples: torch.Tensor) -> LazyResults:
    """Log-density of ``samples (*B, N, C, H, W)`` under the per-pixel GM.

    Isotropic GM with shared std: ``logprob`` from ``gmkernels.gm_logprob``. Per-component
    ``logstds (*B, K, 1, H, W)`` and ``covs`` GMs: plain PyTorch (a ``covs`` GM gets
    ``invcov_trils`` and ``logdets`` stored, and read when present, as in the original).

    Returns:
        ``(logprob (*B, N, H, W), gaussian_logprobs (*B, N, K, H, W))``; for the library path the
        second item is computed only when read.
    """
    if "covs" in gm:
        means = gm["means"]  # (*B, K, H, W, C)
        C = means.size(-1)
        covs = gm["covs"]
        invcov_trils = _cache(gm, "invcov_trils", lambda: torch.linalg.cholesky(psd_inverse(covs)))
        logdets = _cache(gm, "logdets", lambda: torch.logdet(covs))
        diffs = _channels_last(samples).unsqueeze(-4) - means.unsqueeze(-5)  # (*B, N, K, H, W, C)
        white = (diffs.unsqueeze(-2) @ invcov_trils.unsqueeze(-6)).squeeze(-2)
        gaussian_logprobs = -0.5 * (white.square().sum(dim=-1) + logdets.unsqueeze(-4) + C * _LOG_2PI)
        return LazyResults(
            torch.logsumexp(gm["logweights"].unsqueeze(-4) + gaussian_logprobs, dim=-3), gaussian_logprobs
        )
    means, logstds, logweights = gm["means"], gm["logstds"], gm["logweights"]
    if logstds.size(-4) == means.size(-4) and means.size(-4) > 1:
        gaussian_logprobs = _iso_component_logprobs(means, logstds, samples)
        logprob = torch.logsumexp(logweights.squeeze(-3).unsqueeze(-4) + gaussian_logprobs, dim=-3)
        return LazyResults(logprob, gaussian_logprobs)
    (iso,) = _lib_gm(gm)
    logprob = _likelihood.gm_logprob(iso, samples)
    return LazyResults(logprob, Deferred(lambda: _iso_component_logprobs(means, logstds, samples)))


def gm_kl_div(gm_p: dict, gm_q: dict, n_samples=32) -> torch.Tensor:
    """Monte-Carlo ``KL(p || q)`` per pixel from ``n_samples`` draws of ``p`` -> ``(*B, 1, H, W)``."""
    samples = gm_to_sample(gm_p, 1.0, n_samples=n_samples)
    return (gm_logprob(gm_p, samples)[0] - gm_logprob(gm_q, samples)[0]).mean(dim=-3, keepdim=True)


def gm_entropy(gm: dict, n_samples=32) -> torch.Tensor:
    """Monte-Carlo entropy per pixel from ``n_samples`` draws -> ``(*B, 1, H, W)``."""
    samples = gm_to_sample(gm, 1.0, n_samples=n_samples)
    return -gm_logprob(gm, samples)[0].mean(dim=-3, keepdim=True)


# --------------------------------------------------------------------------------------------
# Knothe-Rosenblatt transports and spectral densities


def gm_samples_to_gaussian_samples(gm, gm_samples, n_axes=None, eps=1e-6, axis_aligned=True):
    """Knothe-Rosenblatt transport GM -> N(0, I): ``gmkernels.gm_samples_to_gaussian_samples``, in the
    original's basis (see :func:`gaussian_samples_to_gm_samples`).
    ``gm_samples (*B, N, C, H, W)`` -> ``(*B, N, C, H, W)``. Only ``n_axes=None`` (every channel)."""
    _check_all_axes(n_axes, gm)
    (iso,) = _lib_gm(gm)
    return _inverse_cdf.gm_samples_to_gaussian_samples(iso, gm_samples, eps=eps, axis_aligned=axis_aligned)


def gaussian_samples_to_gm_samples(
    gm, gaussian_samples, n_axes=None, n_steps=16, backward_steps=0, eps=1e-6, force_fp32=True, axis_aligned=True
):
    """Knothe-Rosenblatt transport N(0, I) -> GM: ``gmkernels.gaussian_samples_to_gm_samples``.
    ``gaussian_samples (*B, N, C, H, W)`` -> ``(*B, N, C, H, W)`` in the dtype of ``means``.

    The basis is the original's (float32 ``eigh`` of the pixel-averaged covariance, same
    eigenvector signs), so the same Gaussian samples give the same GM samples; see
    ``reference.inverse_cdf.kr_basis`` for repeated eigenvalues. Each axis takes the Newton steps
    of :func:`gm1d_inverse_cdf` with ``n_steps`` and ``backward_steps`` (16 with the defaults).
    Only ``n_axes=None`` (every channel). ``force_fp32`` is accepted and has no effect: the
    library always computes in float32 (float64 for float64 inputs on its PyTorch path).
    """
    _check_all_axes(n_axes, gm)
    total = _newton_steps(n_steps, backward_steps)
    (iso,) = _lib_gm(gm)
    return _inverse_cdf.gaussian_samples_to_gm_samples(
        iso, gaussian_samples, n_steps=total, eps=eps, axis_aligned=axis_aligned
    )


def gm_spectral_logprobs(
    gm, samples, power_spectrum=None, spectral_samples=None, n_axes=None, eps=1e-6, axis_aligned=True
):
    """Log-density of whole samples ``(*B, N, C, H, W)`` -> ``(*B, N)``: the sum of the per-pixel GM
    log-densities, plus, when a log power spectrum broadcastable to ``(*B, N, H, W)`` is given, the
    log-ratio of ``N(0, exp(power_spectrum))`` to ``N(0, 1)`` for the Knothe-Rosenblatt images of
    the samples in the orthonormal 2-D Fourier basis (``spectral_samples``, computed when absent)."""
    logprobs = gm_logprob(gm, samples)[0].sum(dim=(-2, -1))
    if power_spectrum is None:
        return logprobs
    if spectral_samples is None:
        z_kr = gm_samples_to_gaussian_samples(gm, samples, n_axes=n_axes, eps=eps, axis_aligned=axis_aligned)
        z_fft = torch.fft.fft2(z_kr, norm="ortho")
        spectral_samples = z_fft.real + z_fft.imag
    C = spectral_samples.size(-3)
    diff = -0.5 * spectral_samples.square().sum(dim=-3) * (torch.exp(-power_spectrum) - 1) - 0.5 * C * power_spectrum
    return logprobs + diff.sum(dim=(-2, -1))
