"""FedPVR (``fedsim.algorithms.fedpvr``) on the tiny problem: SCAFFOLD's correction from a layer on,
by hand; from the first layer it is SCAFFOLD; its start layer and saved state are checked."""
import pytest
import torch

from fedsim.algorithms import build_algorithm
from fedsim.config import Config
from fedsim.server import Server

from .tiny_problem import CLASSIFIER, N, TinyNet, close, make, play, scaffold_by_hand

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_fedpvr_two_rounds_by_hand():
    algorithm, server, trainer = make("fedpvr")  # default start: classifier.weight
    assert algorithm.start == CLASSIFIER and algorithm.c.numel() == N - CLASSIFIER
    for ids, (w, c, cs) in zip([(0, 1), (1, 2)], scaffold_by_hand(CLASSIFIER, [(0, 1), (1, 2)])):
        play(algorithm, server, trainer, ids)
        close(server.params, w)
        close(algorithm.c, c[CLASSIFIER:])
        assert not c[:CLASSIFIER].any()
        for k, c_k in cs.items():
            close(algorithm.client_state[k]["c"], c_k[CLASSIFIER:])
    assert algorithm.c.abs().sum() > 0


def test_fedpvr_from_the_first_layer_is_scaffold():
    pvr = make("fedpvr", fedpvr_start_layer="body.1.weight")
    scaffold = make("scaffold")
    for ids in [(0, 1), (1, 2), (0, 2)]:
        play(*pvr, ids)
        play(*scaffold, ids)
    assert torch.equal(pvr[1].params, scaffold[1].params)
    assert torch.equal(pvr[0].c, scaffold[0].c)


def test_fedpvr_refuses_state_of_another_size():
    pvr, scaffold = make("fedpvr"), make("scaffold")
    with pytest.raises(ValueError, match="saved control variate has 26 elements"):
        pvr[0].load_state_dict(scaffold[0].state_dict())


def test_fedpvr_start_layer_checked_against_the_actual_model():
    config = Config(model="mlp", fedpvr_start_layer="body.3.weight", num_clients=3, clients_per_round=2)
    algorithm = build_algorithm("fedpvr", config)
    server = Server(TinyNet(), config, masked=False)  # TinyNet has no body.3
    with pytest.raises(ValueError, match="fedpvr_start_layer: 'body.3.weight' is not in the layout"):
        algorithm.setup(server)
