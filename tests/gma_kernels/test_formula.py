"""The formula's pieces (``formula.py``): the integer threshold at exact ties (through every
backend), the weighted threshold's rounding allowance, ``MaskParams``, the mask from a count,
the density rescale, the mask placement, the streaming result and step, and the guarded step
that writes nothing it cannot finish."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gma_kernels as gk
from gma_kernels.config import MaskConfig, StepConfig
from gma_kernels.formula import (MaskParams, StreamSums, apply_step, count_threshold,
                                 mask_from_count, mask_threshold, rescale, step_input,
                                 step_values, streaming_result, streaming_step,
                                 weighted_threshold)

import reference as ref
from gk_util import BACKENDS, gen, layout, tie_columns


TIES = [(4, 0.5), (10, 0.4), (10, 0.8), (5, 0.4), (5, 0.6), (3, 1 / 3), (6, 0.5), (7, 3 / 7),
        (20, 0.35), (1, 1.0), (2, 1.0), (8, 0.0), (9, 1.0), (13, 0.1), (25, 0.24)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,tau", TIES, ids=[f"K{k}-tau{t:.4g}" for k, t in TIES])
def test_mask_threshold_is_exact_ge(backend, k, tau):
    values = tie_columns(k, gen(k))
    updates, exact = layout(values, torch.float32, "matrix")
    counts = ref.sign_count(exact).abs()
    keep = ref.keep(exact, tau=tau)
    # the inputs hold every count, so the exact ties (c / K == τ) and both sides of τ
    assert set(counts.tolist()) == set(range(k + 1))
    assert keep.any() and ((~keep).any() or tau == 0.0)
    avg = gk.masked_mean(updates, tau=0.0, backend=backend).cpu()
    nonzero = avg != 0
    assert nonzero.sum() >= values.shape[1] - 1  # only the all-zero column averages to 0
    hard = gk.masked_mean(updates, tau=tau, mask="hard", backend=backend).cpu()
    assert torch.equal((hard != 0)[nonzero], keep[nonzero])
    assert torch.equal(hard[keep], avg[keep])  # m = 1 exactly where kept
    soft = gk.masked_mean(updates, tau=tau, mask="soft", backend=backend).cpu()
    a = gk.agreement(updates, backend=backend).cpu()
    assert torch.equal(soft, torch.where(keep, avg, a * avg))
    # density counts exactly the kept coordinates
    _, stats = gk.masked_mean(updates, tau=tau, mask="hard", backend=backend, return_stats=True)
    assert float(stats.density) * values.shape[1] == pytest.approx(int(keep.sum()), abs=1e-3)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 10, 13, 100])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.24, 1 / 3, 0.4, 0.5, 0.6, 0.8, 1.0])
def test_count_threshold_is_the_smallest_count_with_c_over_k_at_least_tau(k, tau):
    """``count_threshold`` is ``min {c : c / K ≥ τ}`` with the float64 division ``A ≥ τ``
    reads (0.4 keeps 4 of 10, though the binary 0.4 is a hair above 2/5)."""
    c = count_threshold(tau, k)
    assert c == float(min(c for c in range(k + 1) if c / k >= tau))
    assert count_threshold(0.4, 10) == 4.0


def test_weighted_threshold_allows_the_rounding_of_the_weighted_sum():
    """τ lowered by ``(K + 1)·2⁻²⁴`` (0 stays 0), so that six equal clients all agreeing,
    ``6 · fl32(1/6)`` = 1.0000001 or 0.99999994 in float32, pass τ = 1."""
    assert weighted_threshold(0.0, 6) == 0.0
    assert weighted_threshold(1.0, 6) == 1.0 - 7 * 2.0 ** -24
    sixth = np.float32(1 / 6)
    assert np.float32(sixth * 6) >= weighted_threshold(1.0, 6)


@pytest.mark.parametrize("mask", ["soft", "hard"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mask_params_are_the_threshold_and_scale_of_the_config(mask, weighted):
    config = MaskConfig(0.4, mask, weighted)
    params = MaskParams.of(config, 10)
    assert (params.threshold, params.scale) == mask_threshold(config, 10)
    assert params.hard == (mask == "hard") and params.weighted == weighted
    assert params.scale == (1.0 if weighted else float(np.float32(0.1)))


@pytest.mark.parametrize("hard", [False, True])
def test_mask_from_count(hard):
    """``A = |count|·scale`` (written over ``count``), ``m = 1`` where ``|count| ≥ threshold``,
    else ``A`` (soft) or 0 (hard)."""
    count = torch.tensor([-4.0, -3.0, -1.0, 0.0, 2.0, 3.0, 4.0])
    m, agree = mask_from_count(count, MaskParams(3.0, 0.25, hard, False))
    assert agree is count and agree.tolist() == [1.0, 0.75, 0.25, 0.0, 0.5, 0.75, 1.0]
    low = [0.0, 0.0, 0.0] if hard else [0.25, 0.0, 0.5]
    assert m.tolist() == [1.0, 1.0, *low, 1.0, 1.0]


def test_rescale_divides_by_the_density():
    x = torch.tensor([1.0, -2.0, 0.5])
    out = rescale(x, torch.tensor(0.25))
    assert out is x
    assert torch.equal(x, torch.tensor([1.0, -2.0, 0.5]) * (1.0 / (torch.tensor(0.25) + 1e-12)))


@pytest.mark.parametrize("kind,placement,after", [("sgd", "after", False),
                                                  ("adam", "before", False),
                                                  ("adam", "after", True)])
def test_step_input_places_the_mask(kind, placement, after):
    """Before (and sgd either way): the step sees ``m ⊙ mean``; after, a stateful step sees
    the mean and ``m`` multiplies its direction."""
    mean, m = torch.tensor([2.0, -4.0]), torch.tensor([0.5, 1.0])
    x, on_step = step_input(StepConfig(kind, mask_placement=placement), mean, m)
    if after:
        assert x is mean and on_step is m and x.tolist() == [2.0, -4.0]
    else:
        assert on_step is None and x.tolist() == [1.0, -4.0]


@pytest.mark.parametrize("weighted", [False, True])
def test_streaming_result_reads_the_sums_only(weighted):
    """(S/Σp, m from C — C/Σp weighted —, [[Σ m, Σ A]], finite), the sums left as they were."""
    total = torch.tensor([3.0, -6.0, 1.5, 0.0])
    count = torch.tensor([3.0, -1.0, 2.0, 0.0]) * (1.5 if weighted else 1.0)
    before = total.clone(), count.clone()
    mask = MaskParams(0.5 if weighted else 2.0, 1.0 if weighted else 1 / 3, False, weighted)
    mean, m, sums, finite = streaming_result(StreamSums(total, count, 3.0), mask=mask)
    assert torch.equal(total, before[0]) and torch.equal(count, before[1])
    assert mean.tolist() == [1.0, -2.0, 0.5, 0.0] and finite
    score = (count / 3.0 if weighted else count).abs()
    expected_m = torch.where(score >= mask.threshold, 1.0, score * mask.scale)
    assert torch.equal(m, expected_m)
    assert torch.equal(sums, torch.stack((m.sum(), (score * mask.scale).sum()))[None])


@pytest.mark.parametrize("placement", ["before", "after"])
def test_streaming_step_is_the_result_then_the_step(placement):
    """``streaming_step`` = ``streaming_result``, ``step_input``, ``step_values``."""
    g = gen(3)
    total, count = torch.randn(50, generator=g), torch.randint(-4, 5, (50,),
                                                                 generator=g).float()
    config = StepConfig("adam", lr=0.1, mask_placement=placement)
    mask = MaskParams(3.0, 0.25, False, False)
    params, states = torch.randn(50, generator=g), (torch.zeros(50), torch.zeros(50))
    mean, m, _, _ = streaming_result(StreamSums(total, count, 4.0), mask=mask)
    want, want_states = step_values(config, params, states, *step_input(config, mean, m))
    sums, finite, stepped = streaming_step(StreamSums(total, count, 4.0), mask=mask,
                                           config=config, params=params, states=states)
    assert finite and stepped
    assert torch.equal(params, want) and all(map(torch.equal, states, want_states))


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_a_guarded_step_that_would_overflow_writes_nothing(kind):
    """``apply_step(guard=True)`` refuses a step whose new params or state are not finite (here
    in the last coordinate), with every block as it was; unguarded, it steps."""
    n = 300
    params = torch.ones(n)
    params[-1] = 3e38
    states = tuple(torch.zeros(n) for _ in range(StepConfig(kind).state_count))
    x = torch.full((n,), 1e38 if kind != "adam" else 1e10)
    before = params.clone()
    config = StepConfig(kind, lr=1.0)
    if kind == "adam":
        x[-1] = 3e38  # g² overflows
    assert not apply_step(config=config, params=params, states=states, x=x, guard=True)
    assert torch.equal(params, before) and all(not s.any() for s in states)
    assert apply_step(config=config, params=params, states=states, x=x, guard=False)
    assert not torch.equal(params, before)
