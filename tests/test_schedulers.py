"""The schedulers that carry the official GMFlow names keep the official contract, and the
GM-consuming ones have names of their own.

``FlowEulerODEScheduler`` / ``GMFlowSDEScheduler`` (``gmkernels.gmflow_schedulers``, exposed by
``gmkernels.compat`` and ``gmkernels.pipelines``) are checked against the official behaviour
written out here in float64 from its description: the signatures, the schedule
``s_i = 1 - i/n``, ``sigma_i = shift s_i / (1 + (shift - 1) s_i)``, ``timesteps = 1000 sigma``
with a final 0, and the step formulas of both classes, for shift 1 and 3, n = 1, 5, 8,
``prediction_type`` ``'u'`` and ``'x0'`` and every mode combination, to 1e-5 relative.
"""

import ast
import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from strategies import rel_err

import gmkernels
from gmkernels import gmflow_schedulers as OS
from gmkernels.compat import schedulers as compat_schedulers
from gmkernels.models import SpectrumMLP
from gmkernels.schedulers import GMODEScheduler, GMSDEScheduler, GMTensorStepScheduler

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
SHIFTS, STEPS, PREDICTIONS = (1.0, 3.0), (1, 5, 8), ("u", "x0")
SDE_MODES = (("sample", "large"), ("mean", "large"), ("mean", "small"))


# ------------------------------------------------------------------------- the official behaviour


def official_sigmas(n: int, shift: float) -> torch.Tensor:
    s = 1 - torch.arange(n, dtype=F64) / n
    return torch.cat([shift * s / (1 + (shift - 1) * s), torch.zeros(1, dtype=F64)])


def official_euler(x, out, sigma, sigma_to, prediction):
    d = out if prediction == "u" else (x - out) / sigma
    return x + d * (sigma_to - sigma)


def official_sde(x, out, sigma, sigma_to, prediction, z, output_mode, variance_mode, eps=1e-6):
    alpha, alpha_to = 1 - sigma, 1 - sigma_to
    r = sigma_to / max(sigma, eps)
    q = alpha / max(alpha_to, eps)
    beta = 1 - (r * q) ** 2
    x0 = x - sigma * out if prediction == "u" else out
    if output_mode == "sample" or variance_mode == "small":
        s = math.sqrt(beta) * sigma_to
    else:
        s = math.sqrt(beta) * sigma * math.sqrt((alpha_to**2 + sigma_to**2) / max(alpha**2 + sigma**2, eps))
    return r * r * q * x + beta * alpha_to * x0 + s * z


def run_contract(cls, shift: float, n: int, prediction: str, **modes) -> float:
    """The largest relative error over the ``n`` steps of a loop (each step compared from the
    scheduler's own state), and the schedule's."""
    sched = cls(shift=shift, **modes)
    sched.set_timesteps(n)
    sig = official_sigmas(n, shift)
    errs = [rel_err(sched.sigmas, sig), rel_err(sched.timesteps, sig[:-1] * 1000)]
    g = torch.Generator().manual_seed(7)
    data = torch.Generator().manual_seed(8)
    g_ref = torch.Generator().manual_seed(7)  # z: a float32 standard normal drawn from the generator
    x = torch.randn(2, 3, 4, 5, generator=data)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(x.shape, generator=data)
        got = sched.step(out, t, x, generator=g, prediction_type=prediction).prev_sample
        s, s_to = sig[i].item(), sig[i + 1].item()
        if cls is OS.FlowEulerODEScheduler:
            want = official_euler(x.double(), out.double(), s, s_to, prediction)
        else:
            z = torch.randn(x.shape, generator=g_ref, dtype=torch.float32).double()
            want = official_sde(x.double(), out.double(), s, s_to, prediction, z, **modes)
        assert got.dtype == torch.float32 and got.shape == x.shape
        errs.append(rel_err(got, want))
        x = got
    return max(errs)


CONFIGS = [(OS.FlowEulerODEScheduler, {}, shift, n, p) for shift in SHIFTS for n in STEPS for p in PREDICTIONS] + [
    (OS.GMFlowSDEScheduler, {"output_mode": o, "variance_mode": v}, shift, n, p)
    for o, v in SDE_MODES
    for shift in SHIFTS
    for n in STEPS
    for p in PREDICTIONS
]


def contract_table() -> list[tuple[str, float]]:
    """(configuration, max relative error) for every configuration of the contract."""
    rows = []
    for cls, modes, shift, n, p in CONFIGS:
        name = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in modes.items())}) shift={shift:g} n={n} {p}"
        rows.append((name, run_contract(cls, shift, n, p, **modes)))
    return rows


@pytest.mark.parametrize("cls,modes,shift,n,prediction", CONFIGS)
def test_numbers_equal_the_official_formulas(cls, modes, shift, n, prediction):
    assert run_contract(cls, shift, n, prediction, **modes) < 1e-5


def test_signatures_are_the_official_ones():
    def positional(f):
        return [
            (p.name, p.default)
            for p in inspect.signature(f).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"
        ]

    ode, sde = OS.FlowEulerODEScheduler, OS.GMFlowSDEScheduler
    assert positional(ode.__init__) == [("num_train_timesteps", 1000), ("shift", 1.0)]
    assert positional(sde.__init__) == [
        ("num_train_timesteps", 1000),
        ("shift", 1.0),
        ("output_mode", "sample"),
        ("variance_mode", "large"),
    ]
    step = [
        ("model_output", inspect.Parameter.empty),
        ("timestep", inspect.Parameter.empty),
        ("sample", inspect.Parameter.empty),
        ("generator", None),
        ("return_dict", True),
        ("prediction_type", "u"),
        ("eps", 1e-6),
    ]
    for cls in (ode, sde):
        assert positional(cls.step) == step
        assert positional(cls.set_timesteps) == [("num_inference_steps", inspect.Parameter.empty), ("device", None)]
        # LakonLab's additions by keyword only, so the official positional calls keep their meaning
        keyword_only = {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert {"use_dynamic_shifting", "base_seq_len", "max_seq_len", "base_logshift", "max_logshift"} <= keyword_only
        assert "seq_len" in inspect.signature(cls.set_timesteps).parameters


def test_config_keys_and_the_official_calls():
    sde = OS.GMFlowSDEScheduler(1000, 3.0, "mean", "small")
    assert (sde.config.shift, sde.config.output_mode, sde.config.variance_mode) == (3.0, "mean", "small")
    swapped = OS.GMFlowSDEScheduler.from_config(OS.FlowEulerODEScheduler(shift=2.0).config, output_mode="mean")
    assert (
        swapped.config.shift == 2.0 and swapped.config.output_mode == "mean" and swapped.config.variance_mode == "large"
    )
    sde.set_timesteps(4, "cpu")
    x, out = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="integer"):
        sde.step(out, 2, x)
    # the step index is found from the first timestep passed
    (y,) = sde.step(out.to(torch.bfloat16), sde.timesteps[2], x, return_dict=False, prediction_type="x0")
    assert sde.step_index == 3 and y.dtype == torch.bfloat16  # cast back to model_output's dtype
    with pytest.raises(ValueError, match="output_mode"):
        OS.GMFlowSDEScheduler(output_mode="exact")
    with pytest.raises(ValueError, match="variance_mode"):
        OS.GMFlowSDEScheduler(variance_mode="fixed")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sde.set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type"):
        sde.step(out, sde.timesteps[3], x, prediction_type="eps")


def test_dynamic_shifting_by_keyword():
    for kind in ("exp", "sqrt"):
        sched = OS.FlowEulerODEScheduler(use_dynamic_shifting=True, dynamic_shifting_type=kind)
        sched.set_timesteps(4, seq_len=1024)
        shift = sched.get_shift(1024)
        want = (
            math.exp(0.5 + (1024 - 256) * (1.15 - 0.5) / (4096 - 256))
            if kind == "exp"
            else (math.exp(0.5) + (32 - 16) * (math.exp(1.15) - math.exp(0.5)) / (64 - 16))
        )
        assert shift == pytest.approx(want) and shift > 1
        assert rel_err(sched.sigmas, official_sigmas(4, shift)) < 1e-6
        assert sched.get_shift(None) == 1.0


def test_generator_list_draws_one_noise_per_sample():
    x, out = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)

    def first_step(generator, rows):
        sched = OS.GMFlowSDEScheduler()
        sched.set_timesteps(3)
        return sched.step(out[rows], sched.timesteps[0], x[rows], generator=generator).prev_sample

    both = first_step([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], slice(0, 2))
    assert torch.equal(both[1:], first_step([torch.Generator().manual_seed(2)], slice(1, 2)))
    with pytest.raises(ValueError, match="generator"):
        first_step([torch.Generator()], slice(0, 2))


def _imports_compat(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = (node.module or "").split(".") + [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [part for a in node.names for part in a.name.split(".")]
        else:
            continue
        if "compat" in names:
            return True
    return False


def test_one_class_per_official_name():
    """compat and pipelines expose the same classes; the package defines each class name once and
    no GM-consuming scheduler carries an official name."""
    pytest.importorskip("diffusers")
    import gmkernels.pipelines as P

    assert compat_schedulers.FlowEulerODEScheduler is P.FlowEulerODEScheduler is OS.FlowEulerODEScheduler
    assert compat_schedulers.GMFlowSDEScheduler is P.GMFlowSDEScheduler is OS.GMFlowSDEScheduler
    # SPEC.md section 7 names both gmkernels.policy.GMFlowPolicy and its compat subclass
    # gmkernels.compat.piflow.GMFlowPolicy; that pair is the spec's to settle
    spec_pair = {("GMFlowPolicy", "policy.py"), ("GMFlowPolicy", "compat/piflow.py")}
    seen = {}
    for path in sorted((ROOT / "gmkernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ClassDef)
                and (node.name, path.relative_to(ROOT / "gmkernels").as_posix()) not in spec_pair
            ):
                assert node.name not in seen, f"class {node.name} in {path} and {seen[node.name]}"
                seen[node.name] = path
        if path.relative_to(ROOT / "gmkernels").parts[0] != "compat":
            assert not _imports_compat(path), f"{path} imports gmkernels.compat"
    official = {
        "FlowEulerODEScheduler",
        "GMFlowSDEScheduler",
        "FlowHeunODEScheduler",
        "FlowSDEScheduler",
        "FlowAdapterScheduler",
        "FlowMapSDEScheduler",
    }
    for name in ("GMSDEScheduler", "GMODEScheduler", "GMEulerScheduler", "GMTensorStepScheduler"):
        assert name not in official and hasattr(gmkernels.schedulers, name)
    assert not hasattr(gmkernels, "GMFlowSDEScheduler") and not hasattr(gmkernels.schedulers, "GMFlowODEScheduler")


def test_without_diffusers_the_stand_in_base_keeps_the_interface():
    code = (
        "import sys, warnings; sys.modules['diffusers'] = None\n"
        "from gmkernels.compat import schedulers as S\n"
        "assert not S.HAS_DIFFUSERS\n"
        "ode = S.FlowEulerODEScheduler(shift=3.0)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    sde = S.GMFlowSDEScheduler.from_config(dict(ode.config, unknown=1), output_mode='mean')\n"
        "assert any('unknown' in str(w.message) for w in caught)\n"
        "assert sde.config.shift == 3.0 and sde.config['output_mode'] == 'mean' and sde.config.variance_mode == 'large'\n"
        "sde.set_timesteps(2)\n"
        "import torch; x = torch.zeros(1, 1, 2, 2)\n"
        "out = sde.step(x, sde.timesteps[0], x, prediction_type='x0')\n"
        "assert out.prev_sample.shape == x.shape and out[0] is out.prev_sample\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


def test_with_diffusers_they_are_diffusers_schedulers(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    sde = OS.GMFlowSDEScheduler(shift=3.0, output_mode="mean", variance_mode="small", use_dynamic_shifting=True)
    assert isinstance(sde, SchedulerMixin)
    sde.save_config(str(tmp_path))
    again = OS.GMFlowSDEScheduler.from_pretrained(str(tmp_path))
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == {
        k: v for k, v in sde.config.items() if not k.startswith("_")
    }


# -------------------------------------------------------------- the GM-consuming tensor-step loop


def _toy_gm(x, t, K=3, seed=0):
    """A u-GM that depends smoothly on ``x`` and ``t`` (stands in for a network)."""
    g = torch.Generator().manual_seed(seed)
    offs = torch.randn(K, *x.shape[1:], generator=g)
    s = (t / 1000).reshape(-1, 1, 1, 1, 1)
    means = 0.5 * x.unsqueeze(1) + offs * (1 + s)
    logweights = torch.log_softmax((x.unsqueeze(1) * offs).sum(2, keepdim=True), dim=1)
    return {"means": means, "logstds": torch.log(0.3 + 0.2 * s), "logweights": logweights}


def _toy_guided(x, t):
    return _toy_gm(x, t, seed=0), _toy_gm(x, t, seed=1)


def _loop(sched, noise, generator=None, **kw):
    x = noise
    for t in sched.timesteps:
        x = sched.step(_toy_guided(x, t.expand(x.shape[0])), t, x, generator=generator, **kw)
    return x


def test_tensor_steps_on_the_mean_with_the_euler_scheduler_are_gm_ode():
    noise = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    kw = dict(order=2, guidance_scale=0.3, orthogonal=0.5)
    tensor = GMTensorStepScheduler(OS.FlowEulerODEScheduler(shift=2.0), "mean", **kw)
    tensor.set_timesteps(3, 2)
    fused = GMODEScheduler(shift=2.0, **kw)
    fused.set_timesteps(3, 2)
    assert torch.equal(tensor.timesteps, fused.timesteps)
    assert rel_err(_loop(tensor, noise), _loop(fused, noise)) < 1e-5


def test_tensor_steps_with_spectral_draws():
    """Spectrally correlated draws (a spectrum network fed the step's target Gaussian): finite,
    reproducible with a generator, different from per-pixel draws."""
    spectrum = SpectrumMLP(base_size=(3, 8, 8), layers=[8])
    noise = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))

    def run(spectrum_net, seed):
        sched = GMTensorStepScheduler(OS.GMFlowSDEScheduler(), "sample", spectrum_net, order=2, guidance_scale=0.3)
        sched.set_timesteps(3)
        return _loop(sched, noise, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        a, b, c = run(spectrum, 1), run(spectrum, 1), run(None, 1)
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.allclose(a, c)


def test_tensor_step_misuse():
    with pytest.raises(TypeError, match="tensor_scheduler"):
        GMTensorStepScheduler(GMSDEScheduler(), "mean")
    with pytest.raises(ValueError, match="x0_mode"):
        GMTensorStepScheduler(OS.FlowEulerODEScheduler(), "median")
    with pytest.raises(ValueError, match="spectrum_net"):
        GMTensorStepScheduler(OS.FlowEulerODEScheduler(), "mean", lambda g: g["mean"])
    with pytest.raises(ValueError, match="substeps"):
        GMTensorStepScheduler(OS.GMFlowSDEScheduler(), "sample").set_timesteps(4, 2)
    with pytest.raises(ValueError, match="terminal_sigma"):
        GMTensorStepScheduler(OS.FlowEulerODEScheduler(terminal_sigma=0.01)).set_timesteps(4)
