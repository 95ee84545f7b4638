"""Local training: the batch plan against the batches as they were always drawn, and the cohort
engine against the sequential one (the same per-client updates to float32 rounding for every
algorithm, split and model, and runs that stay close)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.methods import ALGORITHMS
from fedsim.client import (CPU_ACTIVATION_BUDGET, ClientData, client_footprint,
                           client_generator, full_pass_plan, local_steps_of, resolve_engine,
                           shuffled_plan)
from fedsim.config import Config
from fedsim.loop import Simulation, auto_cohort_size, load_data, run_experiment
from fedsim.models import build_model
from fedsim.server import Aggregation

#: 6 clients of unequal sizes (dirichlet), 4 per round, local epochs: clients take different
#: numbers of steps, and most batches end short
SMALL = {"num_clients": 6, "clients_per_round": 4, "max_train": 150, "model": "mlp",
         "seeds": (0,), "batch_size": 16, "local_epochs": 2, "threads": 1, "rounds": 3,
         "min_client_size": 3, "lr": 0.1, "weight_decay": 1e-3}


def _recorded(monkeypatch):
    """Every row folded into an aggregation, in order (copies)."""
    seen: list[torch.Tensor] = []
    add = Aggregation.add

    def recording(self, rows, weights):
        seen.extend(r.clone() for r in rows)
        return add(self, rows, weights)

    monkeypatch.setattr(Aggregation, "add", recording)
    return seen


def _second_round(monkeypatch, config, method, engine):
    """(the rows folded into round 2's aggregations, ``w`` after it, its metrics): round 2, so
    that SCAFFOLD's control variates and the server optimizers' states are no longer zero."""
    config = Config(**{**config.to_dict(), "engine": engine})
    sim = Simulation(config, load_data(config, 0), method, 0)
    sim.round()
    seen = _recorded(monkeypatch)
    metrics = sim.round()
    monkeypatch.undo()
    return torch.stack(seen), sim.server.params.clone(), metrics


def _close(a, b, scale):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def _engines_agree(monkeypatch, config, method):
    """Round 2's per-client updates, ``w`` and metrics of the two engines, to float32 rounding."""
    rows_c, w_c, m_c = _second_round(monkeypatch, config, method, "cohort")
    rows_s, w_s, m_s = _second_round(monkeypatch, config, method, "sequential")
    assert rows_c.shape == rows_s.shape
    _close(rows_c, rows_s, float(rows_s.abs().max()))
    _close(w_c, w_s, float(w_s.abs().max()))
    assert m_c["train_loss"] == pytest.approx(m_s["train_loss"], rel=1e-5)
    assert m_c["mask_density"] == pytest.approx(m_s["mask_density"], abs=0.02)


@pytest.mark.parametrize("split", ["iid", "shards", "dirichlet"])
@pytest.mark.parametrize("method", ALGORITHMS)
def test_engines_agree_on_every_client_update(monkeypatch, method, split):
    _engines_agree(monkeypatch, Config(**SMALL, split=split, algorithms=(method,)), method)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
@pytest.mark.parametrize("method", ["fedavg", "fedgma", "fedadam+gma", "fedgma-v1"])
def test_engines_agree_without_weight_decay(monkeypatch, method, split):
    """Without weight decay or a hook the MLP's steps are taken inside its backward (those
    every client takes, but a last gradient FedGMA v1 keeps)."""
    config = Config(**{**SMALL, "weight_decay": 0.0}, split=split, algorithms=(method,))
    _engines_agree(monkeypatch, config, method)


# ---------------------------------------------------------------- the batch plan

def _reference_batches(x, y, generator, batch_size, steps):
    """Batches as the sequential trainer always drew them: one permutation per pass, each pass
    split into batches of ``batch_size``, the first ``steps`` batches."""
    out = []
    while len(out) < steps:
        perm = torch.randperm(len(y), generator=generator)
        out += list(zip(x[perm].split(batch_size), y[perm].split(batch_size)))
    return out[:steps]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
       batch_size=st.integers(1, 17), epochs=st.integers(1, 3),
       local_steps=st.one_of(st.none(), st.integers(1, 9)))
def test_plan_draws_each_clients_batches_from_its_own_generator(sizes, batch_size, epochs,
                                                                local_steps):
    g = torch.Generator().manual_seed(sum(sizes))
    clients = [(torch.randn(n, 2, generator=g), torch.randint(0, 5, (n,), generator=g))
               for n in sizes]
    data = ClientData(clients)
    ids = list(range(len(sizes)))[::-1]  # any order
    steps = [local_steps_of(sizes[k], batch_size, epochs, local_steps) for k in ids]
    plan = shuffled_plan(data, ids, [client_generator(3, 1, k) for k in ids], batch_size, steps)
    assert plan.steps == steps and plan.index.shape[:2] == (max(steps), len(ids))
    for j, k in enumerate(ids):
        want = _reference_batches(*clients[k], client_generator(3, 1, k), batch_size, steps[j])
        for s in range(max(steps)):
            b = plan.counts[s][j]
            assert bool(plan.active[s, j]) == (s < steps[j])
            if s >= steps[j]:
                assert b == 0 and float(plan.weight[s, j].sum()) == 0
                continue
            xb, yb = want[s]
            assert b == len(yb)
            picked = plan.index[s, j, :b]
            assert torch.equal(data.x[picked], xb) and torch.equal(data.y[picked], yb)
            torch.testing.assert_close(plan.weight[s, j, :b], torch.full((b,), 1 / b))
            assert float(plan.weight[s, j, b:].abs().sum()) == 0  # padding weighs nothing
    for s in range(max(steps)):  # a step's batch is cut to its largest real batch, no less
        index, weight = plan.batch(s)
        assert index.shape == weight.shape == (len(ids), max(plan.counts[s]))
        assert torch.equal(index, plan.index[s, :, :index.shape[1]])
        assert float(weight.sum()) == pytest.approx(float(plan.weight[s].sum()))


def test_full_pass_plan_weighs_every_example_once_by_its_client():
    data = ClientData([(torch.arange(5.0)[:, None], torch.zeros(5, dtype=torch.long)),
                       (torch.arange(12.0)[:, None], torch.ones(12, dtype=torch.long))])
    plan = full_pass_plan(data, [1, 0], chunk=4)
    assert plan.steps == [3, 2] and plan.counts == [[4, 4], [4, 1], [4, 0]]
    for j, (k, n) in enumerate(((1, 12), (0, 5))):
        picked = torch.cat([plan.index[s, j, :plan.counts[s][j]] for s in range(3)])
        assert torch.equal(picked, torch.arange(n) + data.offsets[k])
        torch.testing.assert_close(plan.weight[:, j].sum(), torch.tensor(1.0))


def test_client_data_reads_consecutive_views_in_place_and_copies_otherwise():
    base = torch.randn(10, 3)
    views = ClientData([(base[:4], torch.zeros(4)), (base[4:], torch.zeros(6))])
    assert views.x.data_ptr() == base.data_ptr() and views.x.shape == (10, 3)
    apart = ClientData([(base[6:], torch.zeros(4)), (base[:6], torch.zeros(6))])
    assert apart.x.data_ptr() != base.data_ptr()
    assert torch.equal(apart[0][0], base[6:]) and torch.equal(apart[1][0], base[:6])


# ---------------------------------------------------------------- models, rounds, cohort sizes

@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_engines_agree_on_every_model(monkeypatch, model):
    config = Config(**{**SMALL, "max_train": 60, "local_epochs": 1, "model": model},
                    split="dirichlet", algorithms=("scaffold",))
    rows_c, w_c, _ = _second_round(monkeypatch, config, "scaffold", "cohort")
    rows_s, w_s, _ = _second_round(monkeypatch, config, "scaffold", "sequential")
    _close(rows_c, rows_s, float(rows_s.abs().max()))
    _close(w_c, w_s, float(w_s.abs().max()))


@pytest.mark.parametrize("method", ["fedavg", "fedgma", "scaffold+gma", "fedga", "fedgma-v1"])
def test_engines_stay_close_over_rounds(tmp_path, method):
    results = {}
    for engine in ("cohort", "sequential"):
        config = Config(**{**SMALL, "rounds": 6, "eval_every": 3}, split="dirichlet",
                        algorithms=(method,), engine=engine)
        (tmp_path / engine).mkdir()
        results[engine] = run_experiment(config, tmp_path / engine, progress=False)
    for a, b in zip(results["cohort"], results["sequential"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        if a["test_acc"] is not None:
            assert abs(a["test_acc"] - b["test_acc"]) <= 0.02


@pytest.mark.parametrize("method", ["fedavg", "fedgma", "scaffold", "fedga", "fedgma-v1+gma"])
def test_a_round_in_several_cohorts_equals_one_cohort(method):
    """25 clients a round in cohorts of 4 (the last one of 1) fold into the same step as one
    cohort of 25 (float32 summation order; the same unweighted mask)."""
    base = {**SMALL, "num_clients": 30, "clients_per_round": 25, "max_train": 400,
            "min_client_size": 5, "algorithms": (method,)}
    params = {}
    for size in (4, 25):
        config = Config(**base, split="dirichlet", cohort_size=size)
        sim = Simulation(config, load_data(config, 0), method, 0)
        metrics = [sim.round() for _ in range(2)]
        params[size] = (sim.server.params.clone(), metrics)
    (w4, m4), (w25, m25) = params[4], params[25]
    _close(w4, w25, float(w25.abs().max()))
    for a, b in zip(m4, m25):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["mask_density"] == pytest.approx(b["mask_density"], abs=1e-4)


def test_a_thousand_clients_a_round_in_bounded_cohorts(tmp_path):
    config = Config(num_clients=1000, clients_per_round=1000, split="iid", max_train=1400,
                    min_client_size=1, model="mlp", local_epochs=1, batch_size=8, rounds=2,
                    seeds=(0,), algorithms=("fedgma",), cohort_size=128, threads=1)
    sim = Simulation(config, load_data(config, 0), "fedgma", 0)
    assert sim.trainer._params.shape[0] == 128  # memory: 128 rows, not 1000
    before = sim.server.params.clone()
    metrics = sim.round()
    assert metrics["floats_up"] == 1000 * before.numel()
    assert not torch.equal(before, sim.server.params) and torch.isfinite(sim.server.params).all()


def test_client_footprint_counts_every_modules_output_and_leaves_the_model_as_it_was():
    """The MLP's outputs per example, by hand: Flatten 64, Linear 200, ReLU 200, Linear 200,
    ReLU 200, the body 200, the classifier 10, the model 10; times the batch. The forward draws
    no random numbers and leaves parameters, modes and hooks as they were."""
    mlp = build_model("mlp", (1, 8, 8), 10)
    mlp.body[1].eval()  # a module in its own mode stays so
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    rng = torch.get_rng_state()
    n, activations = client_footprint(mlp, (1, 8, 8), 37)
    assert n == 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    assert activations == 37 * (64 + 4 * 200 + 200 + 10 + 10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert mlp.training and not mlp.body[1].training and mlp.body[3].training
    assert not any(m._forward_hooks for m in mlp.modules())


def test_auto_cohort_size_on_a_cpu_keeps_a_batch_of_activations_within_budget():
    """The 28×28 CNN (about 11 MB of activations a client at batch 32): on a CPU a few
    clients at a time, as many as the budget holds; with room to spare (the MLP), the
    whole round."""
    cpu = torch.device("cpu")
    cnn = build_model("cnn", (2, 28, 28), 2)
    _, activations = client_footprint(cnn, (2, 28, 28), 32)
    want = CPU_ACTIVATION_BUDGET // (4 * activations)
    assert 1 <= want < 10
    assert auto_cohort_size(cnn, (2, 28, 28), 32, cpu, 100) == want
    assert auto_cohort_size(cnn, (2, 28, 28), 32, cpu, 2) == min(2, want)
    mlp = build_model("mlp", (1, 8, 8), 10)
    assert auto_cohort_size(mlp, (1, 8, 8), 32, cpu, 100) == 100


def test_auto_cohort_size_trains_the_whole_round_together_when_it_fits(tiny):
    config = Config(**tiny)
    assert Simulation(config, load_data(config, 0), "fedavg", 0).cohort_size == tiny["clients_per_round"]


def test_auto_engine_is_the_cohort_except_large_vmapped_convolutions_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name, shape, on_cpu, on_cuda in (("mlp", (1, 28, 28), "cohort", "cohort"),
                                         ("cnn", (1, 8, 8), "cohort", "cohort"),
                                         ("cnn", (2, 28, 28), "cohort", "cohort"),
                                         ("resnet", (3, 32, 32), "sequential", "cohort")):
        model = build_model(name, shape, 2)
        assert resolve_engine("auto", model, shape, cpu) == on_cpu
        assert resolve_engine("auto", model, shape, cuda) == on_cuda
        assert resolve_engine("cohort", model, shape, cpu) == "cohort"
