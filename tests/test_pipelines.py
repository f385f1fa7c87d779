"""gmkernels.pipelines: the GM-DiT pipeline on a tiny random checkpoint in the public GMFlow layout
(written by tests/gmflow_checkpoint.py without our model classes), with the official schedulers
(their contract itself: tests/test_schedulers.py)."""

import json
import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gmkernels  # noqa: E402
from gmkernels.models import GMDiTTransformer2DModel, SpectrumMLP  # noqa: E402
from gmkernels.pipelines import FlowEulerODEScheduler, GMDiTPipeline, GMFlowSDEScheduler  # noqa: E402
from gmkernels.schedulers import GMTensorStepScheduler  # noqa: E402
from tests.gmflow_checkpoint import (  # noqa: E402
    SPECTRUM,
    official_forward,
    random_state,
    transformer_config,
    transformer_shapes,
    write_checkpoint,
)
from tests.strategies import rel_err, seeds  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gmflow_ckpt"))
    states = write_checkpoint(path)
    return path, states


@pytest.fixture(scope="module")
def pipe(ckpt):
    return GMDiTPipeline.from_pretrained(ckpt[0])


def with_scheduler(pipe, scheduler):
    """The pipeline's components with another scheduler (the module's pipeline stays as loaded)."""
    return GMDiTPipeline(pipe.transformer, pipe.spectrum_net, pipe.vae, scheduler, pipe.config.id2label)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_checkpoint_loads_strict_without_warnings(ckpt):
    path, states = ckpt
    handler = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        pipe = GMDiTPipeline.from_pretrained(path)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in handler.messages if "key" in m.lower() or "weight" in m.lower()], handler.messages
    assert isinstance(pipe.transformer, GMDiTTransformer2DModel) and isinstance(pipe.spectrum_net, SpectrumMLP)
    assert isinstance(pipe.scheduler, GMFlowSDEScheduler)
    for name in ("transformer", "spectrum_net"):
        module, state = getattr(pipe, name), states[name]
        assert set(module.state_dict()) == set(state)
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[k]), k
        fresh = type(module).from_config(module.config)
        fresh.load_state_dict(state, strict=True)


def test_transformer_matches_independent_forward(ckpt, pipe):
    cfg = transformer_config()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    t = torch.tensor([999.0, 412.5, 3.0])
    y = torch.tensor([0, 7, cfg["num_embeds_ada_norm"]])  # the last one: the null class
    with torch.no_grad():
        out = pipe.transformer(x, timestep=t, class_labels=y)
    ref = official_forward(ckpt[1]["transformer"], cfg, x, t, y)
    for k in ("means", "logstds", "logweights"):
        assert out[k].shape == ref[k].shape, k
        assert rel_err(out[k], ref[k]) < 1e-5, (k, rel_err(out[k], ref[k]))
    assert out["logweights"].exp().sum(1).sub(1).abs().max() < 1e-5


@settings(max_examples=10)
@given(
    K=st.integers(1, 5),
    patch=st.sampled_from([1, 2]),
    grid=st.integers(1, 4),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([4, 8, 12]),
    layers=st.integers(1, 2),
    C=st.integers(1, 4),
    B=st.integers(1, 3),
    logstd=st.sampled_from([None, -1.5]),
    logstd_layers=st.integers(1, 3),
    seed=seeds,
)
def test_transformer_matches_independent_forward_on_drawn_configs(
    K, patch, grid, heads, head_dim, layers, C, B, logstd, logstd_layers, seed
):
    cfg = transformer_config(
        num_gaussians=K,
        patch_size=patch,
        sample_size=grid * patch,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        in_channels=C,
        constant_logstd=logstd,
        gm_num_logstd_layers=logstd_layers,
        logstd_inner_dim=5,
    )
    g = torch.Generator().manual_seed(seed)
    state = random_state(transformer_shapes(cfg), g)
    model = GMDiTTransformer2DModel.from_config(cfg).eval()
    model.load_state_dict(state, strict=True)
    S = grid * patch
    x = torch.randn(B, C, S, S, generator=g)
    t = torch.rand(B, generator=g) * 1000
    y = torch.randint(0, cfg["num_embeds_ada_norm"] + 1, (B,), generator=g)
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y)
    ref = official_forward(state, cfg, x, t, y)
    for k in ("means", "logstds", "logweights"):
        assert out[k].shape == ref[k].shape, k
        assert rel_err(out[k], ref[k]) < 1e-5 or (out[k] - ref[k]).abs().max() < 1e-5, (k, rel_err(out[k], ref[k]))


@pytest.mark.parametrize("output_mode,substeps", [("mean", 2), ("sample", 1)])
def test_pipeline_images_and_latents(pipe, output_mode, substeps):
    kw = dict(num_inference_steps=2, num_inference_substeps=substeps, output_mode=output_mode, progress=False)
    images = pipe([2, 3], generator=torch.manual_seed(0), **kw).images
    assert len(images) == 2 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    latents = pipe([2, 3], generator=torch.manual_seed(0), output_type="latent", **kw).images
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32 and torch.isfinite(latents).all()
    arr = pipe([2, 3], generator=torch.manual_seed(0), output_type="np", **kw).images
    assert arr.shape == (2, 16, 16, 3) and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(images[1]), (arr[1] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("output_mode,substeps", [("mean", 2), ("sample", 1)])
def test_same_seed_same_images(pipe, output_mode, substeps):
    kw = dict(
        num_inference_steps=2,
        num_inference_substeps=substeps,
        output_mode=output_mode,
        output_type="pt",
        progress=False,
        guidance_scale=0.3,
    )
    a = pipe([1, 4], generator=torch.manual_seed(5), **kw).images
    b = pipe([1, 4], generator=torch.manual_seed(5), **kw).images
    c = pipe([1, 4], generator=torch.manual_seed(6), **kw).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pipeline_runs_the_gmkernels_sampler(pipe):
    """FlowEulerODEScheduler with "mean" is gmkernels.sample(solver="gm-ode") on the transformer,
    guided by the null class."""
    B, labels = 2, torch.tensor([3, 5])
    out = with_scheduler(pipe, FlowEulerODEScheduler.from_config(pipe.scheduler.config))(
        labels.tolist(),
        guidance_scale=0.4,
        generator=torch.manual_seed(2),
        num_inference_steps=2,
        num_inference_substeps=3,
        output_type="latent",
        progress=False,
    ).images
    noise = torch.randn(B, 4, 8, 8, generator=torch.manual_seed(2))
    null = torch.full_like(labels, 10)

    def denoiser(x, t):
        gm = pipe.transformer(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=torch.cat([labels, null]))
        return {k: v[:B] for k, v in gm.items()}, {k: v[B:] for k, v in gm.items()}

    with torch.no_grad():
        ref = gmkernels.sample(denoiser, noise, 2, solver="gm-ode", substeps=3, order=2, guidance_scale=0.4)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_sample_mode_without_spectrum_net_is_gm_sde(ckpt):
    """Without a spectrum network "sample" mode is gmkernels.sample(solver="gm-sde"), the generator
    drawing the noise and then every step."""
    pipe = GMDiTPipeline.from_pretrained(ckpt[0], spectrum_net=None)
    out = pipe(
        [6],
        guidance_scale=0.0,
        generator=torch.manual_seed(4),
        num_inference_steps=3,
        num_inference_substeps=1,
        output_mode="sample",
        output_type="latent",
        progress=False,
    ).images
    g = torch.manual_seed(4)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref = gmkernels.sample(
            lambda x, t: pipe.transformer(x, timestep=t, class_labels=torch.tensor([6])),
            noise,
            3,
            solver="gm-sde",
            order=2,
            generator=g,
        )
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.triton
def test_pipeline_on_the_triton_path(pipe):
    """The same call with the Triton kernels (interpreted on CPU) gives the torch path's latents."""
    kw = dict(num_inference_steps=2, num_inference_substeps=2, output_type="latent", progress=False, guidance_scale=0.3)
    ode = with_scheduler(pipe, FlowEulerODEScheduler())  # fused GM-ODE steps
    ref = ode([1, 4], generator=torch.manual_seed(5), **kw).images
    with gmkernels.use_backend("triton"):
        out = ode([1, 4], generator=torch.manual_seed(5), **kw).images
    assert rel_err(out, ref) < 1e-5


def test_bf16_variant(ckpt):
    pipe = GMDiTPipeline.from_pretrained(ckpt[0], torch_dtype=torch.bfloat16, variant="bf16")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, ckpt[1]["transformer"][k].to(torch.bfloat16)), k
    for mode, n in (("mean", 2), ("sample", 1)):
        images = pipe(
            [0, 9],
            generator=torch.manual_seed(0),
            num_inference_steps=2,
            num_inference_substeps=n,
            output_mode=mode,
            output_type="pt",
            progress=False,
        ).images
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_bin_weights_and_ode_scheduler(tmp_path):
    """torch .bin weight files (also as the bf16 variant) and a checkpoint whose scheduler is the ODE one."""
    states = write_checkpoint(str(tmp_path), seed=3, scheduler="FlowEulerODEScheduler", shift=3.0, weights="bin")
    assert not list(tmp_path.glob("transformer/*.safetensors"))
    for dtype, variant in ((None, None), (torch.bfloat16, "bf16")):
        pipe = GMDiTPipeline.from_pretrained(str(tmp_path), torch_dtype=dtype, variant=variant)
        for k, v in pipe.transformer.state_dict().items():
            assert torch.equal(v, states["transformer"][k].to(v.dtype)), k
    assert isinstance(pipe.scheduler, FlowEulerODEScheduler) and pipe.scheduler.config.shift == 3.0


def test_get_label_ids(pipe):
    assert pipe.get_label_ids(["jay", "magpie", "Tinca tinca", "tench"]) == [2, 3, 0, 0]
    assert pipe.get_label_ids("robin") == [4]
    with pytest.raises(ValueError, match="unknown labels"):
        pipe.get_label_ids(["unicorn"])


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path))
    again = GMDiTPipeline.from_pretrained(str(tmp_path))
    assert again.labels == pipe.labels
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, again.transformer.state_dict()[k])
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(again.scheduler) is type(pipe.scheduler) and public(again.scheduler.config) == public(
        pipe.scheduler.config
    )


def test_bad_arguments(pipe, ckpt, tmp_path):
    with pytest.raises(ValueError, match="output_mode"):
        pipe([1], output_mode="mode")
    with pytest.raises(ValueError, match="num_inference_substeps"):
        pipe([1], output_mode="sample", num_inference_substeps=4)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe([1], guidance_scale=1.0)
    with pytest.raises(ValueError, match="class_labels"):
        pipe([10])
    with pytest.raises(ValueError, match="multiple of 4"):
        GMDiTTransformer2DModel(num_attention_heads=3, attention_head_dim=6)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpg")
    path = str(tmp_path / "v2")
    write_checkpoint(path)
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    index["transformer"] = ["lib.models.architecture.gmflow", "GMDiTTransformer2DModelV2"]
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="GMDiTTransformer2DModelV2"):
        GMDiTPipeline.from_pretrained(path)


def test_bad_arguments_name_what_to_pass(pipe, tmp_path):
    with pytest.raises(TypeError, match=r"get_label_ids\(\['jay'\]\)"):
        pipe(["jay"])
    with pytest.raises(TypeError, match=r"get_label_ids\('jay'\)"):
        pipe("jay")
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        pipe([1], num_inference_steps=0)
    with pytest.raises(ValueError, match="num_inference_substeps must be an int >= 1"):
        pipe([1], num_inference_substeps=0)
    with pytest.raises(ValueError, match="orthogonal_guidance must be a number >= 0, got -1"):
        pipe([1], orthogonal_guidance=-1)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        pipe([1], order=3)
    with pytest.raises(ValueError, match="a list of 1 generators for 2 class labels"):
        pipe([1, 2], generator=[torch.Generator()])
    with pytest.raises(TypeError, match="generator"):
        pipe([1], generator=0)
    with pytest.raises(ValueError, match="terminal_sigma"):
        with_scheduler(pipe, FlowEulerODEScheduler(terminal_sigma=0.01))([1])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GMDiTPipeline.from_pretrained(str(tmp_path / "missing" / "ckpt"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GMDiTPipeline.from_pretrained("./missing")


@pytest.mark.parametrize(
    "scheduler,output_mode,substeps",
    [
        (FlowEulerODEScheduler(), "mean", 2),
        (GMFlowSDEScheduler(), "sample", 1),
        (GMFlowSDEScheduler(), "mean", 2),
    ],
)
def test_generator_list_one_per_sample(pipe, scheduler, output_mode, substeps):
    """As in diffusers: with one generator per sample, sample i of a batched call is the image a
    call with [generator i] alone gives (up to the network's batched arithmetic)."""
    p = with_scheduler(pipe, scheduler)
    kw = dict(
        num_inference_steps=2,
        num_inference_substeps=substeps,
        output_mode=output_mode,
        output_type="latent",
        progress=False,
        guidance_scale=0.3,
    )
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    both = p([1, 4], generator=[gen(1), gen(2)], **kw).images
    alone = [p([label], generator=[gen(seed)], **kw).images for label, seed in ((1, 1), (4, 2))]
    for i in range(2):
        assert rel_err(both[i : i + 1], alone[i]) < 1e-4
    assert rel_err(both[0], both[1]) > 0.1


def test_scheduler_swaps_as_with_the_official_pipeline(pipe):
    """pipe.scheduler = GMFlowSDEScheduler.from_config(..., output_mode="mean"): the official
    pipeline's pairing, SDE steps on the GM's mean with the large variance, run by
    GMTensorStepScheduler on the pipeline's scheduler (tests/test_compat.py checks that loop
    against the official loop body)."""
    p = with_scheduler(pipe, FlowEulerODEScheduler(shift=2.0))
    p.scheduler = GMFlowSDEScheduler.from_config(p.scheduler.config, output_mode="mean")
    assert isinstance(p.scheduler, GMFlowSDEScheduler) and p.scheduler.config.output_mode == "mean"
    assert p.scheduler.config.shift == 2.0
    labels = torch.tensor([3, 5])
    out = p(
        labels.tolist(),
        guidance_scale=0.4,
        generator=torch.manual_seed(2),
        num_inference_steps=2,
        num_inference_substeps=3,
        output_type="latent",
        progress=False,
    ).images
    g = torch.manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sched = GMTensorStepScheduler(
        GMFlowSDEScheduler(shift=2.0, output_mode="mean"), "mean", order=2, guidance_scale=0.4
    )
    sched.set_timesteps(2, 3)
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        for t in sched.timesteps:
            gm = pipe.transformer(torch.cat([x, x]), timestep=t.expand(4), class_labels=torch.cat([labels, null]))
            x = sched.step(({k: v[:2] for k, v in gm.items()}, {k: v[2:] for k, v in gm.items()}), t, x, generator=g)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    p.scheduler = FlowEulerODEScheduler.from_config(p.scheduler.config)  # back to GM-ODE: other latents
    assert not torch.allclose(
        out,
        p(
            [3, 5],
            guidance_scale=0.4,
            generator=torch.manual_seed(2),
            num_inference_steps=2,
            num_inference_substeps=3,
            output_type="latent",
            progress=False,
        ).images,
    )


def test_spectrum_mlp_crops_to_small_latents():
    net = SpectrumMLP(**SPECTRUM)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    gaussian = {"mean": torch.randn(2, 4, 5, 6), "var": torch.rand(2, 1, 1, 1)}
    out = net(gaussian)
    assert out.shape == (2, 4, 5, 6)
    # a log power spectrum that averages to 1 over the frequencies of each channel
    torch.testing.assert_close(out.exp().mean(dim=(-2, -1)), torch.ones(2, 4))
    full = net({"mean": torch.randn(2, 4, 8, 8), "var": gaussian["var"]})
    assert full.shape == (2, 4, 8, 8)


def test_bench_pipeline_suite(tmp_path, capsys):
    from gmkernels_bench.__main__ import main

    out = tmp_path / "out"
    argv = [
        "--suite",
        "pipeline",
        "--pipeline-model",
        "tiny",
        "--pipeline-steps",
        "1,2",
        "--pipeline-batch",
        "2",
        "--quick",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    with open(out / "results.json") as f:
        recs = json.load(f)["records"]
    assert [r["op"].split()[1] for r in recs] == ["mean", "sample"]
    for r in recs:
        assert r["status"] == "ok", r
        assert r["shape"] == "2x8x4x32x32" and r["backend"] == "torch"
        assert 0 < r["network_ms"] < r["median_ms"]
        assert r["sampler_ms"] == pytest.approx(r["median_ms"] - r["network_ms"])
        assert r["sampler_share"] == pytest.approx(r["sampler_ms"] / r["median_ms"])
    assert "sampler" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--suite", "pipeline", "--pipeline-steps", "32", "--out", str(out)])


def test_model_trains_the_pipeline_network(tmp_path):
    """model/'s ImageNet presets build the pipeline's transformer class: a training step runs (with
    gradient checkpointing and seeded class dropout) and the weights export to a pipeline folder."""
    from model.networks import GMDiTOfficial, build_network
    from model.presets import get_preset
    from model.train import call_net

    cfg = get_preset(
        "imagenet-xl2",
        [
            "net_cfg.num_layers=2",
            "net_cfg.num_attention_heads=2",
            "net_cfg.attention_head_dim=8",
            "net_cfg.sample_size=8",
            "net_cfg.logstd_inner_dim=16",
        ],
    )
    net = build_network(cfg["net"], cfg["net_cfg"]).train()
    assert isinstance(net, GMDiTOfficial) and isinstance(net.transformer, GMDiTTransformer2DModel)
    assert net.transformer.gradient_checkpointing
    with torch.no_grad():  # leave the zero-initialised layers' zeros behind, so gradients reach every layer
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 999])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    out = call_net(net, x, torch.tensor([10.0, 500.0, 990.0]), y, generator=g1)
    gmkernels.gm_nll_loss(out, torch.randn(3, 4, 8, 8)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    again = call_net(net, x, torch.tensor([10.0, 500.0, 990.0]), y, generator=g2)
    assert torch.equal(again["means"], out["means"])  # the same dropout draws from the same seed
    net.transformer.save_pretrained(str(tmp_path / "transformer"))
    loaded = GMDiTTransformer2DModel.from_pretrained(str(tmp_path), subfolder="transformer").eval()
    net.eval()
    with torch.no_grad():
        ref = net(x, torch.tensor([10.0, 500.0, 990.0]), y)
        got = loaded(x, timestep=torch.tensor([10.0, 500.0, 990.0]), class_labels=y)
    assert torch.equal(ref["means"], got["means"]) and torch.equal(ref["logweights"], got["logweights"])
