"""The IRM protocol's data (``fedsim.data.irm``): Fashion-MNIST as Arjovsky et al.'s Colored
MNIST (two environments of color flips 0.1 and 0.2, the OOD set at 0.9, 25 % label noise), many
clients with reversed colors, the grayscale oracle and the refusal of other label noise."""
import numpy as np
import pytest
import torch

from fedsim.data import load_federated
from fedsim.data.idx import write_idx
from fedsim.data.sources import IDX_FILES


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Random 28 × 28 'Fashion-MNIST' IDX files: 2000 training and 400 test images."""
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("fashion")
    arrays = {"train_x": rng.integers(1, 256, (2000, 28, 28), dtype=np.uint8),
              "train_y": np.arange(2000, dtype=np.uint8) % 10,
              "test_x": rng.integers(1, 256, (400, 28, 28), dtype=np.uint8),
              "test_y": np.arange(400, dtype=np.uint8) % 10}
    for key, stem in IDX_FILES.items():
        write_idx(directory / stem, arrays[key])
    return directory


def _color(x):
    """Each image's color: 1 where channel 1 holds it, else 0."""
    return (x[:, 1].flatten(1).sum(1) > 0).long()


def test_irm_fashion_mnist_is_the_protocol(fashion_dir):
    data = load_federated("irm-fashion-mnist", num_clients=2, split="iid", data_dir=fashion_dir)
    assert data.input_shape == (2, 14, 14) and data.num_classes == 2
    assert data.meta["client_flip_probs"] == [0.1, 0.2] and data.meta["label_noise"] == 0.25
    raw = load_federated("fashion-mnist", num_clients=1, split="iid", data_dir=fashion_dir)
    classes = raw.clients[0][1]
    agree = []
    for x, y in [*data.clients, data.test, data.ood_test]:
        assert x.shape[1:] == (2, 14, 14)
        assert torch.all((x[:, 0] == 0) | (x[:, 1] == 0))  # one channel each
        agree.append(float((_color(x) == y).float().mean()))
    assert agree[0] == pytest.approx(0.9, abs=0.03) and agree[1] == pytest.approx(0.8, abs=0.03)
    assert agree[2] == pytest.approx(0.85, abs=0.05) and agree[3] == pytest.approx(0.1, abs=0.05)
    # the image is the downsampled original, the label its noisy class >= 5
    x, y = data.clients[0]
    drawn = x.sum(1)
    match = [int(torch.nonzero((raw.clients[0][0][:, 0, ::2, ::2] == d).flatten(1).all(1))[0])
             for d in drawn[:50]]
    noise = (classes[match] >= 5).long() != y[:50]
    assert 0 < int(noise.sum()) < 25


def test_many_clients_reversed_colors_gray_oracle_and_validation(fashion_dir):
    many = load_federated("irm-fashion-mnist", num_clients=10, split="iid", data_dir=fashion_dir,
                          reversed_color_fraction=0.3, validation_fraction=0.1)
    probs = np.array(many.meta["client_flip_probs"])
    assert sorted(np.minimum(probs, 1 - probs)) == pytest.approx(np.linspace(0.1, 0.2, 10))
    assert int((probs > 0.5).sum()) == 3 and many.validation[0].shape[1:] == (2, 14, 14)
    gray = load_federated("irm-fashion-mnist-gray", num_clients=2, split="iid",
                          data_dir=fashion_dir)
    for x, _ in [*gray.clients, gray.test, gray.ood_test]:
        assert torch.equal(x[:, 0], x[:, 1]) and x.sum() > 0
    with pytest.raises(ValueError, match="label_noise: dataset 'irm-fashion-mnist' has the IRM"):
        load_federated("irm-fashion-mnist", num_clients=2, data_dir=fashion_dir, label_noise=0.1)
