"""The native C backend (``backends/native.py``, ``csrc/gma_cpu.c``) on CPU tensors: bit for bit
against the PyTorch-ops path where it promises to be, the float32 accuracy of its statistics,
every float16 bit pattern, the per-row non-finite screen, its thread pool across a fork, the
guard's undo on every thread, 64-bit row addressing, a chunk out of memory and the streaming
result. The tests of ``backend="torch"`` on both CPU paths are in ``test_torch_ops.py``."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import gma_kernels as gk
from gma_kernels.backends import native as _native
from gma_kernels.batch import make_batch
from gma_kernels.config import MaskConfig
from gma_kernels.formula import MaskParams, StreamSums, streaming_result
from gma_kernels.job import Job

import reference as ref
from gk_util import PARAM_DTYPES, assert_close, data_scale, make, needs_native


@needs_native
@PARAM_DTYPES
@pytest.mark.parametrize("k, kind", [(1, "list"), (1, "matrix"), (4, "list"), (4, "rowslice"),
                                     (7, "matrix"), (7, "rowslice"), (64, "list"),
                                     (64, "matrix")])
@pytest.mark.parametrize("weighted", [False, True])
def test_native_identical_to_chunks(dtype, k, weighted, kind, many_threads, monkeypatch):
    """The C fold (its AVX-512 loop where the CPU has one, the portable loop for the last
    columns) adds the same products in the same order as the PyTorch-ops path: the same
    agreement and the same masked mean, bit for bit, for every row dtype, with the rows given
    as pointers (a list) or as a matrix's first row and row stride (its own or a wider one's)."""
    updates, _, w = make(k, k, 3001, dtype, kind, device="cpu")
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_native, "ENABLED", enabled)
        results.append((gk.agreement(updates, w, weighted=weighted, backend="torch"),
                        gk.masked_mean(updates, w, weighted_agreement=weighted, backend="torch")))
    for native, chunks in zip(*results):
        assert torch.equal(native, chunks)


@needs_native
@pytest.mark.parametrize("placement", ["before", "after"])
def test_native_server_step(placement, many_threads):
    """Adam with the mask after the step: ``g`` unmasked and ``m`` apart (the split outputs)."""
    updates, exact, w = make(5, 6, 2053, torch.float32, "list", device="cpu")
    params = torch.randn(2053, dtype=torch.float64)
    flat = params.float()
    opt = gk.ServerOptimizer(flat, "adam", lr=0.1, tau=0.5, mask_placement=placement,
                             backend="torch")
    expected = ref.Optimizer(params, "adam", lr=0.1, placement=placement, tau=0.5)
    for _ in range(3):
        opt.step(updates, w)
        expected.step(exact, w)
    assert_close(flat, expected.params, scale=1.0, rtol=1e-4, atol=1e-5)


@needs_native
def test_native_overwrites_poisoned_outputs(many_threads):
    """``native.run`` writes every element of ``g`` and ``A`` (poisoned with NaN before)."""
    updates, exact, w = make(11, 5, 777, torch.bfloat16, "matrix", device="cpu")
    batch = make_batch(updates, w)
    g = torch.full((777,), float("nan"))
    a = torch.full((777,), float("nan"))
    outcome = _native.run(Job(batch, MaskConfig(tau=0.6), g_out=g, a_out=a))
    assert outcome.finite and torch.isfinite(g).all() and torch.isfinite(a).all()
    assert_close(g, ref.masked_mean(exact, w, tau=0.6), scale=data_scale(exact))
    assert_close(a, ref.agreement(exact, w), scale=1.0)
    expected_m = ref.mask(exact, w, tau=0.6)
    assert float(outcome.mask_sum) == pytest.approx(float(expected_m.sum()), rel=1e-6)


@needs_native
@pytest.mark.parametrize("k", [3, 7])
def test_statistics_keep_float32_accuracy_over_many_columns(k):
    """The density and mean agreement over 2^20 + 5 columns, agreement values k/3-like
    fractions that float32 cannot hold exactly: within 5e-7 of the float64 sums (a single
    running float32 sum per run of columns drifts several times further)."""
    updates, exact, w = make(k, k, (1 << 20) + 5, torch.float32, "matrix", device="cpu")
    _, stats = gk.masked_mean(updates, w, tau=0.5, backend="torch", return_stats=True)
    assert float(stats.mean_agreement) == pytest.approx(ref.mean_agreement(exact, w),
                                                        rel=5e-7)
    assert float(stats.density) == pytest.approx(ref.density(exact, w, tau=0.5), rel=5e-7)


@needs_native
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_every_float16_bit_pattern_loads_exactly(rows, flush_denormal):
    """All 65536 halves (subnormals, ±0, infinities, NaNs) through the kernel as ``rows``
    equal clients (1: the one-row loop; 4: the four-row loop; the mean of four equal halves
    is exact), τ = 0: g is each value as float32, and the guard sees the non-finite ones; also
    with the CPU in denormals-are-zero mode, which must not flush subnormal halves."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    batch = make_batch(x[None].expand(rows, -1).contiguous(), None)
    g = torch.full((x.numel(),), 123.0)
    torch.set_flush_denormal(flush_denormal)
    try:
        outcome = _native.run(Job(batch, MaskConfig(tau=0.0), g_out=g))
    finally:
        torch.set_flush_denormal(False)
    expected = x.float()
    finite = torch.isfinite(expected)
    assert torch.equal(g[finite], expected[finite])
    assert torch.equal(torch.isnan(g), torch.isnan(expected))
    assert torch.equal(torch.isinf(g) & (g > 0), torch.isinf(expected) & (expected > 0))
    assert not outcome.finite


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_count_per_row_matches_isfinite(dtype):
    """The screen's count per row (from the raw exponent bits) equals torch's, on every bit
    pattern of the 16-bit types and on random float32 bit patterns, over awkward columns."""
    g = torch.Generator().manual_seed(7)
    if dtype == torch.float32:
        bits = torch.randint(-2**31, 2**31 - 1, (3, 100_003), generator=g, dtype=torch.int64)
        rows = bits.to(torch.int32).view(torch.float32)
    else:
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        rows = torch.stack([every[:65531], every[torch.randperm(65536, generator=g)][:65531]])
    rows = torch.cat([rows, torch.randn(1, rows.shape[1]).to(dtype)])  # a finite row too
    _, _, partial = _native._over_columns(_native._library().gma_cpu_nonfinite,
                                          _native._rows(make_batch(rows, None), None),
                                          rows.shape[1], out=_native._counts(rows.shape[0]),
                                          parallel=False)
    want = [float((~torch.isfinite(r.float())).sum()) for r in rows]
    assert partial.sum(0).tolist() == want and want[-1] == 0 and min(want[:-1]) > 0


@needs_native
def test_a_forked_child_aggregates(many_threads):
    """The parent's thread pool does not survive a fork (its threads stay behind): the child
    must make its own instead of waiting forever on the inherited one."""
    updates, _, w = make(4, 5, 300_000, torch.float32, "matrix", device="cpu")
    job = Job(make_batch(updates, w), MaskConfig(tau=0.6), g_out=torch.empty(300_000),
              guard=False)
    g = job.g_out
    _native.run(job)
    # every worker of the parent's pool started and idle: a child that inherited the pool
    # would queue its work for threads that do not exist in it
    barrier = threading.Barrier(3)
    list(_native._pool(3, os.getpid()).map(lambda _: barrier.wait(5), range(3)))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only the native kernel (torch's OpenMP pool is not fork-safe)
        code = 1
        try:
            g.numpy()[:] = np.nan  # poisoned (NumPy, not a torch op)
            _native.run(job)
            os.write(write_end, repr(float(g.numpy().astype(np.float64).sum())).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the native kernel's thread pool")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    with os.fdopen(read_end) as pipe:
        assert float(pipe.read()) == pytest.approx(float(g.double().sum()), rel=1e-9)


@needs_native
@pytest.mark.parametrize("where", ["first column", "mid-tile of thread 2", "third tile of thread 2",
                                   "last column"])
@pytest.mark.parametrize("poison", ["nan update", "overflowing step"])
def test_fused_sgd_step_is_undone_when_a_late_tile_fails(where, poison, many_threads):
    """gma_step's SGD step is made tile by tile in the C pass; a tile whose new values are not
    finite (bad update, or w + lr·g overflowing) stops it, and every tile already stepped on
    any thread is put back: params end bit for bit as they were."""
    k, n = 5, 3 * 20011  # three threads, each over three tiles of the C loop
    j = {"first column": 0, "mid-tile of thread 2": n // 3 + 700,
         "third tile of thread 2": n // 3 + 2 * 8192 + 5, "last column": n - 1}[where]
    gen = torch.Generator().manual_seed(j + len(poison))
    updates = torch.randn(k, n, generator=gen)
    params = torch.randn(n, generator=gen)
    if poison == "nan update":
        updates[2, j] = float("nan")
    else:
        updates[:, j] = 3e38  # all agree: g_j = 3e38, and w_j + 2·g_j overflows
    before = params.clone()
    with pytest.raises(gk.NonFiniteError):
        gk.gma_step(params, updates, lr=2.0, backend="torch")
    assert torch.equal(params, before)
    if poison == "nan update":  # dropping the client steps with the others, on every tile
        gk.gma_step(params, updates, lr=2.0, backend="torch", nonfinite="drop")
        keep = [0, 1, 3, 4]
        expected = ref.masked_mean(updates[keep].double(), None, tau=0.4, mask="soft")
        assert_close(params - before, 2.0 * expected, scale=2.0)


@needs_native
@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi", "adagrad"])
@pytest.mark.parametrize("where", ["mid-tile of thread 2", "last column"])
@pytest.mark.parametrize("source", ["batch", "accumulator"])
def test_fused_step_with_state_is_undone_when_a_tile_fails(kind, where, source, many_threads):
    """The C step writes each tile in place after saving it, from the updates or straight from
    an accumulator's sums; a tile with a non-finite new value is put back from its save, and
    the tiles stepped before it on every thread from the backups: params and both states end
    bit for bit as they were."""
    k, n = 5, 3 * 20011
    j = {"mid-tile of thread 2": n // 3 + 700, "last column": n - 1}[where]
    gen = torch.Generator().manual_seed(len(kind) + j)
    params = torch.randn(n, generator=gen)
    opt = gk.ServerOptimizer(params, kind, lr=0.3, tau=0.3, backend="torch")

    def step(updates):
        if source == "batch":
            return opt.step(updates)
        return opt.step_accumulated(gk.Accumulator(n, backend="torch").add(updates))

    step(torch.randn(k, n, generator=gen))  # non-zero state
    updates = torch.randn(k, n, generator=gen)
    # finite sums (5 · 6e37 < 3.4e38); g² overflows at once, the velocity v·β + g within steps
    updates[:, j] = 1e20 if kind != "momentum" else 6e37
    for _ in range(30):
        before = [params.clone(), *(s.clone() for s in opt.states)]
        try:
            step(updates)
        except gk.NonFiniteError as err:
            assert "left unchanged" in str(err)
            break
    else:
        pytest.fail("the step never overflowed")
    for after, saved in zip([params, *opt.states], before):
        assert torch.equal(after, saved)


@needs_native
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_step_from_an_overflowed_sum_leaves_everything(kind, many_threads):
    """Sums that overflowed float32 in the accumulator (two updates of 3e38 in one column, on
    thread 2) refuse the step from them, params and state unchanged."""
    n = 3 * 20011
    gen = torch.Generator().manual_seed(3)
    params = torch.randn(n, generator=gen)
    opt = gk.ServerOptimizer(params, kind, lr=0.3, tau=0.3, backend="torch")
    opt.step(torch.randn(3, n, generator=gen))
    before = [params.clone(), *(s.clone() for s in opt.states)]
    updates = torch.randn(2, n, generator=gen)
    updates[:, n // 3 + 9] = 3e38
    acc = gk.Accumulator(n, backend="torch").add(updates)
    with pytest.raises(gk.NonFiniteError, match="sum overflowed"):
        opt.step_accumulated(acc)
    for after, saved in zip([params, *opt.states], before):
        assert torch.equal(after, saved)


@needs_native
@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "yogi", "adagrad"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_native_step_equals_torch_ops_bit_for_bit(kind, placement, many_threads, monkeypatch):
    """The C step is formula.step_values in float32, operation for operation: steps of sgd and
    momentum leave params and state bit-identical to the PyTorch-ops path's; the adaptive kinds
    agree to float32 rounding (PyTorch's vectorized CPU sqrt is not always correctly rounded,
    C's sqrtf is)."""
    k, n = 7, 3 * 9001 + 5
    gen = torch.Generator().manual_seed(len(kind) * 7 + len(placement))
    rounds = [torch.randn(k, n, generator=gen) * 0.01 for _ in range(3)]
    start = torch.randn(n, generator=gen)
    results = {}
    for path in ("native", "chunks"):
        monkeypatch.setattr(_native, "ENABLED", path == "native")
        params = start.clone()
        opt = gk.ServerOptimizer(params, kind, lr=0.3, tau=0.4, mask_placement=placement,
                                 backend="torch")
        for updates in rounds:
            opt.step(updates)
        acc = gk.Accumulator(n, backend="torch").add(rounds[0])
        opt.step_accumulated(acc)
        results[path] = (params, *opt.states)
    for native, chunks in zip(*results.values()):
        if kind in ("sgd", "momentum"):
            assert torch.equal(native, chunks)
        else:
            torch.testing.assert_close(native, chunks, rtol=1e-5, atol=1e-7)


@needs_native
def test_rows_more_than_2_to_the_31_elements_apart():
    """64-bit addressing: the rows of a [K, N] view lie 2^31 + 64 bf16 elements apart in one
    storage (4 GiB of address space, of which only the rows are ever touched), and the
    aggregate equals the reference of the same rows made contiguous."""
    k, n, stride = 3, 5003, (1 << 31) + 64
    storage = torch.empty((k - 1) * stride + n, dtype=torch.bfloat16)
    updates = storage.as_strided((k, n), (stride, 1))
    gen = torch.Generator().manual_seed(31)
    updates.copy_(torch.randn(k, n, generator=gen) * 0.01)
    exact = updates.double()
    params = torch.zeros(n)
    gk.gma_step(params, updates, [1.0, 2.0, 3.0], lr=1.0, backend="torch")
    expected = ref.masked_mean(exact, [1.0, 2.0, 3.0], tau=0.4, mask="soft")
    assert_close(params, expected, scale=data_scale(exact))


class _FailingLibrary:
    """The native library, except that the chunk starting at column ``lo`` reports no scratch
    space (without writing anything, as the C code does) ``times`` times."""

    def __init__(self, real, lo: int, times: int) -> None:
        self.real, self.lo, self.left = real, lo, times

    def __getattr__(self, name):
        real = getattr(self.real, name)

        def call(*args):
            if args[1] == self.lo and self.left > 0:  # (args, lo, hi, sums)
                self.left -= 1
                return _native.OUT_OF_MEMORY
            return real(*args)
        return call


@needs_native
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("times", [1, 2])
def test_chunk_out_of_memory_is_retried_or_leaves_params_unchanged(kind, times, many_threads,
                                                                   monkeypatch):
    """A chunk that cannot get its scratch space is taken again by the calling thread: once,
    and the step is the same as without the failure; twice, and the call raises with params
    and state as they were, though the other chunks had stepped."""
    n = 50_000
    updates, _, w = make(n, 6, n, torch.float32, "matrix", device="cpu")
    params = torch.randn(n)
    clean = gk.ServerOptimizer(params.clone(), kind, lr=0.1, backend="torch")
    clean.step(updates, w)
    lo = _native._chunks(n, True)[0][3]  # a chunk in the middle, not the calling thread's first
    failing = _FailingLibrary(_native._library(), lo, times)
    monkeypatch.setattr(_native, "_library", lambda: failing)
    opt = gk.ServerOptimizer(params.clone(), kind, lr=0.1, backend="torch")
    before = opt.params.clone()
    if times == 1:
        opt.step(updates, w)
        assert torch.equal(opt.params, clean.params)
        return
    with pytest.raises(RuntimeError, match="out of memory.*left unchanged"):
        opt.step(updates, w)
    assert torch.equal(opt.params, before)
    assert all(not s.any() for s in opt.states)


@needs_native
@pytest.mark.parametrize("n", [1, 8191, 70001])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("hard", [False, True])
def test_native_streaming_result_equals_the_formula(n, weighted, hard, many_threads):
    """The accumulator's result in C (``native.finish``) against ``formula.streaming_result``
    on fresh sums of awkward sizes: the same mean and mask (bit for bit unweighted; the
    weighted score within float32 rounding of τ may fall either side), statistics to float32
    rounding, the sums left as they were, and a non-finite mean reported."""
    gen = torch.Generator().manual_seed(n + 2 * weighted + hard)
    k, weight_sum = 7, 3.7
    total = torch.randn(n, generator=gen)
    count = torch.randint(-k, k + 1, (n,), generator=gen).float()
    if weighted:
        count = count * 0.53
    threshold, scale = (3.0, 1 / k) if not weighted else (0.4, 1.0)
    mask = MaskParams(threshold, scale, hard, weighted)
    before = total.clone(), count.clone()
    mean, m, sums, finite = _native.finish(StreamSums(total, count, weight_sum), mask=mask)
    e_mean, e_m, e_sums, e_finite = streaming_result(StreamSums(total, count, weight_sum),
                                                     mask=mask)
    assert torch.equal(total, before[0]) and torch.equal(count, before[1])
    assert torch.equal(mean, e_mean) and finite and e_finite
    near = ((count.abs() / (weight_sum if weighted else 1.0)) - threshold).abs() < 1e-5
    assert torch.equal(m[~near], e_m[~near])
    assert 0 < int((m == 1).sum()) < n or n == 1  # both sides of the threshold are tested
    torch.testing.assert_close(sums, e_sums, rtol=1e-5, atol=1e-3)
    total[n // 2] = float("inf")
    assert not _native.finish(StreamSums(total, count, weight_sum), mask=mask)[3]


@needs_native
def test_a_library_built_from_another_layout_is_not_called(monkeypatch):
    """A library whose argument structures differ in size from the ctypes mirrors (one built
    from another version of gma_cpu.c) is refused with a warning: the PyTorch path runs."""
    monkeypatch.setattr(_native, "_LAYOUT", (_native._Mask,) * len(_native._LAYOUT))
    _native._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="another version of csrc/gma_cpu.c"):
            assert _native._library() is None and not _native.available()
    finally:
        monkeypatch.undo()
        _native._library.cache_clear()
    assert _native.available()


def test_mask_params_are_passed_as_the_c_mask():
    """A ``MaskParams`` fills a ``_Mask`` field by position: the two name the same fields in
    the same order."""
    assert [name for name, _ in _native._Mask._fields_] == list(MaskParams._fields)

