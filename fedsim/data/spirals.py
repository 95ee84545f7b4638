"""The synthetic memorization task of Parascandolo et al. (2021), *Learning explanations that are
hard to vary*: a mechanism shared by every environment, and a shortcut that differs per
environment.

Each example has ``2 + d_S`` features. The first two are two interleaved spirals: radius
``r ~ U(0.08, 1)``, angle ``2 n_rot π r + π y`` with the label ``y ∈ {0, 1}``, then
``r += U(−0.02, 0.02)``; the point ``(r cos, r sin)``, each column divided by its std over the
set. The other ``d_S`` are the shortcut: in training environment ``e`` every example carries
``s_e (2y − 1)``, where ``s_e ~ N(0, I)`` is drawn once per environment, so the shortcut
separates the labels perfectly in each environment but points another way in each; in the OOD
test set they are i.i.d. ``N(0, I)`` noise, unrelated to the label. A model that memorized the
shortcuts scores about 50 % there; one that learned the spirals, up to 100 %. One environment
per client; the ID test set is drawn from the training environments (``s_e`` of a uniformly
chosen ``e``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

Split = tuple[torch.Tensor, torch.Tensor]

#: examples in each test set (ID and OOD)
SPIRALS_TEST_SIZE = 2000


def spiral_points(rng: np.random.Generator, n: int, revolutions: float,
                  shortcut: np.ndarray) -> Split:
    """``n`` examples ``[n, 1, 1, 2 + d_S]`` with labels ``[n]``; ``shortcut(y)`` gives the
    ``[n, d_S]`` shortcut features of labels ``y``."""
    radius = rng.uniform(0.08, 1.0, n)
    y = rng.integers(0, 2, n)
    angle = 2 * revolutions * math.pi * radius + math.pi * y
    radius = radius + rng.uniform(-0.02, 0.02, n)
    mechanism = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    mechanism /= mechanism.std(axis=0)
    x = np.hstack([mechanism, shortcut(y)]).astype(np.float32)
    return torch.from_numpy(x).view(n, 1, 1, -1), torch.from_numpy(y.astype(np.int64))


def spiral_sets(seed: int, num_clients: int, client_size: int, shortcut_dims: int,
                revolutions: float) -> tuple[list[Split], Split, Split]:
    """(one environment per client, the ID test set, the OOD test set), each set from its own
    random stream of ``seed``."""
    rng = lambda *stream: np.random.default_rng([seed, 0x5B12, *stream])  # noqa: E731
    signatures = rng(0).standard_normal((num_clients, shortcut_dims))
    clients = [spiral_points(rng(1, k), client_size, revolutions,
                             lambda y, s=s: np.outer(2 * y - 1, s))
               for k, s in enumerate(signatures)]
    env = rng(2).integers(0, num_clients, SPIRALS_TEST_SIZE)
    id_test = spiral_points(rng(3), SPIRALS_TEST_SIZE, revolutions,
                            lambda y: signatures[env] * (2 * y - 1)[:, None])
    noise = rng(4).standard_normal((SPIRALS_TEST_SIZE, shortcut_dims))
    ood_test = spiral_points(rng(5), SPIRALS_TEST_SIZE, revolutions, lambda y: noise)
    return clients, id_test, ood_test


def check_spiral_options(client_size: int, shortcut_dims: int, revolutions: float) -> None:
    """Refuse impossible spiral settings before any data is made."""
    for name, value, low in (("spiral_client_size", client_size, 2),
                             ("spiral_shortcut_dims", shortcut_dims, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(revolutions, bool) or not isinstance(revolutions, (int, float)) \
            or not 0 < revolutions < math.inf:
        raise ValueError(f"spiral_revolutions must be a finite number > 0, got {revolutions!r}")
