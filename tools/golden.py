"""Golden outputs of every public entry point, for bit-identity checks across a refactor.

    python tools/golden.py record OUT.pt      # run every case, torch.save {case_name: outputs}
    python tools/golden.py compare OUT.pt     # run every case again and compare with OUT.pt
    python tools/golden.py list               # the case names
    (--only SUBSTRING, repeatable, restricts any command to the cases whose name contains it)

Why: the op layer (the host code between each public function and its kernel launch) gets
rebuilt; the kernels and the reference do not change, so every public function must return
the same bits as before on the same inputs. Record on the old commit, compare on the new one.

Cases are ``<entry point>/<backend>/<dtype>[/<variant>]``: every public op of
``gmkernels/__init__.py`` (forward, and the gradients of the differentiable ones), steps of the
scheduler classes (with and without guidance, several steps so the 2nd-order memory is used),
``gmkernels.sample`` and ``CapturedSampler(fallback=True)`` on a fixed toy denoiser, and the
pi-Flow policy of ``gmkernels.policy`` (forward and gradients). Each runs under
``gmkernels.use_backend("torch")`` and ``use_backend("triton")`` (Triton's CPU interpreter:
``TRITON_INTERPRET=1`` is set here before gmkernels is imported), on fp32 and bf16 inputs;
variants ``nb`` (two batch dims) and ``nc`` (non-contiguous inputs, H and W not mergeable in the
states) run in fp32.

Inputs come from a ``torch.Generator`` seeded from the case's name without backend and dtype
(crc32), so the torch/triton and fp32/bf16 cases of one entry point share their inputs, and
adding or removing cases leaves the other cases' inputs unchanged. Random streams inside
sampling ops come from generators seeded the same way and created in the case; the global RNG is
also seeded per case. Only the public API is used (``gmkernels``, ``gmkernels.schedulers``,
``gmkernels.policy``), so this file runs unchanged after the rebuild. Everything runs on CPU
with one torch thread (so the bits do not depend on the core count).

``compare`` prints per case the max over output tensors of ``||out - ref|| / ||ref||``
(float64, over the finite entries; the non-finite entries must match exactly) and whether
every tensor is bit-identical; it exits 1 when a case is missing, raises, changes structure,
shape or dtype, or differs by more than 1e-6 relative. Cases in the current run but not in
the file are listed as new (not a failure).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by gmkernels)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's gmkernels, not an installed one

import torch  # noqa: E402

import gmkernels  # noqa: E402
import gmkernels.policy  # noqa: E402
import gmkernels.schedulers  # noqa: E402

TOL = 1e-6
BACKENDS = ("torch", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# sizes: B batch, K components, C channels, H x W pixels, N samples per pixel
B, K, C, H, W, N = 2, 4, 3, 4, 5, 3


# ----------------------------------------------------------------------------- inputs


class In:
    """The inputs of one case: a generator seeded from the case key, the dtype and the layout.
    Every tensor is drawn in float32 from ``g`` and then cast, so the fp32 and bf16 cases see
    the same values (up to rounding)."""

    def __init__(self, seed: int, dtype: torch.dtype, layout: str):
        self.seed, self.dtype, self.layout = seed, dtype, layout
        self.g = torch.Generator().manual_seed(seed)
        self.batch = (2, B) if layout == "nb" else (B,)

    def rng(self, i: int = 0) -> torch.Generator:
        """A fresh generator for the random stream of a sampling op (``i``-th of the case)."""
        return torch.Generator().manual_seed((self.seed + 7919 * (i + 1)) % 2**63)

    def randn(self, *shape: int, scale: float = 1.0, shift: float = 0.0, dtype=None) -> torch.Tensor:
        t = torch.randn(shape, generator=self.g) * scale + shift
        return t.to(self.dtype if dtype is None else dtype)

    def rand(self, *shape: int, lo: float = 0.0, hi: float = 1.0, dtype=None) -> torch.Tensor:
        t = torch.rand(shape, generator=self.g) * (hi - lo) + lo
        return t.to(self.dtype if dtype is None else dtype)

    def state(self, c: int = C, h: int = H, w: int = W, scale: float = 1.0) -> torch.Tensor:
        """``(*B, C, H, W)``; layout ``nc``: a transposed view (H and W not mergeable)."""
        if self.layout == "nc":
            return self.randn(*self.batch, c, w, h, scale=scale).transpose(-1, -2)
        return self.randn(*self.batch, c, h, w, scale=scale)

    def samples(self, n: int = N, c: int = C, scale: float = 1.0) -> torch.Tensor:
        """``(*B, N, C, H, W)``; layout ``nc``: channels-last memory."""
        if self.layout == "nc":
            return self.randn(*self.batch, n, H, W, c, scale=scale).movedim(-1, -3)
        return self.randn(*self.batch, n, c, H, W, scale=scale)

    def gm(
        self,
        k: int = K,
        c: int = C,
        h: int = H,
        w: int = W,
        per_pixel_std: bool = False,
        dead: bool = False,
        std_shift: float = -0.7,
    ) -> dict:
        """A GM dict; layout ``nc``: channels-last means, log-weights a strided slice."""
        bt = self.batch
        if self.layout == "nc":
            means = self.randn(*bt, k, h, w, c).movedim(-1, -3)
        else:
            means = self.randn(*bt, k, c, h, w)
        ls_shape = (*bt, 1, 1, h, w) if per_pixel_std else (*bt, 1, 1, 1, 1)
        logstds = self.randn(*ls_shape, scale=0.3, shift=std_shift)
        logits = torch.randn((*bt, k, 2, h, w), generator=self.g) * 1.5
        if dead:  # component 0 dead on the first batch row
            logits[(0,) * len(bt)][0] = float("-inf")
        lw = logits.log_softmax(dim=-4).to(self.dtype)
        lw = lw[..., 0:1, :, :] if self.layout == "nc" else lw[..., 0:1, :, :].contiguous()
        return {"means": means, "logstds": logstds, "logweights": lw}

    def sigma(self, lo: float, hi: float) -> torch.Tensor:
        """Per-sample sigmas ``(*B, 1, 1, 1)`` in float32."""
        return self.rand(*self.batch, 1, 1, 1, lo=lo, hi=hi, dtype=torch.float32)


def leaves(gm: dict) -> dict:
    """Leaf copies of a GM's tensors that require grad (same dtype and strides)."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in gm.items()}


def grads(out: torch.Tensor, inputs: dict, cot: torch.Tensor | None = None) -> dict:
    ks = list(inputs)
    gs = torch.autograd.grad(out, [inputs[k] for k in ks], grad_outputs=cot, allow_unused=True)
    return {k: g for k, g in zip(ks, gs)}


# ----------------------------------------------------------------------------- registry


@dataclass
class Case:
    name: str
    key: str  # the seed key: entry point and variant, not backend or dtype
    backend: str
    dtype: torch.dtype
    layout: str
    fn: Callable[[In], Any]


CASES: list[Case] = []


def register(
    op: str, fn: Callable[[In], Any], dtypes=("fp32", "bf16"), layouts=("std",), variant: str = "", backends=BACKENDS
) -> None:
    for layout in layouts:
        suffix = "/".join(s for s in (variant, "" if layout == "std" else layout) if s)
        for be in backends:
            for dt in dtypes if layout == "std" else ("fp32",):
                name = f"{op}/{be}/{dt}" + (f"/{suffix}" if suffix else "")
                CASES.append(Case(name, f"{op}/{suffix}", be, DTYPES[dt], layout, fn))


ALL_LAYOUTS = ("std", "nb", "nc")


# ----------------------------------------------------------------------------- ops


def c_gm_to_mean(x: In):
    gm = x.gm(dead=True)
    return {
        "p1": gmkernels.gm_to_mean(gm),
        "p0.5": gmkernels.gm_to_mean(gm, power=0.5),
        "p0": gmkernels.gm_to_mean(gm, power=0.0),
    }


def c_gm_to_iso_gaussian(x: In):
    return gmkernels.gm_to_iso_gaussian(x.gm())


def c_gm_mul_iso_gaussian(x: In):
    gm = x.gm()
    g_pix = {"mean": x.state(), "var": x.rand(*x.batch, 1, H, W, lo=0.2, hi=1.5)}
    g_bat = {"mean": x.state(), "var": x.rand(*x.batch, 1, 1, 1, lo=0.2, hi=1.5)}
    return {
        "pixel_var": gmkernels.gm_mul_iso_gaussian(gm, g_pix),
        "batch_var_powers": gmkernels.gm_mul_iso_gaussian(gm, g_bat, gm_power=0.7, gaussian_power=0.5),
        "divide": gmkernels.gm_mul_iso_gaussian(
            gm, {"mean": g_bat["mean"], "var": g_bat["var"] * 20}, gaussian_power=-1.0
        ),
    }


def c_iso_gaussian_mul_iso_gaussian(x: In):
    g1 = {"mean": x.state(), "var": x.rand(*x.batch, 1, H, W, lo=0.3, hi=1.0)}
    g2 = {"mean": x.state(), "var": x.rand(*x.batch, 1, 1, 1, lo=2.0, hi=3.0)}
    return {
        "mul": gmkernels.iso_gaussian_mul_iso_gaussian(g1, g2),
        "powers": gmkernels.iso_gaussian_mul_iso_gaussian(g1, g2, power1=0.6, power2=1.7),
        "divide": gmkernels.iso_gaussian_mul_iso_gaussian(g2, g1, power1=1.0, power2=-1.0),
    }


def c_u_to_x0(x: In):
    gm, xt = x.gm(), x.state()
    gm_pp = x.gm(per_pixel_std=True)
    return {
        "float": gmkernels.u_to_x0(gm, xt, 0.7),
        "tensor": gmkernels.u_to_x0(gm, xt, x.sigma(0.2, 0.9)),
        "per_pixel_std": gmkernels.u_to_x0(gm_pp, xt, 0.4),
    }


def c_x0_to_u(x: In):
    gm, xt = x.gm(), x.state()
    return {"float": gmkernels.x0_to_u(gm, xt, 0.7), "tensor": gmkernels.x0_to_u(gm, xt, x.sigma(0.2, 0.9))}


def c_gm_posterior_mean(x: In):
    gm, xs, xt = x.gm(), x.state(), x.state()
    s_src = x.sigma(0.6, 0.9)
    return {
        "float": gmkernels.gm_posterior_mean(gm, xs, 0.8, xt, 0.5),
        "tensor": gmkernels.gm_posterior_mean(gm, xs, s_src, xt, s_src * 0.6),
        "per_pixel_std": gmkernels.gm_posterior_mean(x.gm(per_pixel_std=True), xs, 0.9, xt, 0.3),
    }


def c_reverse_transition(x: In):
    gm, xt = x.gm(), x.state()
    s = x.sigma(0.5, 0.9)
    return {
        "float": gmkernels.reverse_transition(gm, xt, 0.7, 0.4),
        "tensor": gmkernels.reverse_transition(gm, xt, s, s * 0.5),
        "to_zero": gmkernels.reverse_transition(gm, xt, 0.6, 0.0),
    }


def c_gm_logprob(x: In):
    return gmkernels.gm_logprob(x.gm(dead=True), x.samples())


def c_gm_nll_loss(x: In):
    gm, target = x.gm(), x.state()
    out = {r: gmkernels.gm_nll_loss(gm, target, reduction=r) for r in ("mean", "sum", "none")}
    out["eps_big"] = gmkernels.gm_nll_loss(gm, target, eps=0.3)
    ins = leaves(gm)
    out["grad_mean"] = grads(gmkernels.gm_nll_loss(ins, target), ins)
    ins = leaves(gm)
    tgt = target.detach().clone().requires_grad_(True)
    loss = gmkernels.gm_nll_loss(ins, tgt, reduction="none")
    cot = x.randn(*loss.shape, dtype=loss.dtype)
    out["grad_none_cot"] = grads(loss, {**ins, "target": tgt}, cot)
    gm_pp = leaves(x.gm(per_pixel_std=True))
    loss = gmkernels.gm_nll_loss(gm_pp, target, reduction="sum")
    out["per_pixel_std"] = {"loss": loss, "grad": grads(loss, gm_pp)}
    return out


def c_transition_loss(x: In):
    gm, xh, xl = x.gm(), x.state(), x.state()
    th = torch.tensor([800.0, 600.0]).repeat(x.batch[:-1] + (1,)) if len(x.batch) > 1 else torch.tensor([800.0, 600.0])
    tl = th * torch.tensor([0.5, 0.0])
    out = {r: gmkernels.transition_loss(gm, xh, 700.0, xl, 300.0, reduction=r) for r in ("mean", "sum", "none")}
    out["tensor_t"] = gmkernels.transition_loss(gm, xh, th, xl, tl)
    out["t_low_zero"] = gmkernels.transition_loss(gm, xh, 500.0, xl, 0.0)
    ins = leaves(gm)
    out["grad_mean"] = grads(gmkernels.transition_loss(ins, xh, th, xl, tl), ins)
    ins = leaves(gm)
    loss = gmkernels.transition_loss(ins, xh, 900.0, xl, 450.0, reduction="none")
    out["grad_none_cot"] = grads(loss, ins, x.randn(*loss.shape, dtype=loss.dtype))
    return out


def c_gm_sample(x: In):
    gm = x.gm(dead=True)
    return {
        "n3": gmkernels.gm_sample(gm, n_samples=3, generator=x.rng(0)),
        "power0.5": gmkernels.gm_sample(gm, n_samples=1, power=0.5, generator=x.rng(1)),
    }


def _pair(x: In, k_uncond: int = K):
    return x.gm(), x.gm(k=k_uncond)


def c_probabilistic_guidance(x: In):
    cond, uncond = _pair(x, k_uncond=K + 2)
    return {
        "orth1": gmkernels.probabilistic_guidance(cond, uncond, 0.6),
        "orth0.5": gmkernels.probabilistic_guidance(cond, uncond, 0.3, orthogonal=0.5),
    }


def c_weight_guidance(x: In):
    cond, uncond = _pair(x)
    return {"s2.5": gmkernels.weight_guidance(cond, uncond, 2.5), "s0.5": gmkernels.weight_guidance(cond, uncond, 0.5)}


def c_mean_cfg(x: In):
    cond, uncond = _pair(x, k_uncond=K - 1)
    return {
        "plain": gmkernels.mean_cfg(cond, uncond, 3.0),
        "orthogonal": gmkernels.mean_cfg(cond, uncond, 2.0, orthogonal=True),
    }


def _gm1d(x: In, per_pixel_std: bool = False) -> dict:
    bt = x.batch
    return {
        "means": x.randn(*bt, K, H, W, scale=1.5),
        "logstds": x.randn(*bt, 1, H, W, scale=0.3, shift=-0.8)
        if per_pixel_std
        else x.randn(*bt, 1, 1, 1, scale=0.3, shift=-0.8),
        "logweights": (torch.randn((*bt, K, H, W), generator=x.g) * 1.5).log_softmax(dim=-3).to(x.dtype),
    }


def c_gm1d_inverse_cdf(x: In):
    gm1d = _gm1d(x)
    u = x.rand(*x.batch, N, H, W, lo=-0.95, hi=0.95)
    z = torch.randn((*x.batch, N, H, W), generator=x.g)
    uz = torch.erf(z / math.sqrt(2)).to(x.dtype)
    return {
        "default": gmkernels.gm1d_inverse_cdf(gm1d, u),
        "steps3": gmkernels.gm1d_inverse_cdf(gm1d, u, n_steps=3, max_step_size=0.5),
        "gaussian_samples": gmkernels.gm1d_inverse_cdf(gm1d, uz, n_steps=4, gaussian_samples=z.to(x.dtype)),
        "per_pixel_std": gmkernels.gm1d_inverse_cdf(_gm1d(x, per_pixel_std=True), u, n_steps=4),
    }


# the KR transports run Newton iterations axis by axis: 2 channels and few steps keep the
# interpreter's time down
def c_gaussian_samples_to_gm_samples(x: In):
    gm, z = x.gm(c=2, std_shift=-1.0), x.samples(c=2)
    return {
        "axis_aligned": gmkernels.gaussian_samples_to_gm_samples(gm, z, n_steps=6),
        "per_pixel": gmkernels.gaussian_samples_to_gm_samples(gm, z, n_steps=3, max_step_size=1.0, axis_aligned=False),
    }


def c_gm_samples_to_gaussian_samples(x: In):
    gm, y = x.gm(c=2, std_shift=-1.0), x.samples(c=2)
    return {
        "axis_aligned": gmkernels.gm_samples_to_gaussian_samples(gm, y),
        "per_pixel": gmkernels.gm_samples_to_gaussian_samples(gm, y, axis_aligned=False),
    }


def c_gm_ode_substeps(x: In):
    gm, xt = x.gm(), x.state()
    levels = [0.9, 0.75, 0.55, 0.3]
    return {
        "floats": gmkernels.gm_ode_substeps(gm, xt, levels),
        "tensor": gmkernels.gm_ode_substeps(gm, xt, torch.tensor(levels + [0.0])),
        "one": gmkernels.gm_ode_substeps(gm, xt, [0.5, 0.2]),
        "per_pixel_std": gmkernels.gm_ode_substeps(x.gm(per_pixel_std=True), xt, levels),
    }


def c_gm_sde_step(x: In):
    gm, xt = x.gm(dead=True), x.state()
    return {
        "step": gmkernels.gm_sde_step(gm, xt, 0.8, 0.5, generator=x.rng(0)),
        "power_to0": gmkernels.gm_sde_step(gm, xt, 0.6, 0.0, power=0.7, generator=x.rng(1)),
    }


OPS = {
    "gm_to_mean": c_gm_to_mean,
    "gm_to_iso_gaussian": c_gm_to_iso_gaussian,
    "gm_mul_iso_gaussian": c_gm_mul_iso_gaussian,
    "iso_gaussian_mul_iso_gaussian": c_iso_gaussian_mul_iso_gaussian,
    "u_to_x0": c_u_to_x0,
    "x0_to_u": c_x0_to_u,
    "gm_posterior_mean": c_gm_posterior_mean,
    "reverse_transition": c_reverse_transition,
    "gm_logprob": c_gm_logprob,
    "gm_nll_loss": c_gm_nll_loss,
    "transition_loss": c_transition_loss,
    "gm_sample": c_gm_sample,
    "probabilistic_guidance": c_probabilistic_guidance,
    "weight_guidance": c_weight_guidance,
    "mean_cfg": c_mean_cfg,
    "gm1d_inverse_cdf": c_gm1d_inverse_cdf,
    "gaussian_samples_to_gm_samples": c_gaussian_samples_to_gm_samples,
    "gm_samples_to_gaussian_samples": c_gm_samples_to_gaussian_samples,
    "gm_ode_substeps": c_gm_ode_substeps,
    "gm_sde_step": c_gm_sde_step,
}
LAYOUTS = {  # default: ALL_LAYOUTS
    "gm1d_inverse_cdf": ("std", "nb"),  # no GM dict that layout "nc" would change
    "iso_gaussian_mul_iso_gaussian": ("std", "nb"),
    "gaussian_samples_to_gm_samples": ("std", "nc"),  # slow under the interpreter
    "gm_samples_to_gaussian_samples": ("std", "nc"),
}
for _op, _fn in OPS.items():
    register(_op, _fn, layouts=LAYOUTS.get(_op, ALL_LAYOUTS))


# ----------------------------------------------------------------------------- toy denoiser


class ToyDenoiser:
    """A fixed smooth map ``(x_t, t) -> u-GM`` (or ``(gm_cond, gm_uncond)`` when ``guided``):
    per component a channel mix of ``x_t`` plus a pixel bias, log-weights from a per-pixel
    projection of ``x_t``, a log-std that grows with ``t``. Parameters drawn once from ``g``;
    arithmetic in float32, output in the dtype of ``x_t``."""

    def __init__(self, g: torch.Generator, guided: bool, k: int = K, c: int = C, h: int = H, w: int = W):
        self.guided = guided
        self.params = []
        for _ in range(2 if guided else 1):
            self.params.append(
                {
                    "A": torch.randn((k, c, c), generator=g) * 0.4,
                    "b": torch.randn((k, c, h, w), generator=g) * 0.8,
                    "d": torch.randn((k, c, 1, 1), generator=g) * 0.5,
                    "p": torch.randn((k, c), generator=g),
                    "e": torch.randn((k, h, w), generator=g),
                    "s": float(torch.rand((), generator=g)) * 0.3 + 0.2,
                }
            )

    @staticmethod
    def _gm(p: dict, x: torch.Tensor, t: torch.Tensor) -> dict:
        xf = x.float()
        s = (t.float() / 1000).reshape(-1, 1, 1, 1, 1)
        means = torch.einsum("kdc,bchw->bkdhw", p["A"], xf) + p["b"] + s * p["d"] - xf.unsqueeze(1) * 0.5
        logits = torch.einsum("kc,bchw->bkhw", p["p"], xf) * 0.7 + p["e"]
        logweights = logits.log_softmax(dim=1).unsqueeze(2)
        logstds = torch.log(p["s"] + 0.4 * s)
        return {k: v.to(x.dtype) for k, v in (("means", means), ("logstds", logstds), ("logweights", logweights))}

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        gms = tuple(self._gm(p, x, t) for p in self.params)
        return gms if self.guided else gms[0]


GUIDANCE = {  # kind -> (guidance, scale, orthogonal)
    "none": ("probabilistic", 0.0, 1.0),
    "probabilistic": ("probabilistic", 0.6, 1.0),
    "weight": ("weight", 2.0, 1.0),
    "mean-cfg": ("mean-cfg", 2.5, 0.0),
}


# ----------------------------------------------------------------------------- schedulers


def scheduler_case(cls, order: int, kind: str, substeps: int, fused: bool | None = None):
    guidance, scale, orthogonal = GUIDANCE[kind]

    def fn(x: In):
        den = ToyDenoiser(x.g, guided=scale > 0)
        xt = x.randn(B, C, H, W)
        sched = cls(shift=2.0, order=order, guidance=guidance, guidance_scale=scale, orthogonal=orthogonal)
        if fused is not None:
            sched.fused = fused
        sched.set_timesteps(order + 1, substeps=substeps)  # 2nd order: two steps use the memory
        gen = x.rng(0)
        states = []
        for t in sched.timesteps:
            out = den(xt, t.expand(B).contiguous())
            xt = sched.step(out, t, xt, generator=gen)
            states.append(xt)
        return {"timesteps": sched.timesteps, "states": states}

    return fn


# case names keep the class names of the recording (42a3092), where these three carried them
SCHEDS = [
    ("GMFlowODEScheduler", gmkernels.schedulers.GMODEScheduler, (1, 2), 2),
    ("GMFlowSDEScheduler", gmkernels.schedulers.GMSDEScheduler, (1, 2), 1),
    ("FlowEulerScheduler", gmkernels.schedulers.GMEulerScheduler, (1,), 1),
]
for _name, _cls, _orders, _sub in SCHEDS:
    for _order in _orders:
        for _kind in GUIDANCE:
            register(f"{_name}.step", scheduler_case(_cls, _order, _kind, _sub), variant=f"o{_order}-{_kind}")
        # the eager composition of the ops on the Triton path (class attribute ``fused``)
        for _kind in ("none", "probabilistic"):
            register(
                f"{_name}.step",
                scheduler_case(_cls, _order, _kind, _sub, fused=False),
                variant=f"o{_order}-{_kind}-unfused",
                backends=("triton",),
                dtypes=("fp32",),
            )


# ----------------------------------------------------------------------------- sample


SAMPLE_CONFIGS = {  # name -> kwargs of gmkernels.sample (besides guidance)
    "sde-o1": {"solver": "gm-sde", "num_steps": 3, "shift": 3.0},
    "sde-o2-probabilistic": {"solver": "gm-sde", "num_steps": 3, "order": 2, "guidance_kind": "probabilistic"},
    "ode-o2-sub3": {"solver": "gm-ode", "num_steps": 3, "substeps": 3, "order": 2, "shift": 2.0},
    "ode-o1-weight": {"solver": "gm-ode", "num_steps": 2, "substeps": 2, "guidance_kind": "weight"},
    "euler-meancfg": {"solver": "euler", "num_steps": 4, "guidance_kind": "mean-cfg"},
}


def sample_case(cfg: dict, captured: bool = False):
    cfg = dict(cfg)
    kind = cfg.pop("guidance_kind", "none")
    guidance, scale, orthogonal = GUIDANCE[kind]
    num_steps = cfg.pop("num_steps")

    def fn(x: In):
        den = ToyDenoiser(x.g, guided=scale > 0)
        noise = x.randn(B, C, H, W)
        kw = dict(guidance=guidance, guidance_scale=scale, orthogonal=orthogonal, **cfg)
        if captured:  # on CPU: the eager fallback
            return gmkernels.CapturedSampler(den, num_steps, generator=x.rng(0), fallback=True, **kw)(noise)
        return gmkernels.sample(den, noise, num_steps, generator=x.rng(0), **kw)

    return fn


for _name, _cfg in SAMPLE_CONFIGS.items():
    register("sample", sample_case(_cfg), variant=_name)
register("CapturedSampler", sample_case(SAMPLE_CONFIGS["sde-o2-probabilistic"], captured=True), variant="fallback")


# ----------------------------------------------------------------------------- policy


def policy_case(video: bool = False):
    def fn(x: In):
        spatial = (2, H, W) if video else (H, W)
        gm = {
            "means": x.randn(B, K, C, *spatial),
            "logstds": x.randn(B, *([1] * (len(spatial) + 2)), scale=0.3, shift=-0.5),
            "logweights": (torch.randn((B, K, 1, *spatial), generator=x.g) * 1.5).log_softmax(dim=1).to(x.dtype),
        }
        x_src, x_q = x.randn(B, C, *spatial), x.randn(B, C, *spatial)
        sigma_src = torch.tensor([0.9, 0.7])
        Policy = gmkernels.policy.GMFlowPolicy
        out = {}
        pol = Policy(gm, x_src, sigma_src)
        out["pi"] = pol.pi(x_q, sigma_src * 0.6)
        out["pi_float"] = pol.pi(x_q, 0.5)
        out["integrate"] = pol.integrate(
            x_src, sigma_src, torch.tensor([0.9, 0.8]), torch.tensor([0.4, 0.75]), shift=2.0, total_substeps=8
        )
        out["integrate_float_warp"] = pol.integrate(x_src, 0.9, 0.9, 0.0, warp=lambda r: r * r, total_substeps=8)
        out["temperature"] = pol.temperature(0.7).integrate(
            x_src, sigma_src, torch.tensor([0.9, 0.8]), 0.5, total_substeps=8
        )
        out["dropout"] = pol.dropout(0.4, generator=x.rng(0)).pi(x_q, 0.5)
        # gradients w.r.t. the GM and the states, with random cotangents
        ins = leaves(gm)
        xs = x_src.detach().clone().requires_grad_(True)
        xq = x_q.detach().clone().requires_grad_(True)
        pol = Policy(ins, xs, sigma_src)
        u = pol.pi(xq, sigma_src * 0.5)
        out["grad_pi"] = grads(u, {**ins, "x_src": xs, "x": xq}, x.randn(*u.shape, dtype=u.dtype))
        pol = Policy(ins, xs, sigma_src)  # a new graph for gm_vars (autograd.grad freed the first)
        xe, _, _ = pol.integrate(
            xq, sigma_src, torch.tensor([0.9, 0.7]), torch.tensor([0.3, 0.2]), shift=3.0, total_substeps=6
        )
        out["grad_integrate"] = grads(xe, {**ins, "x_src": xs, "x_start": xq}, x.randn(*xe.shape, dtype=xe.dtype))
        return out

    return fn


register("GMFlowPolicy", policy_case())
register("GMFlowPolicy", policy_case(video=True), dtypes=("fp32",), variant="video")


# ----------------------------------------------------------------------------- running


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


def run_case(case: Case) -> Any:
    seed = zlib.crc32(case.key.encode())
    torch.manual_seed(seed)  # the global RNG too, should anything draw from it
    with gmkernels.use_backend(case.backend):
        return _detach(case.fn(In(seed, case.dtype, case.layout)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]) if t.is_floating_point() else t


def diff(out: Any, ref: Any, path: str = "") -> tuple[float, bool, str]:
    """``(max relative error, bit-identical, first problem)`` of two output trees."""
    if isinstance(ref, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            return math.inf, False, f"{path}: {type(out).__name__} instead of a tensor"
        if out.shape != ref.shape or out.dtype != ref.dtype:
            return math.inf, False, f"{path}: {tuple(out.shape)} {out.dtype} instead of {tuple(ref.shape)} {ref.dtype}"
        same = torch.equal(_bits(out), _bits(ref))
        if same:
            return 0.0, True, ""
        if not ref.is_floating_point():
            return math.inf, False, f"{path}: integer values differ"
        o, r = out.double(), ref.double()
        fo, fr = torch.isfinite(o), torch.isfinite(r)
        if (
            not torch.equal(fo, fr)
            or not torch.equal(o[~fo].nan_to_num(0.0), r[~fr].nan_to_num(0.0))
            or not torch.equal(o[~fo].isnan(), r[~fr].isnan())
        ):
            return math.inf, False, f"{path}: non-finite entries differ"
        num, den = torch.linalg.vector_norm(o[fo] - r[fr]).item(), torch.linalg.vector_norm(r[fr]).item()
        err = num / den if den > 0 else (0.0 if num == 0 else math.inf)
        return err, False, f"{path}: rel err {err:.3g}"
    if isinstance(ref, dict):
        if not isinstance(out, dict) or set(out) != set(ref):
            return (
                math.inf,
                False,
                f"{path}: keys {sorted(out) if isinstance(out, dict) else type(out).__name__} instead of {sorted(ref)}",
            )
        items = [(f"{path}.{k}", out[k], ref[k]) for k in ref]
    elif isinstance(ref, (list, tuple)):
        if not isinstance(out, (list, tuple)) or len(out) != len(ref):
            return math.inf, False, f"{path}: not a sequence of {len(ref)}"
        items = [(f"{path}[{i}]", o, r) for i, (o, r) in enumerate(zip(out, ref))]
    else:
        same = out == ref
        return (0.0, True, "") if same else (math.inf, False, f"{path}: {out!r} instead of {ref!r}")
    worst, ident, why = 0.0, True, ""
    for p, o, r in items:
        e, s, w = diff(o, r, p)
        ident &= s
        if e > worst or (not s and not why):
            worst, why = max(worst, e), w
    return worst, ident, why


def selected(only: list[str] | None) -> list[Case]:
    return [c for c in CASES if not only or any(s in c.name for s in only)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=("record", "compare", "list"))
    ap.add_argument("path", nargs="?", help="the .pt file (record, compare)")
    ap.add_argument("--only", action="append", help="run only the cases whose name contains this (repeatable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = selected(args.only)
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names), "duplicate case names"
    if args.command == "list":
        print("\n".join(c.name for c in cases))
        return 0
    if not args.path:
        ap.error(f"{args.command} needs a path")
    print(
        f"gmkernels {gmkernels.__file__}, torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}, "
        f"{len(cases)} cases"
    )
    t0, c0 = time.perf_counter(), time.process_time()
    if args.command == "record":
        results, failed = {}, []
        for c in cases:
            try:
                results[c.name] = run_case(c)
            except Exception as e:  # noqa: BLE001
                failed.append(c.name)
                print(f"FAILED {c.name}: {type(e).__name__}: {e}")
        if failed:
            print(f"{len(failed)} cases raised; nothing written")
            return 1
        torch.save(results, args.path)
        print(
            f"recorded {len(results)} cases to {args.path} in {time.perf_counter() - t0:.1f} s "
            f"({time.process_time() - c0:.1f} s CPU)"
        )
        return 0

    ref = torch.load(args.path, weights_only=True)
    width = max(len(c.name) for c in cases)
    print(f"{'case':<{width}}  {'max rel err':>11}  identical")
    bad, n_ident, seen = [], 0, set()
    for c in cases:
        seen.add(c.name)
        if c.name not in ref:
            print(f"{c.name:<{width}}  {'':>11}  new (not in {args.path})")
            continue
        try:
            err, ident, why = diff(run_case(c), ref[c.name])
        except Exception as e:  # noqa: BLE001
            bad.append(c.name)
            print(f"{c.name:<{width}}  {'raised':>11}  no    {type(e).__name__}: {e}")
            continue
        n_ident += ident
        flag = "" if err <= TOL else f"  FAIL {why}"
        if err > TOL:
            bad.append(c.name)
        print(f"{c.name:<{width}}  {err:11.3g}  {'yes' if ident else 'no '}{flag}")
    missing = [n for n in ref if n not in seen and (not args.only or any(s in n for s in args.only))]
    for n in missing:
        bad.append(n)
        print(f"{n:<{width}}  {'missing':>11}  no    (recorded, not run now)")
    print(
        f"{len(cases)} cases run in {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} s CPU): {n_ident} bit-identical, "
        f"{len(bad)} failing (> {TOL:g} relative, raised or missing)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
