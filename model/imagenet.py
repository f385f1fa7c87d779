"""The ImageNet evaluation protocol: FID, IS, precision and recall of class-conditional samples in
Inception-v3 features against an ADM reference batch, sampled over ``torchrun`` ranks.

    torchrun --nproc_per_node=8 -m model.evaluate Lakonik/gmflow_imagenet_k8_ema --protocol imagenet \\
        --ref VIRTUAL_imagenet256_labeled.npz --set eval.per_class=50 --out runs/in256

The source is a ``GMDiTPipeline`` checkpoint (a directory in the public layout or a Hugging Face
Hub id) or a ``model.train`` checkpoint whose samples are images (the digits preset: what the CPU
tests run). ``per_class`` images of each class are drawn: image ``i`` has class ``i % num_classes``
(every part of the run covers all classes evenly, as the Inception score's splits need). The
images are cut into chunks of ``batch``; chunk ``c`` is drawn from the seed ``seed * 2**32 + c``
(noise and every GM-SDE draw) by rank ``c % world_size``, then passed through the feature network,
and written at once, atomically, to ``<out>/chunks/chunk_<c>.npz`` (``arr_0``: ``(B, H, W, 3)``
uint8 images and ``arr_1``: labels, as ADM's sample batches, plus ``features``, ``logits`` and
the sampling ``seconds``). A run that is killed resumes where it stopped: written chunks are not
redrawn, and since a chunk depends only on its seed, the result equals an uninterrupted run's,
with any number of ranks. ``<out>/manifest.json`` records the settings; resuming with others is
an error.

Metrics (rank 0, once every chunk is written): FID between the samples' pool features and the
``mu``/``sigma`` of the reference ``.npz``; the Inception score of the ``logits`` (10 splits);
improved precision/recall (k-NN, ``k``) between the samples' features and those of the
reference's ``arr_0`` images (computed once, cached in ``<out>/reference_features.npz``).

The feature network is torch-fidelity's ``inception-v3-compat`` (the TensorFlow FID Inception,
ported; the ``eval`` extra: ``pip install -e '.[eval]'``), outputs ``"2048"`` (pool) and
``"logits_unbiased"``. Its weights are read from a local file (``--inception PATH``, default the
torch hub cache); nothing is downloaded: a missing file is an error with the command that fetches
it. Any module with the same interface — uint8 images ``(N, 3, H, W)`` in, ``(features (N, F),
logits (N, L))`` out — can stand in for it (the tests use a small random one).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re

import numpy as np
import torch
import torch.distributed as dist

import gmkernels

from .metrics import feature_stats, frechet_distance_from_stats, inception_score, precision_recall
from .presets import SOLVERS
from .sweep import Setting, timed

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
ADM_REF_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"


def default_inception_path() -> str:
    """Where torch hub keeps the weights file: ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))


def fetch_command(path: str) -> str:
    """The one command that puts the Inception weights at ``path`` (on a machine with network)."""
    return f"curl -L --create-dirs -o {path} {INCEPTION_URL}"


def load_inception(path: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (``inception-v3-compat``) with outputs ``(pool 2048, logits_unbiased)``
    from the weights at ``path`` (default :func:`default_inception_path`); a ValueError says what to
    install or fetch when the package or the file is missing."""
    path = path or default_inception_path()
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ValueError("the Inception features need torch-fidelity: pip install -e '.[eval]'") from None
    if not os.path.isfile(path):
        raise ValueError(
            f"Inception-v3 weights not found at {path}; fetch them once on a machine with network: "
            f"{fetch_command(path)} (or pass --inception PATH)"
        )
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
    )
    return net.to(device)


def check_reference(path: str | None, feature_net, device: str | torch.device = "cpu") -> None:
    """Raise a ValueError, before any sampling, when the reference ``.npz`` is missing, lacks
    ``mu``/``sigma``/``arr_0``, or its statistics have another width than ``feature_net``'s features."""
    fetch = (
        f"download the ADM reference batch for ImageNet 256: curl -L -o VIRTUAL_imagenet256_labeled.npz {ADM_REF_URL}"
    )
    if path is None:
        raise ValueError(f"--ref REF.npz is required for the ImageNet protocol; {fetch}")
    if not os.path.isfile(path):
        raise ValueError(f"reference statistics {path!r} not found; {fetch}")
    with np.load(path) as ref:
        missing = {"mu", "sigma", "arr_0"} - set(ref.files)
        if missing:
            raise ValueError(
                f"{path} lacks {sorted(missing)} (has {sorted(ref.files)}): the protocol needs an ADM reference "
                f"batch, mu/sigma of its pool features and its images arr_0; {fetch}"
            )
        width = ref["mu"].shape
    feats, _ = feature_net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device=device))
    if width != (feats.shape[1],):
        raise ValueError(f"{path}: mu has shape {width}, the feature network gives {feats.shape[1]} features")


@torch.no_grad()
def extract(feature_net, images: torch.Tensor, batch: int, device: str | torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, F), logits (N, L))`` float32 arrays of uint8 ``images (N, 3, H, W)``, ``batch`` at a time."""
    outs = [feature_net(part.to(device)) for part in images.split(batch)]
    return (
        torch.cat([o[0] for o in outs]).float().cpu().numpy(),
        torch.cat([o[1] for o in outs]).float().cpu().numpy(),
    )


def reference_features(
    path: str, feature_net, cache: str, batch: int, device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, sigma, features of arr_0)`` of a reference ``.npz``; the features are cached in
    ``cache`` (recomputed when the reference file's path or size changed)."""
    key = f"{os.path.abspath(path)}:{os.path.getsize(path)}"
    with np.load(path) as ref:
        mu, sigma = ref["mu"], ref["sigma"]
        if os.path.isfile(cache):
            with np.load(cache) as c:
                if str(c["key"]) == key:
                    return mu, sigma, c["features"]
        feats, _ = extract(feature_net, torch.from_numpy(ref["arr_0"]).permute(0, 3, 1, 2), batch, device)
    _save_npz(cache, key=np.array(key), features=feats)
    return mu, sigma, feats


def _save_npz(path: str, **arrays) -> None:
    """Write atomically: a killed run leaves a ``.tmp`` file (ignored, overwritten) or the whole file."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ sources


def is_pipeline(path: str) -> bool:
    """A GMDiTPipeline checkpoint: a directory with ``model_index.json``, or a Hub id (``owner/name``) that is no local path."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "model_index.json"))
    return not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not path.endswith(".pt")


class PipelineSource:
    """Images from a ``GMDiTPipeline`` (its public ``__call__``): GM-SDE is ``output_mode="sample"``,
    GM-ODE ``"mean"`` with ``ode_substeps // NFE`` substeps, and Euler ``"mean"`` with one substep at
    order 1 (a GM-ODE step with one substep is an Euler step on the GM's mean). Probabilistic
    guidance only (the pipeline's)."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, variant: str | None):
        try:
            from gmkernels.pipelines import GMDiTPipeline
        except ImportError as e:
            raise ValueError(
                f"a GMDiTPipeline source needs the diffusers extra: pip install -e '.[diffusers]' ({e})"
            ) from None
        self.pipe = GMDiTPipeline.from_pretrained(path, torch_dtype=dtype, variant=variant).to(device)
        self.device, self.name = device, path
        self.num_classes = self.pipe.transformer.config.num_embeds_ada_norm

    def images(self, labels: torch.Tensor, setting: Setting, seed: int, ecfg: dict) -> torch.Tensor:
        solver, order = SOLVERS[setting.solver]
        out = self.pipe(
            labels.tolist(),
            guidance_scale=setting.scale,
            generator=torch.Generator(self.device).manual_seed(seed),
            num_inference_steps=setting.nfe,
            output_mode="sample" if solver == "gm-sde" else "mean",
            order=order,
            num_inference_substeps=max(1, ecfg["ode_substeps"] // setting.nfe) if solver == "gm-ode" else 1,
            orthogonal_guidance=ecfg["orthogonal"],
            output_type="pt",
            progress=False,
        ).images
        return (out.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()


class CheckpointSource:
    """Images from a ``model.train`` checkpoint of an image preset (the digits), through
    ``gmkernels.sample``; grey images are repeated to 3 channels."""

    def __init__(self, path: str, device: torch.device):
        from .train import load_network

        self.net, cfg = load_network(path, device=device)
        if cfg["net"] != "dit":
            raise ValueError(
                f"{path}: the ImageNet protocol samples class-conditional images, and this is a {cfg['net']!r} "
                "checkpoint; for an ImageNet-preset checkpoint (latents) write net.transformer into a "
                "GMDiTPipeline directory (README) and pass that"
            )
        c = cfg["net_cfg"]
        self.shape = (c["in_channels"], c["image_size"], c["image_size"])
        self.device, self.name, self.num_classes = device, path, c["num_classes"]

    def images(self, labels: torch.Tensor, setting: Setting, seed: int, ecfg: dict) -> torch.Tensor:
        from .evaluate import make_denoiser
        from .sample import to_pixels

        solver, order = SOLVERS[setting.solver]
        noise = torch.randn((labels.shape[0], *self.shape), generator=torch.Generator().manual_seed(seed)).to(
            self.device
        )
        with torch.no_grad():
            x = gmkernels.sample(
                make_denoiser(self.net, labels.to(self.device), guided=setting.guidance is not None),
                noise,
                setting.nfe,
                solver=solver,
                order=order,
                orthogonal=ecfg["orthogonal"],
                substeps=max(1, ecfg["ode_substeps"] // setting.nfe) if solver == "gm-ode" else 1,
                generator=torch.Generator(self.device).manual_seed(seed),
                **setting.guidance_kwargs(),
            )
        px = to_pixels(x.float().cpu())
        return px.expand(-1, 3, -1, -1).contiguous() if px.shape[1] == 1 else px


def open_source(path: str, device: torch.device, dtype: torch.dtype | None = None, variant: str | None = None):
    """:class:`PipelineSource` for a pipeline checkpoint (:func:`is_pipeline`), else :class:`CheckpointSource`."""
    if is_pipeline(path):
        return PipelineSource(
            path, device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32), variant
        )
    return CheckpointSource(path, device)


# --------------------------------------------------------------------------------------- the protocol


@dataclasses.dataclass
class Dist:
    """This process's place in the run: ``rank``, ``world`` size and ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def share(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_dist() -> Dist:
    """From ``torchrun``'s environment (NCCL on CUDA, gloo on CPU), with a long timeout: rank 0
    alone computes the reference features and the metrics while the others wait."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return Dist(dist.get_rank(), world, torch.device("cuda", local) if cuda else torch.device("cpu"))


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a run with ``seed`` (distinct for any chunk count below 2**32)."""
    return seed * 2**32 + chunk


def _check_manifest(path: str, manifest: dict, rank: int) -> None:
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != manifest:
            diff = ", ".join(
                f"{k}: {saved.get(k)!r} there, {manifest.get(k)!r} asked"
                for k in sorted(set(saved) | set(manifest))
                if saved.get(k) != manifest.get(k)
            )
            raise ValueError(
                f"{os.path.dirname(path)} holds samples of another run ({diff}); pass another --out or remove it"
            )
    elif rank == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, path)


def run_protocol(
    source,
    setting: Setting,
    seed: int,
    per_class: int,
    ecfg: dict,
    out: str,
    feature_net,
    ref: str,
    ctx: Dist,
    ref_cache: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict | None:
    """Sample (this rank's missing chunks), then score on rank 0; every rank gets the metrics dict
    ``{FID, IS, IS_std, precision, recall, images, sampling_s, ms_per_image}`` (also written to
    ``<out>/metrics.json``). The reference features are cached in ``ref_cache`` (default
    ``<out>/reference_features.npz``). ``stop_after`` ends this rank after that many new chunks,
    returning None (the tests' stand-in for a killed run; only with one rank)."""
    n = source.num_classes * per_class
    batch = ecfg["batch"]
    chunks = math.ceil(n / batch)
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    _check_manifest(
        os.path.join(out, "manifest.json"),
        dict(
            source=source.name,
            setting=dataclasses.asdict(setting),
            seed=seed,
            per_class=per_class,
            batch=batch,
            num_classes=source.num_classes,
            ode_substeps=ecfg["ode_substeps"],
            orthogonal=ecfg["orthogonal"],
        ),
        ctx.rank,
    )
    ctx.barrier()
    path = lambda c: os.path.join(out, "chunks", f"chunk_{c:06d}.npz")  # noqa: E731
    todo = [c for c in range(ctx.rank, chunks, ctx.world) if not os.path.isfile(path(c))]
    for i, c in enumerate(todo):
        labels = torch.arange(c * batch, min(n, (c + 1) * batch)) % source.num_classes
        images, secs = timed(lambda: source.images(labels, setting, chunk_seed(seed, c), ecfg))
        secs = secs["wall"]
        feats, logits = extract(feature_net, images, ecfg["inception_batch"], ctx.device)
        _save_npz(
            path(c),
            arr_0=images.permute(0, 2, 3, 1).numpy(),
            arr_1=labels.numpy(),
            features=feats,
            logits=logits,
            seconds=np.array(secs),
        )
        if progress:
            print(f"rank {ctx.rank}: chunk {c + 1}/{chunks} ({secs:.1f}s)", flush=True)
        if stop_after is not None and i + 1 >= stop_after:
            return None
    ctx.barrier()
    result = None
    if ctx.rank == 0:
        feats, logits, secs = [], [], 0.0
        for c in range(chunks):
            with np.load(path(c)) as z:
                feats.append(z["features"])
                logits.append(z["logits"])
                secs += float(z["seconds"])
        feats = torch.from_numpy(np.concatenate(feats))
        mu, sigma, ref_feats = reference_features(
            ref,
            feature_net,
            ref_cache or os.path.join(out, "reference_features.npz"),
            ecfg["inception_batch"],
            ctx.device,
        )
        fid = frechet_distance_from_stats(*feature_stats(feats), torch.from_numpy(mu), torch.from_numpy(sigma))
        isc, isc_std = inception_score(torch.from_numpy(np.concatenate(logits)), splits=min(10, n))
        p, r = precision_recall(
            torch.from_numpy(ref_feats).to(ctx.device), feats.to(ctx.device), ecfg["k"], exact=False
        )
        result = dict(
            FID=fid,
            IS=isc,
            IS_std=isc_std,
            precision=p,
            recall=r,
            images=n,
            sampling_s=secs,
            ms_per_image=1000 * secs / n,
        )
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
    return ctx.share(result)


class ImagenetRunner:
    """The sweep's :class:`model.sweep.Runner` for the protocol: each setting and seed is one run
    of :func:`run_protocol` with ``eval.sweep.per_class`` images per class, in its own folder
    under ``<out>/sweep/`` (so an interrupted sweep resumes too); time is the sampling's device
    seconds per image summed over ranks."""

    metrics = ["FID", "IS", "precision", "recall"]
    plotted = ["FID", "IS", "precision", "recall"]

    def __init__(self, source, ecfg: dict, out: str, feature_net, ref: str, ctx: Dist, progress: bool = True):
        self.source, self.ecfg, self.out, self.feature_net, self.ref, self.ctx = (
            source,
            ecfg,
            out,
            feature_net,
            ref,
            ctx,
        )
        self.per_class = ecfg["sweep"]["per_class"]
        self.images = source.num_classes * self.per_class
        self.progress = progress

    def run(self, setting: Setting, seed: int) -> tuple[list[float], dict]:
        guide = "" if setting.guidance is None else f"_{setting.guidance}{setting.scale:g}"
        out = os.path.join(self.out, "sweep", f"{setting.solver}_nfe{setting.nfe}{guide}_seed{seed}")
        res = run_protocol(
            self.source,
            setting,
            seed,
            self.per_class,
            self.ecfg,
            out,
            self.feature_net,
            self.ref,
            self.ctx,
            ref_cache=os.path.join(self.out, "reference_features.npz"),
            progress=self.progress,
        )
        return [res["FID"], res["IS"], res["precision"], res["recall"]], {"wall": res["sampling_s"]}


def setting_of(ecfg: dict) -> Setting:
    """The single setting of ``eval.solver``, ``eval.steps`` (network calls) and ``eval.guidance_scale``."""
    scale = float(ecfg["guidance_scale"])
    return Setting(ecfg["solver"], ecfg["steps"], "probabilistic" if scale > 0 else None, scale)


def results_markdown(res: dict, setting: Setting, source: str, world: int) -> str:
    """One table row of a protocol run."""
    return (
        f"### ImageNet protocol: {source}, {setting.family} at {setting.nfe} NFE, {res['images']} images, {world} rank(s)\n\n"
        "| FID | IS | precision | recall | ms / image |\n|---|---|---|---|---|\n"
        f"| {res['FID']:.3f} | {res['IS']:.2f} ± {res['IS_std']:.2f} | {res['precision']:.4f} | {res['recall']:.4f} | "
        f"{res['ms_per_image']:.2f} |"
    )
