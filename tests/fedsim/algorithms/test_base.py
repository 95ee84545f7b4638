"""What holds for every algorithm (``fedsim.algorithms.base``): GMA off is exactly the plain
algorithm, GMA on changes the aggregation, and what each exchanges per round."""
import pytest
import torch

from fedsim.methods import PLAIN, masked_name

from .tiny_problem import N, make, play

pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


@pytest.mark.parametrize("name", PLAIN)
def test_gma_at_tau_zero_is_exactly_the_plain_algorithm(name):
    twin = masked_name(name)
    runs = []
    for method in (name, twin):
        algorithm, server, trainer = make(method, gma_tau=0.0, gma_mask="hard",
                                          momentum_server_lr=0.05, adaptive_server_lr=0.05)
        metrics = [play(algorithm, server, trainer, ids) for ids in [(0, 1), (1, 2), (0, 2)]]
        runs.append((server.params.clone(), algorithm.state_dict(), metrics))
    (w_a, state_a, m_a), (w_b, state_b, m_b) = runs
    assert torch.equal(w_a, w_b)
    assert m_a == m_b
    # GMA off: the plain algorithm's server averages with τ = 0 whatever gma_tau says
    assert make(name, gma_tau=0.9)[1].optimizer.mask_config.tau == 0.0
    assert make(twin, gma_tau=0.9)[1].optimizer.mask_config.tau == 0.9
    if "c" in state_a:
        assert torch.equal(state_a["c"], state_b["c"])


@pytest.mark.parametrize("name", [n for n in PLAIN if n != "fedgma-v1"])
def test_gma_on_changes_the_aggregation(name):
    twin = masked_name(name)
    plain_run = make(name, gma_tau=1.0, gma_mask="hard", adaptive_server_lr=0.05)
    twin_run = make(twin, gma_tau=1.0, gma_mask="hard", adaptive_server_lr=0.05)
    m_plain, m_twin = play(*plain_run), play(*twin_run)
    assert not torch.equal(plain_run[1].params, twin_run[1].params)
    assert m_plain["mask_density"] == 1.0 and m_twin["mask_density"] < 1.0


@pytest.mark.parametrize("name, down, up", [
    ("fedavg", N, N), ("fedgma", N, N), ("fedprox", N, N), ("fedavgm", N, N), ("fedadam+gma", N, N),
    ("scaffold", 2 * N, 2 * N), ("scaffold+gma", 2 * N, 2 * N),
    ("fedpvr", N + 10, N + 10), ("fedpvr+gma", N + 10, N + 10),  # classifier: 8 + 2 corrected
    ("fedga", 2 * N, 2 * N), ("gradalign", 2 * N, 2 * N),
    ("fedgma-v1", N, 2 * N), ("fedgma-v1+gma", N, 2 * N),
])
def test_communication_per_round(name, down, up):
    algorithm, server, trainer = make(name, adaptive_server_lr=0.05)
    metrics = play(algorithm, server, trainer)  # 2 clients
    assert (metrics["floats_down"], metrics["floats_up"]) == (2 * down, 2 * up)
    assert metrics["comm_vs_fedavg"] == pytest.approx((down + up) / (2 * N))
