"""FedGA (``fedsim.algorithms.fedga``) on the tiny problem, by hand; at β = 0 it is FedAvg."""
import pytest

from .tiny_problem import close, fedga_by_hand, make, play

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_fedga_by_hand():
    beta = 0.3
    algorithm, server, trainer = make("fedga", fedga_beta=beta)
    play(algorithm, server, trainer)
    close(server.params, fedga_by_hand(beta, steps=2))


def test_fedga_at_beta_zero_is_fedavg():
    ga, avg = make("fedga", fedga_beta=0.0), make("fedavg")
    play(*ga)
    play(*avg)
    close(ga[1].params, avg[1].params.double())
