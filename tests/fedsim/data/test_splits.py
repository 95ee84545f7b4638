"""Client splits: disjoint and complete, label skew as designed, deterministic from the seed."""
import numpy as np
import pytest

from fedsim.data.splits import SPLITS, dirichlet_split, shard_split, split_indices

LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 100))  # 10 classes x 100


def _split(split, seed=0, labels=LABELS, num_clients=10, **kw):
    if split == "binary-skew" and labels is LABELS:
        labels = (LABELS >= 5).astype(np.int64)  # the binary task's labels
    return split_indices(labels, num_clients, split, np.random.default_rng(seed), **kw)


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels, minlength=10) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("split", SPLITS)
def test_disjoint_and_complete(split):
    parts = _split(split, alpha=0.3)
    assert len(parts) == 10
    assert all(p.dtype.kind == "i" and len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("split", SPLITS)
def test_deterministic_from_seed(split):
    a, b, c = _split(split, 7), _split(split, 7), _split(split, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_balanced_and_all_labels():
    parts = _split("iid")
    assert {len(p) for p in parts} == {100}
    assert all(len(np.unique(LABELS[p])) >= 8 for p in parts)


def test_shards_two_labels_per_client():
    # 100 examples per class and 20 shards of 50: every shard holds a single label.
    parts = _split("shards")
    assert {len(p) for p in parts} == {100}
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert sum(len(np.unique(LABELS[p])) == 2 for p in parts) >= 5


def test_shards_unaligned_classes_mostly_two_labels():
    # Shards of n / 20 straddle label boundaries (as in McMahan et al.): at most 4 labels, mostly 2.
    labels = np.random.default_rng(0).integers(0, 10, 1437)
    coverage = []
    for p in split_indices(labels, 10, "shards", np.random.default_rng(1)):
        counts = np.sort(np.bincount(labels[p], minlength=10))[::-1]
        assert np.count_nonzero(counts) <= 4
        coverage.append(counts[:2].sum() / len(p))
    assert np.mean(coverage) >= 0.85


def test_shards_need_two_examples_per_client():
    with pytest.raises(ValueError, match="shards"):
        shard_split(np.arange(5), 3, np.random.default_rng(0))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skewed = np.mean([_entropy(LABELS[p]) for p in _split("dirichlet", alpha=0.1, min_client_size=1)])
    spread = np.mean([_entropy(LABELS[p]) for p in _split("dirichlet", alpha=100.0, min_client_size=1)])
    assert spread > 0.95 * np.log(10)
    assert skewed < 0.6 * spread


def test_dirichlet_min_client_size_respected():
    for seed in range(3):
        parts = _split("dirichlet", seed, alpha=0.1, min_client_size=60)
        assert min(len(p) for p in parts) >= 60


def test_dirichlet_impossible_min_size_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot give 10 clients 200 examples"):
        _split("dirichlet", alpha=0.5, min_client_size=200)
    two_classes = np.repeat([0, 1], 500)  # tiny alpha puts each class on one client
    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet_split(two_classes, 10, 1e-3, np.random.default_rng(0), min_client_size=50, max_attempts=20)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="random"), "iid, shards, dirichlet"),
        (dict(split="iid", num_clients=0), "num_clients"),
        (dict(split="iid", num_clients=1001), "exceeds"),
        (dict(split="dirichlet", alpha=0.0), "alpha"),
        (dict(split="dirichlet", alpha=-1.0), "alpha"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _split(**kwargs)


def test_one_client_gets_everything():
    for split in SPLITS:
        (part,) = _split(split, num_clients=1)
        assert len(part) == len(LABELS)
