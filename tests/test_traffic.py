"""The interpreter's traffic counter (``gmkernels_bench.traffic``): exact bytes, sectors and
statement counts on hand-made kernels, the replay of recorded (meta) launches, and the byte
model of ``gmkernels_bench.cases`` against what the kernels move (``byte_check``)."""

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gmkernels_bench import byte_check, traffic  # noqa: E402

pytestmark = pytest.mark.triton


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, stride, REPEAT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(REPEAT):
        acc += tl.load(x_ptr + offs * stride, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc, mask=mask)


def _run(n, stride, repeat=1, block=16, lines=False):
    x = torch.arange(64 * 16, dtype=torch.float32)
    y = torch.zeros(16)
    with traffic.count_traffic(lines=lines) as launches:
        _copy_kernel[(1,)](x, y, n, stride, REPEAT=repeat, BLOCK=block)
    (t,) = launches
    return t, x, y


def test_contiguous_masked_load_counts_live_lanes_and_sectors():
    t, x, y = _run(n=10, stride=1)
    assert torch.equal(y[:10], x[:10]) and not y[10:].any()  # the kernel still runs
    assert (t.load_requested, t.store_requested) == (40, 40)  # 10 live lanes of 4 bytes, masked ones not counted
    # torch's CPU allocations are 64-byte aligned: 40 bytes from a sector boundary are 2 sectors
    assert (t.load_sectors, t.load_distinct_sectors, t.store_distinct_sectors) == (2, 2, 2)
    assert (t.dram_bytes, t.l2_bytes, t.distinct_bytes) == (128, 128, 80)
    assert t.programs == 1 and t.load_instructions == 1 and t.store_instructions == 1


def test_strided_load_touches_one_sector_per_lane():
    t, _, _ = _run(n=4, stride=8)  # 32 bytes apart
    assert (t.load_requested, t.load_sectors, t.load_distinct_sectors) == (16, 4, 4)
    st = t.storages["x_ptr"]
    assert (st.load_bytes, st.load_sectors, st.storage_sectors) == (16, 4, 64 * 16 * 4 // 32)


def test_repeated_loads_touch_again_but_stay_distinct():
    t, _, _ = _run(n=16, stride=1, repeat=3)
    assert (t.load_requested, t.load_sectors, t.load_distinct_sectors) == (3 * 64, 3 * 2, 2)


def test_statement_counts_follow_the_loop():
    t, _, _ = _run(n=16, stride=1, repeat=5, lines=True)
    per_line = {chain[-1][1]: n for chain, n in t.lines.items()}
    src = _copy_kernel.fn.__code__
    body = next(line for line, n in per_line.items() if n == 5)  # the load statement, once per trip
    assert src.co_firstlineno < body
    assert max(per_line.values()) == 6  # the `for` header: trips + 1


def test_replayed_meta_launches_count_like_the_public_op():
    """A launch recorded on meta tensors and replayed on CPU tensors moves what the public op moves."""
    import gmkernels
    import gmkernels_bench.aot.mixture as mixture

    dims = (2, 3, 3, 5, 7)
    (replayed,) = traffic.launch_cases_traffic(
        mixture.aot_cases, *dims, only=lambda n: n.startswith("gm_to_mean[") and "fp32" in n
    )
    gm = {"means": torch.randn(2, 3, 3, 5, 7), "logstds": torch.zeros(2, 1, 1, 1, 1),
          "logweights": torch.randn(2, 3, 1, 5, 7).log_softmax(1)}  # fmt: skip
    with gmkernels.use_backend("triton"), traffic.count_traffic() as launches:
        gmkernels.gm_to_mean(gm)
    (direct,) = launches
    for attr in (
        "programs",
        "load_requested",
        "store_requested",
        "load_distinct_sectors",
        "store_distinct_sectors",
        "distinct_bytes",
    ):
        assert getattr(replayed, attr) == getattr(direct, attr), attr


def test_materialise_keeps_layout_and_separates_arguments():
    base = torch.empty((4, 6), device="meta", dtype=torch.bfloat16)
    view = base[:, 2:]
    other = torch.empty(3, device="meta", dtype=torch.int64)
    (a, b, c, d), _ = traffic.materialise((base, view, other, base), {})
    assert a.device.type == "cpu"
    assert (b.shape, b.stride(), b.storage_offset(), b.dtype) == (
        view.shape,
        view.stride(),
        view.storage_offset(),
        view.dtype,
    )
    assert ((a.float() > 0.09) & (a.float() < 0.91)).all() and (c >= 1).all()
    # each argument its own storage (the AOT cases pass one meta GM for both GMs of guidance) ...
    assert len({t.untyped_storage().data_ptr() for t in (a, b, d)}) == 3
    # ... unless asked to keep the aliasing
    (a, b, _, d), _ = traffic.materialise((base, view, other, base), {}, alias=True)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == d.untyped_storage().data_ptr()


# the byte model of gmkernels_bench.cases, one case per family, at the three shapes of byte_check
_OPS = (
    "gm_to_iso_gaussian",
    "gm_mul_iso_gaussian",
    "reverse_transition",
    "gm_posterior_mean",
    "gm_nll_loss",
    "gm_sample",
    "weight_guidance",
    "probabilistic_guidance",
    "mean_cfg",
    "gm1d_inverse_cdf",
    "gaussian_samples_to_gm_samples",
)


@pytest.mark.parametrize("dims", byte_check.SHAPES)
def test_byte_model_matches_the_counted_bytes(dims):
    checks = byte_check.op_checks(dims, "fp32", _OPS) + [
        byte_check.train_check(dims, "fp32"),
        byte_check.policy_check(dims, "fp32"),
    ]
    checks += byte_check.step_checks(dims, "fp32", ("none", "probabilistic"))
    assert {c.family for c in checks} >= {"mixture", "product", "transition", "posterior", "likelihood", "sampling", "guidance",
                                          "inverse_cdf", "solver_steps", "policy"}  # fmt: skip
    bad = [byte_check.row(c) for c in checks if abs(c.gap) > byte_check.TOLERANCE and not byte_check.known_gap(c)]
    assert not bad, "\n".join(bad)
    # a listed gap that closed must leave the list (and the note)
    closed = [
        c.case
        for c in checks
        if byte_check.known_gap(c) and abs(c.gap) <= byte_check.TOLERANCE and c.shape == (2, 3, 3, 5, 7)
    ]
    assert not closed, closed


@pytest.mark.parametrize("dims", byte_check.SHAPES[:1])
def test_byte_model_matches_the_counted_bytes_in_bf16(dims):
    checks = byte_check.op_checks(dims, "bf16", ("gm_mul_iso_gaussian", "gm_nll_loss", "gm_sample")) + [
        byte_check.train_check(dims, "bf16")
    ]
    bad = [byte_check.row(c) for c in checks if abs(c.gap) > byte_check.TOLERANCE and not byte_check.known_gap(c)]
    assert not bad, "\n".join(bad)
