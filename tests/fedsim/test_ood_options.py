"""The OOD benchmark options of the binary colored datasets (label noise, reversed color rules),
the held-out validation set, and the color-reliance metric."""
import pytest
import torch

from fedsim.config import Config, ConfigError
from fedsim.data import load_federated


def greenness(x):
    """Per image: +1 green digit, −1 red digit (binary coloring leaves the other channel 0)."""
    return torch.sign(x[:, 1].sum((1, 2)) - x[:, 0].sum((1, 2)))


def test_validation_is_held_out_of_each_client():
    full = load_federated("colored-digits", num_clients=7, split="iid", seed=3)
    held = load_federated("colored-digits", num_clients=7, split="iid", seed=3,
                          validation_fraction=0.15)
    assert full.validation is None
    want = sum(int(0.15 * len(y)) for _, y in full.clients)
    assert len(held.validation[1]) == want
    for (x, y), (xh, yh) in zip(full.clients, held.clients):
        assert len(yh) == len(y) - int(0.15 * len(y))
    # the clients' examples and the validation set partition the clients' original examples
    # (compared as sets of image bytes: coloring is the same, only the split moved)
    def rows(x):
        return sorted(map(bytes, x.flatten(1).numpy()))
    kept = torch.cat([x for x, _ in held.clients])
    assert rows(torch.cat([kept, held.validation[0]])) == rows(torch.cat([x for x, _ in full.clients]))
    assert torch.equal(held.test[0], full.test[0]) and torch.equal(held.ood_test[0], full.ood_test[0])
    again = load_federated("colored-digits", num_clients=7, split="iid", seed=3,
                           validation_fraction=0.15)
    assert torch.equal(again.validation[0], held.validation[0])


def test_validation_that_holds_out_nothing_is_refused():
    with pytest.raises(ValueError, match="holds out no example"):
        load_federated("digits", num_clients=5, max_train=20, validation_fraction=0.05)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_federated("digits", validation_fraction=1.0)


def test_label_noise_flips_that_share_of_labels_in_every_set():
    clean = load_federated("colored-digits", split="iid", seed=1)
    noisy = load_federated("colored-digits", split="iid", seed=1, label_noise=0.25)
    flipped = torch.cat([a != b for (_, a), (_, b) in zip(clean.clients, noisy.clients)])
    assert 0.2 < flipped.float().mean() < 0.3
    for a, b in ((clean.test, noisy.test), (clean.ood_test, noisy.ood_test)):
        assert 0.18 < (a[1] != b[1]).float().mean() < 0.32
    # the color follows the noisy label (flip probabilities 0.1 to 0.2 as without noise)
    for x, y in noisy.clients:
        agree = (greenness(x) == 2 * y - 1).float().mean()
        assert agree > 0.7


def test_reversed_color_clients():
    data = load_federated("colored-digits", split="iid", seed=2, reversed_color_fraction=0.3,
                          color_flip_range=(0.05, 0.1))
    probs = torch.tensor(data.meta["client_flip_probs"])
    reversed_ = probs > 0.5
    assert int(reversed_.sum()) == 3
    assert ((probs[reversed_] >= 0.9) & (probs[reversed_] <= 0.95)).all()
    assert ((probs[~reversed_] >= 0.05) & (probs[~reversed_] <= 0.1)).all()
    for (x, y), flipped in zip(data.clients, reversed_):
        agree = (greenness(x) == 2 * y - 1).float().mean()
        assert (agree < 0.2) if flipped else (agree > 0.8)
    # the default variant is unchanged: the same probabilities as before the option existed
    default = load_federated("colored-digits", split="iid", seed=2)
    assert all(0.1 <= p <= 0.2 for p in default.meta["client_flip_probs"])


@pytest.mark.parametrize("settings, message", [
    ({"dataset": "digits", "label_noise": 0.25}, "label_noise apply to the binary colored"),
    ({"dataset": "colored-digits-10", "reversed_color_fraction": 0.5}, "reversed_color_fraction"),
    ({"color_flip_range": (0.1,)}, "color_flip_range must be two numbers"),
    ({"color_flip_range": (0.3, 0.2)}, "color_flip_range must be a finite number >= 0.3"),
    ({"label_noise": 1.5}, "label_noise must be a finite number >= 0.0 and <= 1.0"),
    ({"validation_fraction": 1.0}, "validation_fraction must be < 1"),
    ({"ood_validation_fraction": 1.0}, "ood_validation_fraction must be < 1"),
    ({"ood_validation_fraction": -0.1}, "ood_validation_fraction must be a finite number >= 0"),
])
def test_config_refuses_impossible_options(settings, message):
    with pytest.raises(ConfigError, match=message):
        Config(**settings)


@pytest.mark.parametrize("name", ["colored-digits", "spirals"])
def test_ood_validation_is_held_out_of_the_ood_test_set(name):
    """The OOD validation and OOD test sets partition the OOD examples; the clients and the ID
    test set do not change; the same seed holds out the same examples."""
    options = {"num_clients": 4, "seed": 2, **({"split": "iid"} if name != "spirals" else
                                                {"spiral_client_size": 30})}
    full = load_federated(name, **options)
    held = load_federated(name, ood_validation_fraction=0.3, **options)
    assert full.ood_validation is None
    n = len(full.ood_test[1])
    assert len(held.ood_validation[1]) == int(0.3 * n)
    assert len(held.ood_test[1]) == n - int(0.3 * n)

    def rows(x):
        return sorted(map(bytes, x.flatten(1).numpy()))
    assert rows(torch.cat([held.ood_validation[0], held.ood_test[0]])) == rows(full.ood_test[0])
    assert not set(rows(held.ood_validation[0])) & set(rows(held.ood_test[0]))
    assert torch.equal(held.test[0], full.test[0])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(held.clients, full.clients))
    again = load_federated(name, ood_validation_fraction=0.3, **options)
    assert torch.equal(again.ood_validation[0], held.ood_validation[0])


def test_ood_validation_needs_an_ood_test_set():
    with pytest.raises(ValueError, match="dataset 'digits' has no OOD test set"):
        load_federated("digits", num_clients=4, ood_validation_fraction=0.2)
    with pytest.raises(ValueError, match="leaves 0 of the"):
        load_federated("colored-digits", num_clients=4, ood_validation_fraction=1e-6)


def test_run_logs_ood_validation(tmp_path):
    from fedsim.loop import run_experiment
    config = Config(model="mlp", rounds=2, eval_every=1, seeds=(0,), algorithms=("fedavg",),
                    ood_validation_fraction=0.5, num_clients=4, clients_per_round=2)
    rows = run_experiment(config, tmp_path, progress=False)
    assert all(0.0 <= row["ood_val_acc"] <= 1.0 and row["ood_val_loss"] > 0 for row in rows)
    assert "ood_val_acc" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_run_logs_validation_and_color_reliance(tmp_path):
    from fedsim.loop import run_experiment
    config = Config(model="mlp", rounds=2, eval_every=1, seeds=(0,), algorithms=("fedavg",),
                    validation_fraction=0.1, num_clients=4, clients_per_round=2)
    rows = run_experiment(config, tmp_path, progress=False)
    for row in rows:
        assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["color_reliance"] <= 1.0


def test_binary_skew_split_does_not_depend_on_the_seed():
    shares = []
    for seed in (0, 1, 2):
        data = load_federated("colored-digits", split="binary-skew", seed=seed)
        shares.append([float(y.float().mean()) for _, y in data.clients])
        assert sum(len(y) for _, y in data.clients) + len(data.test[1]) == 1797
    for per_client in zip(*shares):  # the same mix for every seed, to rounding
        assert max(per_client) - min(per_client) < 0.02
    first, last = shares[0][0], shares[0][-1]
    assert abs(first - 0.2) < 0.05 and abs(last - 0.8) < 0.05
    assert all(a < b for a, b in zip(shares[0], shares[0][1:]))  # evenly increasing


def test_binary_skew_split_needs_binary_labels():
    with pytest.raises(ValueError, match="needs a binary colored dataset"):
        load_federated("digits", split="binary-skew")
    with pytest.raises(ConfigError, match="split 'binary-skew'"):
        Config(dataset="colored-digits-10", split="binary-skew")
