"""The plain-arrays adapters (gma_kernels.integrations.arrays): NumPy lists and state dicts."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import gma_kernels as gk
from gma_kernels.integrations.arrays import aggregate_arrays, aggregate_state_dicts

SHAPES = [(6, 5), (5,), (2, 3, 4)]


def make(seed: int, k: int = 4, dtype=np.float32):
    rng = np.random.default_rng(seed)
    model = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    drift = [rng.standard_normal(s) * 0.1 for s in SHAPES]
    clients = [[(w + d * rng.uniform(-0.5, 1.5, w.shape) + 0.1 * rng.standard_normal(w.shape))
                .astype(dtype) for w, d in zip(model, drift)] for _ in range(k)]
    weights = [float(x) for x in rng.integers(1, 50, k)]
    return model, clients, weights


def flat(arrays) -> torch.Tensor:
    return torch.cat([torch.as_tensor(np.asarray(a, np.float32)).reshape(-1) for a in arrays])


def test_import_gma_kernels_imports_no_framework():
    code = ("import sys, gma_kernels, gma_kernels.integrations, gma_kernels.integrations.arrays, "
            "gma_kernels.distributed; bad = [m for m in ('flwr', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tau0_is_weighted_fedavg_dtypes_and_shapes_kept():
    model, clients, weights = make(0)
    model.append(np.array(3, dtype=np.int64))
    model.append(np.linspace(0, 1, 4))                       # float64
    for k, c in enumerate(clients):
        c.append(np.array(3 + 2 * k, dtype=np.int64))
        c.append(np.linspace(0, 1, 4) + 0.01 * k)
    out = aggregate_arrays(model, clients, weights, tau=0.0)
    total = sum(weights)
    for i, (o, w) in enumerate(zip(out, model)):
        assert o.dtype == w.dtype and o.shape == w.shape
        expected = sum(p * c[i].astype(np.float64) for p, c in zip(weights, clients)) / total
        if w.dtype.kind == "i":
            assert o == np.rint(expected)
        else:
            np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", ["soft", "hard"])
@pytest.mark.parametrize("rescale", [False, True])
def test_equals_gma_step(mask, rescale):
    model, clients, weights = make(1, k=6)
    snapshot = [w.copy() for w in model]
    out, stats = aggregate_arrays(model, clients, weights, lr=0.5, tau=0.5, mask=mask,
                                  rescale=rescale, device="cpu", return_stats=True)
    params = flat(model)
    updates = [flat(c) - params for c in clients]
    gk.gma_step(params, updates, weights, lr=0.5, tau=0.5, mask=mask, rescale=rescale,
                backend="torch")
    np.testing.assert_allclose(flat(out).numpy(), params.numpy(), rtol=1e-6, atol=1e-7)
    assert stats.num_clients == 6 and 0 < float(stats.density) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(model, snapshot))  # inputs untouched


def test_are_updates():
    model, clients, weights = make(2)
    updates = [[c - w for c, w in zip(cl, model)] for cl in clients]
    a = aggregate_arrays(model, clients, weights, tau=0.4)
    b = aggregate_arrays(model, updates, weights, tau=0.4, are_updates=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_state_dicts_tensors_and_arrays():
    model, clients, weights = make(3)
    names = ["fc.weight", "fc.bias", "conv.weight"]
    global_state = {n: torch.from_numpy(w.copy()) for n, w in zip(names, model)}
    global_state["bn.num_batches_tracked"] = torch.tensor(100)
    global_state["emb"] = np.ones(3, dtype=np.float16)        # an array keeps being an array
    client_states = []
    for k, c in enumerate(clients):
        state = {n: torch.from_numpy(w) for n, w in zip(names, c)}
        state["bn.num_batches_tracked"] = torch.tensor(100 + 10 * k)
        state["emb"] = np.full(3, 1 + k, dtype=np.float16)
        client_states.append(dict(reversed(list(state.items()))))
    out = aggregate_state_dicts(global_state, client_states, weights, tau=0.4, mask="hard")
    assert list(out) == list(global_state)
    for name, value in global_state.items():
        assert type(out[name]) is type(value) and out[name].dtype == value.dtype
        assert tuple(out[name].shape) == tuple(value.shape)
    expected = aggregate_arrays(model, clients, weights, tau=0.4, mask="hard", device="cpu")
    for n, e in zip(names, expected):
        np.testing.assert_allclose(out[n].numpy(), e, rtol=1e-6, atol=1e-7)
    mean_steps = sum(w * (100 + 10 * k) for k, w in enumerate(weights)) / sum(weights)
    assert int(out["bn.num_batches_tracked"]) == round(mean_steps)


def test_nonfinite_drop_excludes_the_client_everywhere():
    model, clients, weights = make(4)
    model.append(np.array(0, dtype=np.int32))
    for k, c in enumerate(clients):
        c.append(np.array(100 * k, dtype=np.int32))
    clients[1][0][2, 2] = np.inf
    with pytest.raises(ValueError, match=r"updates\[1\]"):
        aggregate_arrays(model, clients, weights)
    out, stats = aggregate_arrays(model, clients, weights, nonfinite="drop", return_stats=True)
    assert stats.dropped == (1,)
    rest = [c for k, c in enumerate(clients) if k != 1]
    rest_w = [w for k, w in enumerate(weights) if k != 1]
    expected = aggregate_arrays(model, rest, rest_w)
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)


def test_bad_input():
    model, clients, weights = make(5)
    with pytest.raises(ValueError, match="empty"):
        aggregate_arrays(model, [], None)
    with pytest.raises(ValueError, match=r"client_arrays\[1\] has 2 arrays"):
        aggregate_arrays(model, [clients[0], clients[1][:2]], None)
    with pytest.raises(ValueError, match="shape"):
        aggregate_arrays(model, [clients[0], [c.T for c in clients[1]]], None)
    with pytest.raises(ValueError, match="weights"):
        aggregate_arrays(model, clients, weights[:2])
    with pytest.raises(TypeError, match="list of NumPy arrays"):
        aggregate_arrays(model[0], clients, None)
    with pytest.raises(TypeError, match="complex"):
        aggregate_arrays([np.ones(2, np.complex64)], [[np.ones(2, np.complex64)]])
    with pytest.raises(ValueError, match="no floating-point"):
        aggregate_arrays([np.ones(2, np.int64)], [[np.ones(2, np.int64)]])
    state = {"a": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"missing: \['a'\], unexpected: \['b'\]"):
        aggregate_state_dicts(state, [{"b": torch.zeros(2)}])
