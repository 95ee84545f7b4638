"""The fused Triton kernel (through Triton's interpreter when there is no GPU): block edges, many
clients, unaligned rows, the per-block guard and its restore, and agreement with the reference
and with the PyTorch backend."""
from __future__ import annotations

import pytest
import torch

import gma_kernels as gk
import reference as ref
from gk_util import (DEVICE, ON_GPU, assert_close, data_scale, gen, layout, make,
                     random_values)


def _both(updates, w, **kw):
    return (gk.masked_mean(updates, w, backend="triton", **kw),
            gk.masked_mean(updates, w, backend="torch", **kw))


@pytest.mark.parametrize("n", [1, 2, 1023, 1024, 1025, 2047, 2048, 2049, 3001, 4097, 5000])
def test_block_edges(n):
    updates, exact, w = make(n, 3, n, kind="list")
    tri, tor = _both(updates, w, tau=0.34, mask="hard")
    expected = ref.masked_mean(exact, w, tau=0.34, mask="hard")
    assert_close(tri, expected, scale=data_scale(exact))
    assert torch.equal(tri != 0, tor != 0)  # the same mask, coordinate by coordinate
    a = gk.agreement(updates, backend="triton")
    assert torch.equal(a, gk.agreement(updates, backend="torch"))
    assert a.shape == (n,)


@pytest.mark.parametrize("k,n", [(300, 1), (300, 7), (129, 33), (64, 1025)],
                         ids=lambda v: str(v))
def test_many_clients(k, n):
    updates, exact, w = make(k + n, k, n, torch.float16, "matrix")
    for mask in ("soft", "hard"):
        tri, stats = gk.masked_mean(updates, w, tau=0.1, mask=mask, backend="triton",
                                    return_stats=True)
        assert_close(tri, ref.masked_mean(exact, w, tau=0.1, mask=mask), scale=data_scale(exact))
        assert float(stats.density) == pytest.approx(ref.density(exact, w, tau=0.1, mask=mask),
                                                     rel=1e-5)


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_unaligned_rows(offset, dtype):
    """Rows that start at odd addresses (not 16-byte aligned) are read correctly."""
    values = random_values(gen(offset), 4, 1500)
    low = values.to(dtype)
    storage = torch.full((4 * 1500 + offset,), 555.0, dtype=dtype, device=DEVICE)
    rows = [storage[offset + i * 1500: offset + (i + 1) * 1500] for i in range(4)]
    for r, v in zip(rows, low):
        r.copy_(v.to(DEVICE))
    assert rows[0].data_ptr() % 16 != 0
    out = gk.masked_mean(rows, tau=0.5, backend="triton")
    exact = low.double()
    assert_close(out, ref.masked_mean(exact, tau=0.5), scale=data_scale(exact))


def test_rows_in_any_order_of_memory():
    """The row table follows the list, not memory order: a reversed list of views."""
    updates, exact, w = make(5, 6, 1100, kind="row_views")
    rev = updates[::-1]
    out = gk.masked_mean(rev, w[::-1], tau=0.5, mask="hard", backend="triton")
    assert_close(out, ref.masked_mean(exact.flip(0), w[::-1], tau=0.5, mask="hard"),
                 scale=data_scale(exact))


def test_same_tensor_twice():
    updates, exact, _ = make(6, 1, 777, kind="list")
    out = gk.masked_mean([updates[0], updates[0], updates[0]], [1, 2, 3], tau=1.0,
                         backend="triton")
    assert_close(out, exact[0], scale=data_scale(exact))


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "yogi", "adagrad"])
@pytest.mark.parametrize("where", [0, 1500, 3000], ids=["first-block", "mid-block", "last-block"])
def test_guard_restores_every_block(kind, where):
    """A NaN in one block: the blocks that were already stepped are restored bit for bit."""
    n = 3001
    params = torch.randn(n, generator=gen(1)).to(DEVICE)
    opt = gk.ServerOptimizer(params, kind, lr=0.3, tau=0.3, backend="triton")
    good, _, w = make(2, 4, n, kind="list")
    opt.step(good, w)  # non-zero state
    before = [params.clone()] + [s.clone() for s in opt.states]
    bad, _, _ = make(3, 4, n, kind="list")
    bad[2][where] = float("nan")
    with pytest.raises(ValueError, match=r"updates\[2\]"):
        opt.step(bad, w)
    for t, b in zip([params, *opt.states], before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("where", [0, 1500, 3000], ids=["first-block", "mid-block", "last-block"])
def test_step_from_sums_restores_every_block(kind, where):
    """``step_accumulated`` launches the kernel on the accumulator's sums; a step that
    overflows in one block (w + g past float32, or Adam's g²) restores every block it had
    written: params and state end bit for bit as they were."""
    n = 3001
    params = torch.randn(n, generator=gen(2)).to(DEVICE)
    opt = gk.ServerOptimizer(params, kind, lr=1.0, tau=0.3, backend="triton")
    good, _, _ = make(4, 2, n, kind="list")

    def step(updates):
        acc = gk.Accumulator(n, device=DEVICE, backend="triton").add(updates, [1.0, 1.0])
        return opt.step_accumulated(acc)

    step(good)  # non-zero state
    bad = [u.clone() for u in good]
    for u in bad:
        u[where] = 1e20 if kind == "adam" else 1e38  # S = 2e38 stays finite
    if kind != "adam":
        params[where] = 3e38  # w + 1e38 overflows
    before = [params.clone()] + [s.clone() for s in opt.states]
    with pytest.raises(gk.NonFiniteError, match="left unchanged"):
        step(bad)
    for t, b in zip([params, *opt.states], before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "yogi", "adagrad"])
@pytest.mark.parametrize("placement", ["before", "after"])
@pytest.mark.parametrize("mask,weighted", [("soft", False), ("hard", False), ("soft", True)])
def test_from_sums_kernel_equals_the_aggregate_kernel(kind, placement, mask, weighted):
    """The step from an accumulator's sums (``_from_sums_kernel``) and the step from the
    updates (``_aggregate_kernel``) share the mask and the step: on updates whose mean is exact
    in float32 either way (dyadic values, four equal weights: ``S/4`` and ``Σ S_k/4`` are the
    same number), params and state are bit-identical after three steps."""
    n = 2500
    rounds = [(torch.randint(-8, 9, (4, n), generator=gen(r)) / 16).to(DEVICE) for r in range(3)]
    results = []
    for source in ("updates", "sums"):
        params = torch.linspace(-1, 1, n, device=DEVICE)
        opt = gk.ServerOptimizer(params, kind, lr=0.3, tau=0.5, mask=mask,
                                 weighted_agreement=weighted, mask_placement=placement,
                                 backend="triton")
        for updates in rounds:
            if source == "updates":
                opt.step(updates)
            else:
                opt.step_accumulated(gk.Accumulator(n, device=DEVICE, backend="triton",
                                                    weighted_agreement=weighted).add(updates))
        results.append((params, *opt.states))
    for from_updates, from_sums in zip(*results):
        assert torch.equal(from_updates, from_sums)


def test_step_from_an_overflowed_sum_names_the_sum():
    """Sums that overflowed float32 in the accumulator refuse the step from them, say that
    the sum overflowed (not the step) and leave params as they were."""
    n = 3001
    params = torch.randn(n, generator=gen(5)).to(DEVICE)
    opt = gk.ServerOptimizer(params, "sgd", lr=1.0, tau=0.3, backend="triton")
    updates = torch.randn(2, n, generator=gen(6)).to(DEVICE)
    updates[:, 2000] = 3e38  # S = 6e38
    acc = gk.Accumulator(n, device=DEVICE, backend="triton").add(updates, [1.0, 1.0])
    before = params.clone()
    with pytest.raises(gk.NonFiniteError, match="sum overflowed.*left unchanged"):
        opt.step_accumulated(acc)
    assert torch.equal(params, before)


@pytest.mark.parametrize("block,warps,unroll", [(256, 2, 1), (2048, 8, 1), (1024, 4, 4)])
def test_other_block_sizes(monkeypatch, block, warps, unroll):
    """The kernel is correct for any BLOCK the launcher may pick (tuning must not break it)."""
    from gma_kernels.backends import triton_kernel as _triton
    if hasattr(_triton, "LAUNCH"):  # the tuned launch parameters
        monkeypatch.setitem(_triton.LAUNCH, "BLOCK", block)
        monkeypatch.setitem(_triton.LAUNCH, "num_warps", warps)
        if "UNROLL" in _triton.LAUNCH:  # K = 3 is not a multiple of the unrolling
            monkeypatch.setitem(_triton.LAUNCH, "UNROLL", unroll)
    else:
        monkeypatch.setattr(_triton, "launch_config", lambda numel: (block, warps))
    updates, exact, w = make(block, 3, 3001, torch.bfloat16, "list")
    params = torch.full((3001,), 0.5, device=DEVICE)
    _, stats = gk.gma_step(params, updates, w, lr=0.5, tau=1.0, mask="hard", backend="triton",
                           return_stats=True)
    g = ref.masked_mean(exact, w, tau=1.0, mask="hard")
    assert_close(params, 0.5 + 0.5 * g, scale=1.0)
    assert float(stats.density) == pytest.approx(ref.density(exact, w, tau=1.0, mask="hard"),
                                                 rel=1e-6)
    acc = gk.Accumulator(3001, device=DEVICE, backend="triton").add(updates, w)
    assert_close(acc.masked_mean(tau=1.0, mask="hard"), g, scale=data_scale(exact))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_number_of_clients_changes_between_calls(k):
    """K is a runtime argument: the same compiled kernel serves every K correctly."""
    updates, exact, w = make(40 + k, k, 999, kind="list")
    out = gk.masked_mean(updates, w, tau=0.6, backend="triton")
    assert_close(out, ref.masked_mean(exact, w, tau=0.6), scale=data_scale(exact))


def test_outputs_fully_written():
    """masked_mean / agreement return fresh buffers: every element is written (N = 1025 leaves a
    one-element last block)."""
    updates, exact, _ = make(50, 3, 1025, zeros=0.0)
    for _ in range(2):  # a second call may reuse the allocator's memory holding old values
        a = gk.agreement(updates, backend="triton")
        g = gk.masked_mean(updates, tau=0.0, backend="triton")
        assert torch.isfinite(a).all() and torch.isfinite(g).all()
        assert_close(a, ref.agreement(exact), scale=1.0)
        assert_close(g, ref.average(exact), scale=data_scale(exact))


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: compiled kernel on device memory")
def test_cuda_list_of_tensors_in_separate_allocations():
    updates, exact, w = make(60, 16, 1 << 16, torch.bfloat16, "list")
    out = gk.masked_mean(updates, w, tau=0.4, backend="triton")
    assert_close(out, ref.masked_mean(exact, w, tau=0.4), scale=data_scale(exact))


def test_values_are_read_in_their_dtype_not_reinterpreted():
    """fp16/bf16 rows go through a typed pointer: a bf16 row read as fp16 would give garbage."""
    values = torch.tensor([[1.5, -2.25, 3.0, 0.0], [0.5, 2.0, -1.0, 4.0]], dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        updates, exact = layout(values, dtype, "list")
        out = gk.masked_mean(updates, tau=0.0, backend="triton").cpu()
        assert torch.equal(out, torch.tensor([1.0, -0.125, 1.0, 2.0]))


def test_cached_row_tables_follow_weights_and_addresses():
    """The launcher caches its device copy of the row offsets and weights: calls that differ
    only in weights, or in where the rows lie, must each get their own table."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(4, 1500, generator=g)
    for weights in ([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]):
        for rows in (list(values.to(DEVICE)), [v.clone().to(DEVICE) for v in values]):
            got = gk.masked_mean(rows, weights, backend="triton")
            expect = gk.masked_mean(values, weights, backend="torch")
            assert torch.allclose(got.cpu(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["matrix", "list"])
def test_nonfinite_rows_reads_each_row_once(dtype, kind):
    """The screen kernel names exactly the rows with a NaN or an infinity, wherever in the row
    and in whichever block it lies (N over three blocks and a bit), and not the rows that hold
    only the largest finite values, zeros or subnormals; the same rows as ``torch.isfinite``."""
    from gma_kernels.backends import triton_kernel
    from gma_kernels.batch import make_batch
    k, n = 9, 3 * 1024 + 5
    values = torch.randn(k, n, generator=gen(77)).to(dtype)
    info = torch.finfo(dtype)
    values[1, 0] = float("nan")
    values[2, n - 1] = float("inf")
    values[4, 2048] = -float("inf")
    values[5, 1023] = float("nan")
    values[6, ::7] = info.max  # finite extremes, not flagged
    values[7, ::5] = -info.max
    values[3, ::3] = info.tiny / 4  # subnormals
    values[8, 1500] = -float("inf")  # the last row
    updates = values.to(DEVICE) if kind == "matrix" else list(values.to(DEVICE).unbind(0))
    batch = make_batch(updates, None)
    expected = [i for i in range(k) if not bool(torch.isfinite(values[i]).all())]
    assert expected == [1, 2, 4, 5, 8]
    assert triton_kernel.nonfinite_rows(batch) == expected
