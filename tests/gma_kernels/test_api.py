"""agreement / masked_mean / gma_step against the float64 reference, on both backends."""
from __future__ import annotations

import itertools

import pytest
import torch

import gma_kernels as gk
import reference as ref
from gk_util import (BACKENDS, DEVICE, DTYPES, LAYOUTS, PARAM_DTYPES, assert_close,
                     assert_no_weighted_ties, assert_unchanged, data_scale, gen, layout, make,
                     random_values, snapshot)

# Triton's interpreter computes with numpy, which warns on the NaN/inf inputs of the guard tests
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

OPTIONS = list(itertools.product(("soft", "hard"), (False, True), (False, True)))
OPTION_IDS = [f"{m}-{'wagree' if w else 'count'}-{'rescale' if r else 'plain'}"
              for m, w, r in OPTIONS]


def _check_masked_mean(updates, exact, weights, backend, *, tau, mask, weighted, rescale):
    if weighted:
        assert_no_weighted_ties(exact, weights, tau)
    before = snapshot(updates)
    out, stats = gk.masked_mean(updates, weights, tau=tau, mask=mask, weighted_agreement=weighted,
                                rescale=rescale, backend=backend, return_stats=True)
    assert out.dtype == torch.float32 and out.shape == (exact.shape[1],)
    assert out.device.type == DEVICE.type
    expected = ref.masked_mean(exact, weights, tau=tau, mask=mask, weighted_agreement=weighted,
                               rescale=rescale)
    scale = data_scale(exact)
    if rescale:
        scale /= max(ref.density(exact, weights, tau=tau, mask=mask, weighted=weighted), 1e-12)
    assert_close(out, expected, scale=scale)
    assert_unchanged(updates, before)
    assert stats.num_clients == exact.shape[0] and stats.dropped == ()
    assert float(stats.density) == pytest.approx(
        ref.density(exact, weights, tau=tau, mask=mask, weighted=weighted), rel=1e-5, abs=1e-7)
    assert float(stats.mean_agreement) == pytest.approx(
        ref.mean_agreement(exact, weights, weighted=weighted), rel=1e-5, abs=1e-7)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_weights", [False, True], ids=["equal", "weights"])
@pytest.mark.parametrize("mask,weighted,rescale", OPTIONS, ids=OPTION_IDS)
def test_masked_mean_every_option(backend, with_weights, mask, weighted, rescale):
    seed = 10 * OPTIONS.index((mask, weighted, rescale)) + 2 * with_weights + (backend == "torch")
    updates, exact, w = make(seed, 7, 3001, kind="list", weights=with_weights)
    _check_masked_mean(updates, exact, w, backend, tau=0.4137, mask=mask, weighted=weighted,
                       rescale=rescale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
@PARAM_DTYPES
def test_masked_mean_dtypes_and_layouts(backend, kind, dtype):
    seed = 100 + LAYOUTS.index(kind) * 10 + DTYPES.index(dtype)
    updates, exact, w = make(seed, 5, 2049, dtype, kind)
    _check_masked_mean(updates, exact, w, backend, tau=0.4, mask="soft", weighted=False,
                       rescale=False)
    _check_masked_mean(updates, exact, w, backend, tau=0.7313, mask="hard", weighted=True,
                       rescale=True)


@pytest.mark.parametrize("k,n", [(1, 1), (1, 1025), (2, 1), (3, 1000003), (257, 10007),
                                 (300, 5)], ids=lambda v: str(v))
def test_masked_mean_sizes_torch(k, n):
    updates, exact, w = make(k * 7 + n, k, n, kind="matrix")
    _check_masked_mean(updates, exact, w, "torch", tau=0.3, mask="soft", weighted=False,
                       rescale=False)
    _check_masked_mean(updates, exact, w, "torch", tau=0.55, mask="hard", weighted=False,
                       rescale=True)


@pytest.mark.parametrize("k,n", [(1, 1), (2, 1), (4, 1025), (300, 3)], ids=lambda v: str(v))
def test_masked_mean_sizes_triton(k, n):
    updates, exact, w = make(k * 5 + n, k, n, kind="list")
    _check_masked_mean(updates, exact, w, "triton", tau=0.3, mask="soft", weighted=False,
                       rescale=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_zero_is_weighted_fedavg(backend):
    updates, exact, w = make(7, 9, 4097, torch.float16, "rowslice")
    soft = gk.masked_mean(updates, w, tau=0.0, mask="soft", backend=backend)
    hard = gk.masked_mean(updates, w, tau=0.0, mask="hard", backend=backend)
    rescaled, stats = gk.masked_mean(updates, w, tau=0.0, mask="hard", rescale=True,
                                     backend=backend, return_stats=True)
    assert torch.equal(soft, hard) and torch.equal(soft, rescaled)
    assert float(stats.density) == 1.0
    assert_close(soft, ref.average(exact, w), scale=data_scale(exact))
    # and it is not the unweighted mean: the weights matter
    assert not torch.allclose(soft.cpu().double(), ref.average(exact, None), rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["count", "wagree"])
@pytest.mark.parametrize("kind", ["matrix", "list", "transposed", "strided_list"])
def test_agreement(backend, weighted, kind):
    updates, exact, w = make(11 + weighted, 6, 1025, torch.bfloat16, kind)
    before = snapshot(updates)
    a = gk.agreement(updates, w, weighted=weighted, backend=backend)
    assert a.dtype == torch.float32 and a.shape == (1025,)
    expected = ref.agreement(exact, w, weighted=weighted)
    assert_close(a, expected, scale=1.0, rtol=1e-6 if not weighted else 1e-5)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert_unchanged(updates, before)
    if not weighted:
        # the count over K: A·K is an integer, exactly the reference's count
        assert torch.equal(torch.round(a.cpu().double() * 6), ref.sign_count(exact).abs().double())


def test_agreement_unweighted_ignores_weights_weighted_uses_them():
    updates, exact, w = make(12, 5, 999)
    a0 = gk.agreement(updates, backend="torch")
    a1 = gk.agreement(updates, w, backend="torch")
    assert torch.equal(a0, a1)
    aw = gk.agreement(updates, w, weighted=True, backend="torch")
    assert not torch.allclose(aw, a0)
    assert_close(aw, ref.agreement(exact, w, weighted=True), scale=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agreement_bit_identical_across_backends(backend):
    updates, exact, _ = make(13, 11, 4097, torch.float16, "list")
    a = gk.agreement(updates, backend=backend)
    other = gk.agreement(updates, backend="triton" if backend == "torch" else "torch")
    assert torch.equal(a, other)


# -- exact thresholds: the unweighted mask compares the integer count with K·τ --------------

@pytest.mark.parametrize("k,tau", [(4, 0.5), (10, 0.4), (300, 0.4), (128, 0.25)],
                         ids=lambda v: str(v))
def test_unweighted_mask_bit_identical_across_backends(k, tau):
    g = gen(k)
    values = random_values(g, k, 257 if k > 100 else 2049)
    # force exact ties on a block of coordinates
    c = round(tau * k)
    values[:, :50] = 0.0
    values[:c, :50] = torch.rand(c, 50, generator=g, dtype=torch.float64) + 0.1
    for dtype in (torch.float32, torch.bfloat16):
        updates, exact = layout(values, dtype, "list")
        outs = {}
        for backend in BACKENDS:
            hard = gk.masked_mean(updates, tau=tau, mask="hard", backend=backend).cpu()
            avg = gk.masked_mean(updates, tau=0.0, backend=backend).cpu()
            outs[backend] = hard
            nz = avg != 0
            assert torch.equal((hard != 0)[nz], ref.keep(exact, tau=tau)[nz])
            assert torch.equal(hard[:50] != 0, torch.ones(50, dtype=torch.bool))
        assert torch.equal(outs["torch"] != 0, outs["triton"] != 0)


# -- gma_step ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask,weighted,rescale", OPTIONS, ids=OPTION_IDS)
def test_gma_step_updates_params_in_place(backend, mask, weighted, rescale):
    seed = 300 + OPTIONS.index((mask, weighted, rescale))
    updates, exact, w = make(seed, 6, 1537, torch.float16, "transposed", scale=0.1)
    if weighted:
        assert_no_weighted_ties(exact, w, 0.45)
    params = (torch.rand(1537, generator=gen(seed)) * 4 - 2).to(DEVICE)
    start = params.clone()
    out, stats = gk.gma_step(params, updates, w, lr=0.75, tau=0.45, mask=mask,
                             weighted_agreement=weighted, rescale=rescale, backend=backend,
                             return_stats=True)
    assert out is params
    g = ref.masked_mean(exact, w, tau=0.45, mask=mask, weighted_agreement=weighted,
                        rescale=rescale)
    expected = start.cpu().double() + 0.75 * g
    assert_close(params, expected, scale=2.0 + float(g.abs().max()))
    moved = (params != start).cpu()
    assert moved.sum() > 0
    if mask == "hard":  # untouched exactly where the mask is 0
        assert torch.equal(moved & (g == 0), torch.zeros_like(moved))
    assert float(stats.density) == pytest.approx(
        ref.density(exact, w, tau=0.45, mask=mask, weighted=weighted), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gma_step_equals_params_plus_lr_masked_mean(backend):
    updates, exact, w = make(21, 4, 4097, torch.bfloat16, "list")
    params = torch.full((4097,), 0.625, device=DEVICE)
    gk.gma_step(params, updates, w, lr=0.5, tau=0.5, backend=backend)
    g = gk.masked_mean(updates, w, tau=0.5, backend=backend)
    assert_close(params, (0.625 + 0.5 * g).cpu().double(), scale=1.0, rtol=1e-6, atol=1e-7)


def test_gma_step_zero_lr_leaves_params_bit_identical():
    updates, _, w = make(22, 3, 100)
    params = torch.randn(100, generator=gen(22)).to(DEVICE)
    start = params.clone()
    gk.gma_step(params, updates, w, lr=0.0, backend="torch")
    assert torch.equal(params, start)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gma_step_large(backend):
    n = 1000003 if backend == "torch" else 4097
    updates, exact, w = make(23, 3, n, torch.float16, "matrix", scale=0.01)
    params = torch.full((n,), -3.5, device=DEVICE)
    gk.gma_step(params, updates, w, lr=2.0, tau=0.6, mask="hard", backend=backend)
    g = ref.masked_mean(exact, w, tau=0.6, mask="hard")
    assert_close(params, -3.5 + 2.0 * g, scale=3.5)


# -- weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_client_counts_in_agreement_not_in_mean(backend):
    g = gen(31)
    values = random_values(g, 4, 1500, zeros=0.0)
    updates, exact = layout(values, torch.float32, "list")
    w = [3.0, 0.0, 5.0, 2.0]
    out = gk.masked_mean(updates, w, tau=0.5, backend=backend)
    assert_close(out, ref.masked_mean(exact, w, tau=0.5), scale=data_scale(exact))
    # the zero-weight client's magnitudes are irrelevant to the mean, its sign still votes
    updates2 = [u.clone() for u in updates]
    updates2[1] = updates2[1] * 1000
    assert torch.equal(gk.masked_mean(updates2, w, tau=0.5, backend=backend), out)
    a_with = gk.agreement(updates, w, backend=backend)
    a_without = gk.agreement([updates[0], updates[2], updates[3]], backend=backend)
    assert not torch.equal(a_with, a_without)


# -- non-finite updates ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
def test_nonfinite_update_raises_and_leaves_params(backend, bad, rescale):
    updates, _, w = make(40, 5, 2500, kind="list")
    updates[3][1234] = bad
    params = torch.linspace(-1, 1, 2500, device=DEVICE)
    start = params.clone()
    with pytest.raises(gk.NonFiniteError, match=r"updates\[3\]"):
        gk.gma_step(params, updates, w, tau=0.2, mask="hard", rescale=rescale, backend=backend)
    assert torch.equal(params, start)
    with pytest.raises(gk.NonFiniteError, match=r"updates\[3\]"):
        gk.masked_mean(updates, w, backend=backend)
    with pytest.raises(gk.NonFiniteError, match=r"updates\[3\]"):
        gk.agreement(updates, w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_names_every_bad_client(backend):
    updates, _, _ = make(41, 6, 300)
    updates[1, 0] = float("nan")
    updates[4, 299] = float("inf")
    with pytest.raises(ValueError, match=r"updates\[1\], updates\[4\]"):
        gk.masked_mean(updates, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_client_with_inf_still_raises(backend):
    updates, _, _ = make(42, 3, 500, kind="list")
    updates[1][7] = float("inf")
    params = torch.ones(500, device=DEVICE)
    with pytest.raises(ValueError, match=r"updates\[1\]"):
        gk.gma_step(params, updates, [1.0, 0.0, 1.0], backend=backend)
    assert torch.equal(params, torch.ones(500, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["count", "wagree"])
def test_nonfinite_drop_equals_aggregating_the_rest(backend, weighted):
    updates, exact, w = make(43, 6, 2049, torch.float16, "list")
    updates[0][5] = float("nan")
    updates[4][2048] = -float("inf")
    keep = [1, 2, 3, 5]
    rest = [updates[k] for k in keep]
    rest_w = [w[k] for k in keep]
    params = torch.full((2049,), 0.25, device=DEVICE)
    expected_params = params.clone()
    gk.gma_step(expected_params, rest, rest_w, tau=0.5, weighted_agreement=weighted,
                backend=backend)
    _, stats = gk.gma_step(params, updates, w, tau=0.5, weighted_agreement=weighted,
                           backend=backend, nonfinite="drop", return_stats=True)
    assert torch.equal(params, expected_params)
    assert stats.dropped == (0, 4) and stats.num_clients == 4
    g = gk.masked_mean(updates, w, tau=0.5, weighted_agreement=weighted, backend=backend,
                       nonfinite="drop")
    assert torch.equal(g, gk.masked_mean(rest, rest_w, tau=0.5, weighted_agreement=weighted,
                                         backend=backend))
    assert_close(g, ref.masked_mean(exact[keep], rest_w, tau=0.5, weighted_agreement=weighted),
                 scale=data_scale(exact[keep]))
    a = gk.agreement(updates, w, weighted=weighted, backend=backend, nonfinite="drop")
    assert torch.equal(a, gk.agreement(rest, rest_w, weighted=weighted, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_drop_all_clients_raises(backend):
    updates, _, _ = make(44, 2, 10, kind="list")
    updates[0][0] = float("nan")
    updates[1][9] = float("inf")
    params = torch.zeros(10, device=DEVICE) + 0.5
    with pytest.raises(gk.NonFiniteError, match="every update"):
        gk.gma_step(params, updates, backend=backend, nonfinite="drop")
    assert torch.equal(params, torch.zeros(10, device=DEVICE) + 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_updates_overflowing_the_rescaled_average_leave_params(backend):
    # one kept coordinate of 3e38, density 1/4: rescaling overflows float32
    updates = torch.tensor([[3e38, -1.0, 1.0, -1.0], [3e38, 1.0, -1.0, 1.0]], device=DEVICE)
    params = torch.full((4,), 0.5, device=DEVICE)
    with pytest.raises(gk.NonFiniteError, match="overflow"):
        gk.gma_step(params, updates, tau=1.0, mask="hard", rescale=True, backend=backend)
    assert torch.equal(params, torch.full((4,), 0.5, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_skips_the_guard(backend):
    updates, _, _ = make(45, 3, 64)
    updates[2, 3] = float("nan")
    g = gk.masked_mean(updates, tau=0.0, backend=backend, nonfinite="unchecked")
    assert torch.isnan(g[3]) and torch.isfinite(g[torch.arange(64, device=g.device) != 3]).all()


# -- defaults and helpers --------------------------------------------------------------------

def test_defaults_are_the_journal_settings():
    """τ = 0.4 with the soft mask, unweighted agreement, no rescale (the journal version's
    published setting)."""
    updates, exact, w = make(50, 10, 3000)
    out = gk.masked_mean(updates, w, backend="torch")
    assert torch.equal(out, gk.masked_mean(updates, w, tau=0.4, mask="soft", backend="torch"))
    assert_close(out, ref.masked_mean(exact, w, tau=0.4, mask="soft"), scale=data_scale(exact))
    params = torch.zeros(3000, device=DEVICE)
    gk.gma_step(params, updates, w, backend="torch")  # lr = 1
    assert torch.equal(params, out)
