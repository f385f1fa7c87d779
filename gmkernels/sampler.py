"""Few-step GM sampling (docs/solvers.md): ``gmkernels.sample``, a loop over the scheduler objects of
``gmkernels.schedulers``.

CUDA graphs: the loop never synchronises the host. The ops get the sigmas of the fixed schedule
as Python floats (so no value check reads the device); the fused GM-ODE kernel reads them from a
device table built with ``torch.arange``; the timesteps handed to the network come from a device
tensor; GM-SDE seeds are drawn with ``torch.randint`` on the generator's device (pass a CUDA
generator, or None for the default one); nothing calls ``.item()`` and no Python branch reads a
tensor value (``tests/test_sampler.py`` runs every solver on the meta device, where any such
read raises). A whole call can therefore be captured once and replayed with new noise::

    static_noise = torch.randn(B, C, H, W, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)        # or None: the default CUDA generator
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                           # warm up: compile the Triton kernels
        gmkernels.sample(model, static_noise, 8, solver="gm-ode", substeps=4, generator=gen)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)                  # custom generators only
    with torch.cuda.graph(graph):
        static_out = gmkernels.sample(model, static_noise, 8, solver="gm-ode", substeps=4, generator=gen)
    static_noise.copy_(torch.randn_like(static_noise)); graph.replay()   # static_out is refreshed

The model itself must be capturable (static shapes, no host synchronisation), and
``progress=True`` only updates a host-side bar (it is updated at capture time, not at replay).
"""

from __future__ import annotations

from ._validate import check_float_tensor, check_generator
from .schedulers import SCHEDULERS


def sample(
    denoiser,
    noise,
    num_steps,
    *,
    solver="gm-sde",
    substeps=1,
    order=1,
    shift=1.0,
    guidance="probabilistic",
    guidance_scale=0.0,
    orthogonal=1.0,
    generator=None,
    progress=False,
):
    """Sample with a GMFlow model in ``num_steps`` network calls (docs/solvers.md).

    Args:
        denoiser: ``denoiser(x_t, t) -> gm_u``: ``x_t (*B, C, H, W)``, ``t`` a float32 tensor of
            shape ``(*B,)`` (``(B,)`` for 4-D noise) of timesteps in (0, 1000]; returns the u-GM
            ``{means (*B, K, C, H, W), logstds (*B, 1, 1, 1, 1), logweights (*B, K, 1, H, W)}``,
            or the pair ``(gm_cond, gm_uncond)`` when ``guidance_scale > 0``. Called exactly
            ``num_steps`` times.
        noise: ``(*B, C, H, W)`` standard normal start state (sigma = 1); its dtype is the
            state's (a bf16/fp16 GM enters ``x0 = x_t - sigma * u`` in fp32: on the Triton path
            each step is one fused kernel that reads the network's GM in its own dtype and forms
            no x0-GM, see ``gmkernels.ops.solver.fused_step``).
        num_steps: main steps = network calls.
        solver: ``"gm-sde"`` (exact GM transition draws), ``"gm-ode"`` (``substeps`` Euler
            substeps per call on the GM's posterior mean) or ``"euler"`` (flow-matching baseline).
        substeps: GM-ODE substeps per main step (1 for the other solvers).
        order: 1, or 2 for the GM solvers (the 2nd-order rule of docs/solvers.md#2nd-order; the first step is first order).
        shift: time shift of the schedule ``sigma = shift * s / (1 + (shift - 1) * s)``.
        guidance: ``"probabilistic"`` (scale in [0, 1), with ``orthogonal``), ``"weight"`` or
            ``"mean-cfg"`` (CFG scales; mean-CFG is orthogonalised when ``orthogonal > 0``, so pass
            ``orthogonal=0`` for plain CFG).
        guidance_scale: 0 disables guidance (a pair returned anyway is reduced to its first GM).
        generator: ``torch.Generator`` on the noise's device for GM-SDE draws (same seed, same
            samples on one backend).
        progress: show a tqdm progress bar (tqdm is imported only then).
    Returns:
        ``(*B, C, H, W)`` samples (the state at sigma = 0), dtype of ``noise``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
    check_float_tensor(noise, "noise")
    if noise.dim() < 3:
        raise ValueError(f"noise must have shape (*B, C, H, W), got {tuple(noise.shape)}")
    if solver not in SCHEDULERS:
        raise ValueError(f"solver must be one of {tuple(SCHEDULERS)}, got {solver!r}")
    check_generator(generator)  # before the first network call
    sched = SCHEDULERS[solver](
        shift=shift, order=order, guidance=guidance, guidance_scale=guidance_scale, orthogonal=orthogonal
    )
    sched.set_timesteps(num_steps, substeps, device=noise.device)
    batch = noise.shape[:-3]
    steps = range(num_steps)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as e:
            raise ImportError("progress=True needs tqdm (pip install tqdm)") from e
        steps = tqdm(steps, desc=f"gmkernels.sample ({solver})", total=num_steps)
    x = noise
    for i in steps:
        t = sched.timesteps[i]
        out = denoiser(x, t.expand(batch).contiguous())
        x = sched.step(out, t, x, generator=generator)
    return x
