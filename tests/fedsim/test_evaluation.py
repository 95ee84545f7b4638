"""Evaluating a global model (``fedsim.evaluation``): accuracy and mean cross-entropy by hand,
across evaluation batches; color reliance of a model that reads the color and of one that reads
the shape."""
import math

import pytest
import torch
from torch import nn

from fedsim.data import load_federated
from fedsim.data.coloring import swap_colors
from fedsim.evaluation import EVAL_BATCH, color_reliance, evaluate


class ReadsGreen(nn.Module):
    def forward(self, x):
        score = x[:, 1].sum((1, 2)) - x[:, 0].sum((1, 2))
        return torch.stack([-score, score], 1)


class ReadsShape(nn.Module):
    """Looks at the stroke only (red + green), whatever its color."""
    def __init__(self):
        super().__init__()
        self.w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        score = ((x[:, 0] + x[:, 1]) * self.w).sum((1, 2))
        return torch.stack([-score, score], 1)


def test_color_reliance_of_a_color_reader_and_a_shape_reader():
    x = load_federated("colored-digits", seed=0).test[0]
    assert torch.equal(swap_colors(swap_colors(x)), x)
    assert color_reliance(ReadsGreen(), x) == 1.0
    assert color_reliance(ReadsShape(), x) == 0.0


def test_color_reliance_swaps_the_two_channels():
    x = torch.rand(6, 2, 3, 3)
    assert torch.equal(swap_colors(x), x[:, [1, 0]])
    x = torch.cat([torch.rand(6, 1, 3, 3), torch.zeros(6, 1, 3, 3)], 1)
    assert color_reliance(_Lambda(lambda z: z.flatten(2).sum(2)), x) == 1.0  # reads the color
    assert color_reliance(_Lambda(lambda z: z.sum(1).flatten(1)[:, :2]), x) == 0.0  # the shape


class _Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _Fixed(nn.Module):
    """Logits read from a table, one row per example (the example's first feature is its row)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_evaluate_is_accuracy_and_mean_cross_entropy_by_hand():
    """More examples than one evaluation batch, so the sums run across batches."""
    n = EVAL_BATCH + 5
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 3, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.arange(n, dtype=torch.float32)[:, None]
    accuracy, loss = evaluate(_Fixed(logits), x, y)
    rows = logits.double().tolist()
    right = sum(max(range(3), key=row.__getitem__) == int(label) for row, label in zip(rows, y))
    nll = sum(math.log(sum(math.exp(v) for v in row)) - row[int(label)]
              for row, label in zip(rows, y))
    assert accuracy == right / n
    assert 0 < accuracy < 1
    assert loss == pytest.approx(nll / n, rel=1e-5)

