"""Dataset loading: the offline default, the IDX / torchvision paths, and argument checks."""
import numpy as np
import pytest
import torch

from fedsim.data import DATASETS, DEFAULT_DATASET, FederatedDataset, load_federated
from fedsim.data.idx import read_idx, write_idx
from fedsim.data.sources import IDX_FILES


def _check_split(x, y, shape):
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == shape and x.shape[0] == y.shape[0] and y.dim() == 1
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_dataset_names():
    assert DEFAULT_DATASET == "colored-digits" == DATASETS[0]
    assert set(DATASETS) == {
        "colored-digits", "colored-digits-10", "digits", "colored-mnist", "colored-mnist-10", "mnist",
        "colored-fashion-mnist", "colored-fashion-mnist-10", "fashion-mnist", "cifar10", "spirals",
        "irm-fashion-mnist", "irm-fashion-mnist-gray",
    }
    with pytest.raises(ValueError, match="colored-digits, colored-digits-10, digits"):
        load_federated("svhn")


def test_default_colored_digits_offline():
    ds = load_federated("colored-digits")
    assert isinstance(ds, FederatedDataset) and ds.name == "colored-digits"
    assert ds.num_classes == 2 and ds.input_shape == (3, 8, 8) and len(ds.clients) == 10
    for x, y in [*ds.clients, ds.test, ds.ood_test]:
        _check_split(x, y, (3, 8, 8))
        assert set(y.unique().tolist()) <= {0, 1}
    assert sum(len(y) for _, y in ds.clients) + len(ds.test[1]) == 1797


def test_plain_digits_one_channel_no_ood():
    ds = load_federated("digits", num_clients=4, split="dirichlet", alpha=0.3)
    assert ds.ood_test is None and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    for x, y in [*ds.clients, ds.test]:
        _check_split(x, y, (1, 8, 8))
    assert min(len(y) for _, y in ds.clients) >= 10


def test_deterministic_and_seed_dependent():
    a, b, c = (load_federated("colored-digits-10", num_clients=3, split="iid", seed=s) for s in (5, 5, 6))
    for (ax, ay), (bx, by) in zip(a.clients + [a.test, a.ood_test], b.clients + [b.test, b.ood_test]):
        assert torch.equal(ax, bx) and torch.equal(ay, by)
    assert not torch.equal(a.clients[0][0], c.clients[0][0])
    assert torch.equal(a.test[1], c.test[1])  # the held-out digits do not depend on the seed


def test_max_train_subsamples_deterministically():
    a = load_federated("digits", num_clients=5, split="iid", max_train=200, seed=1)
    b = load_federated("digits", num_clients=5, split="iid", max_train=200, seed=1)
    assert sum(len(y) for _, y in a.clients) == 200
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a.clients, b.clients))
    assert len(a.test[1]) == 359  # the test set is not subsampled
    big = load_federated("digits", num_clients=5, split="iid", max_train=10**6)
    assert sum(len(y) for _, y in big.clients) == 1438


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="pathological"), "iid, shards, dirichlet"),
        (dict(num_clients=0), "num_clients"),
        (dict(num_clients=2000), "exceeds"),
        (dict(split="dirichlet", alpha=0), "alpha"),
        (dict(seed=-1), "seed"),
        (dict(max_train=0), "max_train"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_federated("digits", **kwargs)


def test_idx_roundtrip_and_bad_magic(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)
    write_idx(tmp_path / "i.idx", np.array([1, -2, 300], dtype=np.int32))
    assert read_idx(tmp_path / "i.idx").tolist() == [1, -2, 300]
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short")


def _write_tiny_mnist(directory, gz: bool, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": np.arange(n_train, dtype=np.uint8) % 10,
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": np.arange(n_test, dtype=np.uint8) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        write_idx(directory / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_given_directly(tmp_path, gz):
    arrays = _write_tiny_mnist(tmp_path, gz)
    ds = load_federated("mnist", num_clients=3, split="shards", data_dir=tmp_path)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.ood_test is None
    x, y = ds.test
    _check_split(x, y, (1, 28, 28))
    torch.testing.assert_close(x[:, 0], torch.from_numpy(arrays["test_x"]).float() / 255)
    assert y.tolist() == arrays["test_y"].tolist()
    assert sorted(sum((c[1].tolist() for c in ds.clients), [])) == sorted(arrays["train_y"].tolist())


def test_torchvision_layout_and_colored_variants(tmp_path):
    _write_tiny_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    binary = load_federated("colored-fashion-mnist", num_clients=2, split="iid", data_dir=tmp_path)
    assert binary.input_shape == (3, 28, 28) and binary.num_classes == 2
    multi = load_federated("colored-fashion-mnist-10", num_clients=2, split="dirichlet", alpha=1.0,
                           data_dir=tmp_path, min_client_size=5, max_train=40)
    assert multi.num_classes == 10 and sum(len(y) for _, y in multi.clients) == 40
    for x, y in [*multi.clients, multi.test, multi.ood_test]:
        _check_split(x, y, (3, 28, 28))
    with pytest.raises(FileNotFoundError):  # MNIST is not the Fashion-MNIST folder
        load_federated("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["mnist", "colored-mnist-10", "fashion-mnist"])
def test_missing_idx_files_explain_how_to_get_them(tmp_path, name):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")  # one of four is not enough
    with pytest.raises(FileNotFoundError) as err:
        load_federated(name, data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "download" in message
    assert "train-labels-idx1-ubyte" in message
    if "fashion" in name:
        assert "apt-get install dataset-fashion-mnist" in message and "/usr/share/datasets/fashion-mnist" in message
    else:
        assert str(tmp_path / "MNIST" / "raw") in message


def test_missing_cifar10(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*download"):
        load_federated("cifar10", data_dir=tmp_path)


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert root == str(tmp_path) and download is False
            n = 50 if train else 10
            self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_federated("cifar10", num_clients=5, split="shards", data_dir=tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.ood_test is None
    x, y = ds.test
    _check_split(x, y, (3, 32, 32))
    ref = FakeCIFAR10(str(tmp_path), False, False)
    torch.testing.assert_close(x[3].permute(1, 2, 0), torch.from_numpy(ref.data[3]).float() / 255)


def test_digits_read_without_sklearn_equal_sklearn_loader():
    """The default dataset is read from scikit-learn's shipped file without importing it; it
    must be exactly what ``sklearn.datasets.load_digits`` returns."""
    from sklearn.datasets import load_digits as sk_load_digits

    from fedsim.data.sources import _digits_arrays

    images, target = _digits_arrays()
    bunch = sk_load_digits()
    assert np.array_equal(images, bunch.images)
    assert np.array_equal(target, bunch.target)
