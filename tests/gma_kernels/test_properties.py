"""Property tests (hypothesis) of the aggregation semantics, on small random problems: FedAvg at
τ = 0, masks in [0, 1], the hard mask inside the soft one, invariance to client order, scaling
and negation, agreement in [0, 1], K = 1, monotonicity in τ, and agreement with the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gma_kernels as gk
import reference as ref
from gk_util import BACKENDS, DEVICE, DTYPES, assert_close, data_scale
from gma_kernels.config import MaskConfig

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FAST, max_examples=12)


@st.composite
def problems(draw, max_k=12, max_n=48, dtypes=DTYPES):
    """(updates [K, N] on DEVICE, exact float64 values, raw weights or None). Values are either
    small integers (many exact ties in signs and sums, many zeros) or scaled floats."""
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))
    dtype = draw(st.sampled_from(dtypes))
    if draw(st.booleans()):
        flat = draw(st.lists(st.integers(-3, 3), min_size=k * n, max_size=k * n))
        values = torch.tensor(flat, dtype=torch.float64).view(k, n)
    else:
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        values = torch.randn(k, n, generator=g, dtype=torch.float64)
        values += torch.randn(n, generator=g, dtype=torch.float64)  # coordinates lean one way
        values *= 10.0 ** draw(st.integers(-3, 3))
        values[torch.rand(k, n, generator=g) < 0.1] = 0.0
    exact = values.to(dtype).to(torch.float64)
    weights = draw(st.none() | st.lists(st.integers(0, 50), min_size=k, max_size=k)
                   .filter(lambda w: sum(w) > 0).map(lambda w: [float(x) for x in w]))
    return exact.to(DEVICE, dtype), exact, weights


taus = st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.8, 1.0]) | \
    st.floats(0.0, 1.0)
masks = st.sampled_from(["soft", "hard"])


def _nonzero_avg(updates, weights, backend="torch"):
    return (gk.masked_mean(updates, weights, tau=0.0, backend=backend) != 0).cpu()


@FAST
@given(problems(), masks)
def test_tau_zero_is_weighted_fedavg(problem, mask):
    updates, exact, w = problem
    out = gk.masked_mean(updates, w, tau=0.0, mask=mask, backend="torch")
    assert_close(out, ref.average(exact, w), scale=data_scale(exact))
    assert torch.equal(out, gk.masked_mean(updates, w, tau=0.0, mask="soft", rescale=True,
                                           backend="torch"))


@FAST
@given(problems(), taus, st.booleans())
def test_masks_within_unit_interval(problem, tau, weighted):
    updates, exact, w = problem
    acc = gk.Accumulator(exact.shape[1], device=DEVICE, weighted_agreement=weighted)
    acc.add(updates, w)
    _, soft, s_stats = acc.finalize(MaskConfig(tau, "soft", weighted))
    _, hard, h_stats = acc.finalize(MaskConfig(tau, "hard", weighted))
    assert float(soft.min()) >= 0.0 and float(soft.max()) <= 1.0
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(soft >= hard, torch.ones_like(soft, dtype=torch.bool))
    assert 0.0 <= float(h_stats.density) <= float(s_stats.density) <= 1.0 + 1e-6


@FAST
@given(problems(), taus, st.booleans())
def test_hard_support_inside_soft_support(problem, tau, weighted):
    updates, _, w = problem
    hard = gk.masked_mean(updates, w, tau=tau, mask="hard", weighted_agreement=weighted,
                          backend="torch")
    soft = gk.masked_mean(updates, w, tau=tau, mask="soft", weighted_agreement=weighted,
                          backend="torch")
    inside = hard != 0
    assert not (inside & (soft == 0)).any()
    assert torch.equal(hard[inside], soft[inside])  # m = 1 in both where the hard mask keeps


@FAST
@given(problems(), taus, masks, st.randoms(use_true_random=False))
def test_permutation_invariance(problem, tau, mask, rnd):
    updates, exact, w = problem
    k = exact.shape[0]
    order = list(range(k))
    rnd.shuffle(order)
    permuted = updates[order]
    pw = None if w is None else [w[i] for i in order]
    a = gk.agreement(updates, backend="torch")
    assert torch.equal(a, gk.agreement(permuted, backend="torch"))
    g = gk.masked_mean(updates, w, tau=tau, mask=mask, backend="torch")
    gp = gk.masked_mean(permuted, pw, tau=tau, mask=mask, backend="torch")
    assert_close(gp, g.cpu().double(), scale=data_scale(exact), rtol=1e-5, atol=1e-6)
    nz = _nonzero_avg(updates, w) & _nonzero_avg(permuted, pw)
    if mask == "hard":
        assert torch.equal((g != 0).cpu()[nz], (gp != 0).cpu()[nz])


@FAST
@given(problems(dtypes=(torch.float32,)), taus, masks, st.integers(-6, 6))
def test_scaling_by_power_of_two_scales_g_exactly(problem, tau, mask, j):
    updates, exact, w = problem
    c = 2.0 ** j
    g = gk.masked_mean(updates, w, tau=tau, mask=mask, backend="torch")
    gc = gk.masked_mean(updates * c, w, tau=tau, mask=mask, backend="torch")
    if exact.abs().max() * c < 1e30 and (exact[exact != 0].abs().min() * c > 1e-30
                                          if (exact != 0).any() else True):
        assert torch.equal(gc, g * c)


@FAST
@given(problems(), taus, masks, st.floats(1e-3, 1e3))
def test_scaling_by_any_positive_constant(problem, tau, mask, c):
    updates, exact, w = problem
    scaled = (exact * c).to(updates.dtype)
    if not torch.equal(torch.sign(scaled.double()), torch.sign(exact)) or \
            not torch.isfinite(scaled).all():
        return  # rounding to the low-precision type flushed a value to zero or overflowed
    scaled = scaled.to(DEVICE)
    g = gk.masked_mean(updates, w, tau=tau, mask=mask, backend="torch")
    gc = gk.masked_mean(scaled, w, tau=tau, mask=mask, backend="torch")
    assert torch.equal(gk.agreement(scaled, backend="torch"), gk.agreement(updates, backend="torch"))
    assert_close(gc, ref.masked_mean(scaled.cpu().double(), w, tau=tau, mask=mask),
                 scale=data_scale(scaled.cpu().double()))
    if updates.dtype == torch.float32:
        assert_close(gc, c * g.cpu().double(), scale=c * data_scale(exact), rtol=1e-5)


@FAST
@given(problems(), taus, masks, st.booleans(), st.booleans())
def test_negation_negates_g_exactly(problem, tau, mask, weighted, rescale):
    updates, _, w = problem
    kw = dict(tau=tau, mask=mask, weighted_agreement=weighted, rescale=rescale, backend="torch")
    assert torch.equal(gk.masked_mean(-updates, w, **kw), -gk.masked_mean(updates, w, **kw))
    assert torch.equal(gk.agreement(-updates, w, weighted=weighted, backend="torch"),
                       gk.agreement(updates, w, weighted=weighted, backend="torch"))


@FAST
@given(problems(), st.booleans())
def test_agreement_in_unit_interval(problem, weighted):
    updates, exact, w = problem
    a = gk.agreement(updates, w, weighted=weighted, backend="torch").cpu().double()
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-6
    assert_close(a, ref.agreement(exact, w, weighted=weighted), scale=1.0)
    k = exact.shape[0]
    if not weighted:
        assert torch.equal(torch.round(a * k), ref.sign_count(exact).abs().double())
    # unanimity is A = 1 exactly; a coordinate with no non-zero entry has A = 0 exactly
    unanimous = (exact > 0).all(0) | (exact < 0).all(0)
    if not weighted:
        assert torch.equal(a[unanimous], torch.ones(int(unanimous.sum()), dtype=torch.float64))
    assert torch.equal(a[(exact == 0).all(0)], torch.zeros(int((exact == 0).all(0).sum()),
                                                           dtype=torch.float64))


@FAST
@given(problems(max_k=1), taus, masks)
def test_single_client_is_the_update_itself(problem, tau, mask):
    updates, exact, _ = problem
    g, stats = gk.masked_mean(updates, tau=tau, mask=mask, backend="torch", return_stats=True)
    assert torch.equal(g.cpu().double(), exact[0])
    # m = 1 everywhere except where the update is 0 (sign 0, A = 0 < τ unless τ = 0)
    nonzero = float((exact[0] != 0).double().mean())
    assert float(stats.density) == pytest.approx(1.0 if tau == 0.0 else nonzero, abs=1e-6)
    a = gk.agreement(updates, backend="torch").cpu().double()
    assert torch.equal(a, (exact[0] != 0).double())


@FAST
@given(problems(), taus, taus, st.booleans())
def test_hard_mask_shrinks_as_tau_grows(problem, t1, t2, weighted):
    updates, _, w = problem
    lo, hi = min(t1, t2), max(t1, t2)
    kw = dict(mask="hard", weighted_agreement=weighted, backend="torch", return_stats=True)
    g_lo, s_lo = gk.masked_mean(updates, w, tau=lo, **kw)
    g_hi, s_hi = gk.masked_mean(updates, w, tau=hi, **kw)
    assert not ((g_hi != 0) & (g_lo == 0)).any()
    assert float(s_hi.density) <= float(s_lo.density)


@FAST
@given(problems())
def test_unanimity_at_tau_one(problem):
    updates, exact, w = problem
    hard = gk.masked_mean(updates, w, tau=1.0, mask="hard", backend="torch").cpu()
    unanimous = (exact > 0).all(0) | (exact < 0).all(0)
    assert torch.equal(hard != 0, unanimous & (torch.as_tensor(ref.average(exact, w)) != 0))


@FAST
@given(problems(), taus, masks)
def test_duplicating_every_client_changes_nothing(problem, tau, mask):
    updates, exact, w = problem
    twice = torch.cat([updates, updates])
    w2 = None if w is None else w + w
    assert torch.equal(gk.agreement(twice, backend="torch"), gk.agreement(updates, backend="torch"))
    g = gk.masked_mean(updates, w, tau=tau, mask=mask, backend="torch")
    g2 = gk.masked_mean(twice, w2, tau=tau, mask=mask, backend="torch")
    assert_close(g2, g.cpu().double(), scale=data_scale(exact))
    if mask == "hard":
        nz = _nonzero_avg(updates, w) & _nonzero_avg(twice, w2)
        assert torch.equal((g != 0).cpu()[nz], (g2 != 0).cpu()[nz])


@FAST
@given(problems(), taus, masks, st.booleans(), st.booleans())
def test_torch_backend_equals_reference(problem, tau, mask, weighted, rescale):
    _check_reference(problem, tau, mask, weighted, rescale, "torch")


@FEW
@given(problems(max_k=8, max_n=40), taus, masks, st.booleans(), st.booleans())
def test_triton_backend_equals_reference(problem, tau, mask, weighted, rescale):
    _check_reference(problem, tau, mask, weighted, rescale, "triton")


def _check_reference(problem, tau, mask, weighted, rescale, backend):
    updates, exact, w = problem
    if weighted:
        a = ref.agreement(exact, w, weighted=True)
        if ((a - tau).abs() < 1e-5).any():
            return  # float32 vs float64 weighted agreement may fall on either side of τ
    kw = dict(tau=tau, mask=mask, weighted_agreement=weighted, rescale=rescale)
    g, stats = gk.masked_mean(updates, w, backend=backend, return_stats=True, **kw)
    expected = ref.masked_mean(exact, w, **kw)
    dens = ref.density(exact, w, tau=tau, mask=mask, weighted=weighted)
    scale = data_scale(exact) / (max(dens, 1e-12) if rescale else 1.0)
    assert_close(g, expected, scale=scale)
    assert float(stats.density) == pytest.approx(dens, rel=1e-5, abs=1e-7)
    assert float(stats.mean_agreement) == pytest.approx(
        ref.mean_agreement(exact, w, weighted=weighted), rel=1e-5, abs=1e-7)
    if not weighted and mask == "hard":
        nz = (torch.as_tensor(ref.average(exact, w)) != 0)
        assert torch.equal((g.cpu() != 0)[nz], ref.keep(exact, tau=tau)[nz])


@FEW
@given(problems(max_k=8, max_n=40), taus)
def test_backends_give_identical_unweighted_masks(problem, tau):
    updates, exact, w = problem
    outs = [gk.masked_mean(updates, w, tau=tau, mask="hard", backend=b).cpu() for b in BACKENDS]
    nz = _nonzero_avg(updates, w, "torch") & _nonzero_avg(updates, w, "triton")
    assert torch.equal((outs[0] != 0)[nz], (outs[1] != 0)[nz])
    assert torch.equal(gk.agreement(updates, backend="torch"),
                       gk.agreement(updates, backend="triton"))


@FAST
@given(problems(), taus, masks, st.integers(1, 4))
def test_streaming_equals_batch(problem, tau, mask, groups):
    updates, exact, w = problem
    k = exact.shape[0]
    weights = w or [1.0] * k
    bounds = sorted({0, k, *[(i * k) // groups for i in range(groups)]})
    # an add() must carry a positive weight: fold zero-weight groups into their neighbour
    parts = [[lo, hi] for lo, hi in zip(bounds, bounds[1:])]
    merged = []
    for lo, hi in parts:
        if merged and sum(weights[merged[-1][0]:merged[-1][1]]) == 0:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    if len(merged) > 1 and sum(weights[merged[-1][0]:merged[-1][1]]) == 0:
        merged[-2][1] = merged.pop()[1]
    acc = gk.Accumulator(exact.shape[1], device=DEVICE)
    for lo, hi in merged:
        acc.add(updates[lo:hi], None if w is None else w[lo:hi])
    assert acc.num_clients == k
    g = acc.masked_mean(tau=tau, mask=mask)
    batch = gk.masked_mean(updates, w, tau=tau, mask=mask, backend="torch")
    assert_close(g, batch.cpu().double(), scale=data_scale(exact))
    assert_close(g, ref.masked_mean(exact, w, tau=tau, mask=mask), scale=data_scale(exact))
