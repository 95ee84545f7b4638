"""The pfl-research algorithm (gma_kernels.integrations.pfl), inside real pfl simulations:
pfl's ``SimulatedBackend`` with its ``SumAggregator``, a ``PyTorchModel``, a ``FederatedDataset``
of ten non-IID users, five a round."""
from __future__ import annotations

import numpy as np
import pytest
import torch

# pfl is in the dev extra: no importorskip, a missing pfl fails here
from pfl.aggregate.base import SumAggregator
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import StringMetricName, Weighted
from pfl.model.pytorch import PyTorchModel

import reference as ref  # tests/gma_kernels/reference.py: the float64 GMA reference
from gma_kernels import NonFiniteError
from gma_kernels.integrations.pfl import (SIGN_PREFIX, USERS_KEY, GMAFederatedAveraging,
                                          GMAStatistics)

USERS, COHORT, FEATURES, CLASSES = 10, 5, 6, 3


class Net(torch.nn.Module):
    """Softmax regression with the ``loss`` and ``metrics`` a ``PyTorchModel`` needs."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, 4)
        self.out = torch.nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))

    def loss(self, x, y, eval=False):
        self.eval() if eval else self.train()
        return torch.nn.functional.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x, y, eval=False):
        self.eval() if eval else self.train()
        loss = torch.nn.functional.cross_entropy(self(x), y.long(), reduction="sum")
        return {"loss": Weighted(float(loss), len(x))}


def flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])


def simulate(algorithm_factory, *, rounds: int = 3, weighting: bool = False, seed: int = 0,
             central=lambda params: torch.optim.SGD(params, lr=1.0), nan_user: int | None = None):
    """One pfl simulation; returns (initial flat params, final flat params). Everything
    random is seeded here, in the same order for every algorithm."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = {}
    for user in range(USERS):  # non-IID: each user's features shifted, its labels skewed
        n = int(rng.integers(5, 20))
        x = (rng.standard_normal((n, FEATURES)) + 0.3 * (user - USERS / 2)).astype(np.float32)
        y = (rng.integers(0, CLASSES, n) + user) % CLASSES
        if user == nan_user:
            x[0, 0] = np.nan
        data[user] = [x, y.astype(np.float32)]
    users = FederatedDataset.from_slices(data, get_user_sampler("minimize_reuse",
                                                                list(range(USERS))))
    net = Net()
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=central(net.parameters()))
    algorithm = algorithm_factory()
    backend = SimulatedBackend(training_data=users, val_data=users,
                               postprocessors=[WeightByDatapoints()] if weighting else [])
    initial = flat(net)
    algorithm.run(NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=10**6,
                                    train_cohort_size=COHORT, val_cohort_size=None),
                  backend, model,
                  NNTrainHyperParams(local_num_epochs=2, local_learning_rate=0.1,
                                     local_batch_size=4),
                  NNEvalHyperParams(local_batch_size=None),
                  send_metrics_to_platform=False)
    return initial, flat(net)


class Recording(GMAFederatedAveraging):
    """Records each round's users (Δ_k as trained, the datapoint count) and the parameters
    after each central step, and the step's metrics."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.rounds: list[tuple[list[tuple[torch.Tensor, int]], torch.Tensor]] = []
        self.metrics: list[dict] = []
        self.dropped: list[float] = []
        self._users: list[tuple[torch.Tensor, int]] = []

    def train_one_user(self, initial_model_state, model, user_dataset, central_context):
        stats, metrics = super().train_one_user(initial_model_state, model, user_dataset,
                                                central_context)
        if stats is not None:  # before any weighting: the values are Δ_k itself
            delta = torch.cat([stats[n].reshape(-1).clone() for n in model.variable_map])
            self._users.append((delta, len(user_dataset)))
        return stats, metrics

    def process_aggregated_statistics(self, central_context, aggregate_metrics, model,
                                      statistics):
        model, metrics = super().process_aggregated_statistics(
            central_context, aggregate_metrics, model, statistics)
        after = torch.cat([v.detach().reshape(-1).clone() for v in model.variable_map.values()])
        self.rounds.append((self._users, after))
        self.metrics.append({str(k): float(v.overall_value) for k, v in metrics})
        self.dropped.append(aggregate_metrics[StringMetricName("GMA dropped users")]
                            .overall_value)
        self._users = []
        return model, metrics


# ----------------------------------------------------------------------------- τ = 0


@pytest.mark.parametrize("weighting", [False, True], ids=["by-user", "by-datapoints"])
def test_tau0_equals_pfl_federated_averaging(weighting):
    """τ = 0, central SGD with lr 1: pfl's own FederatedAveraging, parameter for parameter."""
    initial, fedavg = simulate(FederatedAveraging, weighting=weighting)
    initial_gma, gma = simulate(lambda: GMAFederatedAveraging(tau=0.0), weighting=weighting)
    assert torch.equal(initial, initial_gma)
    assert (fedavg - initial).abs().max() > 1e-2  # the rounds moved the model
    torch.testing.assert_close(gma, fedavg, rtol=1e-5, atol=1e-6)


def test_tau0_adam_equals_fedavg_with_central_torch_adam():
    """Central Adam: GMA's adam with bias_correction is pfl's FedAvg with a central
    torch.optim.Adam (the model update read as the negative gradient)."""
    _, fedavg = simulate(FederatedAveraging, rounds=4,
                         central=lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.9, 0.99),
                                                            eps=1e-3))
    _, gma = simulate(lambda: GMAFederatedAveraging(tau=0.0, optimizer="adam", lr=0.05,
                                                    beta1=0.9, beta2=0.99, eps=1e-3,
                                                    bias_correction=True), rounds=4)
    torch.testing.assert_close(gma, fedavg, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- τ = 0.4


CASES = {
    "soft-sgd": dict(settings=dict(mask="soft"), weighting=False),
    "hard-weighted-adam": dict(settings=dict(mask="hard", weighted_agreement=True,
                                             optimizer="adam", lr=0.05), weighting=True),
    "soft-momentum-after": dict(settings=dict(mask="soft", optimizer="momentum", lr=0.5,
                                              momentum=0.8, mask_placement="after"),
                                weighting=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tau04_equals_float64_reference(case):
    """τ = 0.4 over four rounds: every round's parameters are the float64 GMA step
    (tests/gma_kernels/reference.py) from the users' recorded Δ_k and weights."""
    settings, weighting = CASES[case]["settings"], CASES[case]["weighting"]
    algorithm = None

    def make():
        nonlocal algorithm
        algorithm = Recording(tau=0.4, **settings)
        return algorithm

    initial, final = simulate(make, rounds=4, weighting=weighting)
    assert len(algorithm.rounds) == 4
    reference = ref.Optimizer(initial, kind=settings.get("optimizer", "sgd"),
                              lr=settings.get("lr", 1.0), momentum=settings.get("momentum", 0.9),
                              placement=settings.get("mask_placement", "before"), tau=0.4,
                              mask=settings["mask"],
                              weighted_agreement=settings.get("weighted_agreement", False))
    densities = []
    for (users, after), metrics in zip(algorithm.rounds, algorithm.metrics):
        assert len(users) == COHORT
        deltas = torch.stack([d for d, _ in users])
        weights = [n for _, n in users] if weighting else None
        reference.step(deltas, weights)
        torch.testing.assert_close(after.double(), reference.params, rtol=1e-5, atol=1e-6)
        density = ref.density(deltas, weights, tau=0.4, mask=settings["mask"],
                              weighted=settings.get("weighted_agreement", False))
        assert metrics["GMA mask density"] == pytest.approx(density, abs=1e-6)
        assert metrics["GMA users"] == COHORT
        densities.append(density)
    assert torch.equal(final, algorithm.rounds[-1][1])
    assert any(d < 1 for d in densities)  # the mask did mask something


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("settings, named", [
    (dict(tau=2), "tau"),
    (dict(tau=-0.1), "tau"),
    (dict(mask="median"), "mask"),
    (dict(optimizer="lamb"), "optimizer"),
    (dict(lr=-1.0), "lr"),
    (dict(beta2=1.5, optimizer="adam"), "beta2"),
    (dict(weighted_agreement="yes"), "weighted_agreement"),
    (dict(rescale=True, optimizer="adam", mask_placement="after"), "rescale"),
    (dict(bias_correction=True), "bias_correction"),
    (dict(nonfinite="skip"), "nonfinite"),
    (dict(backend="fortran"), "backend"),
])
def test_bad_setting_is_one_clear_line_before_anything_runs(settings, named):
    with pytest.raises(ValueError) as err:
        GMAFederatedAveraging(**settings)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("GMAFederatedAveraging: ")
    assert named in message


def test_positional_settings_are_refused():
    with pytest.raises(TypeError):
        GMAFederatedAveraging(0.4)


# ----------------------------------------------------------------------------- statistics


def user_stats(seed: int, weighted: bool) -> GMAStatistics:
    g = torch.Generator().manual_seed(seed)
    delta = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    data = dict(delta)
    data.update((SIGN_PREFIX + k, torch.sign(v)) for k, v in delta.items())
    data[USERS_KEY] = torch.ones(1)
    return GMAStatistics(data, 1.0, weighted)


@pytest.mark.parametrize("weighted", [False, True])
def test_reweight_scales_the_updates_and_only_weighted_signs(weighted):
    stats = user_stats(1, weighted)
    before = {k: v.clone() for k, v in stats.items()}
    stats.reweight(7.0)
    assert stats.weight == 7.0
    for key, value in stats.items():
        scaled = key != USERS_KEY and (weighted or not key.startswith(SIGN_PREFIX))
        torch.testing.assert_close(value, before[key] * (7.0 if scaled else 1.0))


@pytest.mark.parametrize("weighted", [False, True])
def test_sums_survive_sum_aggregator_and_the_all_reduce_wire_format(weighted):
    """Two workers' SumAggregator sums, added as pfl's all-reduce adds them (the
    ``get_weights`` vectors, then ``from_weights``), are the sum over all users."""
    users = [user_stats(s, weighted) for s in range(5)]
    for k, u in enumerate(users):
        u.reweight(float(k + 1))
    agg = SumAggregator()
    workers = []
    for part in (users[:2], users[2:]):
        total = None
        for u in part:
            total = agg.accumulate(accumulated=total, user_stats=u)
        workers.append(total)
    (meta0, w0), (meta1, w1) = (w.get_weights() for w in workers)
    reduced = workers[0].from_weights(meta0 + meta1, [a + b for a, b in zip(w0, w1)])
    assert isinstance(reduced, GMAStatistics) and reduced.weighted_agreement == weighted
    assert reduced.weight == pytest.approx(15.0)
    for key in users[0].keys():
        torch.testing.assert_close(reduced[key], sum(u[key] for u in users))
    assert float(reduced[USERS_KEY]) == 5.0


def test_adding_other_statistics_is_refused():
    with pytest.raises(ValueError, match="weighted_agreement"):
        user_stats(0, False) + user_stats(1, True)


# ----------------------------------------------------------------------------- NaN and inf


def test_nonfinite_user_raises_naming_the_user():
    with pytest.raises(NonFiniteError, match="user 3"):
        simulate(lambda: GMAFederatedAveraging(tau=0.4), nan_user=3, rounds=2)


def test_nonfinite_user_dropped():
    algorithm = None

    def make():
        nonlocal algorithm
        algorithm = Recording(tau=0.4, nonfinite="drop")
        return algorithm

    _, final = simulate(make, nan_user=3, rounds=2)
    assert bool(torch.isfinite(final).all())
    # minimize_reuse with five of ten users a round: user 3 is in exactly one of two rounds
    users = sorted(m["GMA users"] for m in algorithm.metrics)
    assert users == [COHORT - 1, COHORT]
    assert sorted(algorithm.dropped) == [0, 1]
    for users_of_round, _ in algorithm.rounds:
        assert all(bool(torch.isfinite(d).all()) for d, _ in users_of_round)


# ----------------------------------------------------------------------------- checkpoints


def test_optimizer_state_survives_save_and_load(tmp_path):
    algorithm = None

    def make():
        nonlocal algorithm
        algorithm = GMAFederatedAveraging(tau=0.4, optimizer="adam", lr=0.05)
        return algorithm

    simulate(make, rounds=2)
    saved = algorithm.server_optimizer.state_dict()
    assert saved["steps_taken"] == 2 and float(saved["states"][1].abs().max()) > 0
    algorithm.save(str(tmp_path))
    restored = GMAFederatedAveraging(tau=0.4, optimizer="adam", lr=0.05)
    restored.load(str(tmp_path))
    assert restored._current_central_iteration == 2
    # the state is loaded with the first step, once the model's size is known
    opt = restored._optimizer({"w": torch.zeros(saved["states"][0].numel())})
    assert opt.steps_taken == 2
    for a, b in zip(opt.states, saved["states"]):
        assert torch.equal(a, b)
