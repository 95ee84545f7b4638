"""FedGMA v1 (``fedsim.algorithms.fedgma_v1``, the workshop algorithm) on the tiny problem, by
hand; a non-finite round leaves the server as it was; its default step size."""
import copy

import pytest
import torch

from .tiny_problem import LR, close, descend, make, play, size_weights, w0

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_fedgma_v1_by_hand():
    p_threshold, eta_s = 0.8, 0.7
    algorithm, server, trainer = make("fedgma-v1", fedgma_v1_p=p_threshold, fedgma_v1_server_lr=eta_s)
    w = w0()
    metrics = play(algorithm, server, trainer)
    ends, grads = zip(*(descend(w, k, 2) for k in (0, 1)))  # grads: gradient of the last step
    p = size_weights((0, 1))
    agreement = (torch.sign(grads[0]) + torch.sign(grads[1])).abs() / 2  # a_k = 1/K
    hard = (agreement >= p_threshold).double()
    close(server.params, p[0] * ends[0] + p[1] * ends[1]
          - eta_s * hard * (p[0] * grads[0] + p[1] * grads[1]))
    assert 0 < hard.mean() < 1  # the mask does something on this problem
    assert metrics["mask_density"] == pytest.approx(float(hard.mean()))


@pytest.mark.parametrize("poison, lr, message", [
    (float("nan"), 0.7, "contain non-finite values"),  # NaN gradients: refused by the mean
    (3e38, 10.0, "gradient step overflows float32"),  # finite mean, w − η·g overflows
])
@pytest.mark.parametrize("name", ["fedgma-v1", "fedgma-v1+gma"])
def test_a_non_finite_fedgma_v1_round_leaves_the_server_as_it_was(monkeypatch, name, poison, lr,
                                                                    message):
    from fedsim.algorithms.fedgma_v1 import FedGMAv1
    from gma_kernels import NonFiniteError

    algorithm, server, trainer = make(name, fedgma_v1_server_lr=lr, server_optimizer="momentum")
    play(algorithm, server, trainer)  # one good round: momentum state is not zero
    before = copy.deepcopy(server.state_dict())
    collect = FedGMAv1.collect

    def poisoned(self, rnd, cohort):
        cohort.grads[:, 5] = poison  # every client, so the hard mask keeps the coordinate
        collect(self, rnd, cohort)

    monkeypatch.setattr(FedGMAv1, "collect", poisoned)
    with pytest.raises(NonFiniteError, match=message):
        play(algorithm, server, trainer, ids=(1, 2))
    after = server.state_dict()
    assert torch.equal(after["params"], before["params"])
    assert after["optimizer"]["steps_taken"] == before["optimizer"]["steps_taken"]
    for got, want in zip(after["optimizer"]["states"], before["optimizer"]["states"]):
        assert torch.equal(got, want) and bool(want.abs().sum() > 0)


def test_fedgma_v1_default_step_size_is_the_local_lr():
    default, explicit = make("fedgma-v1"), make("fedgma-v1", fedgma_v1_server_lr=LR)
    play(*default)
    play(*explicit)
    assert torch.equal(default[1].params, explicit[1].params)
