"""Raw (uncolored, unsplit) datasets: scikit-learn's 8x8 digits, MNIST, Fashion-MNIST and CIFAR-10.

Every source returns float32 images ``[n, C, H, W]`` scaled to [0, 1] and int64 labels.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .idx import read_idx

SOURCES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")

#: Where the file-backed sources look when ``data_dir`` is None (unless $FEDSIM_DATA_DIR is set).
DEFAULT_DATA_DIR = "data"
#: Debian's ``dataset-fashion-mnist`` package installs the IDX files here.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_NAME = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}

# Fraction of scikit-learn's 1797 digits held out (stratified, fixed split) as the test set.
_DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class RawData:
    """A dataset before splitting and coloring."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


def load_source(
    source: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> RawData:
    """Load a raw dataset by name (one of :data:`SOURCES`)."""
    if source == "digits":
        return load_digits()
    if source in ("mnist", "fashion-mnist"):
        return load_mnist_like(source, data_dir, download)
    if source == "cifar10":
        return load_cifar10(data_dir, download)
    raise ValueError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] in 0..16, labels) read straight from the file scikit-learn ships
    (``sklearn/datasets/data/digits.csv.gz``), without importing scikit-learn (~2 s); read
    once per process (the callers copy them)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default dataset ships with scikit-learn: "
                                "pip install scikit-learn (or pip install -e '.[sim]')")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a future scikit-learn layout: take the slow, official way
        from sklearn.datasets import load_digits as _sk_load_digits
        bunch = _sk_load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_digits() -> RawData:
    """scikit-learn's embedded 8x8 digits (no download), with a fixed stratified 80/20 split."""
    images, target = _digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(target.astype(np.int64))
    rng = np.random.default_rng(0)  # part of the dataset, independent of the run's seed
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(target):
        idx = rng.permutation(np.flatnonzero(target == c))
        test_mask[idx[: round(_DIGITS_TEST_FRACTION * len(idx))]] = True
    train_idx = torch.from_numpy(np.flatnonzero(~test_mask))
    test_idx = torch.from_numpy(np.flatnonzero(test_mask))
    return RawData((x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]), 10)


def find_idx_files(directory: str | os.PathLike) -> dict[str, Path] | None:
    """The four MNIST-style IDX files (raw or ``.gz``) in ``directory``; None if one is missing."""
    found = {}
    for key, stem in IDX_FILES.items():
        for candidate in (Path(directory) / stem, Path(directory) / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def read_idx_dataset(files: dict[str, Path]) -> RawData:
    """Parse the four IDX files into a :class:`RawData` (images scaled to [0, 1], one channel)."""
    arrays = {key: read_idx(path) for key, path in files.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        if a.ndim != 3:
            raise ValueError(f"IDX images must have shape [n, H, W], got {a.shape}")
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray, n: int, which: str) -> torch.Tensor:
        if a.shape != (n,):
            raise ValueError(f"{which}: {a.shape[0] if a.ndim else 0} labels for {n} images")
        return torch.from_numpy(a.astype(np.int64))

    train_x, test_x = images(arrays["train_x"]), images(arrays["test_x"])
    train_y = labels(arrays["train_y"], len(train_x), "train")
    test_y = labels(arrays["test_y"], len(test_x), "test")
    return RawData((train_x, train_y), (test_x, test_y), 10)


def load_mnist_like(source: str, data_dir: str | os.PathLike | None, download: bool) -> RawData:
    """MNIST or Fashion-MNIST from IDX files in ``data_dir`` or ``data_dir/<TorchvisionName>/raw``.

    Without ``data_dir``, Fashion-MNIST is also looked for where Debian's package puts it.
    """
    tv_name = _TORCHVISION_NAME[source]
    root = _root(data_dir)
    candidates = _idx_folders(source, data_dir)
    for directory in candidates:
        files = find_idx_files(directory)
        if files is not None:
            return read_idx_dataset(files)
    if download:
        train, test = (_torchvision_dataset(source, root, t, download=True) for t in (True, False))
        return RawData(
            (train.data.float().div(255).unsqueeze(1), train.targets.long()),
            (test.data.float().div(255).unsqueeze(1), test.targets.long()),
            10,
        )
    names = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
    hint = (
        f"{tv_name} not found under {root}: looked for {names} in "
        f"{', '.join(str(d) for d in candidates)}. Either download it (download=True, or "
        f"`--download` on the command line) on a machine with internet access, or copy the four "
        f"IDX files into {root / tv_name / 'raw'}/ "
        f"(or point data_dir at any folder that holds them directly)."
    )
    if source == "fashion-mnist":
        hint += (
            f" On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` puts them in "
            f"{DEBIAN_FASHION_MNIST_DIR}/ (use data_dir={DEBIAN_FASHION_MNIST_DIR})."
        )
    raise FileNotFoundError(hint)


def _idx_folders(source: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where MNIST-like IDX files are looked for, in order."""
    root = _root(data_dir)
    folders = [root, root / _TORCHVISION_NAME[source] / "raw"]
    if data_dir is None and source == "fashion-mnist":
        folders.append(Path(DEBIAN_FASHION_MNIST_DIR))
    return folders


def source_available(source: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether MNIST-like ``source``'s IDX files are on this machine (no download)."""
    return any(find_idx_files(d) is not None for d in _idx_folders(source, data_dir))


def load_cifar10(data_dir: str | os.PathLike | None, download: bool) -> RawData:
    """CIFAR-10 through torchvision from ``data_dir/cifar-10-batches-py`` (download if asked)."""
    root = _root(data_dir)
    try:
        train, test = (_torchvision_dataset("cifar10", root, t, download) for t in (True, False))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root / 'cifar-10-batches-py'} ({err}). Either download it "
            f"(download=True, or `--download` on the command line) on a machine with internet "
            f"access, or extract the python version (cifar-10-python.tar.gz) into {root}/."
        ) from err

    def convert(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))).float().div(255)
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)

    return RawData(convert(train), convert(test), 10)


def _root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("FEDSIM_DATA_DIR", DEFAULT_DATA_DIR))


def _torchvision_dataset(source: str, root: Path, train: bool, download: bool):
    try:
        import torchvision.datasets as tvd
    except ImportError as err:  # pragma: no cover - torchvision is in the `sim` extra
        raise ImportError(
            f"loading {source} needs torchvision: pip install 'gma-kernels[sim]'"
        ) from err
    return getattr(tvd, _TORCHVISION_NAME[source])(root=str(root), train=train, download=download)
