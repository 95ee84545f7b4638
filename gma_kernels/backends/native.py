"""The native CPU backend: ``csrc/gma_cpu.c`` (built at install when a C compiler is at hand)
computes the whole pass of the torch backend in C: sums, sign count, threshold, mask and, in
the same pass, the server step of every optimizer kind (``formula.step_values`` in float32,
operation for operation: bit-identical for sgd and momentum, within float32 rounding for the
adaptive kinds, whose square root PyTorch rounds differently), tile by tile over column ranges.

Threads: the columns are cut into chunks, and the calling thread works through them with the
pool's threads, taking the next chunk as it finishes one; it never waits for a pool thread
that has not started (a busy machine may not run it for milliseconds), only for chunks already
taken. Calls of fewer than ``2 · MIN_COLUMNS_PER_THREAD`` columns run on the calling thread
alone, as does the non-finite screen of the accumulator (``nonfinite_rows``).

Guard: each tile's old values (params and state) go to a scratch backup (up to 3N floats, kept
between calls of one size, written past the caches), then the tile is stepped in place; a tile
with a non-finite new value is put back from it and stops its chunk, and the tiles stepped
before it are put back too, so params and state end as they were.

``usable()`` is False when the library was not built or could not be loaded, or with
``ENABLED`` False (the environment variable ``GMA_KERNELS_NATIVE=0`` at import): the dispatcher
then runs the torch backend's pure-PyTorch chunks on CPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..batch import ClientBatch
from ..config import StepConfig
from ..formula import mask_threshold
from ..job import Job, Outcome

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KIND_CODES = {"sgd": 1, "momentum": 2, "adam": 3, "yogi": 4, "adagrad": 5}
ENABLED = os.environ.get("GMA_KERNELS_NATIVE", "1") != "0"
MIN_COLUMNS_PER_THREAD = 1 << 16   # below twice this one thread: the split costs more than it saves
CHUNKS_PER_THREAD = 4              # chunks per thread, so a late thread's share is taken by others
OUT_OF_MEMORY = -2                 # a C call's code when malloc failed (before it wrote anything)
_ALIGN = 8192                      # chunks start on a tile of the C loop


class _Step(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int)] + [(name, ctypes.c_float) for name in (
        "lr", "momentum", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps")]


class _StepArrays(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("w", "s1", "s2", "bw", "bs1", "bs2")]


@functools.cache
def _library() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_gma_cpu{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            p, i64, c_int, c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            head = [p, c_int, i64, i64, i64, p, p]   # rows, dtype, K, lo, hi, w, a
            step = [ctypes.POINTER(_Step), ctypes.POINTER(_StepArrays), c_int, p]
            lib.gma_cpu_aggregate.argtypes = head + [c_float, c_float, c_int, p, p, p, c_int] + step
            lib.gma_cpu_step.argtypes = head + [p, p] + step
            lib.gma_cpu_fold.argtypes = head + [p, p]
            lib.gma_cpu_nonfinite.argtypes = head + [p]
            lib.gma_cpu_finish.argtypes = head + [p, p, c_float, c_int, c_float, c_float, c_int,
                                                  p, p, c_int] + step
            for fn in ("gma_cpu_aggregate", "gma_cpu_step", "gma_cpu_fold", "gma_cpu_nonfinite",
                       "gma_cpu_finish"):
                getattr(lib, fn).restype = c_int
            return lib
    return None


def available() -> bool:
    return _library() is not None


def usable() -> bool:
    """Built, loaded and not switched off (it reads float32, bfloat16 and float16 rows)."""
    return ENABLED and available()


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """A pool per process: a forked child inherits its parent's pool without its threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix=f"gma-cpu-{pid}")


def _row_pointers(batch: ClientBatch) -> np.ndarray:
    if batch.matrix is not None:
        stride = batch.matrix.stride(0) * batch.dtype.itemsize
        return batch.matrix.data_ptr() + stride * np.arange(batch.num_clients, dtype=np.uint64)
    return np.array([row.data_ptr() for row in batch.rows], dtype=np.uint64)


def _chunks(n: int, parallel: bool) -> tuple[list[int], int]:
    """(chunk bounds over ``n`` columns, threads to work on them): one chunk and one thread
    unless ``parallel`` and ``n`` is large."""
    threads = min(torch.get_num_threads(), n // MIN_COLUMNS_PER_THREAD) if parallel else 1
    if threads <= 1:
        return [0, n], 1
    count = threads * CHUNKS_PER_THREAD
    bounds = sorted({min(n, (n * i // count) // _ALIGN * _ALIGN) for i in range(count)})
    return bounds + [n], threads


def _over_columns(fn, batch: ClientBatch | None, numel: int, weights: tuple[float, ...],
                  agree_weights: tuple[float, ...] | None, *rest, sums: int = 0,
                  parallel: bool = True) -> tuple[list[int], list[int], np.ndarray]:
    """Call ``fn(rows, dtype, K, lo, hi, w, a, *rest, chunk_sums)`` on every chunk of the
    ``numel`` columns: the calling thread and the pool's threads each take the next chunk
    until none is left (see the module docstring). Each chunk gets a zeroed float64 array of
    ``sums`` sums to add into. Returns (the chunk bounds, each chunk's return code,
    ``[chunks, sums]``); a negative code raises."""
    bounds, threads = _chunks(numel, parallel)
    chunks = len(bounds) - 1
    if batch is not None:
        pointers = _row_pointers(batch)
        head = (pointers.ctypes.data, DTYPE_CODES[batch.dtype], batch.num_clients)
    else:
        head = (None, 0, 0)
    w = np.array(weights, dtype=np.float32)
    a = None if agree_weights is None else np.array(agree_weights, dtype=np.float32)
    tail = (w.ctypes.data if len(w) else None, None if a is None else a.ctypes.data)
    partial = np.zeros((chunks, max(sums, 1)), dtype=np.float64)
    codes = [0] * chunks
    if chunks == 1:
        codes[0] = fn(*head, 0, numel, *tail, *rest, partial[0].ctypes.data)
    else:
        taken = iter(range(chunks))
        lock = threading.Lock()
        done = threading.Semaphore(0)

        def drain() -> None:
            while True:
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                try:
                    codes[i] = fn(*head, bounds[i], bounds[i + 1], *tail, *rest,
                                  partial[i].ctypes.data)
                finally:
                    done.release()

        pool = _pool(torch.get_num_threads() - 1, os.getpid())
        for _ in range(threads - 1):  # the calling thread is the last one
            pool.submit(drain)
        drain()
        for _ in range(chunks):
            done.acquire()
    for i in [i for i, c in enumerate(codes) if c == OUT_OF_MEMORY]:
        partial[i] = 0  # that chunk wrote nothing: the calling thread takes it again
        codes[i] = fn(*head, bounds[i], bounds[i + 1], *tail, *rest, partial[i].ctypes.data)
    if any(c < 0 for c in codes):
        raise KernelFailure(codes, bounds, partial)
    return bounds, codes, partial


class KernelFailure(RuntimeError):
    """A chunk of a native call failed (its code: ``OUT_OF_MEMORY`` when no scratch space could
    be had, even on the calling thread); the other chunks may have finished. Carries what the
    callers need to undo a step: the chunk bounds and each chunk's sums. (A streaming fold
    cannot be undone exactly: an accumulator it fails in holds the finished chunks' sums.)"""

    def __init__(self, codes: list[int], bounds: list[int], partial: np.ndarray) -> None:
        out_of_memory = OUT_OF_MEMORY in codes
        super().__init__("native CPU kernel could not allocate its scratch space (out of memory)"
                         if out_of_memory else f"native CPU kernel failed (codes {codes})")
        self.bounds, self.partial = bounds, partial


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run(job: Job) -> Outcome:
    """The whole pass in C: aggregate and, with ``job.step``, step params and state."""
    batch, step = job.batch, job.step
    threshold, scale = mask_threshold(job.mask, batch.num_clients)
    agree_w = batch.mean_weights if job.mask.weighted_agreement else None
    g = job.g_out  # None: g lives in the C loop's tile buffer only
    split = step is not None and step.masks_step
    args, arrays, targets, backups = _step_args(step, job.params, job.states, job.guard)
    with _undone_on_failure(3, targets, backups):
        bounds, codes, partial = _over_columns(
            _library().gma_cpu_aggregate, batch, batch.numel, batch.mean_weights, agree_w,
            float(threshold), float(scale), int(job.mask.mask == "hard"), _address(g),
            _address(job.a_out), None, int(split), args, arrays, int(job.guard), sums=4)
    sums, bad = _statistics(partial)
    if not job.guard or (bad == 0 and not any(codes)):
        return Outcome(True, sums)
    _put_back(bounds, partial[:, 3], targets, backups)
    return Outcome(False, sums)


def _statistics(partial: np.ndarray) -> tuple[Tensor, float]:
    """(``[[Σ m, Σ A]]`` as float32, the number of non-finite aggregates) from the chunks'
    sums of an aggregating call (``[chunks, 4]``)."""
    totals = partial[0] if len(partial) == 1 else partial.sum(0)
    return torch.from_numpy(totals[None, :2].astype(np.float32)), float(totals[2])


def step(config: StepConfig, params: Tensor, states: tuple[Tensor, ...], x: Tensor,
         mask: Tensor | None = None, *, guard: bool = False) -> bool:
    """A server step on a known ``g = x`` (``mask`` multiplies the direction) in C; returns
    whether it stepped (with ``guard``, nothing is written unless every new value is finite)."""
    args, arrays, targets, backups = _step_args(config, params, states, guard)
    with _undone_on_failure(0, targets, backups):
        bounds, codes, partial = _over_columns(
            _library().gma_cpu_step, None, params.numel(), (), None, x.data_ptr(),
            _address(mask), args, arrays, int(guard), sums=1)
    if not any(codes):
        return True
    _put_back(bounds, partial[:, 0], targets, backups)
    return False


def _step_args(config: StepConfig | None, params: Tensor | None, states: tuple[Tensor, ...],
               guard: bool) -> tuple:
    """(the C step settings or None, its arrays, the stepped tensors, their backups)."""
    if config is None:
        return None, None, (), ()
    targets = (params, *states)
    backups = _scratch(params.numel(), len(targets)) if guard else ()
    pointers = [t.data_ptr() for t in targets] + [None] * (3 - len(targets))
    pointers += [b.data_ptr() for b in backups] + [None] * (3 - len(backups))
    args = _Step(KIND_CODES[config.kind], config.lr, config.momentum, config.beta1,
                 1.0 - config.beta1, config.beta2, 1.0 - config.beta2, config.eps)
    return ctypes.byref(args), ctypes.byref(_StepArrays(*pointers)), targets, backups


@contextlib.contextmanager
def _undone_on_failure(stepped_sum: int, targets: tuple[Tensor, ...],
                       backups: tuple[Tensor, ...]) -> Iterator[None]:
    """When a chunk fails (``KernelFailure``), put back what the other chunks stepped (column
    counts in sum ``stepped_sum`` of each chunk) and say so; unguarded calls have no backups."""
    try:
        yield
    except KernelFailure as failure:
        if not targets:
            raise
        if backups:
            _put_back(failure.bounds, failure.partial[:, stepped_sum], targets, backups)
        left = "params and optimizer state left unchanged" if backups else \
            "params and optimizer state may be partly stepped (unguarded call)"
        failure.args = (f"{failure}; {left}",)
        raise


def _put_back(bounds: list[int], stepped: np.ndarray, targets: tuple[Tensor, ...],
              backups: tuple[Tensor, ...]) -> None:
    """Restore the columns each chunk stepped before the guard stopped it."""
    for lo, count in zip(bounds, stepped.astype(np.int64).tolist()):
        for target, backup in zip(targets, backups):
            target[lo:lo + count].copy_(backup[lo:lo + count])


_scratch_buffers: dict[tuple[int, int], tuple[Tensor, ...]] = {}


def _scratch(numel: int, count: int) -> tuple[Tensor, ...]:
    """``count`` float32 backups of ``numel`` elements, kept for the next call of the same
    shape (only the latest is kept): new ones would cost a page fault per 4 KiB every call."""
    key = (numel, count)
    bufs = _scratch_buffers.get(key)
    if bufs is None:
        _scratch_buffers.clear()
        bufs = _scratch_buffers[key] = tuple(torch.empty(numel, dtype=torch.float32)
                                             for _ in range(count))
    return bufs


def aggregate(batch: ClientBatch, agree_weights: tuple[float, ...] | None, threshold: float,
              scale: float, hard: bool, g: Tensor, a_out: Tensor | None,
              m_out: Tensor | None) -> np.ndarray:
    """Fill ``g`` (and ``a_out``, ``m_out``) for every column; return ``[Σ m, Σ A, #non-finite
    S_j]`` (float64). ``agree_weights`` None: the unweighted, exact sign count."""
    _, _, partial = _over_columns(
        _library().gma_cpu_aggregate, batch, batch.numel, batch.mean_weights, agree_weights,
        float(threshold), float(scale), int(hard), g.data_ptr(), _address(a_out),
        _address(m_out), int(m_out is not None), None, None, 0, sums=4)
    return partial.sum(0)[:3]


def nonfinite_rows(batch: ClientBatch) -> list[int]:
    """The clients whose update holds a NaN or an infinity, read on the calling thread."""
    _, _, partial = _over_columns(_library().gma_cpu_nonfinite, batch, batch.numel, (), None,
                                  sums=batch.num_clients, parallel=False)
    return np.flatnonzero(partial.sum(0)).tolist()


def fold(batch: ClientBatch, total: Tensor, count: Tensor, weighted: bool) -> None:
    """Streaming fold in place: ``total += Σ p_k x_k``, ``count += Σ a_k sign(x_k)`` (raw
    weights ``p_k``; ``a_k = p_k`` when ``weighted``, else 1)."""
    _over_columns(_library().gma_cpu_fold, batch, batch.numel, batch.weights,
                  batch.weights if weighted else None, total.data_ptr(), count.data_ptr())


def finish(total: Tensor, count: Tensor, weight_sum: float, threshold: float, scale: float,
           hard: bool, weighted: bool) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``formula.streaming_result`` in one pass in C: (mean ``S/Σp``, mask ``m``,
    ``[[Σ m, Σ A]]``, whether the mean is finite); ``total`` and ``count`` are only read."""
    mean, m = torch.empty_like(total), torch.empty_like(total)
    _, _, partial = _over_columns(
        _library().gma_cpu_finish, None, total.numel(), (), None, total.data_ptr(),
        count.data_ptr(), float(weight_sum), int(weighted), float(threshold), float(scale),
        int(hard), mean.data_ptr(), m.data_ptr(), 1, None, None, 0, sums=4)
    sums, bad = _statistics(partial)
    return mean, m, sums, bad == 0


def step_from_sums(config: StepConfig, params: Tensor, states: tuple[Tensor, ...],
                   total: Tensor, count: Tensor, weight_sum: float, threshold: float,
                   scale: float, hard: bool, weighted: bool) -> tuple[Tensor, bool, bool]:
    """The guarded server step straight from the streaming sums, ``finish`` and the step in
    one pass (no buffer of N values besides the guard's backups): (``[[Σ m, Σ A]]``, whether
    the mean is finite, whether it stepped). Unless both, params and state are as they were."""
    args, arrays, targets, backups = _step_args(config, params, states, True)
    with _undone_on_failure(3, targets, backups):
        bounds, codes, partial = _over_columns(
            _library().gma_cpu_finish, None, total.numel(), (), None, total.data_ptr(),
            count.data_ptr(), float(weight_sum), int(weighted), float(threshold),
            float(scale), int(hard), None, None, int(config.masks_step), args, arrays, 1,
            sums=4)
    sums, bad = _statistics(partial)
    if bad == 0 and not any(codes):
        return sums, True, True
    _put_back(bounds, partial[:, 3], targets, backups)
    return sums, bad == 0, False
