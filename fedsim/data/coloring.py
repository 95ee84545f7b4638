"""Color grayscale digits into the spurious-correlation datasets of the FedGMA experiments.

* Binary Colored MNIST (Arjovsky et al. 2019): label = digit >= 5; the digit is drawn red for
  label 0 and green for label 1, the color flipped with some probability (per training client,
  uniform in [0.1, 0.2]; 0.9 in the out-of-distribution test set, which reverses the rule).
* 10-class Colored MNIST (Arpit et al. 2019): each class owns two foreground and two background
  colors; out of distribution, foreground and background come from a separate palette of 10
  colors, independently of the class.

Inputs are grayscale ``[n, 1, H, W]`` in [0, 1]; outputs are RGB ``[n, 3, H, W]``.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
import torch

#: Range of the per-training-client color-flip probability (binary coloring).
CLIENT_FLIP_RANGE: tuple[float, float] = (0.1, 0.2)
#: Flip probability of the in-distribution test set (the training rule).
ID_TEST_FLIP_PROB = 0.15
#: Flip probability of the out-of-distribution test set (the rule reversed).
OOD_FLIP_PROB = 0.9


def check_binary_options(label_noise: float, color_flip_range: tuple[float, float],
                         reversed_color_fraction: float) -> None:
    """The binary coloring's options, one home for the config and the data loader:
    ``label_noise`` and ``reversed_color_fraction`` in [0, 1], ``color_flip_range`` two numbers
    ``(low, high)`` with ``0 <= low <= high <= 1``; else ValueError naming the option."""
    if len(color_flip_range) != 2:
        raise ValueError(f"color_flip_range must be two numbers low,high, got {color_flip_range}")
    low, high = color_flip_range
    for what, value, lowest in (("label_noise", label_noise, 0.0),
                                ("reversed_color_fraction", reversed_color_fraction, 0.0),
                                ("color_flip_range", low, 0.0), ("color_flip_range", high, low)):
        if not math.isfinite(value) or not lowest <= value <= 1.0:
            raise ValueError(f"{what} must be a finite number >= {lowest} and <= 1.0, got {value}")


def _hsv(h: float, s: float, v: float) -> list[float]:
    return list(colorsys.hsv_to_rgb(h % 1.0, s, v))


# Class c owns foreground hues c/20 and (c+10)/20 (bright) and background hues a half step
# further on (dark); the OOD palette uses other hues at a middle brightness.
TRAIN_FOREGROUNDS = torch.tensor([[_hsv(i / 20, 1.0, 1.0) for i in (c, c + 10)] for c in range(10)])
TRAIN_BACKGROUNDS = torch.tensor(
    [[_hsv((i + 0.5) / 20, 0.8, 0.45) for i in (c, c + 10)] for c in range(10)]
)
OOD_PALETTE = torch.tensor([_hsv((i + 0.125) / 10, 0.7, 0.75) for i in range(10)])


def binary_labels(digits: torch.Tensor) -> torch.Tensor:
    """Binary Colored-MNIST label: 1 for digit (class) >= 5, else 0."""
    return (digits >= 5).long()


def client_flip_probs(num_clients: int, rng: np.random.Generator,
                      flip_range: tuple[float, float] = CLIENT_FLIP_RANGE,
                      reversed_fraction: float = 0.0, *, evenly: bool = False) -> np.ndarray:
    """Each training client's color-flip probability ``p``, uniform in ``flip_range`` (or, with
    ``evenly``, client k's ``p`` the k-th of ``num_clients`` evenly spaced points from low to
    high); for the first ``round(reversed_fraction · num_clients)`` clients of a random order it
    is ``1 − p`` (their color rule is reversed: the color's correlation with the label changes
    sign across clients while the digit's does not)."""
    probs = np.linspace(*flip_range, num_clients) if evenly \
        else rng.uniform(*flip_range, size=num_clients)
    reversed_ = rng.permutation(num_clients)[:round(reversed_fraction * num_clients)]
    probs[reversed_] = 1.0 - probs[reversed_]
    return probs


def noisy_labels(y: torch.Tensor, noise: float, rng: np.random.Generator) -> torch.Tensor:
    """Binary labels each flipped with probability ``noise`` (Arjovsky et al.'s 25 %: the digit
    then predicts the label at most ``1 − noise`` of the time, less than a color rule flipped
    less often does)."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"label noise must be in [0, 1], got {noise}")
    return y ^ torch.from_numpy(rng.random(len(y)) < noise).to(y.dtype)


def swap_colors(x: torch.Tensor) -> torch.Tensor:
    """Binary-colored images with their first two channels (red and green) exchanged: the same
    digits, the other color."""
    return x[:, [1, 0, *range(2, x.shape[1])]]


def color_binary(
    x: torch.Tensor, y: torch.Tensor, flip_prob: float | np.ndarray, rng: np.random.Generator
) -> torch.Tensor:
    """Draw each digit red (label 0) or green (label 1), the color flipped with ``flip_prob``
    (one probability, or one per image).

    ``y`` holds binary labels; the blue channel stays zero.
    """
    _check_gray(x, y)
    if not np.all((0.0 <= np.asarray(flip_prob)) & (np.asarray(flip_prob) <= 1.0)):
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if len(y) and (y.min() < 0 or y.max() > 1):
        raise ValueError("color_binary needs binary labels (0 or 1)")
    flip = torch.from_numpy(rng.random(len(y)) < flip_prob)
    green = (y.bool() ^ flip).to(x.dtype).view(-1, 1, 1, 1)
    return torch.cat([x * (1 - green), x * green, torch.zeros_like(x)], dim=1)


def color_multiclass(
    x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, ood: bool = False
) -> torch.Tensor:
    """Paint digit strokes in a foreground color and the rest in a background color.

    In distribution (``ood=False``) both come from the class's own two foreground and two
    background colors; out of distribution they are two different colors of
    :data:`OOD_PALETTE`, drawn independently of the class.
    """
    _check_gray(x, y)
    n = len(y)
    if n and (y.min() < 0 or y.max() >= len(TRAIN_FOREGROUNDS)):
        raise ValueError(f"color_multiclass needs labels in [0, {len(TRAIN_FOREGROUNDS)})")
    if ood:
        k = len(OOD_PALETTE)
        a = rng.integers(0, k, n)
        b = (a + rng.integers(1, k, n)) % k  # any other palette color
        fg, bg = OOD_PALETTE[torch.from_numpy(a)], OOD_PALETTE[torch.from_numpy(b)]
    else:
        fg = TRAIN_FOREGROUNDS[y, torch.from_numpy(rng.integers(0, 2, n))]
        bg = TRAIN_BACKGROUNDS[y, torch.from_numpy(rng.integers(0, 2, n))]
    fg, bg = fg.to(x.dtype)[:, :, None, None], bg.to(x.dtype)[:, :, None, None]
    return x * fg + (1 - x) * bg


def _check_gray(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"coloring needs grayscale images [n, 1, H, W], got {tuple(x.shape)}")
    if len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
