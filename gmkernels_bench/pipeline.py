"""``--suite pipeline``: one ``GMDiTPipeline`` call with random weights, split into network time and
sampler time (needs the ``diffusers`` extra).

The transformer is the GM-DiT at DiT-XL/2 size (K=8, 28 layers of 1152, 32x32x4 latents: the
public ImageNet checkpoint's architecture) or, with ``--pipeline-model tiny``, a 2-layer one.
The call is class-conditional with probabilistic guidance 0.45 and order 2 (the official
defaults), ``output_type="latent"`` (VAE decoding is not timed). Network time is the sum of the
transformer calls, each timed with the device synchronised around it; sampler time is the rest of
the call (guidance, 2nd order, GM-ODE substeps / GM-SDE draws, noise, bookkeeping).
"""

from __future__ import annotations

import time

import torch

from .runner import DTYPE_NAMES

MODELS = {
    "xl2": dict(num_gaussians=8, num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32),
    "tiny": dict(
        num_gaussians=8, num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=32, logstd_inner_dim=64
    ),
}
GUIDANCE_SCALE = 0.45
MODES = (("mean", None), ("sample", 1))  # (output_mode, substeps override)


def parse_steps(spec: str) -> tuple[int, int]:
    """``"32,4"`` -> (steps, substeps)."""
    try:
        steps, substeps = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--pipeline-steps must be STEPS,SUBSTEPS (e.g. 32,4), got {spec!r}") from None
    if steps < 1 or substeps < 1:
        raise ValueError(f"--pipeline-steps must be positive, got {spec!r}")
    return steps, substeps


def build_pipeline(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``GMDiTPipeline`` with random weights (adaLN and output layers non-zero, so every block
    does real work) and a tiny VAE (never called: latents are returned)."""
    from diffusers import AutoencoderKL

    from gmkernels.models import GMDiTTransformer2DModel, SpectrumMLP
    from gmkernels.pipelines import FlowEulerODEScheduler, GMDiTPipeline

    torch.manual_seed(seed)
    transformer = GMDiTTransformer2DModel(**MODELS[model])
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    spectrum_net = SpectrumMLP()
    for m in (transformer, spectrum_net, vae):  # plain Module.to: ModelMixin.to warns about dtype casts
        torch.nn.Module.to(m, device=device, dtype=dtype)
    return GMDiTPipeline(transformer, spectrum_net, vae, FlowEulerODEScheduler())


class _NetworkTimer:
    """Sums the wall time of the transformer's forward calls (device synchronised around each)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device, self.total, self._t0 = device, 0.0, 0.0
        self._handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.total += time.perf_counter() - self._t0

    def remove(self):
        for h in self._handles:
            h.remove()


def pipeline_records(
    device: torch.device, dtypes: list[torch.dtype], model: str, steps: int, substeps: int, batch: int, repeats: int
) -> list[dict]:
    """One record per (output mode, dtype): the median over ``repeats`` timed calls (after one
    warm-up call on CUDA) of the total, network and sampler times."""
    from gmkernels.pipelines import FlowEulerODEScheduler, GMFlowSDEScheduler

    records = []
    for dtype in dtypes:
        pipe = build_pipeline(model, device, dtype)
        cfg = pipe.transformer.config
        for mode, n_override in MODES:
            n = n_override or substeps
            # the official pairing: GM-ODE steps on the mean, GM-SDE steps on a (spectral) draw
            pipe.scheduler = FlowEulerODEScheduler() if mode == "mean" else GMFlowSDEScheduler()
            kw = dict(
                guidance_scale=GUIDANCE_SCALE,
                num_inference_steps=steps,
                num_inference_substeps=n,
                output_mode=mode,
                order=2,
                output_type="latent",
                progress=False,
            )
            labels = list(range(batch))
            rec = {
                "suite": "pipeline",
                "op": f"GMDiTPipeline {mode} {steps}x{n} g={GUIDANCE_SCALE} o2 ({model})",
                "backend": "triton" if device.type == "cuda" else "torch",
                "shape": f"{batch}x{cfg.num_gaussians}x{cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size}",
                "dtype": DTYPE_NAMES[dtype],
                "bytes": None,
                "gbps": None,
                "fraction_of_peak": None,
                "per_call": 1,
                "note": "",
            }
            try:
                if device.type == "cuda":  # warm-up: Triton compiles, cuBLAS picks its kernels
                    pipe(labels, generator=torch.Generator(device).manual_seed(0), **kw)
                totals, nets = [], []
                for r in range(repeats):
                    timer = _NetworkTimer(pipe.transformer, device)
                    try:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                        pipe(labels, generator=torch.Generator(device).manual_seed(r), **kw)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        totals.append(time.perf_counter() - t0)
                        nets.append(timer.total)
                    finally:
                        timer.remove()
                order = sorted(range(repeats), key=lambda i: totals[i])
                mid = order[len(order) // 2]
                total, net = totals[mid] * 1e3, nets[mid] * 1e3
                rec.update(
                    status="ok",
                    median_ms=total,
                    network_ms=net,
                    sampler_ms=total - net,
                    sampler_share=(total - net) / total,
                    note=f"network {net:.4g} ms, sampler {total - net:.4g} ms = {100 * (total - net) / total:.2g}% "
                    f"of the call ({steps} network calls at batch {2 * batch}, VAE not timed)",
                )
            except Exception as e:  # a failing mode does not stop the run
                rec.update(
                    status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                )
            records.append(rec)
    return records
