"""The algorithms by name (``fedsim/algorithms/__init__.py`` with ``fedsim.methods``): every
algorithm's GMA twin runs its class, names and aliases, the server optimizer a name fixes,
and the hyperparameters ``Config`` refuses."""
import pytest

from fedsim.algorithms import CLASSES, build_algorithm
from fedsim.config import Config, ConfigError
from fedsim.loop import Simulation, load_data
from fedsim.methods import ALGORITHMS, PLAIN, is_masked, masked_name, plain_name, server_optimizer_of

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_every_algorithm_has_a_gma_twin_that_runs_its_class():
    assert len(ALGORITHMS) == 2 * len(PLAIN) and CLASSES.keys() == PLAIN.keys()
    for name in PLAIN:
        twin = masked_name(name)
        assert twin in ALGORITHMS and is_masked(twin) and not is_masked(name)
        assert plain_name(twin) == name and server_optimizer_of(twin) == server_optimizer_of(name)
        assert type(build_algorithm(twin, Config())) is CLASSES[name]
    assert masked_name("fedavg") == "fedgma" and plain_name("fedavg+gma") == "fedavg"


def test_names_compare_and_alias():
    config = Config(algorithms=("fedavg", "fedadam", "scaffold+gma", "fedavg+gma"))
    assert config.algorithms == ("fedavg", "fedadam", "scaffold+gma", "fedgma")
    with pytest.raises(ConfigError, match="algorithms has duplicates"):
        Config(algorithms=("fedgma", "fedavg+gma"))
    assert Config(algorithms=("all",)).algorithms == ALGORITHMS


def test_named_server_optimizer_and_the_flag():
    """fedadam fixes adam (at adaptive_server_lr); fedavg follows --server-optimizer."""
    config = Config(algorithms=("fedavg", "fedadam"), adaptive_server_lr=0.02, server_lr=1.0,
                    model="mlp", num_clients=4, clients_per_round=2, max_train=120, seeds=(0,))
    data = load_data(config, 0)
    kinds = {m: Simulation(config, data, m, 0).server.optimizer.step_config for m in config.algorithms}
    assert (kinds["fedavg"].kind, kinds["fedavg"].lr) == ("sgd", 1.0)
    assert (kinds["fedadam"].kind, kinds["fedadam"].lr) == ("adam", 0.02)
    flag = Config(**{**config.to_dict(), "server_optimizer": "yogi"})
    step = Simulation(flag, data, "fedavg", 0).server.optimizer.step_config
    assert (step.kind, step.lr) == ("yogi", 0.02)
    assert Simulation(flag, data, "fedavgm", 0).server.optimizer.step_config.kind == "momentum"


@pytest.mark.parametrize("settings, message", [
    ({"fedprox_mu": -0.1}, "fedprox_mu must be a finite number >= 0.0, got -0.1"),
    ({"fedprox_mu": float("inf")}, "fedprox_mu must be a finite number"),
    ({"fedga_beta": -1.0}, "fedga_beta must be a finite number >= 0.0, got -1.0"),
    ({"fedgma_v1_p": 1.5}, "fedgma_v1_p must be a finite number >= 0.0 and <= 1.0"),
    ({"fedgma_v1_server_lr": 0.0}, "fedgma_v1_server_lr must be a finite number > 0.0"),
    ({"adaptive_server_lr": -1.0}, "adaptive_server_lr must be a finite number > 0.0"),
    ({"momentum_server_lr": float("nan")}, "momentum_server_lr must be a finite number"),
    ({"server_optimizer": "lamb"}, "server_optimizer: unknown name 'lamb'; valid: sgd, momentum, "
                                   "adam, yogi, adagrad"),
    ({"fedpvr_start_layer": "head.weight"},
     "fedpvr_start_layer: 'head.weight' is not a parameter of model 'cnn'; valid: features.0.weight"),
    ({"fedpvr_start_layer": "body.1.weight"}, "is not a parameter of model 'cnn'"),
    ({"algorithms": ("fedavg", "fednova")}, "algorithms: unknown name 'fednova'; valid: fedavg, "
                                            "fedgma, fedprox, fedprox+gma, scaffold, scaffold+gma"),
    ({"algorithms": ("fedadam+gma",), "gma_rescale": True, "gma_mask_placement": "after"},
     "gma_rescale needs gma_mask_placement='before' with a stateful server optimizer ('adam', "
     "algorithm 'fedadam+gma')"),
])
def test_bad_hyperparameters_are_refused(settings, message):
    with pytest.raises(ConfigError) as err:
        Config(**settings)
    assert message in str(err.value)
