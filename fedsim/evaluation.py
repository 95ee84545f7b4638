"""Evaluation of a global model: accuracy and loss on a labelled set, and color reliance."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.coloring import swap_colors

EVAL_BATCH = 1024


@torch.inference_mode()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``(x, y)``, in batches of ``EVAL_BATCH``."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    loss = torch.zeros((), device=x.device)
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return correct.item() / len(y), loss.item() / len(y)


@torch.inference_mode()
def color_reliance(model: nn.Module, x: Tensor) -> float:
    """The fraction of binary-colored images ``x`` whose predicted class changes when only
    their color is swapped (red and green exchanged): 0 for a model that reads the digit alone,
    1 for one that reads the color alone."""
    model.eval()
    changed = torch.zeros((), dtype=torch.long, device=x.device)
    for xb in x.split(EVAL_BATCH):
        changed += (model(xb).argmax(1) != model(swap_colors(xb)).argmax(1)).sum()
    return changed.item() / len(x)
