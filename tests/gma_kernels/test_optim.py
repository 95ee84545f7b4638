"""ServerOptimizer: every kind × mask placement against the float64 reference, on both backends;
state_dict round trip; the guard on optimizer state; the streaming step."""
from __future__ import annotations

import itertools

import pytest
import torch

import gma_kernels as gk
import reference as ref
from gma_kernels.backends import native as _native
from gk_util import BACKENDS, DEVICE, assert_close, assert_state_close, gen, make

# Triton's interpreter computes with numpy, which warns on the NaN/inf inputs of the guard tests
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

KINDS = ("sgd", "momentum", "adam", "yogi", "adagrad")
PLACEMENTS = ("before", "after")
CASES = list(itertools.product(BACKENDS, KINDS, PLACEMENTS))
N = 2049


def _mask_options(i):
    """A different mask configuration for each case, so every option meets every kind."""
    mask = ("soft", "hard")[i % 2]
    weighted = bool((i // 2) % 2)
    return dict(tau=(0.3, 0.6, 0.45)[i % 3], mask=mask, weighted_agreement=weighted)


def _hyper(kind):
    return dict(lr=0.05 if kind in ("adam", "yogi", "adagrad") else 0.7, momentum=0.8, beta1=0.85,
                beta2=0.95, eps=1e-3)


@pytest.mark.parametrize("backend,kind,placement", CASES,
                         ids=[f"{b}-{k}-{p}" for b, k, p in CASES])
def test_steps_match_reference(backend, kind, placement):
    i = CASES.index((backend, kind, placement))
    opts = _mask_options(i)
    params = (torch.rand(N, generator=gen(i)) * 2 - 1).to(DEVICE)
    opt = gk.ServerOptimizer(params, kind, mask_placement=placement, backend=backend,
                             **_hyper(kind), **opts)
    model = ref.Optimizer(params, kind, placement=placement, tau=opts["tau"], mask=opts["mask"],
                          weighted_agreement=opts["weighted_agreement"], **_hyper(kind))
    assert len(opt.states) == ref.STATE_COUNT[kind]
    for step in range(3):
        dtype = (torch.float32, torch.float16, torch.bfloat16)[step]
        updates, exact, w = make(100 * i + step, 5, N, dtype, ("list", "matrix", "rowslice")[step],
                                 scale=0.05)
        before = params.clone()
        stats = opt.step(updates, w)
        model.step(exact, w)
        assert opt.params is params
        assert_state_close(opt, model, step_scale=float((model.params - before.cpu().double())
                                                         .abs().max()))
        assert stats.num_clients == 5
        assert float(stats.density) == pytest.approx(
            ref.density(exact, w, tau=opts["tau"], mask=opts["mask"],
                        weighted=opts["weighted_agreement"]), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_placement_after_differs_from_before(backend):
    first, exact1, w1 = make(1, 4, 1000, scale=0.1)
    second, exact2, w2 = make(2, 4, 1000, scale=0.1)
    results = {}
    for placement in PLACEMENTS:
        params = torch.zeros(1000, device=DEVICE)
        opt = gk.ServerOptimizer(params, "adam", lr=0.1, tau=0.8, mask="hard",
                                 mask_placement=placement, backend=backend)
        model = ref.Optimizer(torch.zeros(1000), "adam", lr=0.1, tau=0.8, mask="hard",
                              placement=placement)
        for updates, exact, w in ((first, exact1, w1), (second, exact2, w2)):
            opt.step(updates, w)
            model.step(exact, w)
        results[placement] = params.cpu()
        assert_close(params, model.params, scale=1.0)
        assert_close(opt.states[0], model.states[0], scale=float(model.states[0].abs().max()))
    # "before": coordinates masked in round two still move on round one's momentum; "after"
    # stops them
    assert not torch.allclose(results["before"], results["after"], rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_placement_after_equals_before(backend):
    updates, _, w = make(2, 4, 1000)
    out = {}
    for placement in PLACEMENTS:
        params = torch.full((1000,), 2.0, device=DEVICE)
        gk.ServerOptimizer(params, "sgd", lr=0.5, mask_placement=placement,
                           backend=backend).step(updates, w)
        out[placement] = params
    assert torch.equal(out["before"], out["after"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "yogi"])
def test_rescale_before(backend, kind):
    params = torch.linspace(-1, 1, N).to(DEVICE)
    opt = gk.ServerOptimizer(params, kind, tau=0.7, mask="hard", rescale=True, backend=backend,
                             **_hyper(kind))
    model = ref.Optimizer(params, kind, tau=0.7, mask="hard", rescale=True, **_hyper(kind))
    for step in range(2):
        updates, exact, w = make(10 + step, 6, N, scale=0.05)
        opt.step(updates, w)
        model.step(exact, w)
    assert_state_close(opt, model, step_scale=1.0)


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi", "adagrad"])
def test_rescale_with_placement_after_is_refused(kind):
    with pytest.raises(ValueError, match="rescale"):
        gk.ServerOptimizer(torch.zeros(10), kind, rescale=True, mask_placement="after")


def test_rescale_with_sgd_after_is_allowed_and_equals_before():
    updates, _, _ = make(3, 3, 500)
    outs = []
    for placement in PLACEMENTS:
        params = torch.zeros(500, device=DEVICE)
        gk.ServerOptimizer(params, "sgd", rescale=True, mask="hard", tau=0.9,
                           mask_placement=placement, backend="torch").step(updates)
        outs.append(params)
    assert torch.equal(*outs)


# -- state_dict ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    params = torch.randn(N, generator=gen(5)).to(DEVICE)
    opt = gk.ServerOptimizer(params, kind, tau=0.5, backend="torch", **_hyper(kind))
    for s in range(2):
        updates, _, w = make(20 + s, 4, N, scale=0.1)
        opt.step(updates, w)
    saved = opt.state_dict()
    assert saved["config"]["kind"] == kind and len(saved["states"]) == len(opt.states)
    # the saved state is a copy: stepping on does not change it
    frozen = [t.clone() for t in saved["states"]]
    params2 = params.clone()
    restored = gk.ServerOptimizer(params2, kind, tau=0.5, backend="torch", **_hyper(kind))
    restored.load_state_dict(saved)
    updates, _, w = make(30, 4, N, scale=0.1)
    start = params2.clone()
    opt.step(updates, w)
    restored.step(updates, w)
    assert torch.equal(params, params2)
    for a, b in zip(opt.states, restored.states):
        assert torch.equal(a, b)
    for a, b in zip(saved["states"], frozen):
        assert torch.equal(a, b)
    if kind != "sgd":  # state matters: a fresh optimizer does something else
        fresh = gk.ServerOptimizer(start, kind, tau=0.5, backend="torch", **_hyper(kind))
        fresh.step(updates, w)
        assert not torch.allclose(start, params2, rtol=1e-4, atol=0)


def test_load_state_dict_refuses_other_kind_and_size():
    a = gk.ServerOptimizer(torch.zeros(10), "adam")
    with pytest.raises(ValueError, match="momentum"):
        a.load_state_dict(gk.ServerOptimizer(torch.zeros(10), "momentum").state_dict())
    with pytest.raises(ValueError, match="size"):
        a.load_state_dict(gk.ServerOptimizer(torch.zeros(11), "adam").state_dict())


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi", "adagrad"])
def test_default_hyperparameters(kind):
    """β1 0.9, β2 0.99, ε 1e-3, momentum 0.9, lr 1, τ 0.4 soft, placement before."""
    params = torch.linspace(-1, 1, 999).to(DEVICE)
    opt = gk.ServerOptimizer(params, kind, backend="torch")
    model = ref.Optimizer(params, kind)
    assert (model.lr, model.beta1, model.beta2, model.eps, model.momentum, model.tau) == \
        (1.0, 0.9, 0.99, 1e-3, 0.9, 0.4)
    for s in range(2):
        updates, exact, w = make(60 + s, 10, 999, scale=0.01)
        opt.step(updates, w)
        model.step(exact, w)
    assert_state_close(opt, model, step_scale=1.0)


def test_initial_state_is_zero():
    params = torch.randn(100)
    for kind in KINDS:
        opt = gk.ServerOptimizer(params, kind)
        assert all(torch.equal(s, torch.zeros(100)) for s in opt.states)


# -- guard -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,kind,placement", CASES,
                         ids=[f"{b}-{k}-{p}" for b, k, p in CASES])
def test_nonfinite_update_leaves_params_and_state(backend, kind, placement):
    params = torch.randn(1500, generator=gen(6)).to(DEVICE)
    opt = gk.ServerOptimizer(params, kind, mask_placement=placement, backend=backend, tau=0.5,
                             mask="hard", **_hyper(kind))
    updates, _, w = make(7, 4, 1500, scale=0.1)
    opt.step(updates, w)
    before = [params.clone()] + [s.clone() for s in opt.states]
    bad = updates.clone()
    bad[1, 700] = float("inf")
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"updates\[1\]"):
        opt.step(bad, w)
    for t, b in zip([params, *opt.states], before):
        assert torch.equal(t, b)
    # and drop: the same as stepping with the other clients
    opt_drop = gk.ServerOptimizer(params, kind, mask_placement=placement, backend=backend,
                                  tau=0.5, mask="hard", nonfinite="drop", **_hyper(kind))
    stats = opt_drop.step(bad, w)
    assert stats.dropped == (1,) and stats.num_clients == 3
    dropped_params = params.clone()
    params.copy_(before[0])
    opt_rest = gk.ServerOptimizer(params, kind, mask_placement=placement, backend=backend,
                                  tau=0.5, mask="hard", **_hyper(kind))
    opt_rest.step(updates[[0, 2, 3]], [w[0], w[2], w[3]])
    assert torch.equal(params, dropped_params)


# -- streaming -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,placement", [("sgd", "before"), ("momentum", "after"),
                                            ("adam", "before"), ("yogi", "after"),
                                            ("adagrad", "before")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_accumulated_matches_step(kind, placement, backend):
    p1 = torch.randn(N, generator=gen(8)).to(DEVICE)
    p2 = p1.clone()
    kw = dict(mask_placement=placement, tau=0.4, mask="soft", **_hyper(kind))
    direct = gk.ServerOptimizer(p1, kind, backend=backend, **kw)
    streamed = gk.ServerOptimizer(p2, kind, backend=backend, **kw)
    model = ref.Optimizer(p1, kind, placement=placement, tau=0.4, **_hyper(kind))
    for s in range(2):
        updates, exact, w = make(40 + s, 5, N, torch.float16, "list", scale=0.1)
        direct.step(updates, w)
        acc = gk.Accumulator(N, device=DEVICE, backend=backend)
        for u, p in zip(updates, w):
            acc.add(u, [p])
        stats = streamed.step_accumulated(acc)
        model.step(exact, w)
        assert stats.num_clients == 5
    assert_close(p2, model.params, scale=2.0)
    assert_close(p1, p2.cpu().double(), scale=2.0)


def test_step_accumulated_refuses_wrong_size_and_agreement_kind():
    opt = gk.ServerOptimizer(torch.zeros(10), "adam")
    acc = gk.Accumulator(11).add(torch.ones(11))
    with pytest.raises(ValueError, match="11"):
        opt.step_accumulated(acc)
    with pytest.raises(ValueError, match="weighted_agreement"):
        opt.step_accumulated(gk.Accumulator(10, weighted_agreement=True).add(torch.ones(10)))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_step_accumulated_rescale_overflow_leaves_params(kind):
    """Finite sums whose density rescale overflows float32 never reach params or state."""
    updates = torch.tensor([[1.5e38, -1.0, 1.0, -1.0], [1.5e38, 1.0, -1.0, 1.0]], device=DEVICE)
    params = torch.full((4,), 0.5, device=DEVICE)
    opt = gk.ServerOptimizer(params, kind, tau=1.0, mask="hard", rescale=True)
    acc = gk.Accumulator(4, device=DEVICE).add(updates)
    with pytest.raises(ValueError, match="overflow"):
        opt.step_accumulated(acc)
    assert torch.equal(params, torch.full((4,), 0.5, device=DEVICE))
    assert all(torch.equal(s, torch.zeros(4, device=DEVICE)) for s in opt.states)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-ops"])
def test_step_accumulated_overflow_leaves_params(kind, native, monkeypatch):
    """Sums whose mean overflows float32, and finite sums whose step overflows, are refused
    with params and state as they were, by the C kernel and by the PyTorch-ops fallback
    (``formula.streaming_step``) alike; each message names which of the two overflowed."""
    monkeypatch.setattr(_native, "ENABLED", native)
    cases = {"sum overflowed": (torch.tensor([[3e38, 1.0, -2.0]] * 2), 0.5),
             "step overflows": (torch.tensor([[1e38, 1.0, -2.0]] * 2), 3e38)}
    for message, (updates, start) in cases.items():
        params = torch.full((3,), start)
        opt = gk.ServerOptimizer(params, kind, lr=1.0, tau=0.0, backend="torch")
        for s in opt.states:
            s.fill_(0.25)
        acc = gk.Accumulator(3, backend="torch").add(updates)
        with pytest.raises(gk.NonFiniteError, match=message):
            opt.step_accumulated(acc)
        assert torch.equal(params, torch.full((3,), start))
        assert all(torch.equal(s, torch.full((3,), 0.25)) for s in opt.states)


# -- Adam's bias correction ---------------------------------------------------------------------

@pytest.mark.parametrize("backend,path", list(itertools.product(BACKENDS, ("batch", "streaming"))))
def test_bias_corrected_adam_is_torch_adam(backend, path):
    """``bias_correction=True`` at τ = 0 steps like ``torch.optim.Adam`` (float64) on the
    gradient ``−mean(Δ)``, step after step, through a saved and restored state."""
    params = torch.randn(N, generator=gen(70)).to(DEVICE)
    hyper = dict(lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6)
    opt = gk.ServerOptimizer(params, "adam", tau=0.0, bias_correction=True, backend=backend,
                             **hyper)
    exact = torch.nn.Parameter(params.cpu().double())
    torch_adam = torch.optim.Adam([exact], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                                  eps=hyper["eps"])
    for t in range(1, 6):
        updates, values, w = make(700 + t, 3, N, scale=10.0 ** -t)  # a shrinking gradient
        if path == "batch":
            opt.step(updates, w)
        else:
            acc = gk.Accumulator(N, device=DEVICE, backend=backend)
            acc.add(updates, w)
            opt.step_accumulated(acc)
        p = torch.tensor(w, dtype=torch.float64) / sum(w)
        exact.grad = -(p[:, None] * values.double()).sum(0)
        torch_adam.step()
        torch.testing.assert_close(params.cpu().double(), exact.detach(), rtol=1e-5, atol=1e-6)
        assert opt.steps_taken == t
        if t == 3:  # a restored optimizer continues at t = 4
            saved = opt.state_dict()
            opt = gk.ServerOptimizer(params, "adam", tau=0.0, bias_correction=True,
                                     backend=backend, **hyper)
            opt.load_state_dict(saved)


def test_bias_correction_changes_the_step():
    """Uncorrected, Adam's first step is ``(1−β1)/√(1−β2)`` times the corrected one."""
    a, b = torch.zeros(64), torch.zeros(64)
    updates, _, w = make(71, 4, 64, scale=0.1)
    hyper = dict(lr=0.01, tau=0.0, beta1=0.9, beta2=0.999, eps=1e-12, backend="torch")
    gk.ServerOptimizer(a, "adam", **hyper).step(updates, w)
    gk.ServerOptimizer(b, "adam", bias_correction=True, **hyper).step(updates, w)
    torch.testing.assert_close(a, b * (0.1 / 0.001 ** 0.5), rtol=1e-4, atol=0)
