"""The server (``fedsim.server``): an aggregation steps the global buffer by the weighted mean of
the uploads, one cohort (batch) or several (streaming) alike; the GMA mask and the server's
weight decay, by hand; a one-cohort aggregation takes one cohort; the state round trip."""
import pytest
import torch

from fedsim.config import Config
from fedsim.models import build_model
from fedsim.server import Server


def test_fedavg_server_step_is_the_weighted_mean_of_updates(tiny):
    config = Config(**tiny, server_lr=0.5)
    server = Server(build_model("mlp", (1, 4, 4), 3), config, masked=False)
    w = server.params.clone()
    updates = [torch.randn_like(w) for _ in range(3)]
    aggregation = server.aggregation(1)
    aggregation.add(updates, [1.0, 2.0, 5.0])
    stats = aggregation.step()
    expected = w + 0.5 * (1 * updates[0] + 2 * updates[1] + 5 * updates[2]) / 8
    torch.testing.assert_close(server.params, expected)
    assert float(stats.density) == 1.0


def _server(tiny, **settings):
    torch.manual_seed(0)
    config = Config(**{**tiny, **settings})
    return Server(build_model("mlp", (1, 4, 4), 3), config, masked=bool(settings.get("gma_tau")))


def _uploads(w, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=gen) for _ in range(n)]


def _agree(updates):
    """The hard mask at τ = 1: 1 where every update has the same nonzero sign."""
    signs = torch.stack([torch.sign(u) for u in updates])
    return ((signs == signs[0]).all(0) & (signs[0] != 0)).float()


@pytest.mark.parametrize("masked", [False, True])
def test_cohorts_streamed_step_as_one_batch(tiny, masked):
    """Three uploads as one cohort, and as cohorts of 2 and 1 (streaming): the same step, the
    weighted mean (masked by sign agreement with GMA at τ = 1) to float32 rounding."""
    settings = {"server_lr": 0.5, **({"gma_tau": 1.0, "gma_mask": "hard"} if masked else {})}
    batch, streamed = _server(tiny, **settings), _server(tiny, **settings)
    w = batch.params.clone()
    assert torch.equal(streamed.params, w)
    updates, weights = _uploads(w), [1.0, 2.0, 5.0]
    one = batch.aggregation(1)
    one.add(torch.stack(updates), weights)
    one_stats = one.step()
    two = streamed.aggregation(2)
    two.add(torch.stack(updates[:2]), weights[:2])
    two.add(updates[2:], weights[2:])
    two_stats = two.step()
    mask = _agree(updates) if masked else torch.ones_like(w)
    if masked:
        assert 0 < float(mask.mean()) < 1  # the mask does something here
    mean = sum(p * u for p, u in zip(weights, updates)) / sum(weights)
    for server, stats in ((batch, one_stats), (streamed, two_stats)):
        torch.testing.assert_close(server.params, w + 0.5 * mask * mean)
        assert float(stats.density) == pytest.approx(float(mask.mean()))


def test_a_one_cohort_aggregation_takes_one_cohort(tiny):
    server = _server(tiny)
    aggregation = server.aggregation(1)
    aggregation.add(_uploads(server.params, 2), [1.0, 1.0])
    with pytest.raises(RuntimeError, match="a one-cohort aggregation takes one cohort"):
        aggregation.add(_uploads(server.params, 1), [1.0])


@pytest.mark.parametrize("chunks", [1, 2])
def test_server_weight_decay_is_l2_on_every_coordinate_masked_or_not(tiny, chunks):
    """With ``server_weight_decay`` λ the SGD step is ``w + η (m ⊙ mean − λ w)``: the decay
    reaches the coordinates the mask zeroes too."""
    lam, eta = 0.1, 0.5
    server = _server(tiny, server_lr=eta, server_weight_decay=lam, gma_tau=1.0, gma_mask="hard")
    w = server.params.clone()
    updates = _uploads(w)
    aggregation = server.aggregation(chunks)
    if chunks == 1:
        aggregation.add(updates, [1.0, 1.0, 1.0])
    else:
        aggregation.add(updates[:1], [1.0])
        aggregation.add(updates[1:], [1.0, 1.0])
    aggregation.step()
    mask = _agree(updates)
    torch.testing.assert_close(server.params, w + eta * (mask * sum(updates) / 3 - lam * w))


@pytest.mark.parametrize("chunks", [1, 2])
def test_masked_mean_is_the_mask_times_the_weighted_mean_and_leaves_the_server(tiny, chunks):
    server = _server(tiny, gma_tau=1.0, gma_mask="hard")
    w = server.params.clone()
    updates, weights = _uploads(w), [3.0, 1.0, 4.0]
    aggregation = server.aggregation(chunks)
    if chunks == 1:
        aggregation.add(torch.stack(updates), weights)
    else:
        aggregation.add(torch.stack(updates[:2]), weights[:2])
        aggregation.add(torch.stack(updates[2:]), weights[2:])
    got, stats = aggregation.masked_mean()
    mean = sum(p * u for p, u in zip(weights, updates)) / sum(weights)
    torch.testing.assert_close(got, _agree(updates) * mean)
    assert float(stats.density) == pytest.approx(float(_agree(updates).mean()))
    assert torch.equal(server.params, w)  # no step


def test_a_loaded_state_steps_exactly_as_the_saved_server(tiny):
    """Adam's moments travel with the parameters: a fresh server that loads the state of one
    that has stepped takes the identical next step; one given the parameters alone does not."""
    settings = {"server_optimizer": "adam", "server_lr": 0.01}
    stepped = _server(tiny, **settings)
    for seed in (1, 2):
        aggregation = stepped.aggregation(1)
        aggregation.add(_uploads(stepped.params, seed=seed), [1.0, 2.0, 3.0])
        aggregation.step()
    state = stepped.state_dict()
    fresh, bare = _server(tiny, **settings, seeds=(4,)), _server(tiny, **settings)
    fresh.load_state_dict(state)
    bare.flat.copy_(state["params"])
    assert torch.equal(fresh.params, stepped.params) and torch.equal(bare.params, stepped.params)
    for server in (stepped, fresh, bare):
        aggregation = server.aggregation(1)
        aggregation.add(_uploads(server.params, seed=3), [1.0, 2.0, 3.0])
        aggregation.step()
    assert torch.equal(fresh.params, stepped.params)
    assert all(torch.equal(a, b) for a, b in zip(fresh.optimizer.states, stepped.optimizer.states))
    assert not torch.equal(bare.params, stepped.params)
