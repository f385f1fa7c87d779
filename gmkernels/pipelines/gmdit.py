"""``GMDiTPipeline``: class-conditional image generation with the public GMFlow GM-DiT checkpoint (or
any checkpoint directory in its layout), sampled with ``gmkernels``' GM solvers.

    pipe = GMDiTPipeline.from_pretrained(path, torch_dtype=torch.bfloat16, variant="bf16").to("cuda")
    pipe.scheduler = FlowEulerODEScheduler.from_config(pipe.scheduler.config)   # GM-ODE, as officially
    images = pipe(pipe.get_label_ids(["jay", "magpie"]), generator=torch.manual_seed(42)).images

The directory layout (diffusers' pipeline format) is read without the official code base:
``model_index.json`` (its module paths are not imported: each component is mapped by name to the
classes here), ``transformer/`` (:class:`gmkernels.models.GMDiTTransformer2DModel`),
``spectrum_net/`` (:class:`gmkernels.models.SpectrumMLP`), ``vae/`` (diffusers ``AutoencoderKL``),
``scheduler/`` (:class:`GMFlowSDEScheduler` or :class:`FlowEulerODEScheduler`).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch

from ..gmflow_schedulers import FlowEulerODEScheduler, GMFlowSDEScheduler
from ..schedulers import GMODEScheduler, GMSDEScheduler, GMTensorStepScheduler

try:
    from diffusers import AutoencoderKL, DiffusionPipeline
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gmkernels.pipelines needs diffusers: pip install -e '.[diffusers]' from a checkout, or pip install diffusers"
    ) from e

from ..models.gmdit import GMDiTTransformer2DModel, SpectrumMLP

# Class names a model_index.json may give each component (the official code base's, ours).
_TRANSFORMERS = ("GMDiTTransformer2DModel", "_GMDiTTransformer2DModel")
_SPECTRUM_NETS = ("SpectrumMLP", "_SpectrumMLP")
_SCHEDULERS = {"GMFlowSDEScheduler": GMFlowSDEScheduler, "FlowEulerODEScheduler": FlowEulerODEScheduler}
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _component_class(index: dict, name: str, allowed) -> str:
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        raise ValueError(f"model_index.json: component {name!r} must be [module, class], got {entry!r}")
    cls = entry[1]
    if cls not in allowed:
        raise ValueError(f"model_index.json: {name} class {cls!r} is not supported (expected one of {sorted(allowed)})")
    return cls


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_count(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _take(out, i: int):
    """Sample ``i`` (kept as a batch of one) of a u-GM or of the pair ``(gm_cond, gm_uncond)``."""
    if isinstance(out, tuple):
        return tuple(_take(o, i) for o in out)
    return {k: v[i : i + 1] for k, v in out.items()}


def _device_generator(generator, device: torch.device):
    """``generator`` on ``device``: the same one, or (e.g. ``torch.manual_seed(42)`` with a CUDA
    pipeline) a new one seeded by a draw from it, so the same seed gives the same images."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator(device).manual_seed(seed)


class GMDiTPipeline(DiffusionPipeline):
    """Class-conditional GM-DiT sampling (the official ``GMDiTPipeline``'s components and ``__call__``).

    Components: ``transformer`` (u-GM network), ``spectrum_net`` (log power spectrum for
    ``"sample"`` mode; ``None``: independent per-pixel draws, ``gmkernels.sample``'s GM-SDE),
    ``vae`` (latents -> images), ``scheduler`` (an official-contract ``FlowEulerODEScheduler`` or
    ``GMFlowSDEScheduler``: its class gives the step and its config the schedule, so
    ``pipe.scheduler = GMFlowSDEScheduler.from_config(pipe.scheduler.config)`` switches as
    officially; the loop runs ``gmkernels``' GM schedulers, fused where they cover the pairing),
    and ``id2label`` (class id -> comma-separated names, for :meth:`get_label_ids`).
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer: GMDiTTransformer2DModel,
        spectrum_net: SpectrumMLP | None,
        vae: AutoencoderKL,
        scheduler: GMFlowSDEScheduler | FlowEulerODEScheduler,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, spectrum_net=spectrum_net, vae=vae, scheduler=scheduler)
        self.register_to_config(id2label=id2label)
        self.labels = {}
        for key, names in (id2label or {}).items():
            for label in names.split(","):
                self.labels[label.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, variant: str | None = None, **kwargs
    ):
        """Load a checkpoint directory in the official layout (or a Hugging Face Hub id, downloaded
        with ``huggingface_hub.snapshot_download`` where the hub is reachable).

        Args:
            pretrained_model_name_or_path: local directory or hub id.
            torch_dtype: dtype of every network (e.g. ``torch.bfloat16``); default as stored.
            variant: weight-file variant, e.g. ``"bf16"`` for ``diffusion_pytorch_model.bf16.safetensors``.
            kwargs: components to use instead of loading them (``transformer=...``, ``scheduler=...``, ...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            # a hub id is "name" or "owner/name"; anything else is a path that is not there
            if os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
                raise FileNotFoundError(
                    f"GMDiTPipeline.from_pretrained: no such directory {path!r} "
                    f"(pretrained_model_name_or_path: a checkpoint directory or a hub id 'owner/name')"
                )
            from huggingface_hub import snapshot_download

            path = snapshot_download(repo_id=path)
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        unknown = set(kwargs) - {"transformer", "spectrum_net", "vae", "scheduler", "id2label"}
        if unknown:
            raise TypeError(f"GMDiTPipeline.from_pretrained: unexpected arguments {sorted(unknown)}")
        load = dict(torch_dtype=torch_dtype, variant=variant)
        parts = dict(kwargs)
        if "transformer" not in parts:
            _component_class(index, "transformer", _TRANSFORMERS)
            parts["transformer"] = GMDiTTransformer2DModel.from_pretrained(path, subfolder="transformer", **load)
        if "spectrum_net" not in parts:
            if index.get("spectrum_net") in (None, [None, None]):  # none saved: "sample" draws per pixel
                parts["spectrum_net"] = None
            else:
                _component_class(index, "spectrum_net", _SPECTRUM_NETS)
                parts["spectrum_net"] = SpectrumMLP.from_pretrained(path, subfolder="spectrum_net", **load)
        if "vae" not in parts:
            _component_class(index, "vae", ("AutoencoderKL",))
            parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
        if "scheduler" not in parts:
            sched_cls = _SCHEDULERS[_component_class(index, "scheduler", _SCHEDULERS)]
            parts["scheduler"] = sched_cls.from_pretrained(path, subfolder="scheduler")
        parts.setdefault("id2label", index.get("id2label"))
        return cls(**parts)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """ImageNet class names (any of the comma-separated names of ``id2label``) -> class ids."""
        labels = [label] if isinstance(label, str) else list(label)
        missing = [name for name in labels if name not in self.labels]
        if missing:
            known = ", ".join(list(self.labels)[:20])
            raise ValueError(f"get_label_ids: unknown labels {missing}; known labels include: {known}, ...")
        return [self.labels[name] for name in labels]

    def _denoiser(self, class_labels: torch.Tensor, guided: bool):
        """``(x (B, C, H, W), t (B,)) -> u-GM`` (or ``(gm_cond, gm_uncond)``: one network call on the
        batch doubled with the null class)."""
        transformer = self.transformer
        B = class_labels.shape[0]
        labels = (
            torch.cat([class_labels, torch.full_like(class_labels, transformer.null_class)]) if guided else class_labels
        )

        def denoise(x, t):
            inp = x.to(transformer.dtype)
            if guided:
                inp, t = torch.cat([inp, inp]), torch.cat([t, t])
            gm = transformer(inp, timestep=t, class_labels=labels)
            if not guided:
                return gm
            return {k: v[:B] for k, v in gm.items()}, {k: v[B:] for k, v in gm.items()}

        return denoise

    def _loop_scheduler(self, output_mode: str, shift: float, **solver):
        """The GM scheduler that runs the loop for ``self.scheduler`` and ``output_mode``, as the
        official pipeline pairs them: the scheduler's class gives the step, ``output_mode`` the x0
        it steps on. GM-ODE (``FlowEulerODEScheduler``, ``"mean"``) and per-pixel GM-SDE
        (``GMFlowSDEScheduler`` with the exact transition's noise, ``"sample"``, no spectrum
        network) run fused; every other pairing runs the official step on an x0 of the GM
        (:class:`GMTensorStepScheduler`, on a copy of ``self.scheduler``)."""
        sched = self.scheduler
        if isinstance(sched, FlowEulerODEScheduler) and output_mode == "mean":
            return GMODEScheduler(shift=shift, **solver)
        if (
            isinstance(sched, GMFlowSDEScheduler)
            and output_mode == "sample"
            and sched.exact_transition
            and self.spectrum_net is None
        ):
            return GMSDEScheduler(shift=shift, **solver)
        spectrum_net = self.spectrum_net if output_mode == "sample" else None
        return GMTensorStepScheduler(copy.deepcopy(sched), output_mode, spectrum_net, **solver)

    def _class_labels(self, class_labels, device: torch.device) -> torch.Tensor:
        """``class_labels`` (ints, or an int tensor) as a long tensor ``(B,)`` on ``device``."""
        names = [class_labels] if isinstance(class_labels, str) else class_labels
        if isinstance(names, (list, tuple)) and any(isinstance(v, str) for v in names):
            raise TypeError(
                f"class_labels must be class ids (ints), got names {class_labels!r}; "
                f"turn names into ids with pipe.get_label_ids({class_labels!r})"
            )
        try:
            labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"class_labels must be a list of class ids (ints), got {class_labels!r}") from e
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.numel() == 0:
            raise ValueError(f"class_labels must be a non-empty list of ints, got {class_labels!r}")
        n = self.transformer.config.num_embeds_ada_norm
        if bool(((labels < 0) | (labels >= n)).any()):
            raise ValueError(f"class_labels must lie in [0, {n}), got {labels.tolist()}")
        return labels.long()

    @torch.inference_mode()
    def __call__(
        self,
        class_labels,
        guidance_scale: float = 0.45,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 32,
        num_inference_substeps: int = 4,
        output_mode: str = "mean",
        order: int = 2,
        orthogonal_guidance: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = True,
    ):
        """Generate one image per class label.

        Args:
            class_labels: class ids (list of ints, an int, or an int tensor ``(B,)``); names go
                through :meth:`get_label_ids` first.
            guidance_scale: probabilistic guidance in ``[0, 1)`` (0: none; the unconditional pass
                uses the null class).
            generator: a ``torch.Generator``, or a list of one per sample (sample ``i`` is then the
                image a call with ``[generator[i]]`` alone gives), for the initial noise and every
                draw after it (same seed, same images on one device and backend).
            num_inference_steps: network calls. num_inference_substeps: steps per call
                (``"mean"``; must be 1 with ``"sample"``).
            output_mode: the x0 the steps take from the GM, as officially: ``"mean"`` (its mean, the
                posterior mean at substeps) or ``"sample"`` (a draw, spatially correlated by
                ``spectrum_net`` when there is one). The step itself is ``self.scheduler``'s:
                ``FlowEulerODEScheduler`` with ``"mean"`` is GM-ODE, ``GMFlowSDEScheduler`` with
                ``"sample"`` GM-SDE (see ``_loop_scheduler`` for which pairings run fused).
            order: 1, or 2 for GMFlow's 2nd-order correction.
            orthogonal_guidance: share (``>= 0``) of the guidance bias made orthogonal to the
                conditional mean.
            output_type: ``"pil"``, ``"np"`` (``(B, H, W, 3)`` float in [0, 1]), ``"pt"``
                (``(B, 3, H, W)`` float in [0, 1]) or ``"latent"`` (the sampled latents
                ``(B, C, h, w)``, not divided by the VAE's scaling factor).
            return_dict: ``ImagePipelineOutput`` or ``(images,)``.
            progress: show a progress bar over the network calls.
        Returns:
            ``ImagePipelineOutput(images=...)``.
        """
        if output_mode not in ("mean", "sample"):
            raise ValueError(f"output_mode must be 'mean' or 'sample', got {output_mode!r}")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        if not (_is_number(guidance_scale) and 0 <= guidance_scale < 1):
            raise ValueError(f"guidance_scale must lie in [0, 1), got {guidance_scale!r}")
        steps_n = _check_count(num_inference_steps, "num_inference_steps")
        substeps = _check_count(num_inference_substeps, "num_inference_substeps")
        if output_mode == "sample" and substeps != 1:
            raise ValueError(f"num_inference_substeps must be 1 with output_mode='sample', got {substeps}")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if not (_is_number(orthogonal_guidance) and orthogonal_guidance >= 0):
            raise ValueError(f"orthogonal_guidance must be a number >= 0, got {orthogonal_guidance!r}")
        if not isinstance(self.scheduler, (FlowEulerODEScheduler, GMFlowSDEScheduler)):
            raise TypeError(
                f"scheduler must be a FlowEulerODEScheduler or GMFlowSDEScheduler, got {type(self.scheduler).__name__}"
            )
        sched_cfg = self.scheduler.config
        if sched_cfg.num_train_timesteps != 1000 or sched_cfg.terminal_sigma is not None:
            raise ValueError(
                "scheduler: num_train_timesteps must be 1000 (the network's timesteps are 1000 * sigma) and "
                f"terminal_sigma None, got {sched_cfg.num_train_timesteps} and {sched_cfg.terminal_sigma}"
            )
        device = self._execution_device
        cfg = self.transformer.config
        labels = self._class_labels(class_labels, device)
        B = labels.shape[0]
        per_sample = isinstance(generator, (list, tuple))
        gens = list(generator) if per_sample else [generator]
        if per_sample and len(gens) != B:
            raise ValueError(f"generator: a list of {len(gens)} generators for {B} class labels (one per sample)")
        if not all(g is None or isinstance(g, torch.Generator) for g in gens) or (per_sample and None in gens):
            raise TypeError(
                f"generator must be a torch.Generator, a list of one per sample, or None, got {generator!r}"
            )
        x = randn_tensor(
            (B, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            generator=generator,
            device=device,
            dtype=torch.float32,
        )
        gens = [_device_generator(g, device) for g in gens]

        seq_len = (cfg.sample_size // cfg.patch_size) ** 2
        solver = dict(
            order=order, guidance="probabilistic", guidance_scale=guidance_scale, orthogonal=orthogonal_guidance
        )
        # one GM scheduler per generator: with a list, each sample steps alone with its own draws
        cores = [self._loop_scheduler(output_mode, float(self.scheduler.get_shift(seq_len)), **solver) for _ in gens]
        for core in cores:
            if isinstance(core, GMTensorStepScheduler):
                core.set_timesteps(steps_n, substeps, device=device, seq_len=seq_len)
            else:
                core.set_timesteps(steps_n, substeps, device=device)
        denoise = self._denoiser(labels, guidance_scale > 0)
        steps = cores[0].timesteps
        for t in self.progress_bar(steps) if progress else steps:
            gm = denoise(x, t.expand(B))
            if per_sample:
                x = torch.cat(
                    [
                        core.step(_take(gm, i), t, x[i : i + 1], generator=g)
                        for i, (core, g) in enumerate(zip(cores, gens))
                    ]
                )
            else:
                x = cores[0].step(gm, t, x, generator=gens[0])

        if output_type == "latent":
            images = x
        else:
            images = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images = (images.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
