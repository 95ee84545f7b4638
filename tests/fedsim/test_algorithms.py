"""The client algorithms, each checked against one or two rounds computed by hand.

The tiny problem: three clients (3, 5 and 4 examples of 3 features, two classes) and a two-layer
linear network ``x → body (3→4) → classifier (4→2)`` with cross-entropy; its gradient is written
out below in closed form (no autograd), in float64. Local training is full-batch gradient descent
(the batch holds a whole client), so every local step can be replayed exactly by hand.
"""
import copy

import pytest
import torch
from torch import nn

from fedsim.algorithms import CLASSES, build_algorithm
from fedsim.client import ClientData, build_trainer
from fedsim.config import Config, ConfigError
from fedsim.loop import Simulation, load_data, play_round, run_experiment
from fedsim.methods import ALGORITHMS, PLAIN, is_masked, masked_name, plain_name, server_optimizer_of
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


@pytest.fixture(autouse=True, params=["cohort", "sequential"])
def engine(request, monkeypatch):
    """Every test runs on both engines."""
    monkeypatch.setattr(Engine, "name", request.param)
    return request.param


class Engine:
    name = "cohort"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tiny problems gain nothing from more, and lose much when other
    processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ---------------------------------------------------------------- one round each, by hand

def test_fedavg_by_hand():
    algorithm, server, trainer = make("fedavg")
    w = w0()
    play(algorithm, server, trainer)
    ends = [descend(w, k, 2)[0] for k in (0, 1)]
    p = size_weights((0, 1))
    close(server.params, w + p[0] * (ends[0] - w) + p[1] * (ends[1] - w))


def test_fedprox_by_hand():
    mu = 0.5
    algorithm, server, trainer = make("fedprox", fedprox_mu=mu)
    w = w0()
    play(algorithm, server, trainer)
    ends = [descend(w, k, 2, extra=lambda y: mu * (y - w))[0] for k in (0, 1)]
    p = size_weights((0, 1))
    close(server.params, p[0] * ends[0] + p[1] * ends[1])
    # the proximal term pulls towards w: the clients moved less than FedAvg's
    plain = [descend(w, k, 2)[0] for k in (0, 1)]
    assert all((e - w).norm() < (f - w).norm() for e, f in zip(ends, plain))


def _scaffold_by_hand(start: int, rounds):
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


def test_scaffold_two_rounds_by_hand_with_a_newcomer():
    """Round 1: clients 0, 1 (c = c_k = 0). Round 2: client 1 again (its c_1 persisted) and
    client 2, which never took part (c_2 = 0)."""
    algorithm, server, trainer = make("scaffold")
    expected = _scaffold_by_hand(0, [(0, 1), (1, 2)])
    assert algorithm.client_state == {}
    for ids, (w, c, cs) in zip([(0, 1), (1, 2)], expected):
        play(algorithm, server, trainer, ids)
        close(server.params, w)
        close(algorithm.c, c)
        assert set(algorithm.client_state) == set(cs)
        for k, c_k in cs.items():
            close(algorithm.client_state[k]["c"], c_k)
    assert set(algorithm.client_state) == {0, 1, 2}
    # c stays the mean of all clients' c_k (zero for none)
    close(algorithm.c, sum(cs.values()) / 3)


def test_scaffold_first_round_is_fedavg_with_equal_weights():
    scaffold, s_server, s_trainer = make("scaffold")
    play(scaffold, s_server, s_trainer)
    w = w0()
    ends = [descend(w, k, 2)[0] for k in (0, 1)]
    close(s_server.params, (ends[0] + ends[1]) / 2)  # not size-weighted (3 vs 5 examples)


def test_fedpvr_two_rounds_by_hand():
    algorithm, server, trainer = make("fedpvr")  # default start: classifier.weight
    assert algorithm.start == CLASSIFIER and algorithm.c.numel() == N - CLASSIFIER
    for ids, (w, c, cs) in zip([(0, 1), (1, 2)], _scaffold_by_hand(CLASSIFIER, [(0, 1), (1, 2)])):
        play(algorithm, server, trainer, ids)
        close(server.params, w)
        close(algorithm.c, c[CLASSIFIER:])
        assert not c[:CLASSIFIER].any()
        for k, c_k in cs.items():
            close(algorithm.client_state[k]["c"], c_k[CLASSIFIER:])
    assert algorithm.c.abs().sum() > 0


def test_fedpvr_from_the_first_layer_is_scaffold():
    pvr = make("fedpvr", fedpvr_start_layer="body.1.weight")
    scaffold = make("scaffold")
    for ids in [(0, 1), (1, 2), (0, 2)]:
        play(*pvr, ids)
        play(*scaffold, ids)
    assert torch.equal(pvr[1].params, scaffold[1].params)
    assert torch.equal(pvr[0].c, scaffold[0].c)


@pytest.mark.parametrize("name, steps", [("fedga", 2), ("gradalign", 1)])
def test_fedga_and_gradalign_by_hand(name, steps):
    beta = 0.3
    algorithm, server, trainer = make(name, fedga_beta=beta)
    w = w0()
    play(algorithm, server, trainer)
    p = size_weights((0, 1))
    g = [grad(w, k) for k in (0, 1)]
    g_mean = p[0] * g[0] + p[1] * g[1]
    ends = [descend(w - beta * (g_mean - g[i]), k, steps)[0] for i, k in enumerate((0, 1))]
    close(server.params, w + p[0] * (ends[0] - w) + p[1] * (ends[1] - w))


def test_fedga_at_beta_zero_is_fedavg():
    ga, avg = make("fedga", fedga_beta=0.0), make("fedavg")
    play(*ga)
    play(*avg)
    close(ga[1].params, avg[1].params.double())


def _fedavg_mean_update():
    w = w0()
    p = size_weights((0, 1))
    return w, sum(pk * (descend(w, k, 2)[0] - w) for pk, k in zip(p, (0, 1)))


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_by_hand(name):
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-3
    algorithm, server, trainer = make(name, momentum_server_lr=lr, adaptive_server_lr=lr)
    play(algorithm, server, trainer)
    w, g = _fedavg_mean_update()
    if name == "fedavgm":  # v = 0.9·0 + g
        want = w + lr * g
    else:  # m = (1 − β1) g; adam and yogi (v0 = 0): v = (1 − β2) g²; adagrad: v = g²
        v = g * g if name == "fedadagrad" else (1 - b2) * g * g
        want = w + lr * (1 - b1) * g / (v.sqrt() + eps)
    close(server.params, want)
    assert server.optimizer.step_config.kind == server_optimizer_of(name)


def test_fedgma_v1_by_hand():
    p_threshold, eta_s = 0.8, 0.7
    algorithm, server, trainer = make("fedgma-v1", fedgma_v1_p=p_threshold, fedgma_v1_server_lr=eta_s)
    w = w0()
    metrics = play(algorithm, server, trainer)
    ends, grads = zip(*(descend(w, k, 2) for k in (0, 1)))  # grads: gradient of the last step
    p = size_weights((0, 1))
    agreement = (torch.sign(grads[0]) + torch.sign(grads[1])).abs() / 2  # a_k = 1/K
    hard = (agreement >= p_threshold).double()
    close(server.params, p[0] * ends[0] + p[1] * ends[1]
          - eta_s * hard * (p[0] * grads[0] + p[1] * grads[1]))
    assert 0 < hard.mean() < 1  # the mask does something on this problem
    assert metrics["mask_density"] == pytest.approx(float(hard.mean()))


@pytest.mark.parametrize("poison, lr, message", [
    (float("nan"), 0.7, "contain non-finite values"),  # NaN gradients: refused by the mean
    (3e38, 10.0, "gradient step overflows float32"),  # finite mean, w − η·g overflows
])
@pytest.mark.parametrize("name", ["fedgma-v1", "fedgma-v1+gma"])
def test_a_non_finite_fedgma_v1_round_leaves_the_server_as_it_was(monkeypatch, name, poison, lr,
                                                                    message):
    from fedsim.algorithms.fedgma_v1 import FedGMAv1
    from gma_kernels import NonFiniteError

    algorithm, server, trainer = make(name, fedgma_v1_server_lr=lr, server_optimizer="momentum")
    play(algorithm, server, trainer)  # one good round: momentum state is not zero
    before = copy.deepcopy(server.state_dict())
    collect = FedGMAv1.collect

    def poisoned(self, rnd, cohort):
        cohort.grads[:, 5] = poison  # every client, so the hard mask keeps the coordinate
        collect(self, rnd, cohort)

    monkeypatch.setattr(FedGMAv1, "collect", poisoned)
    with pytest.raises(NonFiniteError, match=message):
        play(algorithm, server, trainer, ids=(1, 2))
    after = server.state_dict()
    assert torch.equal(after["params"], before["params"])
    assert after["optimizer"]["steps_taken"] == before["optimizer"]["steps_taken"]
    for got, want in zip(after["optimizer"]["states"], before["optimizer"]["states"]):
        assert torch.equal(got, want) and bool(want.abs().sum() > 0)


def test_fedgma_v1_default_step_size_is_the_local_lr():
    default, explicit = make("fedgma-v1"), make("fedgma-v1", fedgma_v1_server_lr=LR)
    play(*default)
    play(*explicit)
    assert torch.equal(default[1].params, explicit[1].params)


def test_scaffold_with_gma_hard_mask_by_hand():
    algorithm, server, trainer = make("scaffold+gma", gma_tau=1.0, gma_mask="hard")
    w = w0()
    play(algorithm, server, trainer)
    deltas = [descend(w, k, 2)[0] - w for k in (0, 1)]
    agree = (torch.sign(deltas[0]) == torch.sign(deltas[1])) & (deltas[0] != 0)
    close(server.params, w + agree.double() * (deltas[0] + deltas[1]) / 2)
    assert 0 < agree.double().mean() < 1
    # the control variates are not masked: c is SCAFFOLD's
    plain, p_server, p_trainer = make("scaffold")
    play(plain, p_server, p_trainer)
    assert torch.equal(algorithm.c, plain.c)


def test_fedgma_soft_mask_by_hand():
    tau = 0.6
    algorithm, server, trainer = make("fedgma", gma_tau=tau)
    w = w0()
    play(algorithm, server, trainer)
    p = size_weights((0, 1))
    deltas = [descend(w, k, 2)[0] - w for k in (0, 1)]
    a = (torch.sign(deltas[0]) + torch.sign(deltas[1])).abs() / 2
    soft = torch.where(a >= tau, torch.ones_like(a), a)
    close(server.params, w + soft * (p[0] * deltas[0] + p[1] * deltas[1]))


# ---------------------------------------------------------------- GMA switch, names

def test_every_algorithm_has_a_gma_twin_that_runs_its_class():
    assert len(ALGORITHMS) == 2 * len(PLAIN) and CLASSES.keys() == PLAIN.keys()
    for name in PLAIN:
        twin = masked_name(name)
        assert twin in ALGORITHMS and is_masked(twin) and not is_masked(name)
        assert plain_name(twin) == name and server_optimizer_of(twin) == server_optimizer_of(name)
        assert type(build_algorithm(twin, Config())) is CLASSES[name]
    assert masked_name("fedavg") == "fedgma" and plain_name("fedavg+gma") == "fedavg"


@pytest.mark.parametrize("name", PLAIN)
def test_gma_at_tau_zero_is_exactly_the_plain_algorithm(name):
    twin = masked_name(name)
    runs = []
    for method in (name, twin):
        algorithm, server, trainer = make(method, gma_tau=0.0, gma_mask="hard",
                                          momentum_server_lr=0.05, adaptive_server_lr=0.05)
        metrics = [play(algorithm, server, trainer, ids) for ids in [(0, 1), (1, 2), (0, 2)]]
        runs.append((server.params.clone(), algorithm.state_dict(), metrics))
    (w_a, state_a, m_a), (w_b, state_b, m_b) = runs
    assert torch.equal(w_a, w_b)
    assert m_a == m_b
    # GMA off: the plain algorithm's server averages with τ = 0 whatever gma_tau says
    assert make(name, gma_tau=0.9)[1].optimizer.mask_config.tau == 0.0
    assert make(twin, gma_tau=0.9)[1].optimizer.mask_config.tau == 0.9
    if "c" in state_a:
        assert torch.equal(state_a["c"], state_b["c"])


@pytest.mark.parametrize("name", [n for n in PLAIN if n != "fedgma-v1"])
def test_gma_on_changes_the_aggregation(name):
    twin = masked_name(name)
    plain_run = make(name, gma_tau=1.0, gma_mask="hard", adaptive_server_lr=0.05)
    twin_run = make(twin, gma_tau=1.0, gma_mask="hard", adaptive_server_lr=0.05)
    m_plain, m_twin = play(*plain_run), play(*twin_run)
    assert not torch.equal(plain_run[1].params, twin_run[1].params)
    assert m_plain["mask_density"] == 1.0 and m_twin["mask_density"] < 1.0


def test_names_compare_and_alias():
    config = Config(algorithms=("fedavg", "fedadam", "scaffold+gma", "fedavg+gma"))
    assert config.algorithms == ("fedavg", "fedadam", "scaffold+gma", "fedgma")
    with pytest.raises(ConfigError, match="algorithms has duplicates"):
        Config(algorithms=("fedgma", "fedavg+gma"))
    assert Config(algorithms=("all",)).algorithms == ALGORITHMS


def test_named_server_optimizer_and_the_flag():
    """fedadam fixes adam (at adaptive_server_lr); fedavg follows --server-optimizer."""
    config = Config(algorithms=("fedavg", "fedadam"), adaptive_server_lr=0.02, server_lr=1.0,
                    model="mlp", num_clients=4, clients_per_round=2, max_train=120, seeds=(0,))
    data = load_data(config, 0)
    kinds = {m: Simulation(config, data, m, 0).server.optimizer.step_config for m in config.algorithms}
    assert (kinds["fedavg"].kind, kinds["fedavg"].lr) == ("sgd", 1.0)
    assert (kinds["fedadam"].kind, kinds["fedadam"].lr) == ("adam", 0.02)
    flag = Config(**{**config.to_dict(), "server_optimizer": "yogi"})
    step = Simulation(flag, data, "fedavg", 0).server.optimizer.step_config
    assert (step.kind, step.lr) == ("yogi", 0.02)
    assert Simulation(flag, data, "fedavgm", 0).server.optimizer.step_config.kind == "momentum"


# ---------------------------------------------------------------- state across rounds, checkpoints

def test_scaffold_state_survives_a_state_dict_round_trip(tmp_path):
    straight = make("scaffold")
    for ids in [(0, 1), (1, 2)]:
        play(*straight, ids)
    saved = {"server": straight[1].state_dict(), "algorithm": straight[0].state_dict()}
    torch.save(saved, tmp_path / "state.pt")
    fresh = make("scaffold", seeds=(5,))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh[1].load_state_dict(state["server"])
    fresh[0].load_state_dict(state["algorithm"])
    assert torch.equal(fresh[0].c, straight[0].c) and fresh[0].c.abs().sum() > 0
    assert all(torch.equal(fresh[0].client_state[k]["c"], straight[0].client_state[k]["c"])
               for k in (0, 1, 2))
    play(*straight, (0, 2))
    play(*fresh, (0, 2))
    assert torch.equal(fresh[1].params, straight[1].params)
    assert torch.equal(fresh[0].c, straight[0].c)


def test_fedpvr_refuses_state_of_another_size():
    pvr, scaffold = make("fedpvr"), make("scaffold")
    with pytest.raises(ValueError, match="saved control variate has 26 elements"):
        pvr[0].load_state_dict(scaffold[0].state_dict())


STATEFUL = ["scaffold", "fedpvr+gma", "fedga", "fedadam+gma", "fedavgm", "fedgma-v1+gma"]


@pytest.mark.parametrize("method", STATEFUL)
def test_simulation_save_and_restore_continues_exactly(tmp_path, tiny, method):
    config = Config(**tiny, algorithms=(method,), adaptive_server_lr=0.03, momentum_server_lr=0.1)
    data = load_data(config, 0)
    straight = Simulation(config, data, method, 0)
    expected = [straight.round() for _ in range(4)]
    first = Simulation(config, data, method, 0)
    got = [first.round() for _ in range(2)]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(123)
    second = Simulation(config, data, method, 3)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got += [second.round() for _ in range(2)]
    assert got == expected
    assert torch.equal(second.server.params, straight.server.params)
    a, b = second.algorithm.state_dict(), straight.algorithm.state_dict()
    assert a["client_state"].keys() == b["client_state"].keys()
    if "c" in a:
        assert torch.equal(a["c"], b["c"])


@pytest.mark.parametrize("method", ["scaffold", "fedpvr+gma"])
def test_interrupted_run_resumes_exactly(tmp_path, tiny, monkeypatch, method):
    """Stop a run after its 3rd round (checkpoint at round 2 of 4), resume: the same metrics and
    final model as an uninterrupted run, control variates included."""
    config = Config(**{**tiny, "rounds": 4, "checkpoint_every": 2}, algorithms=(method,))
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    reference.mkdir()
    stopped.mkdir()
    run_experiment(config, reference, progress=False)

    original, calls = Simulation.round, []

    def stop_on_third(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Simulation, "round", stop_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, stopped, progress=False)
    monkeypatch.setattr(Simulation, "round", original)
    run_experiment(config, stopped, resume=True, progress=False)
    assert (stopped / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    got = torch.load(stopped / f"model-{method}-seed0.pt", weights_only=True)
    want = torch.load(reference / f"model-{method}-seed0.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("settings, message", [
    ({"fedprox_mu": -0.1}, "fedprox_mu must be a finite number >= 0.0, got -0.1"),
    ({"fedprox_mu": float("inf")}, "fedprox_mu must be a finite number"),
    ({"fedga_beta": -1.0}, "fedga_beta must be a finite number >= 0.0, got -1.0"),
    ({"fedgma_v1_p": 1.5}, "fedgma_v1_p must be a finite number >= 0.0 and <= 1.0"),
    ({"fedgma_v1_server_lr": 0.0}, "fedgma_v1_server_lr must be a finite number > 0.0"),
    ({"adaptive_server_lr": -1.0}, "adaptive_server_lr must be a finite number > 0.0"),
    ({"momentum_server_lr": float("nan")}, "momentum_server_lr must be a finite number"),
    ({"server_optimizer": "lamb"}, "server_optimizer: unknown name 'lamb'; valid: sgd, momentum, "
                                   "adam, yogi, adagrad"),
    ({"fedpvr_start_layer": "head.weight"},
     "fedpvr_start_layer: 'head.weight' is not a parameter of model 'cnn'; valid: features.0.weight"),
    ({"fedpvr_start_layer": "body.1.weight"}, "is not a parameter of model 'cnn'"),
    ({"algorithms": ("fedavg", "fednova")}, "algorithms: unknown name 'fednova'; valid: fedavg, "
                                            "fedgma, fedprox, fedprox+gma, scaffold, scaffold+gma"),
    ({"algorithms": ("fedadam+gma",), "gma_rescale": True, "gma_mask_placement": "after"},
     "gma_rescale needs gma_mask_placement='before' with a stateful server optimizer ('adam', "
     "algorithm 'fedadam+gma')"),
])
def test_bad_hyperparameters_are_refused(settings, message):
    with pytest.raises(ConfigError) as err:
        Config(**settings)
    assert message in str(err.value)


def test_fedpvr_start_layer_checked_against_the_actual_model():
    config = Config(model="mlp", fedpvr_start_layer="body.3.weight", num_clients=3, clients_per_round=2)
    algorithm = build_algorithm("fedpvr", config)
    server = Server(TinyNet(), config, masked=False)  # TinyNet has no body.3
    with pytest.raises(ValueError, match="fedpvr_start_layer: 'body.3.weight' is not in the layout"):
        algorithm.setup(server)


# ---------------------------------------------------------------- communication

@pytest.mark.parametrize("name, down, up", [
    ("fedavg", N, N), ("fedgma", N, N), ("fedprox", N, N), ("fedavgm", N, N), ("fedadam+gma", N, N),
    ("scaffold", 2 * N, 2 * N), ("scaffold+gma", 2 * N, 2 * N),
    ("fedpvr", N + 10, N + 10), ("fedpvr+gma", N + 10, N + 10),  # classifier: 8 + 2 corrected
    ("fedga", 2 * N, 2 * N), ("gradalign", 2 * N, 2 * N),
    ("fedgma-v1", N, 2 * N), ("fedgma-v1+gma", N, 2 * N),
])
def test_communication_per_round(name, down, up):
    algorithm, server, trainer = make(name, adaptive_server_lr=0.05)
    metrics = play(algorithm, server, trainer)  # 2 clients
    assert (metrics["floats_down"], metrics["floats_up"]) == (2 * down, 2 * up)
    assert metrics["comm_vs_fedavg"] == pytest.approx((down + up) / (2 * N))

