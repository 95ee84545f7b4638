"""The IRM protocol (Arjovsky et al. 2019, "Invariant Risk Minimization") on Fashion-MNIST.

Images downsampled 28 → 14 (``x[:, ::2, ::2]``); binary label ``class >= 5`` (``binary_labels``),
each flipped with probability 0.25 (``IRM_LABEL_NOISE``); the color is the noisy label
flipped with the environment's probability, and the image is drawn in channel 0 (color 0) or
channel 1 (color 1), the other channel zero: inputs ``[n, 2, 14, 14]``. Each client is one
environment, its flip probabilities evenly spaced over ``color_flip_range`` (two clients:
0.1 and 0.2; ``reversed_color_fraction`` reverses some, as for every binary colored dataset);
the ID test set gives each image a training environment's probability (equal shares), the OOD
test set 0.9. The grayscale oracle (``irm-fashion-mnist-gray``) draws every image in both
channels: the same task with no color to read.
"""
from __future__ import annotations

import numpy as np
import torch

from .coloring import color_binary

#: IRM dataset name -> whether it is the grayscale oracle
IRM_DATASETS: dict[str, bool] = {"irm-fashion-mnist": False, "irm-fashion-mnist-gray": True}
#: the protocol's label noise (the ``label_noise`` setting must stay 0: this replaces it)
IRM_LABEL_NOISE = 0.25


def downsampled(x: torch.Tensor) -> torch.Tensor:
    """``[n, C, H, W]`` images, every second row and column kept (28 × 28 → 14 × 14)."""
    return x[:, :, ::2, ::2].contiguous()


def irm_coloring(gray: bool):
    """The protocol's coloring ``(x, y, flip_prob, rng) -> [n, 2, H, W]``: ``color_binary``'s
    red and green channels, or (``gray``) the grayscale image in both."""
    if gray:
        return lambda x, y, flip_prob, rng: torch.cat([x, x], dim=1)
    return lambda x, y, flip_prob, rng: color_binary(x, y, flip_prob, rng)[:, :2]


def environment_probs(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Each of ``n`` examples' flip probability: ``probs[k]`` for the k-th of ``len(probs)``
    equal shares of a random order (the ID test set: the training environments mixed)."""
    return np.asarray(probs)[rng.permutation(n) % len(probs)]
