"""FedAvg (``fedsim.algorithms.fedavg``) on the tiny problem, by hand: plain, with GMA's soft mask
(FedGMA), and as the client side of the server-optimizer algorithms (FedAvgM, FedAdam, FedYogi,
FedAdagrad), whose names fix the server's step."""
import pytest
import torch

from fedsim.methods import server_optimizer_of

from .tiny_problem import close, descend, fedavg_mean_update, make, play, size_weights, w0

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_fedavg_by_hand():
    algorithm, server, trainer = make("fedavg")
    w = w0()
    play(algorithm, server, trainer)
    ends = [descend(w, k, 2)[0] for k in (0, 1)]
    p = size_weights((0, 1))
    close(server.params, w + p[0] * (ends[0] - w) + p[1] * (ends[1] - w))


def test_fedgma_soft_mask_by_hand():
    tau = 0.6
    algorithm, server, trainer = make("fedgma", gma_tau=tau)
    w = w0()
    play(algorithm, server, trainer)
    p = size_weights((0, 1))
    deltas = [descend(w, k, 2)[0] - w for k in (0, 1)]
    a = (torch.sign(deltas[0]) + torch.sign(deltas[1])).abs() / 2
    soft = torch.where(a >= tau, torch.ones_like(a), a)
    close(server.params, w + soft * (p[0] * deltas[0] + p[1] * deltas[1]))


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_by_hand(name):
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-3
    algorithm, server, trainer = make(name, momentum_server_lr=lr, adaptive_server_lr=lr)
    play(algorithm, server, trainer)
    w, g = fedavg_mean_update()
    if name == "fedavgm":  # v = 0.9·0 + g
        want = w + lr * g
    else:  # m = (1 − β1) g; adam and yogi (v0 = 0): v = (1 − β2) g²; adagrad: v = g²
        v = g * g if name == "fedadagrad" else (1 - b2) * g * g
        want = w + lr * (1 - b1) * g / (v.sqrt() + eps)
    close(server.params, want)
    assert server.optimizer.step_config.kind == server_optimizer_of(name)
