"""The tiny problem every algorithm's one-round test is computed on, by hand and by fedsim.

Three clients (3, 5 and 4 examples of 3 features, two classes) and a two-layer linear network
``x → body (3→4) → classifier (4→2)`` with cross-entropy; its gradient is written out below in
closed form (no autograd), in float64. Local training is full-batch gradient descent (the batch
holds a whole client), so every local step can be replayed exactly by hand.

``make`` builds fedsim's algorithm, server and trainer on this problem for the engine in
``Engine.name`` (the ``engine`` fixture of this folder's ``conftest.py`` sets it); ``play``
runs one round of it.
"""
import copy

import torch
from torch import nn

from fedsim.algorithms import build_algorithm
from fedsim.client import ClientData, build_trainer
from fedsim.config import Config
from fedsim.loop import play_round
from fedsim.methods import is_masked, server_optimizer_of
from fedsim.server import Server

LR = 0.1
SIZES = (3, 5, 4)
#: TinyNet's flat layout: body.1.weight [4, 3], body.1.bias [4], classifier.weight [2, 4],
#: classifier.bias [2]
SHAPES = ((4, 3), (4,), (2, 4), (2,))
N = 26
CLASSIFIER = 16  # flat offset of classifier.weight


class TinyNet(nn.Module):
    """Parameter names as fedsim's MLP starts and ends (``body.1.*``, ``classifier.*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3, 4))
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.body(x))


def _data():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in SIZES:
        x = torch.randn(n, 3, generator=g)
        y = torch.randint(0, 2, (n,), generator=g)
        y[0], y[1] = 0, 1  # both classes on every client
        out.append((x, y))
    return out


DATA = _data()


class Engine:
    """The engine ``make`` builds the trainer for (set per test by the ``engine`` fixture)."""
    name = "cohort"


# ---------------------------------------------------------------- the problem, by hand (float64)

def split(v):
    """Flat vector -> (W1, b1, W2, b2)."""
    parts, offset = [], 0
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        parts.append(v[offset:offset + n].reshape(shape))
        offset += n
    return parts


def grad(v, k):
    """Closed-form gradient of client k's mean cross-entropy at the flat parameters ``v``."""
    x, y = (t.double() if t.is_floating_point() else t for t in DATA[k])
    w1, b1, w2, b2 = split(v)
    h = x @ w1.T + b1
    z = h @ w2.T + b2
    p = torch.exp(z - z.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    dz = (p - torch.eye(2, dtype=torch.float64)[y]) / len(y)
    dh = dz @ w2
    return torch.cat([(dh.T @ x).reshape(-1), dh.sum(0), (dz.T @ h).reshape(-1), dz.sum(0)])


def descend(v, k, steps, extra=lambda y: 0.0):
    """``steps`` full-batch GD steps on client k from ``v``: ``y ← y − η (∇f_k(y) + extra(y))``;
    returns the end point and the last gradient used."""
    y = v.clone()
    for _ in range(steps):
        g = grad(y, k) + extra(y)
        y = y - LR * g
    return y, g


def size_weights(ids):
    total = sum(SIZES[k] for k in ids)
    return [SIZES[k] / total for k in ids]


def scaffold_by_hand(start: int, rounds):
    """SCAFFOLD option II with the correction on flat indices [start:], for the given rounds
    (lists of client ids); returns the global parameters, c and the c_k after each round."""
    w, c, cs, history = w0(), torch.zeros(N, dtype=torch.float64), {}, []
    mask = torch.zeros(N, dtype=torch.float64)
    mask[start:] = 1
    for ids in rounds:
        deltas_y, deltas_c = [], []
        for k in ids:
            c_k = cs.get(k, torch.zeros(N, dtype=torch.float64))  # never took part: zero
            y, _ = descend(w, k, 2, extra=lambda y, c_k=c_k: mask * (c - c_k))
            c_new = mask * (c_k - c + (w - y) / (2 * LR))
            deltas_y.append(y - w)
            deltas_c.append(c_new - c_k)
            cs[k] = c_new
        w = w + sum(deltas_y) / len(ids)  # unweighted mean, η_g = 1
        c = c + len(ids) / 3 * (sum(deltas_c) / len(ids))  # (|S| / N) mean(Δc), N = 3 clients
        history.append((w, c, dict(cs)))
    return history


def fedga_by_hand(beta: float, steps: int):
    """FedGA's round on clients 0 and 1: each starts from ``w − β (ḡ − g_k)`` (``ḡ`` the
    size-weighted mean gradient at ``w``), takes ``steps`` local steps; the size-weighted mean
    of the end points."""
    w = w0()
    p = size_weights((0, 1))
    g = [grad(w, k) for k in (0, 1)]
    g_mean = p[0] * g[0] + p[1] * g[1]
    ends = [descend(w - beta * (g_mean - g[i]), k, steps)[0] for i, k in enumerate((0, 1))]
    return w + p[0] * (ends[0] - w) + p[1] * (ends[1] - w)


def fedavg_mean_update():
    """``w`` and FedAvg's size-weighted mean update of clients 0 and 1 (2 local steps)."""
    w = w0()
    p = size_weights((0, 1))
    return w, sum(pk * (descend(w, k, 2)[0] - w) for pk, k in zip(p, (0, 1)))


# ---------------------------------------------------------------- the implementation under test

def make(name, **settings):
    """(algorithm, server, trainer) on TinyNet: 3 clients, 2 local full-batch steps at lr 0.1."""
    settings = {"num_clients": 3, "clients_per_round": 2, "model": "mlp", "lr": LR, "local_steps": 2,
                "batch_size": 64, "seeds": (0,), "algorithms": (name,), **settings}
    config = Config(**settings, engine=Engine.name)
    torch.manual_seed(0)
    model = TinyNet()
    trainer = build_trainer(config.engine, copy.deepcopy(model), ClientData(DATA), lr=config.lr,
                            batch_size=config.batch_size, local_epochs=1,
                            local_steps=config.local_steps, cohort_size=3)
    algorithm = build_algorithm(name, config)
    server = Server(model, config, masked=is_masked(name), optimizer=server_optimizer_of(name))
    algorithm.setup(server)
    return algorithm, server, trainer


def play(algorithm, server, trainer, ids=(0, 1)):
    return play_round(algorithm, server, trainer, list(ids), seed=0, round_=1)


def w0():
    """The initial global parameters (float64), as ``make`` builds them."""
    return make("fedavg")[1].params.double().clone()


def close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
