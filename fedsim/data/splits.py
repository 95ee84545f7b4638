"""Partition a labelled training set among clients: IID, McMahan shards, or Dirichlet label skew.

Each function takes the labels and a numpy Generator and returns one index array per client;
the arrays are disjoint, cover the whole set, and each is in random order.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

SPLITS: tuple[str, ...] = ("iid", "shards", "dirichlet", "binary-skew")
#: the positive shares of the first and the last client of a binary-skew split
BINARY_SKEW_RANGE: tuple[float, float] = (0.2, 0.8)


def split_indices(
    labels: np.ndarray,
    num_clients: int,
    split: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    min_client_size: int = 10,
) -> list[np.ndarray]:
    """Dispatch to :func:`iid_split`, :func:`shard_split`, :func:`dirichlet_split` or
    :func:`binary_skew_split` (binary labels) by name."""
    check_split_args(split, num_clients, alpha)
    labels = np.asarray(labels)
    if num_clients > len(labels):
        raise ValueError(f"num_clients={num_clients} exceeds the {len(labels)} training examples")
    if split == "iid":
        return iid_split(len(labels), num_clients, rng)
    if split == "shards":
        return shard_split(labels, num_clients, rng)
    if split == "binary-skew":
        return binary_skew_split(labels, num_clients, rng)
    return dirichlet_split(labels, num_clients, alpha, rng, min_client_size=min_client_size)


def check_split_args(split: str, num_clients: int, alpha: float) -> None:
    """Refuse bad split arguments before any data is loaded."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) \
            or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def iid_split(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` near-equal parts."""
    return list(np.array_split(rng.permutation(n), num_clients))


def shard_split(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. (2017): sort by label, cut ``2 * num_clients`` shards, deal two per client.

    Ties within a label are broken at random, so each client holds about two labels.
    """
    n = len(labels)
    if 2 * num_clients > n:
        raise ValueError(
            f"shards split needs 2 examples per client: {num_clients} clients, {n} examples"
        )
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, 2 * num_clients)
    dealt = rng.permutation(2 * num_clients)
    return [
        rng.permutation(np.concatenate([shards[dealt[2 * k]], shards[dealt[2 * k + 1]]]))
        for k in range(num_clients)
    ]


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_client_size: int = 10,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Label skew: each class is divided among clients in proportions drawn from Dirichlet(alpha).

    As in Hsu et al. (2019) and the FedPVR code, a client already holding ``n / num_clients``
    examples gets no more; the whole draw is repeated until every client has at least
    ``min_client_size`` examples (ValueError after ``max_attempts`` draws, at once if impossible).
    Smaller alpha gives more skew.
    """
    n = len(labels)
    if num_clients * min_client_size > n:
        raise ValueError(
            f"dirichlet split cannot give {num_clients} clients {min_client_size} examples each "
            f"from {n}; lower num_clients or min_client_size"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = n / num_clients
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = np.where(sizes < cap, np.nan_to_num(p), 0.0)
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
                sizes[k] += len(chunk)
        if sizes.min() >= min_client_size:
            return [rng.permutation(np.concatenate(p)) for p in parts]
    raise ValueError(
        f"dirichlet split (alpha={alpha}) gave some client fewer than {min_client_size} examples "
        f"in {max_attempts} draws; raise alpha, or lower num_clients or min_client_size"
    )


def binary_skew_split(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                      skew: tuple[float, float] = BINARY_SKEW_RANGE) -> list[np.ndarray]:
    """Binary label skew that does not depend on the draw: client k's share of label 1 is
    ``q_k``, evenly spaced from ``skew[0]`` (client 0) to ``skew[1]`` (the last); it gets
    ``P q_k / Σq`` of the ``P`` positives and ``Q (1 − q_k) / Σ(1 − q)`` of the ``Q`` negatives
    (so every example is dealt; with ``P = Q`` client k's positive share is exactly ``q_k``).
    Only which examples each client gets is random."""
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("binary-skew split needs binary labels (0 or 1): use a binary colored "
                         "dataset")
    q = np.linspace(*skew, num_clients) if num_clients > 1 else np.array([0.5])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, share in ((1, q), (0, 1.0 - q)):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(share)[:-1] / share.sum() * len(idx)).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    out = [rng.permutation(np.concatenate(p)) for p in parts]
    if min(len(p) for p in out) == 0:
        raise ValueError(f"binary-skew split leaves a client empty: {num_clients} clients, "
                         f"{len(labels)} examples")
    return out
