"""The cohort engine against the sequential one: the same batches give the same per-client
updates (to float32 rounding) for every algorithm, split and model, and runs that stay close."""
from __future__ import annotations

import pytest
import torch

from fedsim.algorithms import ALGORITHMS
from fedsim.client import ClientData, CohortTrainer, SequentialTrainer, shuffled_plan, client_generator
from fedsim.config import Config
from fedsim.loop import Simulation, load_data
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


@pytest.mark.parametrize("split", ["iid", "shards", "dirichlet"])
@pytest.mark.parametrize("method", ALGORITHMS)
def test_engines_agree_on_every_client_update(monkeypatch, method, split):
    config = Config(**SMALL, split=split, algorithms=(method,))
    rows_c, w_c, m_c = _second_round(monkeypatch, config, method, "cohort")
    rows_s, w_s, m_s = _second_round(monkeypatch, config, method, "sequential")
    assert rows_c.shape == rows_s.shape
    _close(rows_c, rows_s, float(rows_s.abs().max()))
    _close(w_c, w_s, float(w_s.abs().max()))
    assert m_c["train_loss"] == pytest.approx(m_s["train_loss"], rel=1e-5)
    assert m_c["mask_density"] == pytest.approx(m_s["mask_density"], abs=0.02)
