"""GradAlign (``fedsim.algorithms.gradalign``) on the tiny problem, by hand: FedGA with one local
step, though ``make`` asks for two."""
import pytest

from .tiny_problem import close, fedga_by_hand, make, play

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_gradalign_by_hand():
    beta = 0.3
    algorithm, server, trainer = make("gradalign", fedga_beta=beta)
    play(algorithm, server, trainer)
    close(server.params, fedga_by_hand(beta, steps=1))
