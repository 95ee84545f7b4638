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

Each C entry point takes one argument structure (``_AggregateArgs``, ``_StepArgs``,
``_FinishArgs``, ``_FoldArgs``, ``_Rows``: ctypes mirrors of the C structs, checked against the
library's own sizes when it is loaded), its chunk's column range and a ``_Sums`` record per
chunk, read by field name.

``usable()`` is False when the library was not built, could not be loaded or was built from
another version of ``csrc/gma_cpu.c``, or with ``ENABLED`` False (the environment variable
``GMA_KERNELS_NATIVE=0`` at import): the dispatcher then runs the torch backend's pure-PyTorch
chunks on CPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..batch import ClientBatch
from ..config import StepConfig
from ..formula import MaskParams, StreamSums
from ..job import Job, Outcome

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KIND_CODES = {"sgd": 1, "momentum": 2, "adam": 3, "yogi": 4, "adagrad": 5}
ENABLED = os.environ.get("GMA_KERNELS_NATIVE", "1") != "0"
MIN_COLUMNS_PER_THREAD = 1 << 16   # below twice this one thread: the split costs more than it saves
CHUNKS_PER_THREAD = 4              # chunks per thread, so a late thread's share is taken by others
OUT_OF_MEMORY = -2                 # a C call's code when malloc failed (before it wrote anything)
_ALIGN = 8192                      # chunks start on a tile of the C loop

_p, _f32, _i32 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int32


class _Rows(ctypes.Structure):
    """The clients' rows: pointers to element 0 or, with ``rows`` None, a matrix's first row
    ``base`` and its row stride in bytes; their dtype code, the weights ``w_k`` and the
    agreement weights ``a_k`` (None: the exact unweighted count)."""
    _fields_ = [("rows", _p), ("base", _p), ("row_stride", ctypes.c_int64),
                ("num_clients", ctypes.c_int64), ("dtype", _i32), ("weights", _p),
                ("agree_weights", _p)]


class _Mask(ctypes.Structure):
    """``MaskParams`` as C reads it (the same fields in the same order: a ``MaskParams`` is
    passed where a ``_Mask`` is expected)."""
    _fields_ = [("threshold", _f32), ("scale", _f32), ("hard", _i32), ("weighted", _i32)]


class _Step(ctypes.Structure):
    """The server step (kind 0: none) and the arrays it writes: params, states, backups."""
    _fields_ = ([("kind", _i32), ("masks_step", _i32), ("guard", _i32)]
                + [(name, _f32) for name in ("lr", "momentum", "beta1", "one_minus_beta1",
                                             "beta2", "one_minus_beta2", "eps")]
                + [(name, _p) for name in ("w", "s1", "s2", "bw", "bs1", "bs2")])


class _Sums(ctypes.Structure):
    """What a chunk adds up: ``Σ m``, ``Σ A``, the non-finite ``S_j`` and the columns stepped."""
    _fields_ = [(name, ctypes.c_double) for name in ("mask_sum", "agreement_sum", "nonfinite",
                                                      "stepped")]


class _AggregateArgs(ctypes.Structure):
    _fields_ = [("rows", _Rows), ("mask", _Mask), ("g", _p), ("a_out", _p), ("step", _Step)]


class _StepArgs(ctypes.Structure):
    _fields_ = [("x", _p), ("mask", _p), ("step", _Step)]


class _FinishArgs(ctypes.Structure):
    _fields_ = [("total", _p), ("count", _p), ("weight_sum", _f32), ("mask", _Mask),
                ("mean", _p), ("m_out", _p), ("step", _Step)]


class _FoldArgs(ctypes.Structure):
    _fields_ = [("rows", _Rows), ("total", _p), ("count", _p)]


#: the C structs' mirrors, in the order of the library's ``gma_cpu_layout`` sizes
_LAYOUT = (_Rows, _Mask, _Step, _Sums, _AggregateArgs, _StepArgs, _FinishArgs, _FoldArgs)
SUMS = np.dtype(_Sums)
_CHUNK = [ctypes.c_int64, ctypes.c_int64]  # the column range [lo, hi) every entry point takes
_ENTRY_POINTS = {"gma_cpu_aggregate": [ctypes.POINTER(_AggregateArgs), *_CHUNK, _p],
                 "gma_cpu_step": [ctypes.POINTER(_StepArgs), *_CHUNK, _p],
                 "gma_cpu_finish": [ctypes.POINTER(_FinishArgs), *_CHUNK, _p],
                 "gma_cpu_fold": [ctypes.POINTER(_FoldArgs), *_CHUNK],
                 "gma_cpu_nonfinite": [ctypes.POINTER(_Rows), *_CHUNK, _p]}


@functools.cache
def _library() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_gma_cpu{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
                sizes = list((ctypes.c_int64 * len(_LAYOUT)).in_dll(lib, "gma_cpu_layout"))
            except (OSError, ValueError):
                return None
            if sizes != [ctypes.sizeof(mirror) for mirror in _LAYOUT]:
                warnings.warn(f"{path.name} was built from another version of csrc/gma_cpu.c; "
                              "rebuild it (pip install -e .): using the PyTorch CPU path")
                return None
            for name, argtypes in _ENTRY_POINTS.items():
                getattr(lib, name).argtypes = argtypes
                getattr(lib, name).restype = ctypes.c_int
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


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _array_address(array: np.ndarray) -> int:
    """Where a (non-empty) array's data starts: ``array.ctypes.data``, for half its cost."""
    return ctypes.addressof(ctypes.c_char.from_buffer(array))


@functools.lru_cache(maxsize=8)
def _floats(values: tuple[float, ...] | None) -> tuple[np.ndarray | None, int | None]:
    """(``values`` as float32, where they start), kept for the next call with the same
    weights (the array is read-only)."""
    if not values:
        return None, None
    array = np.array(values, dtype=np.float32)
    address = _array_address(array)
    array.flags.writeable = False
    return array, address


def _rows(batch: ClientBatch, weights: tuple[float, ...] | None,
          agree_weights: tuple[float, ...] | None = None) -> _Rows:
    """The batch's rows with ``weights`` and ``agree_weights``. The arrays it points at live
    as long as it does (``keep``); a structure that holds a copy of it must hold its ``keep``
    too."""
    (w, w_address), (a, a_address) = _floats(weights), _floats(agree_weights)
    rows = _Rows(None, None, 0, batch.num_clients, DTYPE_CODES[batch.dtype], w_address,
                 a_address)
    if batch.matrix is not None:
        rows.base = batch.matrix.data_ptr()
        rows.row_stride = batch.matrix.stride(0) * batch.dtype.itemsize
        pointers = None
    else:
        pointers = np.array([row.data_ptr() for row in batch.rows], dtype=np.uint64)
        rows.rows = _array_address(pointers)
    rows.keep = (pointers, w, a)
    return rows


def _chunks(n: int, parallel: bool) -> tuple[list[int], int]:
    """(chunk bounds over ``n`` columns, threads to work on them): one chunk and one thread
    unless ``parallel`` and ``n`` is large."""
    threads = min(torch.get_num_threads(), n // MIN_COLUMNS_PER_THREAD) if parallel else 1
    if threads <= 1:
        return [0, n], 1
    count = threads * CHUNKS_PER_THREAD
    bounds = sorted({min(n, (n * i // count) // _ALIGN * _ALIGN) for i in range(count)})
    return bounds + [n], threads


def _over_columns(fn: Callable[..., int], args: ctypes.Structure, numel: int, *,
                  out: np.dtype | None = SUMS, parallel: bool = True
                  ) -> tuple[list[int], list[int], np.ndarray]:
    """Call ``fn(&args, lo, hi, &partial[i])`` on every chunk ``i`` of the ``numel`` columns:
    the calling thread and the pool's threads each take the next chunk until none is left (see
    the module docstring). Each chunk adds into a zeroed record of dtype ``out`` (None: the
    entry point takes none). Returns (the chunk bounds, each chunk's return code, the records);
    a negative code raises."""
    bounds, threads = _chunks(numel, parallel)
    chunks = len(bounds) - 1
    pointer = ctypes.byref(args)
    partial = np.zeros(chunks, dtype=out if out is not None else SUMS)
    start, size = _array_address(partial), partial.strides[0]

    def call(i: int) -> int:
        record = () if out is None else (start + i * size,)
        return fn(pointer, bounds[i], bounds[i + 1], *record)

    if chunks == 1:
        codes = [call(0)]
    else:
        codes = [0] * chunks
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
                    codes[i] = call(i)
                finally:
                    done.release()

        pool = _pool(torch.get_num_threads() - 1, os.getpid())
        for _ in range(threads - 1):  # the calling thread is the last one
            pool.submit(drain)
        drain()
        for _ in range(chunks):
            done.acquire()
    if min(codes) < 0:
        for i in [i for i, c in enumerate(codes) if c == OUT_OF_MEMORY]:
            partial[i] = 0  # that chunk wrote nothing: the calling thread takes it again
            codes[i] = call(i)
        if min(codes) < 0:
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


def run(job: Job) -> Outcome:
    """The whole pass in C: aggregate and, with ``job.step``, step params and state."""
    batch = job.batch
    agree_w = batch.mean_weights if job.mask.weighted_agreement else None
    step, targets, backups = _step(job.step, job.params, job.states, job.guard)
    rows = _rows(batch, batch.mean_weights, agree_w)
    args = _AggregateArgs(rows, job.mask_params, _address(job.g_out), _address(job.a_out),
                          step)
    args.keep = rows.keep
    with _undone_on_failure(targets, backups):
        bounds, codes, partial = _over_columns(_library().gma_cpu_aggregate, args, batch.numel)
    sums, bad = _statistics(partial)
    if not job.guard or (bad == 0 and not any(codes)):
        return Outcome(True, sums)
    _put_back(bounds, partial, targets, backups)
    return Outcome(False, sums)


def _statistics(partial: np.ndarray) -> tuple[Tensor, float]:
    """(``[[Σ m, Σ A]]`` as float32, the number of non-finite aggregates) from the chunks'
    records, added in chunk order."""
    totals = partial[0] if len(partial) == 1 else \
        partial.view((np.float64, len(SUMS.names))).sum(0).view(SUMS)[0]
    mask_sum, agreement_sum, nonfinite, _ = totals.item()  # _Sums's fields, in order
    return torch.from_numpy(np.array([[mask_sum, agreement_sum]], dtype=np.float32)), nonfinite


def step(*, config: StepConfig, params: Tensor, states: tuple[Tensor, ...], x: Tensor,
         mask: Tensor | None = None, guard: bool = False) -> bool:
    """A server step on a known ``g = x`` (``mask`` multiplies the direction) in C; returns
    whether it stepped (with ``guard``, nothing is written unless every new value is finite)."""
    stepping, targets, backups = _step(config, params, states, guard)
    args = _StepArgs(x.data_ptr(), _address(mask), stepping)
    with _undone_on_failure(targets, backups):
        bounds, codes, partial = _over_columns(_library().gma_cpu_step, args, params.numel())
    if not any(codes):
        return True
    _put_back(bounds, partial, targets, backups)
    return False


def _step(config: StepConfig | None, params: Tensor | None, states: tuple[Tensor, ...],
          guard: bool) -> tuple[_Step, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(the C step, kind 0 without ``config``; the stepped tensors; their backups)."""
    if config is None:
        return _Step(), (), ()
    targets = (params, *states)
    backups = _scratch(params.numel(), len(targets)) if guard else ()
    arrays = [t.data_ptr() for t in targets] + [None] * (3 - len(targets))
    arrays += [b.data_ptr() for b in backups] + [None] * (3 - len(backups))
    return _Step(KIND_CODES[config.kind], config.masks_step, guard, config.lr, config.momentum,
                 config.beta1, 1.0 - config.beta1, config.beta2, 1.0 - config.beta2,
                 config.eps, *arrays), targets, backups


@contextlib.contextmanager
def _undone_on_failure(targets: tuple[Tensor, ...], backups: tuple[Tensor, ...]
                       ) -> Iterator[None]:
    """When a chunk fails (``KernelFailure``), put back what the other chunks stepped and say
    so; unguarded calls have no backups."""
    try:
        yield
    except KernelFailure as failure:
        if not targets:
            raise
        if backups:
            _put_back(failure.bounds, failure.partial, targets, backups)
        left = "params and optimizer state left unchanged" if backups else \
            "params and optimizer state may be partly stepped (unguarded call)"
        failure.args = (f"{failure}; {left}",)
        raise


def _put_back(bounds: list[int], partial: np.ndarray, targets: tuple[Tensor, ...],
              backups: tuple[Tensor, ...]) -> None:
    """Restore the columns each chunk stepped (its record's ``stepped``) before the guard
    stopped it."""
    for lo, count in zip(bounds, partial["stepped"].astype(np.int64).tolist()):
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


def nonfinite_rows(batch: ClientBatch) -> list[int]:
    """The clients whose update holds a NaN or an infinity, read on the calling thread."""
    _, _, partial = _over_columns(_library().gma_cpu_nonfinite, _rows(batch, None),
                                  batch.numel, out=_counts(batch.num_clients), parallel=False)
    return np.flatnonzero(partial.sum(0)).tolist()


@functools.cache
def _counts(num_clients: int) -> np.dtype:
    """A chunk's record of the non-finite screen: a count per client."""
    return np.dtype((np.float64, num_clients))


def fold(batch: ClientBatch, *, total: Tensor, count: Tensor, weighted: bool) -> None:
    """Streaming fold in place: ``total += Σ p_k x_k``, ``count += Σ a_k sign(x_k)`` (raw
    weights ``p_k``; ``a_k = p_k`` when ``weighted``, else 1)."""
    rows = _rows(batch, batch.weights, batch.weights if weighted else None)
    args = _FoldArgs(rows, total.data_ptr(), count.data_ptr())
    args.keep = rows.keep
    _over_columns(_library().gma_cpu_fold, args, batch.numel, out=None)


def finish(sums: StreamSums, *, mask: MaskParams) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``formula.streaming_result`` in one pass in C: (mean ``S/Σp``, mask ``m``,
    ``[[Σ m, Σ A]]``, whether the mean is finite); the sums are only read."""
    mean, m = torch.empty_like(sums.total), torch.empty_like(sums.total)
    args = _FinishArgs(sums.total.data_ptr(), sums.count.data_ptr(), sums.weight_sum,
                       mask, mean.data_ptr(), m.data_ptr())
    _, _, partial = _over_columns(_library().gma_cpu_finish, args, sums.total.numel())
    stats, bad = _statistics(partial)
    return mean, m, stats, bad == 0


def step_from_sums(sums: StreamSums, *, mask: MaskParams, config: StepConfig, params: Tensor,
                   states: tuple[Tensor, ...]) -> tuple[Tensor, bool, bool]:
    """The guarded server step straight from the streaming sums, ``finish`` and the step in
    one pass (no buffer of N values besides the guard's backups): (``[[Σ m, Σ A]]``, whether
    the mean is finite, whether it stepped). Unless both, params and state are as they were."""
    stepping, targets, backups = _step(config, params, states, True)
    args = _FinishArgs(sums.total.data_ptr(), sums.count.data_ptr(), sums.weight_sum,
                       mask, None, None, stepping)
    with _undone_on_failure(targets, backups):
        bounds, codes, partial = _over_columns(_library().gma_cpu_finish, args,
                                               sums.total.numel())
    stats, bad = _statistics(partial)
    if bad == 0 and not any(codes):
        return stats, True, True
    _put_back(bounds, partial, targets, backups)
    return stats, bad == 0, False
