"""Client updates validated once (``batch.py``): the forms weights may take, the layouts kept as
views or copied, the normalized weights and a subset's renormalization."""
from __future__ import annotations

import math

import torch

import gma_kernels as gk
from gma_kernels.batch import check_params, make_batch

from gk_util import DEVICE, make


def test_weight_forms_are_equivalent():
    updates, exact, w = make(30, 4, 777)
    as_list = gk.masked_mean(updates, w, backend="torch")
    for form in (tuple(w), torch.tensor(w), torch.tensor(w, dtype=torch.int64),
                 [int(x) for x in w], torch.tensor(w, device=DEVICE)):
        assert torch.equal(gk.masked_mean(updates, form, backend="torch"), as_list)
    # scaling every weight by a power of two changes nothing
    assert torch.equal(gk.masked_mean(updates, [4 * x for x in w], backend="torch"), as_list)


def test_unit_stride_layouts_are_read_where_they_lie():
    """A ``[K, N]`` tensor with unit stride along N (a column slice) stays a view, as do
    unit-stride rows of a list; a transposed matrix or a strided row is made contiguous."""
    wide = torch.randn(3, 20)
    sliced = wide[:, 2:12]
    batch = make_batch(sliced, None)
    assert batch.matrix.data_ptr() == sliced.data_ptr() and batch.numel == 10
    rows = [torch.randn(10) for _ in range(3)]
    assert [r.data_ptr() for r in make_batch(rows, None).rows] == [r.data_ptr() for r in rows]
    transposed = make_batch(torch.randn(10, 3).t(), None).matrix
    assert transposed.stride(1) == 1
    strided = make_batch([wide[0, ::2], wide[1, ::2]], None).rows
    assert all(r.stride(0) == 1 for r in strided)
    assert torch.equal(strided[0], wide[0, ::2])


def test_mean_weights_and_a_subset_renormalize():
    """``p̄_k = p_k / Σ p`` with an exact sum; a subset's weights renormalize among its
    clients; a zero sum is refused unless the batch is a streaming fold's."""
    updates = torch.randn(4, 6)
    batch = make_batch(updates, [1.0, 2.0, 3.0, 4.0])
    assert batch.mean_weights == (0.1, 0.2, 0.3, 0.4)
    assert math.fsum(batch.mean_weights) == 1.0
    sub = batch.subset([1, 3])
    assert sub.num_clients == 2 and sub.weights == (2.0, 4.0)
    assert sub.mean_weights == (2 / 6, 4 / 6)
    assert torch.equal(sub.rows[1], updates[3])
    assert make_batch(updates, [0.0] * 4, allow_zero_sum=True).weights == (0.0,) * 4


def test_params_are_checked_against_the_batch():
    batch = make_batch(torch.randn(2, 5, device=DEVICE), None)
    check_params(torch.zeros(5, device=DEVICE), batch)
    for bad, message in ((torch.zeros(4, device=DEVICE), "5 elements"),
                         (torch.zeros(5, dtype=torch.float64, device=DEVICE), "float32"),
                         (torch.zeros(10, device=DEVICE)[::2], "contiguous")):
        try:
            check_params(bad, batch)
        except ValueError as err:
            assert message in str(err)
        else:
            raise AssertionError(f"{bad} was accepted")
