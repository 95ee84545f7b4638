"""The ``irm`` client algorithm (``fedsim.algorithms.irm``): its closed-form penalty is the
gradient at a scale, its loss hook trains the same on both engines, and FedSGD ``irm`` with
server Adam is centralized IRMv1 step for step. (The protocol's data:
``tests/fedsim/data/test_irm.py``.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedsim.algorithms.irm import irm_loss
from fedsim.client import ClientData, build_trainer, client_generator
from fedsim.config import Config
from fedsim.data import FederatedDataset
from fedsim.loop import Simulation
from fedsim.models import build_model


def _autograd_irm(logits, y, weight):
    """IRMv1 as the IRM code writes it: the gradient of the loss at a ``scale`` tensor."""
    scale = torch.ones((), dtype=logits.dtype, requires_grad=True)
    loss = (F.cross_entropy(logits * scale, y, reduction="none") * weight).sum()
    (slope,) = torch.autograd.grad(loss, [scale], create_graph=True)
    return loss, slope ** 2


def test_the_closed_form_penalty_is_the_scale_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 2, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (3, 5), generator=gen)
    weight = torch.rand(3, 5, dtype=torch.float64, generator=gen)
    got = irm_loss(7.0, 2.0)(logits, y, weight)
    for k in range(3):
        loss, pen = _autograd_irm(logits[k], y[k], weight[k])
        torch.testing.assert_close(got[k], (loss + 7.0 * pen) / 2.0)


def test_both_engines_train_the_same_with_a_loss_hook():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(50, 2, 3, 3, generator=gen), torch.randint(0, 2, (50,), generator=gen)
    data = ClientData([(x[:20], y[:20]), (x[20:50], y[20:50])])
    torch.manual_seed(0)
    model = build_model("irm-mlp", (2, 3, 3), 2)
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    results = []
    for engine in ("cohort", "sequential"):
        trainer = build_trainer(engine, copy.deepcopy(model), data, lr=0.05, batch_size=8,
                                local_epochs=1, weight_decay=0.01, cohort_size=2)
        cohort = trainer.cohort([0, 1], w, [client_generator(0, 1, k) for k in (0, 1)])
        losses = trainer.train(cohort, loss=irm_loss(50.0, 50.0))
        results.append((cohort.params.clone(), losses))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1])
    assert not torch.allclose(results[0][0], w.expand(2, -1))  # they moved


def _centralized_irm(model, clients, steps, *, l2, penalty_weight, anneal, **adam):
    """The IRM code's training loop in float64: ``nll = mean_e L_e``, ``penalty = mean_e
    pen_e`` (at a ``scale`` tensor), ``loss = nll + l2 Σ‖w‖² + λ penalty`` (``λ = 1`` before
    step ``anneal``), divided by ``λ`` when ``λ > 1``; ``torch.optim.Adam``. The flat
    parameters after each step."""
    model = copy.deepcopy(model).double()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, **adam)
    out = []
    for step in range(steps):
        terms = [_autograd_irm(model(x.double()), y, torch.full((len(y),), 1 / len(y),
                                                                dtype=torch.float64))
                 for x, y in clients]
        nll = torch.stack([t[0] for t in terms]).mean()
        penalty = torch.stack([t[1] for t in terms]).mean()
        weight = penalty_weight if step >= anneal else 1.0
        loss = nll + l2 * sum(p.pow(2).sum() for p in params) + weight * penalty
        if weight > 1.0:
            loss = loss / weight
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in params]))
    return out


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
def test_fedsgd_irm_with_server_adam_is_centralized_irmv1(engine):
    l2, penalty_weight, anneal, lr = 1e-3, 1000.0, 2, 1e-3
    gen = torch.Generator().manual_seed(2)
    clients = []
    for p in (0.1, 0.2):  # two small environments whose color predicts the label
        y = torch.randint(0, 2, (24,), generator=gen)
        color = y ^ (torch.rand(24, generator=gen) < p).long()
        x = torch.rand(24, 1, 3, 3, generator=gen)
        clients.append((torch.cat([x * (1 - color.view(-1, 1, 1, 1)),
                                   x * color.view(-1, 1, 1, 1)], 1), y))
    data = FederatedDataset("irm-fashion-mnist", clients, clients[0], clients[1], 2, (2, 3, 3),
                            {"coloring": "binary", "seed": 0})
    config = Config(dataset="irm-fashion-mnist", model="irm-mlp", num_clients=2,
                    clients_per_round=2, local_steps=1, batch_size=64, lr=1.0,
                    weight_decay=2 * l2, algorithms=("irm",), server_optimizer="adam",
                    adaptive_server_lr=lr, server_beta1=0.9, server_beta2=0.999,
                    server_eps=1e-8, server_bias_correction=True, engine=engine,
                    irm_penalty_weight=penalty_weight, irm_anneal_rounds=anneal, seeds=(0,),
                    threads=1)
    sim = Simulation(config, data, "irm", 0)
    want = _centralized_irm(sim.server.model, clients, 5, l2=l2, penalty_weight=penalty_weight,
                            anneal=anneal, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    start = sim.server.params.double().clone()
    for t, w in enumerate(want):
        sim.round()
        got = sim.server.params.double()
        off = (got - w).abs() > 1e-3 * lr + 1e-5 * w.abs()
        assert int(off.sum()) <= 1e-4 * len(w), (t, int(off.sum()), float((got - w).abs().max()))
    assert float((got - start).abs().max()) > 2 * lr  # it moved
