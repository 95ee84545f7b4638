"""The run's federated dataset: read once per seed on the host (cached), then moved to the
run's device as one pair of tensors whose slices are the clients."""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..config import Config
from .federated import FederatedDataset, load_federated

#: the settings that decide the dataset (and so its cache key)
_DATA_FIELDS = ("dataset", "num_clients", "split", "alpha", "data_dir", "download",
                "min_client_size", "max_train", "validation_fraction", "ood_validation_fraction",
                "label_noise", "color_flip_range", "reversed_color_fraction",
                "spiral_client_size", "spiral_shortcut_dims", "spiral_revolutions")


def read_data(config: Config, seed: int) -> FederatedDataset:
    """The federated dataset ``config`` describes for ``seed``, on the host (the latest one is
    kept: the start-up check and the first seed's run read it once)."""
    return _read_data(seed, *(getattr(config, name) for name in _DATA_FIELDS))


@functools.lru_cache(maxsize=1)
def _read_data(seed: int, *values: object) -> FederatedDataset:
    settings = dict(zip(_DATA_FIELDS, values))
    return load_federated(settings.pop("dataset"), seed=seed, **settings)


def load_data(config: Config, seed: int) -> FederatedDataset:
    """The federated dataset for ``seed``, moved to the run's device once; the clients'
    examples are consecutive views of one pair of tensors (``ClientData`` reads them in place)."""
    data = read_data(config, seed)
    device = config.torch_device()
    move = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
    sizes = [len(y) for _, y in data.clients]
    x = torch.cat([x for x, _ in data.clients]).to(device).split(sizes)
    y = torch.cat([y for _, y in data.clients]).to(device).split(sizes)
    optional = lambda pair: None if pair is None else move(pair)  # noqa: E731
    return dataclasses.replace(data, clients=list(zip(x, y)), test=move(data.test),
                               ood_test=optional(data.ood_test), validation=optional(data.validation),
                               ood_validation=optional(data.ood_validation))
