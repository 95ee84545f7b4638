"""``load_federated``: a named dataset, split among clients, colored per client."""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .coloring import (
    ID_TEST_FLIP_PROB,
    OOD_FLIP_PROB,
    binary_labels,
    client_flip_probs,
    color_binary,
    color_multiclass,
)
from .sources import load_source
from .splits import check_split_args, split_indices

Split = tuple[torch.Tensor, torch.Tensor]

# name -> (raw source, coloring: None, "binary" or "multiclass")
_REGISTRY: dict[str, tuple[str, str | None]] = {
    "colored-digits": ("digits", "binary"),
    "colored-digits-10": ("digits", "multiclass"),
    "digits": ("digits", None),
    "colored-mnist": ("mnist", "binary"),
    "colored-mnist-10": ("mnist", "multiclass"),
    "mnist": ("mnist", None),
    "colored-fashion-mnist": ("fashion-mnist", "binary"),
    "colored-fashion-mnist-10": ("fashion-mnist", "multiclass"),
    "fashion-mnist": ("fashion-mnist", None),
    "cifar10": ("cifar10", None),
}
DATASETS: tuple[str, ...] = tuple(_REGISTRY)
DEFAULT_DATASET = "colored-digits"

# Independent random streams, each seeded by (seed, stream[, client]).
_SUBSAMPLE, _SPLIT, _FLIP_PROBS, _CLIENT_COLOR, _TEST_COLOR, _OOD_COLOR = range(6)


@dataclass
class FederatedDataset:
    """Per-client training data plus in- and out-of-distribution test sets.

    Images are float32 ``[n, C, H, W]`` in [0, 1], labels int64 ``[n]``. ``meta`` records how the
    data was made (source, split, coloring, each client's flip probability for binary coloring).
    """

    name: str
    clients: list[Split]
    test: Split
    ood_test: Split | None
    num_classes: int
    input_shape: tuple[int, int, int]
    meta: dict[str, Any] = field(default_factory=dict)


def load_federated(
    name: str,
    *,
    num_clients: int = 10,
    split: str = "shards",
    alpha: float = 0.5,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    min_client_size: int = 10,
    max_train: int | None = None,
) -> FederatedDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`), split it among ``num_clients`` clients.

    The split (``"iid"``, ``"shards"`` or ``"dirichlet"`` with concentration ``alpha``) is made on
    the original class labels (the ten digits), before coloring; each client is then colored with
    its own random stream. ``max_train`` keeps a random subset of the training set. Everything is
    deterministic given ``seed``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    check_split_args(split, num_clients, alpha)
    _check_int("seed", seed, 0)
    _check_int("min_client_size", min_client_size, 0)
    if max_train is not None:
        _check_int("max_train", max_train, 1)
    source, coloring = _REGISTRY[name]

    raw = load_source(source, data_dir, download)
    x, y = raw.train
    if max_train is not None and max_train < len(y):
        keep = np.sort(_rng(seed, _SUBSAMPLE).choice(len(y), size=max_train, replace=False))
        x, y = x[torch.from_numpy(keep)], y[torch.from_numpy(keep)]
    parts = split_indices(
        y.numpy(), num_clients, split, _rng(seed, _SPLIT), alpha=alpha,
        min_client_size=min_client_size,
    )
    clients = [(x[idx], y[idx]) for idx in map(torch.from_numpy, parts)]
    meta: dict[str, Any] = {"source": source, "coloring": coloring, "split": split, "seed": seed}
    if split == "dirichlet":
        meta["alpha"] = alpha
    test, ood_test, num_classes = raw.test, None, raw.num_classes
    if coloring == "binary":
        clients, test, ood_test = _color_binary(clients, raw.test, seed, meta)
        num_classes = 2
    elif coloring == "multiclass":
        clients, test, ood_test = _color_multiclass(clients, raw.test, seed)
    c, h, w = clients[0][0].shape[1:]
    shape = (int(c), int(h), int(w))
    return FederatedDataset(name, clients, test, ood_test, num_classes, shape, meta)


def _color_binary(
    clients: list[Split], test: Split, seed: int, meta: dict[str, Any]
) -> tuple[list[Split], Split, Split]:
    """Binary labels; each client colored with its own flip probability (recorded in ``meta``)."""
    probs = client_flip_probs(len(clients), _rng(seed, _FLIP_PROBS))
    colored = []
    for k, ((x, y), p) in enumerate(zip(clients, probs)):
        by = binary_labels(y)
        colored.append((color_binary(x, by, float(p), _rng(seed, _CLIENT_COLOR, k)), by))
    x, by = test[0], binary_labels(test[1])
    id_test = (color_binary(x, by, ID_TEST_FLIP_PROB, _rng(seed, _TEST_COLOR)), by)
    ood_test = (color_binary(x, by, OOD_FLIP_PROB, _rng(seed, _OOD_COLOR)), by)
    meta.update(client_flip_probs=probs.tolist(), test_flip_prob=ID_TEST_FLIP_PROB,
                ood_flip_prob=OOD_FLIP_PROB)
    return colored, id_test, ood_test


def _color_multiclass(
    clients: list[Split], test: Split, seed: int
) -> tuple[list[Split], Split, Split]:
    """Class colors for the clients and the ID test set; palette colors for the OOD test set."""
    colored = [
        (color_multiclass(x, y, _rng(seed, _CLIENT_COLOR, k)), y)
        for k, (x, y) in enumerate(clients)
    ]
    x, y = test
    id_test = (color_multiclass(x, y, _rng(seed, _TEST_COLOR)), y)
    ood_test = (color_multiclass(x, y, _rng(seed, _OOD_COLOR), ood=True), y)
    return colored, id_test, ood_test


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _check_int(what: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
