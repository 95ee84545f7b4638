"""Bad input: one test per case, each checking the error names the argument at fault, and that
nothing was written (params poisoned beforehand and compared bit for bit)."""
from __future__ import annotations

import pytest
import torch

import gma_kernels as gk
from gk_util import DEVICE

N = 8


def _updates(k=3, n=N, dtype=torch.float32):
    return torch.randn(k, n, generator=torch.Generator().manual_seed(k * n)).to(DEVICE, dtype)


@pytest.fixture
def params():
    p = torch.full((N,), 0.375, device=DEVICE)
    yield p
    # every call in these tests fails: params must never have been written
    assert torch.equal(p, torch.full((N,), 0.375, device=DEVICE))


def _all_apis(params, updates, weights=None, **kw):
    """Call every entry point with the same bad input; return the errors raised."""
    errors = []
    for call in (lambda: gk.masked_mean(updates, weights, **kw),
                 lambda: gk.gma_step(params, updates, weights, **kw),
                 lambda: gk.ServerOptimizer(params, "adam", **kw).step(updates, weights)):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        errors.append(info)
    return errors


# -- updates ---------------------------------------------------------------------------------

def test_empty_sequence(params):
    for info in _all_apis(params, []):
        assert info.type is ValueError and "updates" in str(info.value)
        assert "empty" in str(info.value)


def test_empty_matrix(params):
    for info in _all_apis(params, torch.empty(0, N, device=DEVICE)):
        assert "updates" in str(info.value) and "empty" in str(info.value)


def test_zero_length_updates(params):
    with pytest.raises(ValueError, match="updates.*N = 0"):
        gk.masked_mean(torch.empty(3, 0, device=DEVICE))
    with pytest.raises(ValueError, match="updates.*N = 0"):
        gk.masked_mean([torch.empty(0, device=DEVICE)] * 2)


def test_agreement_empty():
    with pytest.raises(ValueError, match="updates"):
        gk.agreement([])


def test_mismatched_lengths(params):
    ups = [torch.ones(N, device=DEVICE), torch.ones(N, device=DEVICE), torch.ones(N + 1, device=DEVICE)]
    for info in _all_apis(params, ups):
        assert "updates[2]" in str(info.value) and str(N + 1) in str(info.value)


def test_mismatched_dtypes(params):
    ups = [torch.ones(N, device=DEVICE), torch.ones(N, device=DEVICE, dtype=torch.float16)]
    for info in _all_apis(params, ups):
        assert "updates[1]" in str(info.value) and "float16" in str(info.value)


def test_mismatched_devices(params):
    ups = [torch.ones(N, device=DEVICE), torch.ones(N, device="meta")]
    for info in _all_apis(params, ups):
        assert "updates[1]" in str(info.value) and "meta" in str(info.value)


def test_params_on_another_device_than_updates(params):
    with pytest.raises(ValueError, match="params.*meta|meta.*params"):
        gk.gma_step(params, torch.ones(2, N, device="meta"))


@pytest.mark.parametrize("shape", [(N,), (2, 3, N), ()])
def test_updates_wrong_ndim_tensor(params, shape):
    for info in _all_apis(params, torch.ones(shape, device=DEVICE)):
        assert "updates" in str(info.value) and "shape" in str(info.value)


def test_update_row_wrong_ndim(params):
    for info in _all_apis(params, [torch.ones(N, device=DEVICE), torch.ones(2, 4, device=DEVICE)]):
        assert "updates[1]" in str(info.value) and "1-D" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool,
                                   torch.complex64], ids=str)
def test_unsupported_dtype(params, dtype):
    for info in _all_apis(params, torch.ones(2, N, device=DEVICE, dtype=dtype)):
        assert "updates" in str(info.value) and str(dtype) in str(info.value)
    with pytest.raises(ValueError, match=r"updates\[0\]"):
        gk.masked_mean([torch.ones(N, device=DEVICE, dtype=dtype)])


def test_updates_not_a_tensor(params):
    for info in _all_apis(params, "abc"):
        assert info.type is TypeError and "updates" in str(info.value)
    for info in _all_apis(params, [torch.ones(N, device=DEVICE), [1.0] * N]):
        assert info.type is TypeError and "updates[1]" in str(info.value)


# -- weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("weights,where", [([1.0, -0.25, 1.0], r"weights\[1\].*negative"),
                                           ([0.0, 0.0, 0.0], "weights sum to zero"),
                                           ([1.0, float("nan"), 1.0], r"weights\[1\].*finite"),
                                           ([1.0, 1.0, float("inf")], r"weights\[2\].*finite"),
                                           ([1.0, 1.0], "weights has 2 entries"),
                                           ([1.0] * 4, "weights has 4 entries"),
                                           ([], "weights has 0 entries")],
                         ids=["negative", "all-zero", "nan", "inf", "too-few", "too-many",
                              "empty"])
def test_bad_weights(params, weights, where):
    for form in (weights, torch.tensor(weights, dtype=torch.float64)):
        for info in _all_apis(params, _updates(), form):
            assert info.type is ValueError
            assert info.match(where)
    with pytest.raises(ValueError, match=where):
        gk.agreement(_updates(), weights)
    if where == "weights sum to zero":  # a fold may carry zero weight; finalize refuses it
        acc = gk.Accumulator(N, device=DEVICE).add(_updates(), weights)
        with pytest.raises(ValueError, match="sum to zero"):
            acc.masked_mean()
    else:
        with pytest.raises(ValueError, match=where):
            gk.Accumulator(N, device=DEVICE).add(_updates(), weights)


def test_weights_wrong_shape_or_type(params):
    for info in _all_apis(params, _updates(), torch.ones(3, 1)):
        assert "weights" in str(info.value) and "1-D" in str(info.value)
    for info in _all_apis(params, _updates(), ["a", "b", "c"]):
        assert info.type is TypeError and "weights" in str(info.value)
    for info in _all_apis(params, _updates(), 3.0):
        assert info.type is TypeError and "weights" in str(info.value)


def test_weights_bool_or_huge_int(params):
    """A bool among plain numbers is refused, not read as 1 (list or tuple); an integer beyond
    float64 is a ValueError that names the weights."""
    for form in ([1.0, True, 1.0], (1, 1, False)):
        for info in _all_apis(params, _updates(), form):
            assert info.type is TypeError and "weights must be numbers" in str(info.value)
    for info in _all_apis(params, _updates(), [1, 2 ** 1100, 1]):
        assert info.type is ValueError and "weights holds an integer too large" in str(info.value)


# -- hyperparameters -------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [-0.01, 1.01, float("nan"), float("inf"), -float("inf"), True,
                                 "0.5", None], ids=repr)
def test_bad_tau(params, tau):
    for info in _all_apis(params, _updates(), tau=tau):
        assert info.type is ValueError and "tau" in str(info.value)
    with pytest.raises(ValueError, match="tau"):
        gk.Accumulator(N, device=DEVICE).add(_updates()).masked_mean(tau=tau)


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_tau_bounds_are_allowed(tau):
    gk.masked_mean(_updates(), tau=tau, backend="torch")


def test_unknown_mask(params):
    for info in _all_apis(params, _updates(), mask="and"):
        assert "mask" in str(info.value) and "'and'" in str(info.value)


def test_unknown_backend(params):
    for info in _all_apis(params, _updates(), backend="cuda"):
        assert "backend" in str(info.value) and "'cuda'" in str(info.value)
    with pytest.raises(ValueError, match="backend"):
        gk.agreement(_updates(), backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        gk.Accumulator(N, device=DEVICE, backend="numpy").add(_updates())


def test_unknown_nonfinite_policy(params):
    for info in _all_apis(params, _updates(), nonfinite="ignore"):
        assert "nonfinite" in str(info.value) and "'ignore'" in str(info.value)
    with pytest.raises(ValueError, match="nonfinite"):
        gk.Accumulator(N, nonfinite="ignore")


def test_unknown_optimizer(params):
    with pytest.raises(ValueError, match="optimizer.*'lamb'"):
        gk.ServerOptimizer(params, "lamb")


def test_unknown_placement(params):
    with pytest.raises(ValueError, match="mask_placement.*'middle'"):
        gk.ServerOptimizer(params, "adam", mask_placement="middle")


@pytest.mark.parametrize("name,value", [("lr", -0.1), ("lr", float("nan")), ("momentum", 1.5),
                                        ("momentum", -0.1), ("beta1", 1.1), ("beta2", -1.0),
                                        ("eps", 0.0), ("eps", -1e-8), ("eps", float("inf"))])
def test_bad_optimizer_hyperparameters(params, name, value):
    with pytest.raises(ValueError, match=name):
        gk.ServerOptimizer(params, "adam", **{name: value})


def test_bad_lr_in_gma_step(params):
    with pytest.raises(ValueError, match="lr"):
        gk.gma_step(params, _updates(), lr=float("nan"))


# -- params ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16], ids=str)
def test_params_wrong_dtype(dtype):
    p = torch.full((N,), 0.5, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match="params.*float32"):
        gk.gma_step(p, _updates())
    with pytest.raises(ValueError, match="params"):
        gk.ServerOptimizer(p, "momentum")
    assert torch.equal(p, torch.full((N,), 0.5, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("shape", [(N + 1,), (N - 1,), (2, N // 2), ()], ids=str)
def test_params_wrong_shape(shape):
    p = torch.full(shape, 0.5, device=DEVICE)
    with pytest.raises(ValueError, match="params"):
        gk.gma_step(p, _updates())
    assert torch.equal(p, torch.full(shape, 0.5, device=DEVICE))


def test_params_size_checked_at_step():
    p = torch.full((N + 1,), 0.5, device=DEVICE)
    opt = gk.ServerOptimizer(p, "adam")
    with pytest.raises(ValueError, match="params"):
        opt.step(_updates())
    assert torch.equal(p, torch.full((N + 1,), 0.5, device=DEVICE))


def test_params_non_contiguous():
    wide = torch.full((2 * N,), 0.5, device=DEVICE)
    p = wide[::2]
    with pytest.raises(ValueError, match="params.*contiguous"):
        gk.gma_step(p, _updates())
    with pytest.raises(ValueError, match="params"):
        gk.ServerOptimizer(p, "sgd")
    assert torch.equal(wide, torch.full((2 * N,), 0.5, device=DEVICE))


def test_params_not_a_tensor():
    """The same check, and the same error type, for the function and the optimizer."""
    with pytest.raises(TypeError, match="params must be a tensor, got list"):
        gk.gma_step([0.0] * N, _updates())
    with pytest.raises(TypeError, match="params must be a tensor, got list"):
        gk.ServerOptimizer([0.0] * N, "sgd")


# -- streaming -------------------------------------------------------------------------------

@pytest.mark.parametrize("numel", [0, -3, 2.5, True, "8"], ids=repr)
def test_accumulator_bad_numel(numel):
    with pytest.raises(ValueError, match="numel"):
        gk.Accumulator(numel)


def test_accumulator_wrong_length_and_device():
    acc = gk.Accumulator(N, device=DEVICE)
    with pytest.raises(ValueError, match=str(N + 1)):
        acc.add(torch.ones(N + 1, device=DEVICE))
    with pytest.raises(ValueError, match="meta"):
        acc.add(torch.ones(N, device="meta"))
    assert acc.num_clients == 0 and torch.equal(acc.buffer, torch.zeros(2 * N + 2, device=DEVICE))


def test_accumulator_merge_mismatch():
    acc = gk.Accumulator(N)
    with pytest.raises(TypeError, match="Accumulator"):
        acc.merge(torch.zeros(2 * N + 2))
    with pytest.raises(ValueError, match="size"):
        acc.merge(gk.Accumulator(N + 1))
    with pytest.raises(ValueError, match="weighted_agreement"):
        acc.merge(gk.Accumulator(N, weighted_agreement=True))


# ---------------------------------------------------------------- numbers that are not Python's

import numpy as np  # noqa: E402


@pytest.mark.parametrize("convert", [np.float64, np.float32, np.int64, torch.tensor,
                                     lambda v: torch.tensor(v, dtype=torch.float64)],
                         ids=["np.float64", "np.float32", "np.int64", "tensor", "tensor64"])
def test_numpy_and_0d_tensor_numbers_are_numbers(convert):
    updates = _updates(3)
    want = gk.gma_step(torch.zeros(N, device=DEVICE), updates, [1.0, 2.0, 3.0], tau=0.5, lr=2.0)
    weights = [convert(1), convert(2), convert(3)]
    got = gk.gma_step(torch.zeros(N, device=DEVICE), updates, weights, tau=convert(0.5)
                      if convert is not np.int64 else 0.5, lr=convert(2))
    assert torch.equal(got, want)
    acc = gk.Accumulator(np.int64(N) if convert is not torch.tensor else torch.tensor(N),
                         device=DEVICE)
    acc.add(updates[0], convert(3))
    assert acc.num_clients == 1 and acc.weight_sum == 3.0
    assert gk.MaskConfig(tau=np.float32(0.4)).tau == 0.4  # as written, not float32's 0.40000001


@pytest.mark.parametrize("kwargs, error, message", [
    ({"weights": ["1", "2", "3"]}, TypeError, "weights must be numbers"),
    ({"weights": [True, 1, 2]}, TypeError, "weights must be numbers"),
    ({"weights": np.array(["1", "2", "3"])}, TypeError, "weights must be numbers"),
    ({"rescale": "yes"}, ValueError, "rescale must be True or False, got 'yes'"),
    ({"weighted_agreement": 1}, ValueError, "weighted_agreement must be True or False"),
    ({"tau": "0.4"}, ValueError, "tau must be a finite number, got '0.4'"),
    ({"tau": torch.tensor([0.4])}, ValueError, "tau must be a finite number"),
    ({"lr": True}, ValueError, "lr must be a finite number, got True"),
])
def test_strings_bools_and_arrays_are_not_numbers(params, kwargs, error, message):
    with pytest.raises(error, match=message):
        gk.gma_step(params, _updates(3), **kwargs)


@pytest.mark.parametrize("numel", ["10", 2.0, True, np.float64(3), torch.tensor(2.0)])
def test_accumulator_size_must_be_an_integer(numel):
    with pytest.raises(ValueError, match="numel must be an integer >= 1"):
        gk.Accumulator(numel)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_params_that_require_grad_are_refused_before_any_state_moves(kind):
    params = torch.zeros(N, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="params requires grad"):
        gk.ServerOptimizer(params, kind)
    opt = gk.ServerOptimizer(torch.zeros(N, device=DEVICE), kind)
    opt.step(_updates(3))
    states = [s.clone() for s in opt.states]
    opt.params.requires_grad_()  # switched on after construction
    with pytest.raises(ValueError, match="params requires grad"):
        opt.step(_updates(3))
    assert all(torch.equal(a, b) for a, b in zip(opt.states, states))
    with pytest.raises(ValueError, match="params requires grad"):
        gk.gma_step(torch.zeros(N, device=DEVICE, requires_grad=True), _updates(3))


def test_masked_mean_does_not_speak_of_params_it_does_not_have():
    updates = _updates(3)
    updates[1, 2] = float("nan")
    with pytest.raises(gk.NonFiniteError, match=r"updates\[1\] contains .*; nothing was computed"):
        gk.masked_mean(updates)
    updates[0, 0] = float("inf")
    with pytest.raises(gk.NonFiniteError, match=r"updates\[0\], updates\[1\] contain non-finite"):
        gk.masked_mean(updates)


@pytest.mark.parametrize("state, message", [
    ({}, "not an optimizer state"),
    ([1, 2], "not an optimizer state"),
    ({"config": {"kind": "adam"}, "states": "x"}, "not an optimizer state"),
    ({"config": {"kind": "adam"}, "states": [torch.full((N,), float("nan"))] * 2},
     "non-finite values"),
    ({"config": {"kind": "yogi"}, "states": [torch.zeros(N)] * 2}, "state is for optimizer 'yogi'"),
])
def test_a_malformed_optimizer_state_is_refused_with_the_state_untouched(state, message):
    opt = gk.ServerOptimizer(torch.zeros(N, device=DEVICE), "adam")
    opt.step(_updates(3))
    before = [s.clone() for s in opt.states]
    if isinstance(state, dict) and isinstance(state.get("states"), list):
        state = {**state, "states": [t.to(DEVICE) for t in state["states"]]}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(opt.states, before))


def test_wrong_types_are_named():
    opt = gk.ServerOptimizer(torch.zeros(N, device=DEVICE))
    with pytest.raises(TypeError, match="step_accumulated takes an Accumulator, got list"):
        opt.step_accumulated([_updates(1)[0]])
    with pytest.raises(TypeError, match="FlatParams takes an nn.Module, got dict"):
        gk.FlatParams({"w": torch.zeros(3)})
