"""The native CPU backend: ``csrc/gma_cpu.c`` (built at install when a C compiler is at hand)
computes phase 1 of the torch backend (sums, sign count, threshold, mask, ``g``) in one fused
pass, split over threads by columns; the step is ``formula.apply_step``, as in the torch backend.

``usable()`` is False when the library was not built or could not be loaded, or with
``ENABLED`` False (the environment variable ``GMA_KERNELS_NATIVE=0`` at import): the dispatcher
then runs the torch backend's pure-PyTorch chunks on CPU.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..batch import ClientBatch
from ..formula import apply_step, mask_threshold
from ..job import Job, Outcome
from .torch_ops import finish, outputs

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ENABLED = os.environ.get("GMA_KERNELS_NATIVE", "1") != "0"
MIN_COLUMNS_PER_THREAD = 1 << 16   # below this one thread: the split costs more than it saves
_ALIGN = 64                        # thread ranges start on a cache line of float32 outputs


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
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            head = [p, ctypes.c_int, i64, i64, i64, p, p]   # rows, dtype, K, lo, hi, w, a
            lib.gma_cpu_aggregate.argtypes = head + [ctypes.c_float, ctypes.c_float,
                                                     ctypes.c_int, p, p, p, p, ctypes.c_float,
                                                     ctypes.c_int, p, p]
            lib.gma_cpu_fold.argtypes = head + [p, p]
            lib.gma_cpu_aggregate.restype = lib.gma_cpu_fold.restype = ctypes.c_int
            return lib
    return None


def available() -> bool:
    return _library() is not None


def usable() -> bool:
    """Built, loaded and not switched off (it reads float32, bfloat16 and float16 rows)."""
    return ENABLED and available()


step = apply_step


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """A pool per process: a forked child inherits its parent's pool without its threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix=f"gma-cpu-{pid}")


def _row_pointers(batch: ClientBatch) -> np.ndarray:
    if batch.matrix is not None:
        stride = batch.matrix.stride(0) * batch.dtype.itemsize
        return batch.matrix.data_ptr() + stride * np.arange(batch.num_clients, dtype=np.uint64)
    return np.array([row.data_ptr() for row in batch.rows], dtype=np.uint64)


def _over_columns(fn, batch: ClientBatch, weights: tuple[float, ...],
                  agree_weights: tuple[float, ...] | None, *rest, sums: int = 0
                  ) -> tuple[list[int], list[int], np.ndarray]:
    """Call ``fn(rows, dtype, K, lo, hi, w, a, *rest)`` on contiguous column ranges, one per
    thread. With ``sums > 0`` each thread also gets a zeroed float64 array of that many sums
    to add into. Returns (the range bounds, each thread's return code, ``[threads, sums]``)."""
    n = batch.numel
    pointers = _row_pointers(batch)
    w = np.array(weights, dtype=np.float32)
    a = None if agree_weights is None else np.array(agree_weights, dtype=np.float32)
    threads = max(1, min(torch.get_num_threads(), n // MIN_COLUMNS_PER_THREAD))
    bounds = [min(n, (n * i // threads + _ALIGN - 1) // _ALIGN * _ALIGN) for i in range(threads)]
    bounds.append(n)
    head = (pointers.ctypes.data, DTYPE_CODES[batch.dtype], batch.num_clients)
    tail = (w.ctypes.data, None if a is None else a.ctypes.data)
    partial = np.zeros((threads, sums), dtype=np.float64)

    def work(i: int) -> int:
        own = (partial[i].ctypes.data,) if sums else ()
        return fn(*head, bounds[i], bounds[i + 1], *tail, *rest, *own)

    if threads == 1:
        codes = [work(0)]
    else:
        codes = list(_pool(threads, os.getpid()).map(work, range(threads)))
    if any(c < 0 for c in codes):
        raise RuntimeError(f"native CPU kernel failed (codes {codes})")
    return bounds, codes, partial


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run(job: Job) -> Outcome:
    """Aggregate in the C kernel (``_aggregate``: sums, count, mask), then step; an SGD step
    is made in the same pass (``_aggregate_and_sgd``)."""
    if job.step is not None and job.step.kind == "sgd":
        return _aggregate_and_sgd(job)
    g, mask_out = outputs(job)
    return finish(job, g, mask_out, *_aggregate(job, g, mask_out))


def _aggregate(job: Job, g: Tensor, mask_out: Tensor | None) -> tuple[bool, Tensor]:
    """Phase 1 in the fused C kernel: (every ``S_j`` finite, ``[[Σ m, Σ A]]``)."""
    batch = job.batch
    threshold, scale = mask_threshold(job.mask, batch.num_clients)
    agree_w = batch.mean_weights if job.mask.weighted_agreement else None
    mask_sum, agreement_sum, bad = aggregate(
        batch, agree_w, threshold, scale, job.mask.mask == "hard", g, job.a_out, mask_out)
    return bad == 0, torch.tensor([[mask_sum, agreement_sum]], dtype=torch.float32)


def _aggregate_and_sgd(job: Job) -> Outcome:
    """One pass: the aggregate and ``w += η g`` tile by tile, ``g`` never written unless
    ``job.g_out`` asks for it. Guarded, each tile is stepped only if its new values are all
    finite, after its old values went to a scratch backup; when a tile fails, the stepped
    tiles are put back from it, so ``params`` ends as it was."""
    batch = job.batch
    threshold, scale = mask_threshold(job.mask, batch.num_clients)
    agree_w = batch.mean_weights if job.mask.weighted_agreement else None
    backup = _scratch(batch.numel) if job.guard else None
    bounds, codes, partial = _over_columns(
        _library().gma_cpu_aggregate, batch, batch.mean_weights, agree_w, float(threshold),
        float(scale), int(job.mask.mask == "hard"), _address(job.g_out), _address(job.a_out),
        None, job.params.data_ptr(), float(job.step.lr), int(job.guard), _address(backup),
        sums=4)
    mask_sum, agreement_sum, bad, _ = partial.sum(0)
    sums = torch.tensor([[mask_sum, agreement_sum]], dtype=torch.float32)
    if not job.guard or (bad == 0 and not any(codes)):
        return Outcome(True, sums)
    for lo, stepped in zip(bounds, partial[:, 3].astype(np.int64).tolist()):
        job.params[lo:lo + stepped].copy_(backup[lo:lo + stepped])
    return Outcome(False, sums)


_scratch_buffers: dict[int, Tensor] = {}


def _scratch(numel: int) -> Tensor:
    """A float32 buffer of ``numel`` elements kept for the next call of the same size (only
    the latest size is kept): a new one would cost a page fault per 4 KiB on every call."""
    buf = _scratch_buffers.get(numel)
    if buf is None:
        _scratch_buffers.clear()
        buf = _scratch_buffers[numel] = torch.empty(numel, dtype=torch.float32)
    return buf


def aggregate(batch: ClientBatch, agree_weights: tuple[float, ...] | None, threshold: float,
              scale: float, hard: bool, g: Tensor, a_out: Tensor | None,
              m_out: Tensor | None) -> np.ndarray:
    """Fill ``g`` (and ``a_out``, ``m_out``) for every column; return ``[Σ m, Σ A, #non-finite
    S_j]`` (float64). ``agree_weights`` None: the unweighted, exact sign count."""
    _, _, partial = _over_columns(
        _library().gma_cpu_aggregate, batch, batch.mean_weights, agree_weights,
        float(threshold), float(scale), int(hard), g.data_ptr(), _address(a_out),
        _address(m_out), None, 0.0, 0, None, sums=4)
    return partial.sum(0)[:3]


def fold(batch: ClientBatch, total: Tensor, count: Tensor, weighted: bool) -> None:
    """Streaming fold in place: ``total += Σ p_k x_k``, ``count += Σ a_k sign(x_k)`` (raw
    weights ``p_k``; ``a_k = p_k`` when ``weighted``, else 1)."""
    _over_columns(_library().gma_cpu_fold, batch, batch.weights,
                  batch.weights if weighted else None, total.data_ptr(), count.data_ptr())
