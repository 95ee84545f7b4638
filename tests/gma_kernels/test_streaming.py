"""Accumulator: folding clients one at a time (or in groups), merging, finalizing; equal to the
batch API and to the float64 reference, with the identical unweighted mask on both backends."""
from __future__ import annotations

import pytest
import torch

import gma_kernels as gk
import reference as ref
from gk_util import (BACKENDS, DEVICE, PARAM_DTYPES, assert_close, assert_no_weighted_ties,
                     data_scale, gen, layout, make, tie_columns)
from gma_kernels.config import MaskConfig


def _fold_one_by_one(updates, w, backend, weighted=False, n=None):
    acc = gk.Accumulator(n or updates[0].numel(), device=DEVICE, weighted_agreement=weighted,
                         backend=backend)
    for k, u in enumerate(updates):
        out = acc.add(u, None if w is None else [w[k]])
        assert out is acc
    return acc


@pytest.mark.parametrize("backend", BACKENDS)
@PARAM_DTYPES
@pytest.mark.parametrize("mask", ["soft", "hard"])
def test_one_by_one_equals_batch_and_reference(backend, dtype, mask):
    updates, exact, w = make(1 + (mask == "hard"), 6, 3001, dtype, "strided_list")
    acc = _fold_one_by_one(updates, w, backend)
    assert acc.num_clients == 6 and acc.weight_sum == pytest.approx(sum(w))
    for rescale in (False, True):
        g = acc.masked_mean(tau=0.5, mask=mask, rescale=rescale)
        expected = ref.masked_mean(exact, w, tau=0.5, mask=mask, rescale=rescale)
        scale = data_scale(exact) / (ref.density(exact, w, tau=0.5, mask=mask) if rescale else 1)
        assert_close(g, expected, scale=scale)
        batch = gk.masked_mean(updates, w, tau=0.5, mask=mask, rescale=rescale, backend=backend)
        assert_close(g, batch.cpu().double(), scale=scale)
        if mask == "hard":
            assert torch.equal(g != 0, batch != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_mask_is_the_reference_mask_exactly(backend):
    """The unweighted mask from the sums: kept exactly where count / K ≥ τ (ties included)."""
    for k, tau in ((10, 0.4), (4, 0.5), (10, 0.8), (7, 3 / 7)):
        values = tie_columns(k, gen(k))
        updates, exact = layout(values, torch.float32, "list")
        acc = _fold_one_by_one(updates, None, backend)
        for kind in ("soft", "hard"):
            mean, m, stats = acc.finalize(MaskConfig(tau, kind))
            expected = ref.mask(exact, tau=tau, mask=kind)
            keep = ref.keep(exact, tau=tau)
            assert torch.equal(m.cpu()[keep], torch.ones(int(keep.sum())))
            if kind == "hard":
                assert torch.equal(m.cpu().double(), expected)
            else:
                assert_close(m, expected, scale=1.0, rtol=1e-6, atol=0)
            assert float(stats.density) == pytest.approx(float(expected.mean()), rel=1e-6)
            assert float(stats.mean_agreement) == pytest.approx(ref.mean_agreement(exact),
                                                                rel=1e-6)
            assert_close(mean, ref.average(exact), scale=data_scale(exact))


def test_identical_unweighted_masks_across_backends_and_batch():
    updates, exact, w = make(3, 12, 2049, torch.bfloat16, "list")
    masks = []
    for backend in BACKENDS:
        acc = _fold_one_by_one(updates, w, backend)
        masks.append(acc.finalize(MaskConfig(0.5, "soft"))[1])
        # the batch API's hard mask has the same support
        batch = gk.masked_mean(updates, w, tau=0.5, mask="hard", backend=backend)
        hard = acc.finalize(MaskConfig(0.5, "hard"))[1]
        avg = gk.masked_mean(updates, w, tau=0.0, backend=backend)
        nz = avg != 0
        assert torch.equal((batch != 0)[nz], (hard == 1)[nz])
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(acc.count, _fold_one_by_one(updates, w, "torch").count)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_and_layouts_fold_the_same(backend):
    updates, exact, w = make(4, 7, 1025, torch.float16, "matrix")
    one = _fold_one_by_one(list(updates), w, backend)
    grouped = gk.Accumulator(1025, device=DEVICE, backend=backend)
    grouped.add(updates[:3], w[:3]).add(list(updates[3:6]), torch.tensor(w[3:6])).add(updates[6],
                                                                                    [w[6]])
    assert torch.equal(one.count, grouped.count)
    assert_close(grouped.total, one.total.cpu().double(), scale=float(one.total.abs().max()))
    assert grouped.num_clients == 7 and grouped.weight_sum == pytest.approx(sum(w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["count", "wagree"])
def test_merged_equals_single(backend, weighted):
    updates, exact, w = make(5 + weighted, 9, 2000, kind="list")
    single = _fold_one_by_one(updates, w, backend, weighted)
    a = _fold_one_by_one(updates[:4], w[:4], backend, weighted)
    b = _fold_one_by_one(updates[4:], w[4:], backend, weighted)
    c = gk.Accumulator(2000, device=DEVICE, weighted_agreement=weighted, backend=backend)
    assert a.merge(b) is a
    c += a
    for merged in (a, c):
        assert merged.num_clients == 9
        if not weighted:
            assert torch.equal(merged.count, single.count)
        assert_close(merged.buffer, single.buffer.cpu().double(),
                     scale=float(single.buffer.abs().max()))
    tau = 0.4137
    if weighted:
        assert_no_weighted_ties(exact, w, tau)
    g = a.masked_mean(tau=tau, mask="hard")
    assert_close(g, ref.masked_mean(exact, w, tau=tau, mask="hard", weighted_agreement=weighted),
                 scale=data_scale(exact))
    assert torch.equal(g != 0, single.masked_mean(tau=tau, mask="hard") != 0)


def test_merge_is_one_buffer_addition():
    """Distributed aggregation is one all_reduce(SUM) of ``buffer``: adding buffers suffices."""
    updates, exact, w = make(7, 5, 800, kind="list")
    parts = [_fold_one_by_one(updates[i:i + 2], w[i:i + 2], "torch") for i in (0, 2, 4)]
    total = gk.Accumulator(800)
    total.buffer.copy_(sum(p.buffer for p in parts))
    assert total.num_clients == 5
    assert_close(total.masked_mean(tau=0.5), ref.masked_mean(exact, w, tau=0.5),
                 scale=data_scale(exact))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_agreement_accumulator(backend):
    updates, exact, w = make(8, 5, 1500, torch.bfloat16, "list")
    assert_no_weighted_ties(exact, w, 0.6)
    acc = _fold_one_by_one(updates, w, backend, weighted=True)
    mean, m, stats = acc.finalize(MaskConfig(0.6, "soft", weighted_agreement=True))
    assert_close(m, ref.mask(exact, w, tau=0.6, mask="soft", weighted=True), scale=1.0)
    assert float(stats.mean_agreement) == pytest.approx(ref.mean_agreement(exact, w, weighted=True),
                                                        rel=1e-5)
    with pytest.raises(ValueError, match="weighted_agreement"):
        acc.finalize(MaskConfig(0.6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_raise_leaves_accumulator_unchanged(backend):
    updates, _, w = make(9, 4, 1000, kind="list")
    acc = _fold_one_by_one(updates[:2], w[:2], backend)
    before = acc.buffer.clone()
    bad = updates[2].clone()
    bad[999] = float("nan")
    with pytest.raises(ValueError, match="#2"):
        acc.add(bad, [w[2]])
    assert torch.equal(acc.buffer, before)
    bad[999] = float("inf")
    with pytest.raises(ValueError, match="#3"):  # the second of this add: the stream's 4th
        acc.add([updates[2], bad], [1.0, 0.0])  # zero weight does not excuse an inf
    assert torch.equal(acc.buffer, before)
    acc.add(updates[2], [w[2]])
    assert acc.num_clients == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_drop(backend):
    updates, exact, w = make(10, 5, 1000, kind="list")
    updates[1][0] = float("inf")
    updates[3][500] = float("nan")
    acc = gk.Accumulator(1000, device=DEVICE, backend=backend, nonfinite="drop")
    for k, u in enumerate(updates):
        acc.add(u, [w[k]])
    assert acc.dropped == [1, 3] and acc.num_clients == 3
    keep = [0, 2, 4]
    rest = _fold_one_by_one([updates[k] for k in keep], [w[k] for k in keep], backend)
    assert torch.equal(acc.buffer, rest.buffer)
    _, _, stats = acc.finalize(MaskConfig())
    assert stats.dropped == (1, 3) and stats.num_clients == 3
    assert_close(acc.masked_mean(), ref.masked_mean(exact[keep], [w[k] for k in keep]),
                 scale=data_scale(exact[keep]))


def test_finalize_returns_fresh_buffers():
    updates, _, _ = make(11, 3, 100, kind="list")
    acc = _fold_one_by_one(updates, None, "torch")
    before = acc.buffer.clone()
    mean, m, _ = acc.finalize(MaskConfig(0.5, rescale=True))
    mean.fill_(7.0)
    m.fill_(7.0)
    acc.masked_mean(tau=0.1)
    assert torch.equal(acc.buffer, before)


def test_empty_accumulator_refuses_to_finalize():
    with pytest.raises(ValueError, match="no client"):
        gk.Accumulator(10).masked_mean()


def test_zero_weight_update_folds_like_the_batch_api():
    """A zero-weight client still counts in the (unweighted) agreement, in a fold as in a batch."""
    g = torch.Generator().manual_seed(11)
    updates = torch.randn(3, 257, generator=g)
    acc = gk.Accumulator(257)
    for u, p in zip(updates, (2.0, 0.0, 5.0)):
        acc.add(u, p)
    expect = gk.masked_mean(updates, [2.0, 0.0, 5.0], backend="torch")
    assert torch.allclose(acc.masked_mean(), expect, rtol=1e-5, atol=1e-6)


def test_zero_total_weight_is_refused_at_finalize():
    acc = gk.Accumulator(5).add(torch.ones(5), 0.0)
    with pytest.raises(ValueError, match="sum to zero"):
        acc.masked_mean()


def test_rescale_overflow_raises_in_streaming_like_the_batch_api():
    u = torch.full((2, 4), 3e38)
    u[:, 1:] *= -1
    u[1, 1:] *= -1  # coordinates 1..3 disagree: the hard mask keeps only coordinate 0
    acc = gk.Accumulator(4).add(u)
    with pytest.raises(gk.NonFiniteError, match="overflow"):
        acc.masked_mean(tau=1.0, mask="hard", rescale=True)
