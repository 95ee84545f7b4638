"""The simulation loop: FedAvg ≡ FedGMA at τ = 0, a tiny end-to-end run, local SGD, an
in-process save/restore that continues exactly, and a heap that keeps freed memory."""
import json

import pytest
import torch

from fedsim.algorithms import Round
from fedsim.client import ClientData, build_trainer
from fedsim.config import Config
from fedsim.loop import Simulation, load_data, run_experiment
from fedsim.models import build_model
from fedsim.report import COLUMNS


def _models(run_dir, method, seed=0):
    return torch.load(run_dir / f"model-{method}-seed{seed}.pt", weights_only=True)


@pytest.mark.parametrize("mask", ["soft", "hard"])
def test_fedgma_at_tau_zero_is_exactly_fedavg(tmp_path, tiny, mask):
    config = Config(**tiny, algorithms=("fedavg", "fedgma"), gma_tau=0.0, gma_mask=mask)
    rows = run_experiment(config, tmp_path, progress=False)
    avg, gma = _models(tmp_path, "fedavg"), _models(tmp_path, "fedgma")
    assert avg.keys() == gma.keys()
    assert all(torch.equal(avg[k], gma[k]) for k in avg)
    strip = lambda r: {k: v for k, v in r.items() if k != "method"}  # noqa: E731
    assert [strip(r) for r in rows if r["method"] == "fedavg"] == \
           [strip(r) for r in rows if r["method"] == "fedgma"]


def test_tiny_end_to_end_run(tmp_path, tiny):
    config = Config(**{**tiny, "seeds": (0, 1)}, gma_tau=0.4)
    rows = run_experiment(config, tmp_path, progress=False)
    assert len(rows) == 2 * 2 * 3  # seeds x algorithms x rounds
    assert all(list(r) == list(COLUMNS) for r in rows)
    evaluated = [r for r in rows if r["test_acc"] is not None]
    assert sorted({r["round"] for r in evaluated}) == [2, 3]  # every 2 rounds, and the last
    for r in evaluated:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["ood_acc"] <= 1 and r["test_loss"] > 0
    assert all(r["mask_density"] == 1.0 for r in rows if r["method"] == "fedavg")
    assert all(0 < r["mask_density"] < 1 for r in rows if r["method"] == "fedgma")
    assert not all(torch.equal(a, b) for a, b in zip(_models(tmp_path, "fedavg").values(),
                                                     _models(tmp_path, "fedgma").values()))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)


def test_dataset_without_ood_set(tmp_path, tiny):
    rows = run_experiment(Config(**tiny, dataset="digits", algorithms=("fedavg",)), tmp_path,
                          progress=False)
    assert rows[-1]["test_acc"] is not None and rows[-1]["ood_acc"] is None


def test_models_are_views_of_the_flat_buffers(tiny):
    config = Config(**tiny, engine="sequential")
    sim = Simulation(config, load_data(config, 0), "fedgma", 0)
    for model, flat in ((sim.server.model, sim.server.params),
                        (sim.trainer.model, sim.trainer.flat.buffer)):
        for p in model.parameters():
            assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    for p in sim.trainer.model.parameters():
        assert p.grad.untyped_storage().data_ptr() == sim.trainer.grad.untyped_storage().data_ptr()
    before = sim.server.params.clone()
    sim.round()
    assert not torch.equal(before, sim.server.params)
    assert all(p.grad.untyped_storage().data_ptr() == sim.trainer.grad.untyped_storage().data_ptr()
               for p in sim.trainer.model.parameters())  # autograd kept writing into the views


def test_a_cohort_is_rows_of_one_matrix_reused_round_after_round(tiny):
    sim = Simulation(Config(**tiny, engine="cohort"), load_data(Config(**tiny), 0), "fedavg", 0)
    rnd = Round(sim.server, sim.trainer, [[0, 2]], 0, 1)
    cohort = rnd.cohort([0, 2])
    assert cohort.params.shape == (2, sim.server.params.numel())
    assert torch.equal(cohort.params, sim.server.params.expand(2, -1))
    views = sim.trainer._views(cohort.params)
    assert all(v.untyped_storage().data_ptr() == cohort.params.untyped_storage().data_ptr()
               for v in views.values())
    assert [tuple(v.shape[1:]) for v in views.values()] == \
           [tuple(p.shape) for p in sim.server.model.parameters()]
    sim.algorithm.local_train(rnd, cohort)
    trained = cohort.params.clone()
    updates = cohort.updates()
    assert updates.data_ptr() == cohort.params.data_ptr()  # made in place
    torch.testing.assert_close(updates, trained - sim.server.params)
    assert cohort.updates() is updates  # once only
    assert rnd.cohort([1]).params.data_ptr() == cohort.params.data_ptr()  # the same buffer


def _trainer(engine: str, x, y, **kwargs):
    torch.manual_seed(0)
    return build_trainer(engine, build_model("mlp", (1, 4, 4), 3), ClientData([(x, y)]), lr=0.1,
                         batch_size=8, cohort_size=1, **kwargs)


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
@pytest.mark.parametrize("kwargs, steps", [({"local_epochs": 2}, 2 * 3),  # 20 examples, batch 8
                                           ({"local_epochs": 1, "local_steps": 7}, 7)])
def test_local_training_runs_the_right_number_of_steps(engine, kwargs, steps):
    x, y = torch.rand(20, 1, 4, 4), torch.randint(0, 3, (20,))
    trainer = _trainer(engine, x, y, **kwargs)
    calls = []
    w = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    cohort = trainer.cohort([0], w, [torch.Generator().manual_seed(0)])
    loss = trainer.train(cohort, hook=lambda g, p, rows: calls.append(g.shape))
    assert calls == [(1, w.numel())] * steps and cohort.steps == [steps]
    assert loss.shape == (1,) and loss[0] > 0


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
def test_local_sgd_step_matches_torch_sgd(engine):
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    trainer = _trainer(engine, x, y, local_epochs=1, weight_decay=0.01)
    reference = build_model("mlp", (1, 4, 4), 3)
    reference.load_state_dict(trainer.model.state_dict())
    w = torch.cat([p.detach().flatten() for p in reference.parameters()])
    cohort = trainer.cohort([0], w, [torch.Generator().manual_seed(0)])
    trainer.train(cohort)  # one batch: order does not matter
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, weight_decay=0.01)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    opt.step()
    torch.testing.assert_close(cohort.params[0],
                               torch.cat([p.detach().flatten() for p in reference.parameters()]))


def test_a_diverging_run_stops_with_the_model_before_and_the_others_go_on(tmp_path, tiny):
    """lr 1e38 overflows the local step, so every update is non-finite in round 1: that run
    stops there (its row marked ``diverged``, evaluated on the untouched model), and the next
    method still runs; resuming changes nothing."""
    from fedsim.report import summarize
    config = Config(**{**tiny, "algorithms": ("fedavg", "fedgma"), "lr": 1e38, "rounds": 3,
                       "eval_every": 1})
    rows = run_experiment(config, tmp_path, progress=False)
    assert [(r["method"], r["round"], r["diverged"]) for r in rows] == [
        ("fedavg", 1, True), ("fedgma", 1, True)]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)  # the initial model, evaluated
    init = torch.load(tmp_path / "model-fedavg-seed0.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in init.values())
    assert summarize(rows)["fedgma"]["test_acc"]["per_seed"] == {0: rows[1]["test_acc"]}
    assert run_experiment(config, tmp_path, resume=True, progress=False) == rows
