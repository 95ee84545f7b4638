"""The PyTorch-ops backend (``backends/torch_ops.py``): ``backend="torch"`` on CPU tensors on
both of its paths, the PyTorch chunks (``torch_ops``) and the native C kernel it hands the
pass to when built, each against the float64 reference; and the chunking itself (chunks and
mask blocks that do not divide N, the mask kept apart for the step)."""
from __future__ import annotations

import pytest
import torch

import gma_kernels as gk
from gma_kernels.backends import torch_ops
from gma_kernels.batch import make_batch

import reference as ref
from gk_util import CPU_PATHS, PARAM_DTYPES, assert_close, data_scale, make


@pytest.mark.parametrize("path", CPU_PATHS, indirect=True)
@PARAM_DTYPES
@pytest.mark.parametrize("kind", ["matrix", "list", "rowslice"])
@pytest.mark.parametrize("k,n", [(1, 2), (3, 513), (4, 1000), (9, 4099), (19, 70001)])
@pytest.mark.parametrize("mask,weighted", [("soft", False), ("hard", False), ("soft", True)])
def test_masked_mean_and_agreement(path, dtype, kind, k, n, mask, weighted, many_threads):
    if k == 1 and kind == "rowslice":
        kind = "list"  # one row of a wider tensor is contiguous: nothing to slice
    updates, exact, w = make(k * 1000 + n, k, n, dtype, kind, device="cpu")
    g, stats = gk.masked_mean(updates, w, tau=0.5, mask=mask, weighted_agreement=weighted,
                              backend="torch", return_stats=True)
    expected = ref.masked_mean(exact, w, tau=0.5, mask=mask, weighted_agreement=weighted)
    near = torch.zeros(n, dtype=torch.bool)
    if weighted:  # a weighted score within rounding of τ may fall either side
        near = (ref.agreement(exact, w, weighted=True) - 0.5).abs() < 1e-5
    g, expected = g[~near], expected[~near]
    assert_close(g, expected, scale=data_scale(exact))
    a = gk.agreement(updates, w, weighted=weighted, backend="torch")
    assert_close(a, ref.agreement(exact, w, weighted=weighted), scale=1.0)
    dens = ref.density(exact, w, tau=0.5, mask=mask, weighted=weighted)
    assert float(stats.density) == pytest.approx(dens, abs=1e-6 + float(near.sum()) / n)
    assert float(stats.mean_agreement) == pytest.approx(
        ref.mean_agreement(exact, w, weighted=weighted), abs=1e-5)


@pytest.mark.parametrize("path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_far_column_raises_with_params_untouched(path, bad, many_threads):
    updates, _, w = make(3, 4, 5000, torch.float32, "list", device="cpu")
    updates[2][4990] = bad  # in the last thread's range
    params = torch.randn(5000)
    before = params.clone()
    with pytest.raises(ValueError, match=r"updates\[2\]"):
        gk.gma_step(params, updates, w, backend="torch")
    assert torch.equal(params, before)
    gk.gma_step(params, updates, w, backend="torch", nonfinite="drop")
    assert torch.isfinite(params).all() and not torch.equal(params, before)


@pytest.mark.parametrize("path", CPU_PATHS, indirect=True)
@PARAM_DTYPES
@pytest.mark.parametrize("weighted", [False, True])
def test_streaming_fold(path, dtype, weighted, many_threads):
    """Folding a stream in three uneven parts gives the batch reference's sums."""
    updates, exact, w = make(21, 9, 3001, dtype, "list", device="cpu")
    acc = gk.Accumulator(3001, weighted_agreement=weighted, backend="torch")
    acc.add(updates[0], w[0])
    acc.add(updates[1:5], w[1:5])
    acc.add(updates[5:], w[5:])
    p = torch.tensor(w, dtype=torch.float64)
    assert_close(acc.total, p @ exact, scale=data_scale(exact) * float(p.sum()))
    signs = torch.sign(exact)
    expected_count = p @ signs if weighted else signs.sum(0)
    assert_close(acc.count, expected_count, scale=float(p.sum()) if weighted else 1.0)
    if not weighted:  # an exact integer count
        assert torch.equal(acc.count.double(), expected_count)
    assert acc.num_clients == 9 and acc.weight_sum == pytest.approx(float(p.sum()))


@pytest.mark.parametrize("path", ["torch_ops"], indirect=True)
@pytest.mark.parametrize("kind", ["matrix", "list"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_chunks_and_mask_blocks_that_do_not_divide_n(path, kind, placement, monkeypatch):
    """Chunks of 4096 columns inside mask blocks of 10000 over N = 23457 (neither divides N,
    nor the chunk the block): the same masked mean as one chunk and one block, bit for bit,
    and the same Adam step with the mask before the step or kept apart (after)."""
    updates, exact, w = make(8, 6, 23457, torch.bfloat16, kind, device="cpu")

    def results():
        params = torch.linspace(-1, 1, 23457)
        opt = gk.ServerOptimizer(params, "adam", lr=0.1, mask_placement=placement,
                                 backend="torch")
        opt.step(updates, w)
        return gk.masked_mean(updates, w, backend="torch"), params, *opt.states

    whole = results()
    monkeypatch.setattr(torch_ops, "CPU_CHUNK_BYTES", 4 * 6 * 4096)
    monkeypatch.setattr(torch_ops, "MASK_BLOCK", 10000)
    assert torch_ops.chunk_length(make_batch(updates, w)) == 4096
    for split, one in zip(results(), whole):
        assert torch.equal(split, one)
    assert_close(whole[0], ref.masked_mean(exact, w), scale=data_scale(exact))
