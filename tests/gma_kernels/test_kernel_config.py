"""The public types (``config.py``): ``tau_from_agreeing_fraction``, the numbers the checks
accept, ``StepConfig``'s bias correction and mask placement, and ``GMAStats``. (Named apart
from ``tests/fedsim/test_config.py``: test file names must be unique across the test trees.)"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gma_kernels as gk
from gma_kernels.config import StepConfig, as_count, as_number, check_bool

import reference as ref
from gk_util import BACKENDS, layout, make


def test_tau_from_agreeing_fraction():
    assert gk.tau_from_agreeing_fraction(0.8) == 0.6
    assert gk.tau_from_agreeing_fraction(0.5) == 0.0
    assert gk.tau_from_agreeing_fraction(1.0) == 1.0
    assert gk.tau_from_agreeing_fraction(0.7) == 0.4
    # 8 of 10 clients agreeing (count 8 - 2 = 6) pass "at least 80% agree"; 7 of 10 do not
    values = torch.ones(10, 2, dtype=torch.float64)
    values[8:, 0] = -1.0
    values[7:, 1] = -1.0
    updates, _ = layout(values, torch.float32, "matrix")
    for backend in BACKENDS:
        hard = gk.masked_mean(updates, tau=gk.tau_from_agreeing_fraction(0.8), mask="hard",
                              backend=backend)
        assert hard.cpu().tolist() == [pytest.approx(0.6), 0.0]


def test_tau_from_agreeing_fraction_bounds():
    for bad in (0.4, 1.2, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            gk.tau_from_agreeing_fraction(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_as_dict(backend):
    updates, exact, w = make(51, 6, 1000, kind="list")
    updates[4][10] = float("nan")
    _, stats = gk.masked_mean(updates, w, tau=0.5, mask="hard", backend=backend,
                              nonfinite="drop", return_stats=True)
    keep = [0, 1, 2, 3, 5]
    rest_w = [w[k] for k in keep]
    d = stats.as_dict()
    assert d["clients"] == 5 and d["dropped"] == 1
    assert d["mask_density"] == pytest.approx(ref.density(exact[keep], rest_w, tau=0.5,
                                                          mask="hard"), rel=1e-6)
    assert d["mean_agreement"] == pytest.approx(ref.mean_agreement(exact[keep]), rel=1e-6)


def test_numbers_are_read_as_written():
    """Python, NumPy and 0-d tensor numbers are numbers, a narrow float by its shortest
    decimal form; bools, strings and 1-element arrays are not."""
    assert as_number(np.float32(0.4)) == 0.4 and as_number(torch.tensor(0.4)) == 0.4
    assert as_number(np.int64(3)) == 3.0 and as_number(torch.tensor(2, dtype=torch.int64)) == 2.0
    for bad in (True, np.bool_(False), "0.4", torch.tensor([0.4]), None):
        assert as_number(bad) is None
    assert as_count("n", torch.tensor(5)) == 5 and as_count("n", np.int64(1)) == 1
    for bad in (0, 2.0, True, "3"):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            as_count("n", bad)
    assert check_bool("flag", np.bool_(True)) is True
    with pytest.raises(ValueError, match="flag must be True or False"):
        check_bool("flag", 1)


def test_at_step_is_adams_bias_correction_as_an_uncorrected_step():
    """``at_step(t)``: ``lr·√(1−β2^t)/(1−β1^t)`` and ``eps·√(1−β2^t)``, bias correction off;
    without bias correction the config itself."""
    config = StepConfig("adam", lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3, bias_correction=True)
    for t in (1, 2, 10):
        step = config.at_step(t)
        root = math.sqrt(1 - 0.99 ** t)
        assert step.lr == 0.01 * root / (1 - 0.9 ** t) and step.eps == 1e-3 * root
        assert not step.bias_correction and step.kind == "adam"
    plain = StepConfig("adam")
    assert plain.at_step(5) is plain
    with pytest.raises(ValueError, match="adam"):
        StepConfig("momentum", bias_correction=True)


@pytest.mark.parametrize("kind,states", [("sgd", 0), ("momentum", 1), ("adam", 2), ("yogi", 2),
                                         ("adagrad", 2)])
def test_masks_step_needs_placement_after_and_a_state(kind, states):
    """The mask multiplies the step only after a stateful kind (for sgd both are one step)."""
    assert StepConfig(kind).state_count == states
    assert not StepConfig(kind).masks_step
    assert StepConfig(kind, mask_placement="after").masks_step == (states > 0)


def test_stats_reduce_the_partial_sums():
    """``density`` and ``mean_agreement`` are the column sums of ``[P, 2]`` over N."""
    stats = gk.GMAStats(torch.tensor([[3.0, 1.0], [1.0, 2.0]]), 8, 5, (2,))
    assert float(stats.density) == 0.5 and float(stats.mean_agreement) == 0.375
    assert stats.as_dict() == {"mask_density": 0.5, "mean_agreement": 0.375, "clients": 5,
                               "dropped": 1}
