"""FedProx (``fedsim.algorithms.fedprox``) on the tiny problem, by hand."""
import pytest

from .tiny_problem import close, descend, make, play, size_weights, w0

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def test_fedprox_by_hand():
    mu = 0.5
    algorithm, server, trainer = make("fedprox", fedprox_mu=mu)
    w = w0()
    play(algorithm, server, trainer)
    ends = [descend(w, k, 2, extra=lambda y: mu * (y - w))[0] for k in (0, 1)]
    p = size_weights((0, 1))
    close(server.params, p[0] * ends[0] + p[1] * ends[1])
    # the proximal term pulls towards w: the clients moved less than FedAvg's
    plain = [descend(w, k, 2)[0] for k in (0, 1)]
    assert all((e - w).norm() < (f - w).norm() for e, f in zip(ends, plain))
