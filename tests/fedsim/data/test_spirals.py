"""The spirals task (``fedsim.data.spirals``) and the AND-mask it was made for: FedSGD FedGMA
with server Adam is the centralized AND-mask, step for step, against a float64 reference."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedsim.config import Config, ConfigError
from fedsim.data import load_federated
from fedsim.data.spirals import SPIRALS_TEST_SIZE
from fedsim.loop import Simulation, load_data


def _features(x: torch.Tensor) -> np.ndarray:
    return x.flatten(1).double().numpy()


def test_the_shortcut_is_each_environments_signature_and_noise_out_of_distribution():
    data = load_federated("spirals", num_clients=5, seed=3, spiral_client_size=37,
                          spiral_shortcut_dims=7, spiral_revolutions=2.5)
    assert data.input_shape == (1, 1, 9) and data.num_classes == 2
    assert [len(y) for _, y in data.clients] == [37] * 5
    signatures = []
    for x, y in data.clients:
        f, sign = _features(x), 2 * y.numpy()[:, None] - 1
        shortcut = f[:, 2:] * sign  # the same vector s_e on every row
        np.testing.assert_allclose(shortcut, np.broadcast_to(shortcut[0], shortcut.shape),
                                   rtol=0, atol=1e-6)
        signatures.append(shortcut[0])
        np.testing.assert_allclose(f[:, :2].std(0), 1.0, rtol=1e-5)  # each column scaled
    assert np.linalg.matrix_rank(np.array(signatures)) == 5  # one signature per environment
    ood_x, ood_y = data.ood_test
    assert len(ood_y) == SPIRALS_TEST_SIZE
    ood = _features(ood_x)[:, 2:]
    assert abs(ood.mean()) < 0.05 and abs(ood.std() - 1) < 0.05
    # noise: unrelated to the label (the shortcut's correlation with 2y - 1 is about 0)
    corr = np.corrcoef(ood.sum(1), 2 * ood_y.numpy() - 1)[0, 1]
    assert abs(corr) < 0.1
    # ID test rows carry one of the training signatures
    id_x, id_y = data.test
    rows = _features(id_x)[:, 2:] * (2 * id_y.numpy()[:, None] - 1)
    distance = np.abs(rows[:, None, :] - np.array(signatures)[None]).max(2).min(1)
    assert distance.max() < 1e-5


def test_the_mechanism_is_shared_by_the_environments():
    """The spirals alone predict the label in another environment (1-nearest neighbour on the
    two mechanism features, fit on one environment, tested on another), the shortcut of one
    environment does not carry over to the next."""
    data = load_federated("spirals", num_clients=2, seed=0, spiral_client_size=800,
                          spiral_shortcut_dims=3, spiral_revolutions=3.0)
    (xa, ya), (xb, yb) = data.clients
    fa, fb = _features(xa), _features(xb)

    def nearest(train, test):
        d = ((test[:, None, :] - train[None]) ** 2).sum(2)
        return ya.numpy()[d.argmin(1)]

    assert (nearest(fa[:, :2], fb[:, :2]) == yb.numpy()).mean() > 0.9
    # the ID test set's mechanism follows the same rule, and so does the OOD test set's
    (xi, yi), (xo, yo) = data.test, data.ood_test
    assert (nearest(fa[:, :2], _features(xi)[:, :2]) == yi.numpy()).mean() > 0.9
    assert (nearest(fa[:, :2], _features(xo)[:, :2]) == yo.numpy()).mean() > 0.9


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data():
    a, b, c = (load_federated("spirals", num_clients=3, seed=s, spiral_client_size=11)
               for s in (4, 4, 5))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a.clients, b.clients))
    assert not torch.equal(a.clients[0][0], c.clients[0][0])


@pytest.mark.parametrize("settings,message", [
    ({"spiral_client_size": 1}, "spiral_client_size must be an integer >= 2"),
    ({"spiral_shortcut_dims": -1}, "spiral_shortcut_dims must be an integer >= 0"),
    ({"spiral_revolutions": 0.0}, "spiral_revolutions must be a finite number > 0"),
    ({"model": "cnn"}, "model must be mlp or leaky-mlp"),
    ({"split": "iid"}, "split do not apply to dataset 'spirals'"),
    ({"max_train": 100}, "max_train do not apply"),
    ({"label_noise": 0.1}, "binary colored datasets only"),
])
def test_bad_spiral_settings_get_one_clear_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        Config(**{"dataset": "spirals", "model": "leaky-mlp", **settings})


def test_spiral_settings_are_refused_on_other_datasets():
    with pytest.raises(ConfigError, match="spiral_shortcut_dims apply to dataset 'spirals' only"):
        Config(spiral_shortcut_dims=4)


# -- the AND-mask, step for step ----------------------------------------------------------------

def _and_mask_step(model, w, m, v, t, clients, *, tau, lr, beta1, beta2, eps, weight_decay):
    """One centralized AND-mask step in float64, as DomainBed's ``ANDMask`` takes it, from
    parameters ``w`` and Adam state ``(m, v)`` (``torch.optim.Adam``'s ``exp_avg``,
    ``exp_avg_sq``) at step ``t``: per-environment gradients, mask ``|mean sign| ≥ τ``, masked
    mean gradient ``/ (density + 1e-10)`` (the density over the whole model, as fedsim's flat
    buffer has it; DomainBed takes it per tensor), then Adam with L2 weight decay and bias
    correction. Returns the new (w, m, v) and which coordinates had an environment gradient
    whose sign float32 may get wrong (fedsim computes in float32): under 1e-6 of the largest
    (an environment whose examples the model already fits has gradients of 1e-9 and less, where
    float32's softmax rounds), or where the L2 term all but cancels the masked gradient (Adam
    turns the sign of what is left into a whole step)."""
    grads = _env_gradients(model, w, clients)
    mask = (grads.sign().mean(0).abs() >= tau).double()
    masked = mask * grads.mean(0) / (mask.mean() + 1e-10)
    g = masked + weight_decay * w
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    step = lr / (1 - beta1 ** t) * m / ((v / (1 - beta2 ** t)).sqrt() + eps)
    fragile = (grads.abs() < 1e-6 * grads.abs().max()).any(0) \
        | (g.abs() < 1e-4 * (masked.abs() + (weight_decay * w).abs()))  # L2 cancels the rest
    return w - step, m, v, fragile


def _env_gradients(model, w, clients):
    """Each environment's mean-loss gradient at flat parameters ``w`` (``[E, N]``, in
    ``w``'s dtype)."""
    shapes = [p.shape for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    grads = []
    for x, y in clients:
        leaves = {n: t.view(s).clone().requires_grad_() for n, t, s in
                  zip(names, w.split([math.prod(s) for s in shapes]), shapes)}
        loss = F.cross_entropy(functional_call(model, leaves, (x.to(w.dtype),)), y)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(leaves.values()))]))
    return torch.stack(grads)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_fedsgd_fedgma_with_server_adam_is_the_and_mask(tau):
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-3)
    config = Config(dataset="spirals", model="leaky-mlp", num_clients=4, clients_per_round=4,
                    spiral_client_size=23, spiral_shortcut_dims=2, local_steps=1, batch_size=64,
                    lr=1.0, algorithms=("fedgma",), server_optimizer="adam",
                    adaptive_server_lr=hyper["lr"], server_beta1=hyper["beta1"],
                    server_beta2=hyper["beta2"], server_eps=hyper["eps"],
                    server_bias_correction=True, server_weight_decay=hyper["weight_decay"],
                    gma_tau=tau, gma_mask="hard", gma_rescale=True, seeds=(0,), threads=1)
    data = load_data(config, 0)
    sim = Simulation(config, data, "fedgma", 0)
    model = copy.deepcopy(sim.server.model).double()  # the reference's float64 forward
    opt = sim.server.optimizer
    for t in range(1, 6):
        w = sim.server.params.detach().double().clone()
        m, v = -opt.states[0].double(), opt.states[1].double()  # fedsim's m is along −∇
        want, _, _, fragile = _and_mask_step(model, w, m, v, t, data.clients, tau=tau, **hyper)
        sim.round()
        got = sim.server.params.double()
        assert int(fragile.sum()) < 0.05 * len(w), t
        off = ((got - want).abs() > 1e-4 * want.abs() + 1e-6) & ~fragile
        assert int(off.sum()) <= 1e-4 * len(w), (t, int(off.sum()))  # float32's stray steps
        assert float((got - want).abs().max()) <= 3 * hyper["lr"]
        assert opt.steps_taken == t
    assert not torch.equal(got, w)  # it moved
