"""SCAFFOLD (``fedsim.algorithms.scaffold``) on the tiny problem, by hand: two rounds with a
newcomer, equal weights, GMA on the model updates only, and its state through a state dict."""
import pytest
import torch

from .tiny_problem import close, descend, make, play, scaffold_by_hand, w0

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_scaffold_two_rounds_by_hand_with_a_newcomer():
    """Round 1: clients 0, 1 (c = c_k = 0). Round 2: client 1 again (its c_1 persisted) and
    client 2, which never took part (c_2 = 0)."""
    algorithm, server, trainer = make("scaffold")
    expected = scaffold_by_hand(0, [(0, 1), (1, 2)])
    assert algorithm.client_state == {}
    for ids, (w, c, cs) in zip([(0, 1), (1, 2)], expected):
        play(algorithm, server, trainer, ids)
        close(server.params, w)
        close(algorithm.c, c)
        assert set(algorithm.client_state) == set(cs)
        for k, c_k in cs.items():
            close(algorithm.client_state[k]["c"], c_k)
    assert set(algorithm.client_state) == {0, 1, 2}
    # c stays the mean of all clients' c_k (zero for none)
    close(algorithm.c, sum(cs.values()) / 3)


def test_scaffold_first_round_is_fedavg_with_equal_weights():
    scaffold, s_server, s_trainer = make("scaffold")
    play(scaffold, s_server, s_trainer)
    w = w0()
    ends = [descend(w, k, 2)[0] for k in (0, 1)]
    close(s_server.params, (ends[0] + ends[1]) / 2)  # not size-weighted (3 vs 5 examples)


def test_scaffold_with_gma_hard_mask_by_hand():
    algorithm, server, trainer = make("scaffold+gma", gma_tau=1.0, gma_mask="hard")
    w = w0()
    play(algorithm, server, trainer)
    deltas = [descend(w, k, 2)[0] - w for k in (0, 1)]
    agree = (torch.sign(deltas[0]) == torch.sign(deltas[1])) & (deltas[0] != 0)
    close(server.params, w + agree.double() * (deltas[0] + deltas[1]) / 2)
    assert 0 < agree.double().mean() < 1
    # the control variates are not masked: c is SCAFFOLD's
    plain, p_server, p_trainer = make("scaffold")
    play(plain, p_server, p_trainer)
    assert torch.equal(algorithm.c, plain.c)


def test_scaffold_state_survives_a_state_dict_round_trip(tmp_path):
    straight = make("scaffold")
    for ids in [(0, 1), (1, 2)]:
        play(*straight, ids)
    saved = {"server": straight[1].state_dict(), "algorithm": straight[0].state_dict()}
    torch.save(saved, tmp_path / "state.pt")
    fresh = make("scaffold", seeds=(5,))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh[1].load_state_dict(state["server"])
    fresh[0].load_state_dict(state["algorithm"])
    assert torch.equal(fresh[0].c, straight[0].c) and fresh[0].c.abs().sum() > 0
    assert all(torch.equal(fresh[0].client_state[k]["c"], straight[0].client_state[k]["c"])
               for k in (0, 1, 2))
    play(*straight, (0, 2))
    play(*fresh, (0, 2))
    assert torch.equal(fresh[1].params, straight[1].params)
    assert torch.equal(fresh[0].c, straight[0].c)
