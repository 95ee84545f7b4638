"""Coloring: binary flip rates per client, the reversed OOD rule, and the 10-class color sets."""
import numpy as np
import pytest
import torch

from fedsim.data import load_federated
from fedsim.data.coloring import (
    CLIENT_FLIP_RANGE,
    OOD_PALETTE,
    TRAIN_BACKGROUNDS,
    TRAIN_FOREGROUNDS,
    binary_labels,
    client_flip_probs,
    color_binary,
    color_multiclass,
)


def _is_green(x: torch.Tensor) -> torch.Tensor:
    """Color of each binary-colored image: True where the green channel carries the digit."""
    return x[:, 1].flatten(1).sum(1) > x[:, 0].flatten(1).sum(1)


def _flip_rate(x: torch.Tensor, y: torch.Tensor) -> float:
    return (_is_green(x) != y.bool()).double().mean().item()


def _tolerance(p: float, n: int) -> float:
    return 5 * np.sqrt(p * (1 - p) / n)  # five standard errors


@pytest.mark.parametrize("p", [0.0, 0.1, 0.17, 0.9, 1.0])
def test_binary_flip_rate_matches_probability(p):
    n = 20000
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 2, 2, generator=gen) * 0.9 + 0.1
    y = torch.randint(0, 2, (n,), generator=gen)
    out = color_binary(x, y, p, np.random.default_rng(1))
    assert out.shape == (n, 3, 2, 2) and out.dtype == torch.float32
    assert torch.all(out[:, 2] == 0)
    torch.testing.assert_close(out.sum(1, keepdim=True), x)  # intensity kept, one channel lit
    assert abs(_flip_rate(out, y) - p) <= _tolerance(p, n) + 1e-12


def test_binary_rejects_non_binary_labels_and_color_images():
    with pytest.raises(ValueError, match="binary"):
        color_binary(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2]), 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="grayscale"):
        color_binary(torch.rand(3, 3, 2, 2), torch.tensor([0, 1, 1]), 0.1, np.random.default_rng(0))


def test_binary_labels_split_at_five():
    assert binary_labels(torch.arange(10)).tolist() == [0] * 5 + [1] * 5


def test_client_flip_probs_in_range_and_distinct():
    probs = client_flip_probs(50, np.random.default_rng(0))
    assert np.all((probs >= CLIENT_FLIP_RANGE[0]) & (probs <= CLIENT_FLIP_RANGE[1]))
    assert len(np.unique(probs)) == 50 and probs.std() > 0.02


@pytest.fixture(scope="module")
def binary_digits():
    return load_federated("colored-digits", num_clients=4, split="iid", seed=3)


def test_binary_dataset_per_client_flip_rates(binary_digits):
    probs = binary_digits.meta["client_flip_probs"]
    assert len(probs) == 4 and all(0.1 <= p <= 0.2 for p in probs)
    for (x, y), p in zip(binary_digits.clients, probs):
        assert set(y.unique().tolist()) == {0, 1}
        assert abs(_flip_rate(x, y) - p) <= _tolerance(p, len(y))


def test_binary_dataset_test_sets(binary_digits):
    (x, y), (ox, oy) = binary_digits.test, binary_digits.ood_test
    assert torch.equal(y, oy) and set(y.unique().tolist()) == {0, 1}
    assert abs(_flip_rate(x, y) - 0.15) <= _tolerance(0.15, len(y))
    assert abs(_flip_rate(ox, oy) - 0.9) <= _tolerance(0.9, len(y))
    torch.testing.assert_close(x.sum(1), ox.sum(1))  # same digits, colored differently


def test_binary_labels_come_from_the_digit_split():
    """Splitting uses the ten digits before coloring: same clients as the plain dataset."""
    plain = load_federated("digits", num_clients=5, split="shards", seed=1)
    colored = load_federated("colored-digits", num_clients=5, split="shards", seed=1)
    for (px, py), (cx, cy) in zip(plain.clients, colored.clients):
        assert torch.equal(cy, binary_labels(py))
        torch.testing.assert_close(cx.sum(1, keepdim=True), px)


def _two_pixel_images(y: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(len(y), 1, 1, 2)
    x[:, 0, 0, 0] = 1.0  # pixel 0 shows the foreground, pixel 1 the background
    return x


def _colors(t: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(round(v, 5) for v in c) for c in t.reshape(-1, 3).tolist()}


def test_multiclass_train_colors_belong_to_the_class():
    y = torch.arange(10).repeat(200)
    out = color_multiclass(_two_pixel_images(y), y, np.random.default_rng(0))
    fg, bg = out[:, :, 0, 0], out[:, :, 0, 1]
    seen_fg, seen_bg = [], []
    for c in range(10):
        seen_fg.append(_colors(fg[y == c]))
        seen_bg.append(_colors(bg[y == c]))
        assert seen_fg[c] == _colors(TRAIN_FOREGROUNDS[c])  # both of the class's two colors, nothing else
        assert seen_bg[c] == _colors(TRAIN_BACKGROUNDS[c])
    all_colors = [col for s in seen_fg + seen_bg for col in s]
    assert len(set(all_colors)) == len(all_colors) == 40  # unique to their class and role


def test_multiclass_ood_colors_independent_of_class():
    n_per_class = 1000
    y = torch.arange(10).repeat(n_per_class)
    out = color_multiclass(_two_pixel_images(y), y, np.random.default_rng(0), ood=True)
    assert len(OOD_PALETTE) == 10
    assert not _colors(OOD_PALETTE) & (_colors(TRAIN_FOREGROUNDS) | _colors(TRAIN_BACKGROUNDS))
    dist = lambda c: torch.cdist(c, OOD_PALETTE)  # noqa: E731
    fg = dist(out[:, :, 0, 0]).argmin(1)
    bg = dist(out[:, :, 0, 1]).argmin(1)
    assert torch.allclose(out[:, :, 0, 0], OOD_PALETTE[fg]) and torch.allclose(out[:, :, 0, 1], OOD_PALETTE[bg])
    assert torch.all(fg != bg)
    for idx in (fg, bg):  # chi-square test of class x color independence, df = 81
        table = torch.zeros(10, 10)
        table.index_put_((y, idx), torch.ones(len(y)), accumulate=True)
        expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
        chi2 = ((table - expected) ** 2 / expected).sum().item()
        assert chi2 < 130  # p < 0.001 beyond this
        assert (table > 0).all()


def test_multiclass_dataset_uses_class_colors():
    plain = load_federated("digits", num_clients=3, split="iid", seed=2)
    colored = load_federated("colored-digits-10", num_clients=3, split="iid", seed=2)
    assert colored.num_classes == 10 and colored.input_shape == (3, 8, 8)
    for (g, py), (x, y) in [*zip(plain.clients, colored.clients), ((plain.test[0], plain.test[1]), colored.test)]:
        assert torch.equal(py, y)
        for i in range(0, len(y), 7):
            zero = (g[i, 0] == 0).nonzero()[0]  # a pure background pixel
            bg = x[i, :, zero[0], zero[1]]
            assert any(torch.allclose(bg, c) for c in TRAIN_BACKGROUNDS[y[i]])
            top = (g[i, 0] == g[i, 0].max()).nonzero()[0]
            v = g[i, 0, top[0], top[1]]
            fg = (x[i, :, top[0], top[1]] - (1 - v) * bg) / v
            assert any(torch.allclose(fg, c, atol=1e-5) for c in TRAIN_FOREGROUNDS[y[i]])
    ox, oy = colored.ood_test
    assert torch.equal(oy, plain.test[1])
    corner = ox[:, :, 0, 0]  # digits' corners are background: palette colors, not the class's
    assert all(any(torch.allclose(c, p) for p in OOD_PALETTE) for c in corner)
