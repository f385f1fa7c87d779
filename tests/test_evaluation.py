"""model/sweep.py and model/imagenet.py: the FD / IS / precision-recall math (FD against scipy),
the sweep's table, Pareto front and plot, and the ImageNet protocol on CPU with a small feature
network in place of Inception-v3 (whose weights cannot be fetched here): a 2-rank gloo run equals
a 1-rank run, and a run stopped part-way resumes to the same result without redrawing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import evaluate as evaluate_cli
from model import imagenet
from model.data import load_digits_split
from model.metrics import frechet_distance, frechet_distance_from_stats, inception_score, precision_recall
from model.presets import IMAGENET_EVAL, apply_overrides, get_preset
from model.sample import to_pixels
from model.sweep import Setting, pareto_front, run_sweep, settings
from model.train import train
from tests.tiny_features import TinyFeatures

ROOT = Path(__file__).resolve().parents[1]
TINY_DIT = dict(
    K=3,
    in_channels=1,
    image_size=8,
    patch_size=2,
    hidden=32,
    depth=1,
    heads=2,
    num_classes=10,
    class_dropout=0.2,
    logstd_hidden=16,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the 2-rank subprocesses get (OMP_NUM_THREADS=1): the same float32 sums."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cov_pair(seed: int, F: int, N: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, F, generator=g, dtype=torch.float64) @ torch.randn(F, F, generator=g, dtype=torch.float64)
    return a.mean(0), torch.cov(a.t())


@pytest.mark.parametrize("F,N", [(6, 400), (32, 20)])  # full rank, and singular (fewer samples than features)
def test_frechet_distance_matches_scipy(F, N):
    from scipy import linalg

    mu_a, s_a = _cov_pair(0, F, N)
    mu_b, s_b = _cov_pair(1, F, N)
    covmean = linalg.sqrtm(s_a.numpy() @ s_b.numpy())  # pytorch-fid / ADM's formula
    exact = float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(s_a.numpy()) + np.trace(s_b.numpy()) - 2 * np.trace(covmean).real
    )
    assert frechet_distance_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(exact, rel=1e-6)
    assert frechet_distance_from_stats(mu_a.numpy(), s_a.numpy(), mu_a.numpy(), s_a.numpy()) == pytest.approx(
        0.0, abs=1e-6
    )
    with pytest.raises(ValueError, match="frechet_distance_from_stats"):
        frechet_distance_from_stats(mu_a, s_a, mu_b[:-1], s_b)


def test_frechet_distance_of_features_is_the_stats_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) * 2 + 1
    mu_a, mu_b = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    s_a, s_b = np.cov(a.double().numpy(), rowvar=False), np.cov(b.double().numpy(), rowvar=False)  # numpy's N - 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance_from_stats(mu_a, s_a, mu_b, s_b), rel=1e-12)


def test_inception_score():
    assert inception_score(torch.zeros(100, 7), splits=10) == pytest.approx((1.0, 0.0), abs=1e-12)  # no confidence: 1
    confident = torch.full((60, 6), -1e4).scatter(1, (torch.arange(60) % 6).view(-1, 1), 0.0)
    assert inception_score(confident, splits=10)[0] == pytest.approx(6.0, rel=1e-9)  # sure and even over 6 classes: 6
    one_class = torch.full((60, 6), -1e4)
    one_class[:, 2] = 0
    assert inception_score(one_class, splits=3)[0] == pytest.approx(1.0, rel=1e-9)  # sure but no diversity: 1
    with pytest.raises(ValueError, match="inception_score"):
        inception_score(torch.zeros(5, 3), splits=10)


def test_precision_recall_in_chunks_equals_whole():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 4, generator=g), 0.7 * torch.randn(250, 4, generator=g) + 0.3
    whole = precision_recall(real, fake, k=3, chunk=10_000)
    assert precision_recall(real, fake, k=3, chunk=7) == whole
    assert 0.5 < whole[0] < 1 and 0.3 < whole[1] < 1
    assert (
        precision_recall(real, fake, k=3, chunk=64, exact=False) == whole
    )  # matrix-product distances: no tie here moves
    with pytest.raises(ValueError, match="N, M > k=3"):
        precision_recall(real[:3], fake, k=3)


def test_pareto_front():
    # (cost, quality): (1, 5) and (2, 3) and (4, 1) are on the front; (2, 4) is beaten by (2, 3), (3, 3) by (2, 3)
    costs, quality = [1, 2, 2, 3, 4], [5.0, 4.0, 3.0, 3.0, 1.0]
    assert pareto_front(costs, quality) == [True, False, True, False, True]


def test_sweep_settings_grid():
    grid = settings(
        dict(solvers=["gm-sde-2", "euler"], nfe=[2, 8], guidance={"probabilistic": [0.0, 0.3], "mean-cfg": [2.0]})
    )
    assert len(grid) == 2 * 3 * 2 and grid[0] == Setting("gm-sde-2", 2)
    assert Setting("euler", 8, "mean-cfg", 2.0) in grid and grid[2].family == "gm-sde-2 + probabilistic 0.3"
    assert settings(dict(solvers=["euler"], nfe=[4], guidance={"probabilistic": [0.5]})) == [
        Setting("euler", 4, "probabilistic", 0.5)
    ]


class _FakeRunner:
    """Quality improves with NFE (gm-sde-2 best, Euler worst); time grows with NFE."""

    metrics = ["FD", "precision", "recall"]
    plotted = ["FD", "recall"]
    images = 10

    def run(self, setting, seed):
        base = {"gm-sde-2": 1.0, "gm-ode-2": 1.5, "euler": 2.0}[setting.solver]
        return [base * 10 / setting.nfe + 0.01 * seed, 0.8, 0.9], {
            "wall": 0.001 * setting.nfe * self.images,
            "cpu": 0.0005,
        }


def test_sweep_table_anchor_and_plot(tmp_path):
    sweep = dict(
        solvers=["gm-sde-2", "gm-ode-2", "euler"],
        nfe=[4, 8, 32],
        guidance={"probabilistic": [0.0]},
        n_seeds=2,
        clock="wall",
    )
    md, rows = run_sweep(_FakeRunner(), sweep, seed=1, out=str(tmp_path), name="fake", progress=False)
    assert (
        len(rows) == 9
        and rows[0]["mean"][0] == pytest.approx(2.515)
        and rows[0]["std"][0] == pytest.approx(0.01 / 2**0.5)
    )
    assert rows[0]["ms_per_image"] == pytest.approx({"wall": 4.0, "cpu": 0.05})
    front = {(r["setting"]["solver"], r["setting"]["nfe"]) for r in rows if r["front_nfe"]}
    assert front == {("gm-sde-2", 4), ("gm-sde-2", 8), ("gm-sde-2", 32)}
    assert "**Anchor: Euler at 32 NFE, FD 0.640 ± 0.007.**" in md
    assert (
        "- gm-sde-2 at 4 NFE: FD 2.515 ± 0.007 -> not reached" in md
        and "- gm-ode-2 at 8 NFE: FD 1.890 ± 0.007 -> not reached" in md
    )
    assert "| euler | none | 32 | 0.640 ± 0.007 | 0.800 ± 0.000 | 0.900 ± 0.000 | 32.000 | 0.050 |  |  |" in md
    assert "| wall ms / image | cpu ms / image | front: FD vs NFE | front: FD vs wall time |" in md
    saved = json.loads((tmp_path / "fake_sweep.json").read_text())
    assert saved["seeds"] == [1, 2] and len(saved["rows"]) == 9
    assert (tmp_path / "fake_sweep.md").read_text().strip() == md and (
        tmp_path / "fake_sweep.png"
    ).stat().st_size > 10_000


def test_sweep_command_on_the_checkerboard(tmp_path):
    cfg = get_preset("checkerboard", [f"out={tmp_path}"])
    cfg.update(
        steps=1,
        batch=16,
        log_every=1000,
        ckpt_every=1000,
        warmup=1,
        threads=1,
        net_cfg=dict(K=4, hidden=16, depth=1, pos_freqs=2),
    )
    ckpt = train(cfg, progress=False)["path"]
    evaluate_cli.main(
        [
            ckpt,
            "--sweep",
            "--out",
            str(tmp_path / "ev"),
            "--no-progress",
            "--set",
            "eval.n=40",
            "eval.projections=8",
            "eval.sweep.nfe=[1,4]",
            "eval.sweep.solvers=['gm-ode-2','euler']",
            "eval.sweep.n_seeds=2",
            "eval.ode_substeps=4",
        ]
    )
    md = (tmp_path / "ev" / "checkerboard_sweep.md").read_text()
    assert (
        md.count("\n| gm-ode-2 | none |") == 2
        and "| sliced W1 | FD | precision | recall | wall ms / image | cpu ms / image |" in md
    )
    assert "front: sliced W1 vs cpu time" in md  # the CPU presets put the front on CPU time
    assert "**Anchor: Euler at 4 NFE" in md and (tmp_path / "ev" / "checkerboard_sweep.png").exists()
    assert not (tmp_path / "ev" / "results.md").exists()


# ------------------------------------------------------------------------------------ ImageNet protocol

PROTOCOL_SET = [
    "eval.per_class=3",
    "eval.batch=8",
    "eval.steps=2",
    "eval.solver=gm-sde-2",
    "eval.guidance_scale=0.3",
    "eval.inception_batch=16",
    "eval.seed=5",
]


@pytest.fixture(scope="module")
def protocol_files(tmp_path_factory):
    """A tiny digits checkpoint and an ADM-format reference (.npz: arr_0 images, mu/sigma of their
    TinyFeatures features) built from the digits test split."""
    d = tmp_path_factory.mktemp("protocol")
    cfg = get_preset("digits", [f"out={d}"])
    cfg.update(steps=1, batch=4, log_every=1000, ckpt_every=1000, warmup=1, threads=1, net_cfg=dict(TINY_DIT))
    ckpt = train(cfg, progress=False)["path"]
    images = to_pixels(load_digits_split("test")[0]).expand(-1, 3, -1, -1).contiguous()
    feats = TinyFeatures()(images)[0].double()
    ref = d / "ref.npz"
    np.savez(
        ref, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=feats.mean(0).numpy(), sigma=torch.cov(feats.t()).numpy()
    )
    return ckpt, str(ref)


def _protocol_args(ckpt: str, ref: str, out) -> list[str]:
    return [ckpt, "--protocol", "imagenet", "--ref", ref, "--out", str(out), "--no-progress", "--set", *PROTOCOL_SET]


def _chunks(out) -> dict:
    out = Path(out) / "chunks"
    return {p.name: np.load(p)["arr_0"] for p in sorted(out.glob("chunk_*.npz"))}


@pytest.fixture(scope="module")
def one_rank(protocol_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    torch.set_num_threads(1)
    evaluate_cli.main(_protocol_args(*protocol_files, out), feature_net=TinyFeatures())
    return out


def test_protocol_writes_chunks_and_metrics(one_rank, capsys):
    res = json.loads((one_rank / "metrics.json").read_text())
    assert res["images"] == 30 and res["FID"] > 0 and res["IS"] >= 1
    chunks = _chunks(one_rank)
    assert list(chunks) == [f"chunk_{c:06d}.npz" for c in range(4)]  # 30 images in chunks of 8
    assert [x.shape for x in chunks.values()] == [(8, 8, 8, 3)] * 3 + [(6, 8, 8, 3)] and all(
        x.dtype == np.uint8 for x in chunks.values()
    )
    labels = np.concatenate([np.load(one_rank / "chunks" / n)["arr_1"] for n in chunks])
    assert labels.tolist() == [i % 10 for i in range(30)]  # class i % num_classes: every part covers all classes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch: ~4 s each on an idle 2-core box
def test_two_gloo_ranks_equal_one_rank(protocol_files, one_rank, tmp_path):
    """torchrun's environment by hand: two processes on gloo split the chunks (0, 2 and 1, 3) and
    give the same images and metrics as the single process."""
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from model import evaluate; from tests.tiny_features import TinyFeatures\n"
        "evaluate.main(sys.argv[1:], feature_net=TinyFeatures())\n"
    )
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *_protocol_args(*protocol_files, tmp_path)],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "WORLD_SIZE": "2",
                "RANK": str(r),
                "LOCAL_RANK": str(r),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "2 rank(s)" in logs[0] and "| FID |" not in logs[1]  # rank 0 reports
    one, two = json.loads((one_rank / "metrics.json").read_text()), json.loads((tmp_path / "metrics.json").read_text())
    for key in ("FID", "IS", "IS_std", "precision", "recall", "images"):
        assert one[key] == two[key], key
    a, b = _chunks(one_rank), _chunks(tmp_path)
    assert list(a) == list(b) and all(np.array_equal(a[n], b[n]) for n in a)


def test_stopped_run_resumes_to_the_same_result(protocol_files, one_rank, tmp_path):
    ckpt, ref = protocol_files
    cfg = apply_overrides({"preset": "t", "eval": dict(IMAGENET_EVAL)}, PROTOCOL_SET)["eval"]
    source, fn = imagenet.open_source(ckpt, torch.device("cpu")), TinyFeatures()
    setting = imagenet.setting_of(cfg)
    args = (source, setting, cfg["seed"], cfg["per_class"], cfg, str(tmp_path), fn, ref, imagenet.Dist())
    assert imagenet.run_protocol(*args, stop_after=2, progress=False) is None  # "killed" after two chunks
    first = (tmp_path / "chunks" / "chunk_000000.npz").stat().st_mtime_ns
    (tmp_path / "chunks" / "chunk_000002.npz.tmp.npz").write_bytes(b"half-written")  # what a kill mid-write leaves
    res = imagenet.run_protocol(*args, progress=False)
    assert (tmp_path / "chunks" / "chunk_000000.npz").stat().st_mtime_ns == first  # not redrawn
    one = json.loads((one_rank / "metrics.json").read_text())
    assert {k: res[k] for k in ("FID", "IS", "precision", "recall")} == {
        k: one[k] for k in ("FID", "IS", "precision", "recall")
    }
    a, b = _chunks(one_rank), _chunks(tmp_path)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    with pytest.raises(
        ValueError, match=r"holds samples of another run \(seed: 5 there, 6 asked\); pass another --out"
    ):
        imagenet.run_protocol(source, setting, 6, cfg["per_class"], cfg, str(tmp_path), fn, ref, imagenet.Dist())


def test_protocol_errors_name_what_to_fetch(protocol_files, tmp_path, capsys, monkeypatch):
    ckpt, ref = protocol_files

    def error(args, **kw) -> str:
        with pytest.raises(SystemExit):
            evaluate_cli.main(args, **kw)
        return capsys.readouterr().err.strip().splitlines()[-1]

    base = [ckpt, "--protocol", "imagenet", "--out", str(tmp_path)]
    assert "--ref REF.npz is required" in error(base, feature_net=TinyFeatures())
    msg = error(base + ["--ref", str(tmp_path / "none.npz")], feature_net=TinyFeatures())
    assert "reference statistics" in msg and imagenet.ADM_REF_URL in msg
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(32), sigma=np.eye(32))
    assert "lacks ['arr_0']" in error(base + ["--ref", str(tmp_path / "stats_only.npz")], feature_net=TinyFeatures())
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert "mu has shape (2048,), the feature network gives 32 features" in error(
        base + ["--ref", str(tmp_path / "wide.npz")], feature_net=TinyFeatures()
    )
    assert "eval.per_class must be an int >= 1, got 0" in error(base + ["--ref", ref, "--set", "eval.per_class=0"])
    assert "checkpoint 'nope.pt' does not exist" in error(["nope.pt", "--protocol", "imagenet", "--ref", ref])
    assert not list(tmp_path.glob("chunks"))  # nothing sampled
    # the real feature network: without torch-fidelity, then without its weights file
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    assert "pip install -e '.[eval]'" in error(base + ["--ref", ref])
    fake = type(sys)("torch_fidelity.feature_extractor_inceptionv3")
    fake.FeatureExtractorInceptionV3 = object
    monkeypatch.setitem(sys.modules, "torch_fidelity", type(sys)("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    weights = tmp_path / "hub" / "w.pth"
    msg = error(base + ["--ref", ref, "--inception", str(weights)])
    assert (
        f"Inception-v3 weights not found at {weights}" in msg
        and f"curl -L --create-dirs -o {weights} {imagenet.INCEPTION_URL}" in msg
    )


@pytest.mark.slow  # imports diffusers and builds a pipeline: seconds before the first sample
def test_sweep_through_a_gmdit_pipeline(tmp_path):
    """The GPU user's path on CPU: a tiny random checkpoint in the public GM-DiT layout, sampled
    through GMDiTPipeline.__call__ (GM-SDE as output_mode 'sample', Euler as 'mean' with one
    substep at order 1), scored by the protocol with guidance, over a sweep."""
    pytest.importorskip("diffusers")
    from tests.gmflow_checkpoint import write_checkpoint

    write_checkpoint(str(tmp_path / "pipe"))
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    feats = TinyFeatures()(images)[0].double()
    np.savez(
        tmp_path / "ref.npz",
        arr_0=images.permute(0, 2, 3, 1).numpy(),
        mu=feats.mean(0).numpy(),
        sigma=torch.cov(feats.t()).numpy(),
    )
    evaluate_cli.main(
        [
            str(tmp_path / "pipe"),
            "--sweep",
            "--ref",
            str(tmp_path / "ref.npz"),
            "--out",
            str(tmp_path / "ev"),
            "--no-progress",
            "--set",
            "eval.sweep.per_class=1",
            "eval.batch=5",
            "eval.sweep.nfe=[1,2]",
            "eval.sweep.solvers=['gm-sde-2','gm-ode-2','euler']",
            "eval.ode_substeps=4",
        ],
        feature_net=TinyFeatures(),
    )
    md = (tmp_path / "ev" / "imagenet_sweep.md").read_text()
    assert "| FID | IS | precision | recall | wall ms / image | front: FID vs NFE | front: FID vs wall time |" in md
    assert md.count("probabilistic 0.45 |") == 6
    assert "**Anchor: Euler at 2 NFE with probabilistic guidance 0.45, FID " in md  # the anchor under the same guidance
    runs = sorted(p.name for p in (tmp_path / "ev" / "sweep").iterdir())
    assert runs[0] == "euler_nfe1_probabilistic0.45_seed0" and len(runs) == 6
    chunk = np.load(tmp_path / "ev" / "sweep" / runs[0] / "chunks" / "chunk_000001.npz")
    assert (
        chunk["arr_0"].dtype == np.uint8 and chunk["arr_0"].shape[0] == 5 and chunk["arr_1"].tolist() == [5, 6, 7, 8, 9]
    )
