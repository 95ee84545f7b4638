"""The IRM protocol: its Fashion-MNIST data (``fedsim.data.irm``), the ``irm`` client
algorithm's penalty and loss hook on both engines, and FedSGD ``irm`` with server Adam equal
to centralized IRMv1 step for step."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.algorithms.irm import irm_loss
from fedsim.client import ClientData, build_trainer, client_generator
from fedsim.config import Config
from fedsim.data import FederatedDataset, load_federated
from fedsim.data.idx import write_idx
from fedsim.data.sources import IDX_FILES
from fedsim.loop import Simulation
from fedsim.models import build_model


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Random 28 × 28 'Fashion-MNIST' IDX files: 2000 training and 400 test images."""
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("fashion")
    arrays = {"train_x": rng.integers(1, 256, (2000, 28, 28), dtype=np.uint8),
              "train_y": np.arange(2000, dtype=np.uint8) % 10,
              "test_x": rng.integers(1, 256, (400, 28, 28), dtype=np.uint8),
              "test_y": np.arange(400, dtype=np.uint8) % 10}
    for key, stem in IDX_FILES.items():
        write_idx(directory / stem, arrays[key])
    return directory


def _color(x):
    """Each image's color: 1 where channel 1 holds it, else 0."""
    return (x[:, 1].flatten(1).sum(1) > 0).long()


def test_irm_fashion_mnist_is_the_protocol(fashion_dir):
    data = load_federated("irm-fashion-mnist", num_clients=2, split="iid", data_dir=fashion_dir)
    assert data.input_shape == (2, 14, 14) and data.num_classes == 2
    assert data.meta["client_flip_probs"] == [0.1, 0.2] and data.meta["label_noise"] == 0.25
    raw = load_federated("fashion-mnist", num_clients=1, split="iid", data_dir=fashion_dir)
    classes = raw.clients[0][1]
    agree = []
    for x, y in [*data.clients, data.test, data.ood_test]:
        assert x.shape[1:] == (2, 14, 14)
        assert torch.all((x[:, 0] == 0) | (x[:, 1] == 0))  # one channel each
        agree.append(float((_color(x) == y).float().mean()))
    assert agree[0] == pytest.approx(0.9, abs=0.03) and agree[1] == pytest.approx(0.8, abs=0.03)
    assert agree[2] == pytest.approx(0.85, abs=0.05) and agree[3] == pytest.approx(0.1, abs=0.05)
    # the image is the downsampled original, the label its noisy class >= 5
    x, y = data.clients[0]
    drawn = x.sum(1)
    match = [int(torch.nonzero((raw.clients[0][0][:, 0, ::2, ::2] == d).flatten(1).all(1))[0])
             for d in drawn[:50]]
    noise = (classes[match] >= 5).long() != y[:50]
    assert 0 < int(noise.sum()) < 25


def test_many_clients_reversed_colors_gray_oracle_and_validation(fashion_dir):
    many = load_federated("irm-fashion-mnist", num_clients=10, split="iid", data_dir=fashion_dir,
                          reversed_color_fraction=0.3, validation_fraction=0.1)
    probs = np.array(many.meta["client_flip_probs"])
    assert sorted(np.minimum(probs, 1 - probs)) == pytest.approx(np.linspace(0.1, 0.2, 10))
    assert int((probs > 0.5).sum()) == 3 and many.validation[0].shape[1:] == (2, 14, 14)
    gray = load_federated("irm-fashion-mnist-gray", num_clients=2, split="iid",
                          data_dir=fashion_dir)
    for x, _ in [*gray.clients, gray.test, gray.ood_test]:
        assert torch.equal(x[:, 0], x[:, 1]) and x.sum() > 0
    with pytest.raises(ValueError, match="label_noise: dataset 'irm-fashion-mnist' has the IRM"):
        load_federated("irm-fashion-mnist", num_clients=2, data_dir=fashion_dir, label_noise=0.1)


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
