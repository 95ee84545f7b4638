"""The task: a tiny MLP on non-IID synthetic data (class-conditional Gaussians, no download).

Partition p of P draws 80% of its examples from class ``p % NUM_CLASSES`` and the rest from
every class, so the clients' updates disagree: the case gradient masked averaging is for.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

NUM_CLASSES, FEATURES = 4, 20


def make_model() -> nn.Module:
    """The MLP, with the same initial weights on every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def load_data(partition_id: int, n: int = 256, *, test: bool = False) -> tuple[Tensor, Tensor]:
    """``n`` examples ``(x, y)`` of a partition (its test split with ``test``); a negative
    ``partition_id`` draws every class alike (the server's balanced test set)."""
    g = torch.Generator().manual_seed(1000 + partition_id + (100_000 if test else 0))
    centers = torch.randn(NUM_CLASSES, FEATURES, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    if partition_id >= 0:
        own = torch.rand(n, generator=g) < 0.8
        y = torch.where(own, torch.full((n,), partition_id % NUM_CLASSES), y)
    return centers[y] + 0.8 * torch.randn(n, FEATURES, generator=g), y


def train(model: nn.Module, data: tuple[Tensor, Tensor], *, epochs: int, lr: float,
          batch_size: int) -> float:
    """Local SGD; returns the last batch's loss."""
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(epochs):
        for i in range(0, len(x), batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size])
            loss.backward()
            opt.step()
    return loss.item()


def test(model: nn.Module, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """``(loss, accuracy)`` of the model on ``data``."""
    x, y = data
    with torch.no_grad():
        logits = model(x)
    return (float(nn.functional.cross_entropy(logits, y)),
            float((logits.argmax(1) == y).float().mean()))
