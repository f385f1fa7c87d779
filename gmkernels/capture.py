"""Captured replay of a whole sampling call: :class:`CapturedSampler`.

For small batches a few-step sampler is bound by launch overhead (a step is a handful of short
kernels plus the network's). A CUDA graph records every kernel of one ``gmkernels.sample`` call
-- the network's forward included when it is capturable -- once, and replays them with one
launch per call::

    sampler = gmkernels.CapturedSampler(model, 8, solver="gm-sde", guidance_scale=0.5)
    x0 = sampler(torch.randn(B, C, H, W, device="cuda"))   # 1st call: warm up, capture, replay
    x0 = sampler(torch.randn(B, C, H, W, device="cuda"))   # later calls: copy noise in, replay

What makes a call capturable: the sampler itself never synchronises the host (no value reads;
the schedule's sigmas are Python floats or device tables; GM-SDE seeds are drawn on the
device). The model must be capturable too: static shapes, no ``.item()``/``print`` of tensors,
no host-side randomness, no allocation that depends on values. A capture failure raises a
``RuntimeError`` naming the likely cause; ``gmkernels.sample`` is the eager equivalent.

Randomness: GM-SDE draws come from the default CUDA generator, or from ``generator`` (a CUDA
``torch.Generator``, registered with the graph), and advance at every replay: two calls give
different samples, as two eager calls do. A replay does not equal an eager call with the same
seed (the graph's RNG offsets differ from the eager ones).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ._validate import check_float_tensor, check_generator
from .sampler import sample

_SAMPLE_KWARGS = set(inspect.signature(sample).parameters) - {"denoiser", "noise", "num_steps", "generator", "progress"}


class CapturedSampler:
    """``gmkernels.sample`` captured in a CUDA graph on the first call and replayed for new noise.

    Args:
        denoiser: the model, ``denoiser(x_t, t) -> gm_u`` (or ``(gm_cond, gm_uncond)``), as for
            ``gmkernels.sample``; it runs inside the capture, so it must be capturable.
        num_steps: network calls per sample.
        generator: a ``torch.Generator`` on the noise's CUDA device for the GM-SDE draws, or None
            (the default CUDA generator). Either advances at every replay. (A CPU generator
            serves the ``fallback`` runs on CPU.)
        warmup: eager calls on a side stream before the capture (they compile the Triton
            kernels, let cuDNN/cuBLAS pick algorithms and let the model's lazy state settle).
        fallback: when the noise is not on CUDA, run ``gmkernels.sample`` eagerly instead of
            raising (useful for code that also runs on CPU).
        clone_output: return a copy of the graph's static output (default). With False the
            returned tensor is the static buffer itself, overwritten by the next call.
        **sample_kwargs: ``solver``, ``substeps``, ``order``, ``shift``, ``guidance``,
            ``guidance_scale``, ``orthogonal``: as for ``gmkernels.sample``.

    Calling with noise ``(*B, C, H, W)`` returns the samples at sigma = 0, as
    ``gmkernels.sample(denoiser, noise, num_steps, **sample_kwargs)``. One graph is kept per
    noise shape, dtype and device (a new shape captures again); :meth:`reset` drops them.
    """

    def __init__(
        self,
        denoiser: Callable,
        num_steps: int,
        *,
        generator: torch.Generator | None = None,
        warmup: int = 1,
        fallback: bool = False,
        clone_output: bool = True,
        **sample_kwargs: Any,
    ):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        unknown = sorted(set(sample_kwargs) - _SAMPLE_KWARGS)
        if unknown:
            extra = " (a progress bar cannot be updated by a graph replay)" if "progress" in unknown else ""
            raise TypeError(
                f"CapturedSampler: unexpected arguments {unknown}{extra}; gmkernels.sample options are {sorted(_SAMPLE_KWARGS)}"
            )
        self.generator = check_generator(generator)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(
                f"warmup must be an int >= 1 (Triton kernels compile at their first call, which cannot be captured), got {warmup!r}"
            )
        self.denoiser, self.num_steps, self.warmup = denoiser, num_steps, warmup
        self.fallback, self.clone_output = bool(fallback), bool(clone_output)
        self.sample_kwargs = dict(sample_kwargs)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _eager(self, noise: torch.Tensor) -> torch.Tensor:
        return sample(self.denoiser, noise, self.num_steps, generator=self.generator, **self.sample_kwargs)

    def _capture(self, noise: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        if self.generator is not None and self.generator.device != noise.device:
            raise ValueError(
                f"generator is on {self.generator.device} but the noise on {noise.device}; the draws happen "
                "inside the graph, so pass a torch.Generator on the noise's CUDA device (or None)"
            )
        static_noise = noise.clone()
        side = torch.cuda.Stream(device=noise.device)
        side.wait_stream(torch.cuda.current_stream(noise.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._eager(static_noise)
        torch.cuda.current_stream(noise.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError(
                    f"CapturedSampler: this torch ({torch.__version__}) cannot register a custom generator "
                    "with a CUDA graph; pass generator=None (the default CUDA generator is graph-safe)"
                )
            graph.register_generator_state(self.generator)
        try:
            with torch.cuda.graph(graph):
                static_out = self._eager(static_noise)
        except RuntimeError as e:
            raise RuntimeError(
                "CapturedSampler: capturing the sampling call failed. The usual cause is a denoiser that "
                "synchronises the host (.item(), printing a tensor, a Python branch on a tensor value) or "
                "allocates by value; gmkernels.sample runs the same call eagerly. Capture error: " + str(e)
            ) from e
        return graph, static_noise, static_out

    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        check_float_tensor(noise, "noise")
        if noise.device.type != "cuda":
            if self.fallback:
                return self._eager(noise)
            raise RuntimeError(
                f"CapturedSampler records CUDA graphs, and noise is on {noise.device}; pass CUDA noise, "
                "call gmkernels.sample directly, or construct CapturedSampler(..., fallback=True) to run "
                "eagerly off CUDA"
            )
        key = (tuple(noise.shape), noise.dtype, noise.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(noise)
        graph, static_noise, static_out = entry
        static_noise.copy_(noise)
        graph.replay()
        return static_out.clone() if self.clone_output else static_out

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool); the next call captures again."""
        self._graphs.clear()

    def __repr__(self) -> str:
        return f"CapturedSampler(num_steps={self.num_steps}, graphs={len(self._graphs)}, {self.sample_kwargs})"
