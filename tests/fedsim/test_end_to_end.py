"""A two-round run of every dataset with every model, on tiny data the test makes: MNIST-style
IDX files written here (the torchvision path), the embedded digits, and CIFAR-10 through a
stand-in for torchvision's loader."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.config import Config, ConfigError
from fedsim.data import DATASETS
from fedsim.data.idx import write_idx
from fedsim.data.sources import IDX_FILES
from fedsim.loop import run_experiment
from fedsim.models import MODELS

ROUNDS = {"num_clients": 3, "clients_per_round": 2, "rounds": 2, "seeds": (0,), "eval_every": 1,
          "batch_size": 16, "threads": 1, "split": "iid", "algorithms": ("fedavg", "fedgma")}


def _write_idx_dataset(directory, n_train=90, n_test=30):
    rng = np.random.default_rng(1)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": (np.arange(n_train) % 10).astype(np.uint8),
              "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": (np.arange(n_test) % 10).astype(np.uint8)}
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        write_idx(directory / f"{stem}.gz", arrays[key])


class _FakeCIFAR10:
    """torchvision.datasets.CIFAR10's interface over random 32×32 RGB images."""

    def __init__(self, root, train=True, download=False, **_):
        n = 60 if train else 20
        rng = np.random.default_rng(2 if train else 3)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_two_rounds_of_every_dataset_and_model(tmp_path, monkeypatch, dataset, model):
    data_dir = tmp_path / "data"
    if "mnist" in dataset:
        _write_idx_dataset(data_dir)
    if dataset == "cifar10":
        import torchvision
        monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    if dataset == "spirals" and model not in ("mlp", "leaky-mlp"):  # feature vectors
        with pytest.raises(ConfigError, match="model must be mlp or leaky-mlp"):
            Config(**ROUNDS, dataset=dataset, model=model)
        return
    settings = {**ROUNDS, "split": "shards", "spiral_client_size": 40} if dataset == "spirals" \
        else ROUNDS  # the split does not apply: one environment per client
    config = Config(**settings, dataset=dataset, model=model, data_dir=str(data_dir))
    (tmp_path / "run").mkdir()
    rows = run_experiment(config, tmp_path / "run", progress=False)
    assert len(rows) == 2 * 2  # methods x rounds
    for row in rows:
        assert 0.0 <= row["test_acc"] <= 1.0 and math.isfinite(row["test_loss"])
        has_ood = dataset.startswith(("colored", "irm")) or dataset == "spirals"
        assert (row["ood_acc"] is None) == (not has_ood)
    models = sorted(p.name for p in (tmp_path / "run").glob("model-*.pt"))
    assert models == ["model-fedavg-seed0.pt", "model-fedgma-seed0.pt"]
    state = torch.load(tmp_path / "run" / models[1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
