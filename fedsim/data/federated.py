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
    CLIENT_FLIP_RANGE,
    binary_labels,
    check_binary_options,
    client_flip_probs,
    color_binary,
    color_multiclass,
    noisy_labels,
)
from .irm import IRM_DATASETS, IRM_LABEL_NOISE, downsampled, environment_probs, irm_coloring
from .sources import load_source
from .spirals import check_spiral_options, spiral_sets
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
    "spirals": ("spirals", None),
    **{name: ("fashion-mnist", "binary") for name in IRM_DATASETS},  # fedsim.data.irm
}
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def coloring_of(name: str) -> str | None:
    """Dataset ``name``'s coloring: ``"binary"``, ``"multiclass"`` or ``None``."""
    return _REGISTRY[name][1]

DEFAULT_DATASET = "colored-digits"

# Independent random streams, each seeded by (seed, stream[, client]).
(_SUBSAMPLE, _SPLIT, _FLIP_PROBS, _CLIENT_COLOR, _TEST_COLOR, _OOD_COLOR, _VALIDATION, _NOISE,
 _OOD_VALIDATION) = range(9)


@dataclass
class FederatedDataset:
    """Per-client training data, an in-distribution validation set held out of the clients'
    data (``None`` without one), and in- and out-of-distribution test sets.

    Images are float32 ``[n, C, H, W]`` in [0, 1], labels int64 ``[n]``. ``meta`` records how the
    data was made (source, split, coloring, each client's flip probability for binary coloring).
    ``ood_validation``: examples of the OOD distribution held out of the OOD test set (disjoint
    from it), for DomainBed's test-domain (oracle) selection; ``None`` without one.
    """

    name: str
    clients: list[Split]
    test: Split
    ood_test: Split | None
    num_classes: int
    input_shape: tuple[int, int, int]
    meta: dict[str, Any] = field(default_factory=dict)
    validation: Split | None = None
    ood_validation: Split | None = None


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
    validation_fraction: float = 0.0,
    ood_validation_fraction: float = 0.0,
    label_noise: float = 0.0,
    color_flip_range: tuple[float, float] = CLIENT_FLIP_RANGE,
    reversed_color_fraction: float = 0.0,
    spiral_client_size: int = 1024,
    spiral_shortcut_dims: int = 16,
    spiral_revolutions: float = 3.0,
) -> FederatedDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`), split it among ``num_clients`` clients.

    The split (``"iid"``, ``"shards"``, ``"dirichlet"`` with concentration ``alpha``) is made on
    the original class labels (the ten digits), ``"binary-skew"`` on the binary labels, before
    coloring; each client is then colored with
    its own random stream. ``max_train`` keeps a random subset of the training set.
    ``validation_fraction``: each client's share (rounded down) held out, after coloring, into
    one in-distribution validation set; ``ood_validation_fraction``: that share of the OOD test
    set (rounded down) held out as an OOD validation set instead. Binary coloring only:
    ``label_noise`` flips each label (every set) before the color is drawn from it; each client's color-flip probability is
    uniform in ``color_flip_range``, reversed (``1 − p``) for a ``reversed_color_fraction`` of
    the clients. ``spirals`` (``fedsim.data.spirals``) makes one environment of
    ``spiral_client_size`` examples per client, ``spiral_shortcut_dims`` shortcut features and
    ``spiral_revolutions`` turns (the split settings do not apply). Everything is deterministic
    given ``seed``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    check_split_args(split, num_clients, alpha)
    _check_int("seed", seed, 0)
    _check_int("min_client_size", min_client_size, 0)
    if max_train is not None:
        _check_int("max_train", max_train, 1)
    for what, fraction in (("validation_fraction", validation_fraction),
                           ("ood_validation_fraction", ood_validation_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {fraction}")
    source, coloring = _REGISTRY[name]
    options = {"label_noise": label_noise, "color_flip_range": tuple(color_flip_range),
               "reversed_color_fraction": reversed_color_fraction}
    if coloring != "binary" and (label_noise, tuple(color_flip_range), reversed_color_fraction) \
            != (0.0, CLIENT_FLIP_RANGE, 0.0):
        raise ValueError(f"label_noise, color_flip_range and reversed_color_fraction apply to "
                         f"the binary colored datasets only, not {name!r}")
    check_binary_options(**options)
    if source == "spirals":
        check_spiral_options(spiral_client_size, spiral_shortcut_dims, spiral_revolutions)
        clients, test, ood_test = spiral_sets(seed, num_clients, spiral_client_size,
                                              spiral_shortcut_dims, spiral_revolutions)
        meta = {"source": source, "coloring": None, "seed": seed,
                "shortcut_dims": spiral_shortcut_dims, "revolutions": spiral_revolutions}
        return _assembled(name, clients, test, ood_test, 2, meta, validation_fraction,
                          ood_validation_fraction)

    raw = load_source(source, data_dir, download)
    x, y = raw.train
    irm_gray = IRM_DATASETS.get(name)
    if irm_gray is not None:
        if label_noise:
            raise ValueError(f"label_noise: dataset {name!r} has the IRM protocol's own "
                             f"({IRM_LABEL_NOISE}); leave it at 0")
        options["label_noise"] = IRM_LABEL_NOISE
        x, test = downsampled(x), (downsampled(raw.test[0]), raw.test[1])
    else:
        test = raw.test
    if max_train is not None and max_train < len(y):
        keep = np.sort(_rng(seed, _SUBSAMPLE).choice(len(y), size=max_train, replace=False))
        x, y = x[torch.from_numpy(keep)], y[torch.from_numpy(keep)]
    if split == "binary-skew" and coloring != "binary":
        raise ValueError(f"split 'binary-skew' needs a binary colored dataset, not {name!r}")
    split_on = binary_labels(y) if split == "binary-skew" else y  # else the ten digits
    parts = split_indices(
        split_on.numpy(), num_clients, split, _rng(seed, _SPLIT), alpha=alpha,
        min_client_size=min_client_size,
    )
    clients = [(x[idx], y[idx]) for idx in map(torch.from_numpy, parts)]
    meta: dict[str, Any] = {"source": source, "coloring": coloring, "split": split, "seed": seed}
    if split == "dirichlet":
        meta["alpha"] = alpha
    ood_test, num_classes = None, raw.num_classes
    if coloring == "binary":
        clients, test, ood_test = _color_binary(clients, test, seed, meta, irm_gray=irm_gray,
                                                **options)
        num_classes = 2
    elif coloring == "multiclass":
        clients, test, ood_test = _color_multiclass(clients, test, seed)
    return _assembled(name, clients, test, ood_test, num_classes, meta, validation_fraction,
                      ood_validation_fraction)


def _assembled(name: str, clients: list[Split], test: Split, ood_test: Split | None,
               num_classes: int, meta: dict[str, Any], validation_fraction: float,
               ood_validation_fraction: float) -> FederatedDataset:
    """The dataset, with each client's ``validation_fraction`` held out (``_hold_out``) and
    ``⌊ood_validation_fraction · n⌋`` random OOD test examples held out as OOD validation."""
    seed = meta["seed"]
    clients, validation = _hold_out(clients, validation_fraction, seed)
    if validation is not None:
        meta["validation_fraction"] = validation_fraction
    ood_validation = None
    if ood_validation_fraction:
        if ood_test is None:
            raise ValueError(f"ood_validation_fraction: dataset {name!r} has no OOD test set")
        x, y = ood_test
        order = torch.from_numpy(_rng(seed, _OOD_VALIDATION).permutation(len(y)))
        m = int(ood_validation_fraction * len(y))
        if m == 0 or m == len(y):
            raise ValueError(f"ood_validation_fraction={ood_validation_fraction} leaves "
                             f"{m} of the {len(y)} OOD test examples for validation")
        ood_validation, ood_test = (x[order[:m]], y[order[:m]]), (x[order[m:]], y[order[m:]])
        meta["ood_validation_fraction"] = ood_validation_fraction
    c, h, w = clients[0][0].shape[1:]
    shape = (int(c), int(h), int(w))
    return FederatedDataset(name, clients, test, ood_test, num_classes, shape, meta, validation,
                            ood_validation)


def _hold_out(clients: list[Split], fraction: float, seed: int) -> tuple[list[Split], Split | None]:
    """Each client's ``⌊fraction · n_k⌋`` random examples (at most ``n_k − 1``) pooled into a
    validation set; the clients keep the rest."""
    if fraction == 0.0:
        return clients, None
    kept, held = [], []
    for k, (x, y) in enumerate(clients):
        n = len(y)
        order = torch.from_numpy(_rng(seed, _VALIDATION, k).permutation(n))
        m = min(int(fraction * n), n - 1)
        kept.append((x[order[m:]], y[order[m:]]))
        held.append((x[order[:m]], y[order[:m]]))
    validation = (torch.cat([x for x, _ in held]), torch.cat([y for _, y in held]))
    if len(validation[1]) == 0:
        raise ValueError(f"validation_fraction={fraction} holds out no example: the clients are "
                         "too small; raise it or use fewer clients")
    return kept, validation


def _color_binary(
    clients: list[Split], test: Split, seed: int, meta: dict[str, Any], *, label_noise: float,
    color_flip_range: tuple[float, float], reversed_color_fraction: float,
    irm_gray: bool | None = None,
) -> tuple[list[Split], Split, Split]:
    """Binary labels (flipped with ``label_noise``); each client colored with its own flip
    probability (recorded in ``meta``). ``irm_gray`` not ``None``: the IRM protocol
    (``fedsim.data.irm``, ``irm_gray`` its grayscale oracle): two channels, the clients' flip
    probabilities evenly spaced, the ID test set colored with theirs."""
    irm = irm_gray is not None
    probs = client_flip_probs(len(clients), _rng(seed, _FLIP_PROBS), color_flip_range,
                              reversed_color_fraction, evenly=irm)
    color = irm_coloring(irm_gray) if irm else color_binary
    colored = []
    for k, ((x, y), p) in enumerate(zip(clients, probs)):
        by = noisy_labels(binary_labels(y), label_noise, _rng(seed, _NOISE, k))
        colored.append((color(x, by, float(p), _rng(seed, _CLIENT_COLOR, k)), by))
    x, by = test[0], noisy_labels(binary_labels(test[1]), label_noise, _rng(seed, _NOISE))
    test_prob = environment_probs(probs, len(by), _rng(seed, _TEST_COLOR, 1)) if irm \
        else ID_TEST_FLIP_PROB
    id_test = (color(x, by, test_prob, _rng(seed, _TEST_COLOR)), by)
    ood_test = (color(x, by, OOD_FLIP_PROB, _rng(seed, _OOD_COLOR)), by)
    meta.update(client_flip_probs=probs.tolist(),
                test_flip_prob="client_flip_probs" if irm else ID_TEST_FLIP_PROB,
                ood_flip_prob=OOD_FLIP_PROB, label_noise=label_noise)
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
