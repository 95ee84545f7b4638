"""A fuzz test of the public step (hypothesis), on both backends (Triton through the
interpreter on a CPU): random K, N, dtypes, weights of every numeric form, τ, masks,
optimizers and placements, and poisoned calls (NaN/inf updates, bad weights, bad arguments).

The invariant: either the step matches the float64 reference, or it raises ValueError or
TypeError and params and every state tensor are bit-identical to what they were."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gma_kernels as gk
import reference as ref
from gk_util import BACKENDS, DEVICE, DTYPES, assert_state_close

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

FUZZ = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: the forms a caller may give K weights in (each a number type the library must accept)
WEIGHT_FORMS = {
    "floats": lambda w: [float(x) for x in w],
    "ints": lambda w: [int(x) for x in w],
    "numpy-int64": lambda w: np.asarray(w, dtype=np.int64),
    "numpy-scalars": lambda w: [np.float32(x) for x in w],
    "tensor": lambda w: torch.tensor(w, dtype=torch.float64),
    "0-d tensors": lambda w: [torch.tensor(float(x)) for x in w],
}
#: poisoned calls: (what, how it changes the call's updates and weights)
POISONS = ("none", "nan", "inf", "-inf", "string weights", "negative weight", "short weights",
           "zero weights", "wrong size", "huge")
#: poisons a call may survive (then it must match the reference): finite but near float32's max
MAY_PASS = ("none", "huge")


@st.composite
def calls(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES))
    updates = [(torch.randn(k, n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
               for _ in range(2)]
    weights = [draw(st.lists(st.integers(1, 50), min_size=k, max_size=k)) for _ in range(2)]
    return {
        "updates": updates, "weights": weights, "seed": seed,
        "form": draw(st.sampled_from(sorted(WEIGHT_FORMS))),
        "kind": draw(st.sampled_from(["sgd", "momentum", "adam", "yogi", "adagrad"])),
        "placement": draw(st.sampled_from(["before", "after"])),
        "mask": draw(st.sampled_from(["soft", "hard"])),
        "tau": draw(st.sampled_from([0.0, 0.25, 0.4, 0.5, 0.8, 1.0])),
        "weighted": draw(st.booleans()),
        "where": draw(st.integers(0, k * n - 1)),
    }


def poisoned(call, poison):
    """The second step's (updates, weights) as the call passes them, with ``poison``."""
    updates = call["updates"][1].clone()
    weights = list(call["weights"][1])
    k = updates.shape[0]
    if poison in ("nan", "inf", "-inf"):
        updates.view(-1)[call["where"]] = float(poison)
    elif poison == "negative weight":
        weights[call["where"] % k] = -1
    elif poison == "short weights":
        weights = weights[:-1] if k > 1 else []
    elif poison == "zero weights":
        weights = [0] * k
    elif poison == "wrong size":
        updates = torch.cat([updates, updates[:, :1]], 1)
    elif poison == "huge":  # finite in float32 (inf in float16): the step may overflow
        updates = (updates.double() / max(float(updates.abs().max()), 1e-30) * 3e38).to(updates.dtype)
    form = WEIGHT_FORMS[call["form"]](weights) if weights else []
    if poison == "string weights":
        form = [str(x) for x in weights]
    return updates.to(DEVICE), form


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(call=calls())
def test_a_step_matches_the_reference_or_changes_nothing(backend, poison, call):
    n = call["updates"][0].shape[1]
    params = (torch.rand(n, generator=torch.Generator().manual_seed(call["seed"])) - 0.5)
    hyper = dict(lr=0.05 if call["kind"] in ("adam", "yogi", "adagrad") else 0.7)
    options = dict(tau=call["tau"], mask=call["mask"], weighted_agreement=call["weighted"])
    opt = gk.ServerOptimizer(params.to(DEVICE), call["kind"], mask_placement=call["placement"],
                             backend=backend, **hyper, **options)
    model = ref.Optimizer(params, call["kind"], placement=call["placement"], **hyper, **options)
    first = call["updates"][0]
    opt.step(first.to(DEVICE), WEIGHT_FORMS[call["form"]](call["weights"][0]))
    model.step(first.double(), [float(w) for w in call["weights"][0]])

    updates, weights = poisoned(call, poison)
    before = [opt.params.clone(), *(s.clone() for s in opt.states)]
    try:
        opt.step(updates, weights)
    except (ValueError, TypeError):
        after = [opt.params, *opt.states]
        assert all(torch.equal(a, b) for a, b in zip(after, before)), "a failed call wrote"
        assert poison != "none", "a valid call was refused"
        return
    assert poison in MAY_PASS, f"a poisoned call ({poison}) was accepted"
    assert all(bool(torch.isfinite(t).all()) for t in (opt.params, *opt.states))
    start = model.params.clone()
    model.step(updates.double().cpu(), [float(w) for w in call["weights"][1]])
    assert_state_close(opt, model, step_scale=float((model.params - start).abs().max()))


OVERFLOWS = {  # finite inputs whose step overflows float32 (each refused, nothing written)
    "sgd: w + g": dict(kind="sgd", params=3e38, updates=3e38),
    "sgd: lr 1e38": dict(kind="sgd", params=1.0, updates=10.0, lr=1e38),
    "momentum, twice": dict(kind="momentum", params=0.0, updates=1.5e38, steps=2),
    "yogi: g² of 1e20": dict(kind="yogi", params=0.0, updates=1e20),
    "adam: g² of 1e20": dict(kind="adam", params=0.0, updates=1e20),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
@pytest.mark.parametrize("case", sorted(OVERFLOWS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_whose_result_overflows_changes_nothing(backend, case, streaming):
    c = OVERFLOWS[case]
    opt = gk.ServerOptimizer(torch.full((8,), c["params"], device=DEVICE), c["kind"],
                             lr=c.get("lr", 1.0), tau=0.0, backend=backend)
    updates = torch.full((2, 8), c["updates"], device=DEVICE)

    def step():
        if not streaming:
            return opt.step(updates)
        acc = gk.Accumulator(8, device=DEVICE, backend=backend)
        acc.add(updates)
        return opt.step_accumulated(acc)

    for _ in range(c.get("steps", 1) - 1):
        step()  # finite so far
    before = [opt.params.clone(), *(s.clone() for s in opt.states)]
    with pytest.raises(gk.NonFiniteError, match="overflow"):
        step()
    assert all(torch.equal(a, b) for a, b in zip([opt.params, *opt.states], before))
    assert all(bool(torch.isfinite(t).all()) for t in before)


def test_gma_step_refuses_an_overflowing_result():
    params = torch.full((8,), 3e38, device=DEVICE)
    for kwargs in ({"lr": 1.0}, {"lr": 1e38, "tau": 0.0}):
        with pytest.raises(gk.NonFiniteError):
            gk.gma_step(params, torch.full((2, 8), 3e38 if kwargs["lr"] == 1.0 else 1.0,
                                           device=DEVICE), tau=0.0, lr=kwargs["lr"])
        assert torch.equal(params, torch.full((8,), 3e38, device=DEVICE))
