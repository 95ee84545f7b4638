"""Flower strategies (gma_kernels.integrations.flower) with real Flower records and messages:
the same result as gma_kernels on the same arrays, Flower's own result at gma_tau = 0, and
Flower's handling of error and inconsistent replies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

# flwr is part of the test install (the dev extra): these tests run on every push
from flwr.app import (Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata,
                      MetricRecord, RecordDict)
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

import gma_kernels as gk
from gma_kernels.integrations.flower import (GMAFedAdagrad, GMAFedAdam, GMAFedAvg, GMAFedAvgM,
                                             GMAFedYogi)

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 72), "fc.bias": (10,)}
PAIRS = [  # (ours, Flower's, constructor options both take)
    (GMAFedAvg, FedAvg, {}),
    (GMAFedAvgM, FedAvgM, {"server_momentum": 0.9, "server_learning_rate": 0.7}),
    (GMAFedAvgM, FedAvgM, {"server_learning_rate": 0.5}),
    (GMAFedAdam, FedAdam, {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}),
    (GMAFedYogi, FedYogi, {}),
    (GMAFedAdagrad, FedAdagrad, {"eta": 0.2}),
]
ATOL = {FedAvg: 1e-6, FedAvgM: 2e-6, FedAdam: 2e-5, FedYogi: 2e-5, FedAdagrad: 2e-5}
PAIR_IDS = ["fedavg", "fedavgm", "fedavgm-no-momentum", "fedadam", "fedyogi", "fedadagrad"]


# ----------------------------------------------------------------------------- helpers


class FakeGrid:
    """What FedAvg.configure_train asks of a Grid: the connected nodes."""

    def get_node_ids(self):
        return [11, 12, 13, 14]


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower >= 1.3x stamps instruction messages with the running task's identity, which a
    ServerApp sets; configure_train outside one needs it set."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        yield
        return
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def metadata(node: int) -> Metadata:
    return Metadata(1, "", node, 0, "", "1", 0.0, 3600.0, MessageType.TRAIN)


def reply(node: int, arrays: dict, num_examples: float, **metrics) -> Message:
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": num_examples, "loss": 0.1 * node, **metrics})})
    return Message(content, metadata=metadata(node))


def error_reply(node: int) -> Message:
    return Message(error=Error(code=0, reason="client crashed"), metadata=metadata(node))


def make_model(rng, shapes=SHAPES, dtype=np.float32) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def make_clients(rng, model, k=4, scale=0.1):
    """Client models: a shared drift (so agreement varies) plus client noise."""
    drift = {key: rng.standard_normal(v.shape) * scale for key, v in model.items()}
    return [{key: (v + drift[key] * rng.uniform(-0.5, 1.5, v.shape)
                   + rng.standard_normal(v.shape) * scale).astype(v.dtype)
             for key, v in model.items()} for _ in range(k)]


def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def flat(arrays: dict, keys=None) -> torch.Tensor:
    keys = keys or list(arrays)
    return torch.cat([torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)).reshape(-1)
                      for k in keys])


def assert_arrays_close(ours: ArrayRecord, expected: dict, *, rtol=1e-5, atol=1e-6):
    got = arrays_of(ours)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].shape == np.shape(value), key
        np.testing.assert_allclose(got[key].astype(np.float64), np.asarray(value, np.float64),
                                   rtol=rtol, atol=atol, err_msg=key)


def run_round(strategy, server_round, arrays: ArrayRecord, replies):
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid())
    assert len(list(messages)) == 4
    return strategy.aggregate_train(server_round, replies)


# ----------------------------------------------------------------------------- tau = 0


@pytest.mark.parametrize(("ours", "theirs", "options"), PAIRS, ids=PAIR_IDS)
def test_tau0_equals_flower(ours, theirs, options):
    """gma_tau = 0: three rounds of the same arrays and metrics as Flower's own strategy
    (optimizer state carried over), error replies included."""
    rng = np.random.default_rng(0)
    model = make_model(rng)
    a = ours(gma_tau=0.0, **options)
    b = theirs(**options)
    ours_arrays = theirs_arrays = to_record(model)
    for server_round in (1, 2, 3):
        clients = make_clients(rng, arrays_of(theirs_arrays))
        replies = [reply(11 + k, c, 10 * (k + 1)) for k, c in enumerate(clients)]
        replies.insert(2, error_reply(99))
        new_ours, metrics_ours = run_round(a, server_round, ours_arrays, replies)
        new_theirs, metrics_theirs = run_round(b, server_round, theirs_arrays, replies)
        # adaptive steps divide by √v + ε: Flower’s own cancellation in (average − w) shows
        assert_arrays_close(new_ours, arrays_of(new_theirs), rtol=1e-5, atol=ATOL[theirs])
        assert dict(metrics_ours) == pytest.approx(dict(metrics_theirs))
        assert all(new_ours[k].dtype == "float32" for k in SHAPES)  # FedAdam's are float64
        ours_arrays, theirs_arrays = new_ours, new_theirs


@pytest.mark.parametrize("streaming", [False, True])
def test_tau0_gmafedavg_is_weighted_fedavg(streaming):
    rng = np.random.default_rng(1)
    model = make_model(rng)
    clients = make_clients(rng, model, k=5)
    weights = [3, 1, 4, 1, 5]
    replies = [reply(20 + k, c, w) for k, (c, w) in enumerate(zip(clients, weights))]
    new, _ = run_round(GMAFedAvg(gma_tau=0.0, streaming=streaming), 1, to_record(model), replies)
    expected = {key: sum(w * c[key].astype(np.float64) for w, c in zip(weights, clients))
                / sum(weights) for key in model}
    assert_arrays_close(new, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- = gma_kernels


@pytest.mark.parametrize("mask", ["soft", "hard"])
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("weighted_agreement", [False, True])
def test_gmafedavg_equals_gma_kernels(mask, streaming, weighted_agreement):
    rng = np.random.default_rng(2)
    model = make_model(rng)
    clients = make_clients(rng, model, k=6)
    weights = [5.0, 1.0, 2.0, 8.0, 3.0, 1.0]
    replies = [reply(30 + k, c, w) for k, (c, w) in enumerate(zip(clients, weights))]
    strategy = GMAFedAvg(gma_tau=0.5, mask=mask, server_learning_rate=0.8, streaming=streaming,
                         weighted_agreement=weighted_agreement)
    new, _ = run_round(strategy, 1, to_record(model), replies)
    w = flat(model)
    updates = [flat(c) - w for c in clients]
    g = gk.masked_mean(updates, weights, tau=0.5, mask=mask,
                       weighted_agreement=weighted_agreement, backend="torch")
    expected = w + 0.8 * g
    np.testing.assert_allclose(flat(arrays_of(new)).numpy(), expected.numpy(), rtol=1e-5,
                               atol=1e-6)
    stats = strategy.last_stats
    assert stats.num_clients == 6 and 0 < float(stats.density) < 1


@pytest.mark.parametrize(("ours", "kind", "options"), [
    (GMAFedAdam, "adam", {"eta": 0.05}),
    (GMAFedYogi, "yogi", {"eta": 0.05, "beta_1": 0.5}),
    (GMAFedAdagrad, "adagrad", {"eta": 0.05}),
    (GMAFedAvgM, "momentum", {"server_momentum": 0.8, "server_learning_rate": 0.9}),
], ids=["adam", "yogi", "adagrad", "momentum"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_adaptive_strategies_equal_server_optimizer(ours, kind, options, placement):
    """Two rounds: the strategy's hyperparameters mapped onto ServerOptimizer, state kept."""
    rng = np.random.default_rng(3)
    model = make_model(rng)
    strategy = ours(gma_tau=0.6, mask="soft", mask_placement=placement, **options)
    params = flat(model)
    if kind == "momentum":
        hyper = {"lr": 0.9, "momentum": 0.8}
    else:
        hyper = {"beta1": strategy.beta_1, "beta2": strategy.beta_2, "eps": strategy.tau}
    opt = gk.ServerOptimizer(params, kind, tau=0.6, mask="soft", mask_placement=placement,
                             backend="torch", **{"lr": 0.05, **hyper})
    arrays = to_record(model)
    for server_round in (1, 2):
        clients = make_clients(rng, arrays_of(arrays), k=5)
        weights = [1.0, 2.0, 3.0, 4.0, 5.0]
        replies = [reply(40 + k, c, w) for k, (c, w) in enumerate(zip(clients, weights))]
        if kind == "adam":  # Flower's FedAdam: bias correction folded into the step size
            opt.step_config = type(opt.step_config)(**{
                **opt.step_config.__dict__,
                "lr": 0.05 * math.sqrt(1 - 0.99 ** (server_round + 1))
                / (1 - 0.9 ** (server_round + 1))})
        opt.step([flat(c) - params for c in clients], weights)
        arrays, _ = run_round(strategy, server_round, arrays, replies)
        np.testing.assert_allclose(flat(arrays_of(arrays)).numpy(), params.numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert strategy.server_optimizer.step_config.kind == kind


# ----------------------------------------------------------------------------- replies


def test_error_replies_dropped_like_flower():
    rng = np.random.default_rng(4)
    model = make_model(rng)
    clients = make_clients(rng, model, k=3)
    good = [reply(50 + k, c, 7 + k) for k, c in enumerate(clients)]
    with_errors = [error_reply(60), good[0], error_reply(61), good[1], good[2]]
    a, b = GMAFedAvg(gma_tau=0.4), GMAFedAvg(gma_tau=0.4)
    new_a, metrics_a = run_round(a, 1, to_record(model), with_errors)
    new_b, metrics_b = run_round(b, 1, to_record(model), good)
    assert_arrays_close(new_a, arrays_of(new_b), rtol=0, atol=0)
    assert dict(metrics_a) == dict(metrics_b)
    # only errors: nothing to aggregate, as FedAvg
    assert run_round(GMAFedAvg(), 1, to_record(model),
                     [error_reply(1), error_reply(2)]) == (None, None)
    assert FedAvg().aggregate_train(1, [error_reply(1)]) == (None, None)


def test_inconsistent_replies_rejected_like_flower():
    rng = np.random.default_rng(5)
    model = make_model(rng)
    c = make_clients(rng, model, k=2)
    missing_weight = [reply(1, c[0], 3), Message(RecordDict({
        "arrays": to_record(c[1]), "metrics": MetricRecord({"loss": 1.0})}), metadata=metadata(2))]
    for strategy in (FedAvg(), GMAFedAvg()):
        strategy.configure_train(1, to_record(model), ConfigRecord(), FakeGrid())
        with pytest.raises(InconsistentMessageReplies):
            strategy.aggregate_train(1, missing_weight)


def test_weighted_by_key_and_metrics_aggregation():
    rng = np.random.default_rng(6)
    model = make_model(rng)
    clients = make_clients(rng, model, k=3)
    replies = [reply(70 + k, c, 1, samples=s, acc=a)
               for k, (c, s, a) in enumerate(zip(clients, [10, 30, 60], [0.5, 0.7, 0.9]))]
    ours = GMAFedAvg(gma_tau=0.0, weighted_by_key="samples")
    theirs = FedAvg(weighted_by_key="samples")
    new_ours, m_ours = run_round(ours, 1, to_record(model), replies)
    new_theirs, m_theirs = run_round(theirs, 1, to_record(model), replies)
    assert_arrays_close(new_ours, arrays_of(new_theirs), rtol=1e-5, atol=1e-6)
    assert dict(m_ours) == pytest.approx(dict(m_theirs))
    assert m_ours["acc"] == pytest.approx(0.1 * 0.5 + 0.3 * 0.7 + 0.6 * 0.9)


def test_nonfinite_reply_dropped_or_raised():
    rng = np.random.default_rng(7)
    model = make_model(rng)
    clients = make_clients(rng, model, k=4)
    bad = {k: v.copy() for k, v in clients[2].items()}
    bad["fc.weight"][3, 4] = np.nan
    replies = [reply(80 + k, c, 5) for k, c in enumerate(clients[:2] + [bad] + clients[3:])]
    clean = [r for k, r in enumerate(replies) if k != 2]
    for streaming in (False, True):
        dropped, metrics = run_round(GMAFedAvg(streaming=streaming), 1, to_record(model),
                                     replies)
        expected, expected_metrics = run_round(GMAFedAvg(), 1, to_record(model), clean)
        assert_arrays_close(dropped, arrays_of(expected), rtol=1e-6, atol=1e-7)
        assert dict(metrics) == pytest.approx(dict(expected_metrics))
        strict = GMAFedAvg(nonfinite="raise", streaming=streaming)
        with pytest.raises(AggregationError, match="node 82"):
            run_round(strict, 1, to_record(model), replies)
        assert run_round(GMAFedAvg(streaming=streaming), 1, to_record(model),
                         [replies[2], reply(90, bad, 1)]) == (None, None)


# ----------------------------------------------------------------------------- arrays


def test_dtypes_shapes_keys_preserved():
    """float16/float64/int/bool arrays, a scalar and a Fortran-ordered array come back with
    their keys (in order), shapes and dtypes; integers get the rounded weighted mean."""
    rng = np.random.default_rng(8)
    model = {"w16": rng.standard_normal((4, 5)).astype(np.float16),
             "w64": rng.standard_normal((3, 7)),
             "scalar": np.array(0.5, dtype=np.float32),
             "steps": np.array(10, dtype=np.int64),
             "flags": np.array([True, False, True]),
             "wf": np.asfortranarray(rng.standard_normal((6, 4)).astype(np.float32))}
    clients = []
    for k in range(3):
        c = {key: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
             for key, v in model.items() if v.dtype.kind == "f"}
        c["wf"] = np.asfortranarray(c["wf"])
        c["steps"] = np.array(10 + 4 * k, dtype=np.int64)
        c["flags"] = np.array([True, k == 2, k > 0])
        clients.append({key: c[key] for key in reversed(list(model))})  # other key order
    replies = [reply(k + 1, c, 1) for k, c in enumerate(clients)]
    new, _ = run_round(GMAFedAvg(gma_tau=0.0), 1, to_record(model), replies)
    assert list(new.keys()) == list(model)
    for key, value in model.items():
        assert new[key].dtype == str(value.dtype) and tuple(new[key].shape) == value.shape, key
    got = arrays_of(new)
    assert got["steps"] == 14 and got["flags"].tolist() == [True, False, True]
    for key in ("w16", "w64", "scalar", "wf"):
        mean = sum(c[key].astype(np.float64) for c in clients) / 3
        np.testing.assert_allclose(got[key], mean, rtol=2e-3 if key == "w16" else 1e-6,
                                   atol=1e-3 if key == "w16" else 1e-6, err_msg=key)


def test_needs_global_arrays_and_matching_keys():
    rng = np.random.default_rng(9)
    model = make_model(rng)
    replies = [reply(k + 1, c, 1) for k, c in enumerate(make_clients(rng, model, k=2))]
    with pytest.raises(AggregationError, match="configure_train"):
        GMAFedAvg().aggregate_train(1, replies)
    strategy = GMAFedAvg()
    strategy.set_global_arrays(to_record({k: v for k, v in model.items() if k != "fc.bias"}))
    with pytest.raises(AggregationError, match="different keys"):
        strategy.aggregate_train(1, replies)
    strategy.set_global_arrays(to_record({**model, "fc.bias": np.zeros(11, np.float32)}))
    with pytest.raises(AggregationError, match="shape"):
        strategy.aggregate_train(1, replies)


def test_optimizer_state_kept_then_reset_on_new_layout():
    rng = np.random.default_rng(10)
    model = make_model(rng)
    strategy = GMAFedAdam(eta=0.1)
    arrays = to_record(model)
    arrays, _ = run_round(strategy, 1, arrays,
                          [reply(k + 1, c, 1) for k, c in enumerate(make_clients(rng, model))])
    opt = strategy.server_optimizer
    first_moment = opt.states[0].clone()
    assert float(first_moment.abs().sum()) > 0
    run_round(strategy, 2, arrays, [reply(k + 1, c, 1) for k, c in
                                    enumerate(make_clients(rng, arrays_of(arrays)))])
    assert strategy.server_optimizer is opt
    other = {"w": np.ones((3, 3), np.float32)}
    run_round(strategy, 3, to_record(other), [reply(1, {"w": np.full((3, 3), 2, np.float32)}, 1),
                                              reply(2, {"w": np.full((3, 3), 3, np.float32)}, 1)])
    assert strategy.server_optimizer is not opt and strategy.server_optimizer.params.numel() == 9


def test_constructor_options():
    s = GMAFedAdam(gma_tau=0.3, mask="hard", tau=0.01, eta=0.2, fraction_train=0.5)
    assert (s.gma_tau, s.mask, s.tau, s.eta, s.fraction_train) == (0.3, "hard", 0.01, 0.2, 0.5)
    assert GMAFedAvg(0.5, 0.25).fraction_evaluate == 0.25  # FedAvg's positional options pass
    with pytest.raises(TypeError, match="gma_tau"):
        GMAFedAvg(tau=0.4)
    # errors name the argument as the strategy takes it
    with pytest.raises(ValueError, match=r"^GMAFedAvg: gma_tau must be <= 1.0, got 1.5$"):
        GMAFedAvg(gma_tau=1.5)
    with pytest.raises(ValueError, match=r"^GMAFedAdam: gma_tau must be <= 1.0, got 2.0$"):
        GMAFedAdam(gma_tau=2)
    with pytest.raises(ValueError, match="mask='medium' is not one of"):
        GMAFedYogi(mask="medium")
    with pytest.raises(ValueError, match="rescale"):
        GMAFedAdam(rescale=True, mask_placement="after")
    with pytest.raises(ValueError, match=r"^GMAFedAdagrad: tau must be > 0.0, got 0.0$"):
        GMAFedAdagrad(tau=0.0)  # Flower's tau is the epsilon
    with pytest.raises(ValueError, match=r"^GMAFedAdam: eta must be >= 0.0, got -1.0$"):
        GMAFedAdam(eta=-1)  # as given, not after the bias correction
    with pytest.raises(ValueError, match="^GMAFedYogi: beta_1 must be <= 1.0"):
        GMAFedYogi(beta_1=1.5)
    with pytest.raises(ValueError, match="^GMAFedAvgM: server_momentum must be <= 1.0"):
        GMAFedAvgM(server_momentum=2.0)
    with pytest.raises(ValueError, match="^GMAFedAvg: server_learning_rate must be >= 0.0"):
        GMAFedAvg(server_learning_rate=-0.5)
    # settings that used to fail only at the first aggregation
    with pytest.raises(ValueError, match="nonfinite='skip' is not one of"):
        GMAFedAvg(nonfinite="skip")
    with pytest.raises(ValueError, match="backend='cuda' is not one of 'auto', 'triton', 'torch'"):
        GMAFedAvg(backend="cuda")


def test_adagrad_step_closer_to_float64_than_flowers():
    """Why the adaptive pairs above need a wider tolerance: ``g / (|g| + ε)`` amplifies the
    cancellation in Flower's ``average − w``; the updates ``w_k − w`` read here do not suffer it."""
    rng = np.random.default_rng(0)
    model = make_model(rng)
    clients = make_clients(rng, model)
    replies = [reply(11 + k, c, 10 * (k + 1)) for k, c in enumerate(clients)]
    ours, _ = run_round(GMAFedAdagrad(gma_tau=0.0, eta=0.2), 1, to_record(model), replies)
    theirs, _ = run_round(FedAdagrad(eta=0.2), 1, to_record(model), replies)
    for key, w in model.items():
        w = w.astype(np.float64)
        g = sum(p * (c[key] - w) for p, c in zip([0.1, 0.2, 0.3, 0.4], clients))
        reference = w + 0.2 * g / (np.abs(g) + 1e-3)
        err_ours = np.abs(ours[key].numpy() - reference).max()
        err_theirs = np.abs(theirs[key].numpy() - reference).max()
        assert err_ours < 5e-7 and err_ours < err_theirs, (key, err_ours, err_theirs)
