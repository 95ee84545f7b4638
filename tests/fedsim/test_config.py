"""Config: defaults, every refusal with a message naming the setting, TOML in and out."""
import pytest

from fedsim.config import Config, ConfigError


def test_defaults_are_valid_and_compare_fedavg_with_fedgma():
    config = Config()
    assert config.algorithms == ("fedavg", "fedgma")
    assert config.dataset == "colored-digits" and config.split == "shards"


@pytest.mark.parametrize("settings, message", [
    ({"clients_per_round": 11, "num_clients": 10},
     "clients_per_round=11 must be between 1 and num_clients=10"),
    ({"clients_per_round": 0}, "clients_per_round=0"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"lr": -0.1}, "lr must be a finite number > 0.0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"server_lr": 0.0}, "server_lr"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"gma_tau": 1.5}, "gma_tau must be a finite number >= 0.0 and <= 1.0"),
    ({"gma_tau": -0.1}, "gma_tau"),
    ({"server_momentum": 1.2}, "server_momentum"),
    ({"server_eps": 0.0}, "server_eps"),
    ({"rounds": 0}, "rounds must be >= 1"),
    ({"local_epochs": 0}, "local_epochs must be >= 1"),
    ({"local_steps": 0}, "local_steps must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"eval_every": 0}, "eval_every must be >= 1"),
    ({"threads": -1}, "threads must be >= 0"),
    ({"num_clients": 0}, "num_clients"),
    ({"dataset": "svhn"}, "dataset: unknown name 'svhn'; valid: colored-digits, colored-digits-10"),
    ({"model": "vit"}, "model: unknown name 'vit'; valid: cnn, mlp, leaky-mlp"),
    ({"algorithms": ("fedavg", "fedfoo")}, "algorithms: unknown name 'fedfoo'; valid: fedavg, fedgma"),
    ({"algorithms": ()}, "algorithms is empty"),
    ({"algorithms": ("fedavg", "fedavg")}, "algorithms has duplicates"),
    ({"split": "random"}, "split: unknown name 'random'; valid: iid, shards, dirichlet"),
    ({"gma_mask": "medium"}, "gma_mask: unknown name 'medium'; valid: soft, hard"),
    ({"gma_mask_placement": "during"}, "gma_mask_placement"),
    ({"server_optimizer": "lamb"}, "server_optimizer: unknown name 'lamb'; valid: sgd, momentum"),
    ({"gma_rescale": True, "gma_mask_placement": "after", "server_optimizer": "adam"}, "gma_rescale"),
    ({"seeds": ()}, "seeds is empty"),
    ({"seeds": (1, 1)}, "seeds has duplicates"),
    ({"seeds": (-1,)}, "seeds must be >= 0"),
    ({"rounds": "ten"}, "rounds must be of type int, got 'ten'"),
    ({"rounds": True}, "rounds must be of type int"),
    ({"seeds": 3}, "seeds must be a list"),
    ({"device": "tpu"}, "device='tpu'"),
])
def test_impossible_settings_are_refused_with_a_clear_message(settings, message):
    with pytest.raises(ConfigError) as err:
        Config(**settings)
    assert message in str(err.value)


def test_cuda_refused_where_there_is_none():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Config(device="cuda")


def test_lists_become_tuples_and_ints_floats():
    config = Config(seeds=[3, 4], algorithms=["fedgma"], lr=1)
    assert config.seeds == (3, 4) and config.algorithms == ("fedgma",)
    assert isinstance(config.lr, float)


def test_toml_round_trip(tmp_path):
    config = Config(rounds=7, seeds=(1, 2), gma_mask="hard", gma_tau=0.8, name='say "hi"',
                    data_dir="/tmp/da\\ta", server_eps=1e-5)
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert Config.from_toml(path) == config
    assert "max_train" not in path.read_text()  # None is left out, and reads back as the default


def test_toml_keys_with_overrides_winning(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 3\nalgorithms = ["fedgma"]\ngma_tau = 0\n')
    config = Config.from_toml(path, rounds=5)
    assert config.rounds == 5 and config.algorithms == ("fedgma",) and config.gma_tau == 0.0


def test_unknown_toml_key_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("rounds = 3\nround = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in .*run.toml: round \(valid: dataset"):
        Config.from_toml(path)


def test_bad_toml_file_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("rounds = \n")
    with pytest.raises(ConfigError, match="cannot read config"):
        Config.from_toml(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        Config.from_toml(tmp_path / "missing.toml")
