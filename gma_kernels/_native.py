"""The optional native CPU kernel (``csrc/gma_cpu.c``, built at install when a C compiler is at
hand): phase 1 of the torch backend on CPU in one fused pass, split over threads by columns.

``available()`` is False when the library was not built or could not be loaded; with it, or
with ``ENABLED`` False (the environment variable ``GMA_KERNELS_NATIVE=0`` at import), the
torch backend runs its pure-PyTorch chunks.
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

from .batch import ClientBatch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
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
            fn = lib.gma_cpu_aggregate
            p = ctypes.c_void_p
            fn.argtypes = [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, p, p,
                           ctypes.c_float, ctypes.c_float, ctypes.c_int, p, p, p, p]
            fn.restype = ctypes.c_int
            return lib
    return None


def available() -> bool:
    return _library() is not None


def supports(batch: ClientBatch) -> bool:
    """The native kernel reads float32 and bfloat16 rows on CPU (float16 takes the torch path)."""
    return ENABLED and batch.device.type == "cpu" and batch.dtype in DTYPE_CODES and available()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="gma-cpu")


def aggregate(batch: ClientBatch, agree_weights: tuple[float, ...] | None, threshold: float,
              scale: float, hard: bool, g: Tensor, a_out: Tensor | None,
              m_out: Tensor | None) -> np.ndarray:
    """Fill ``g`` (and ``a_out``, ``m_out``) for every column; return ``[Σ m, Σ A, #non-finite
    S_j]`` (float64). ``agree_weights`` None: the unweighted, exact sign count."""
    fn = _library().gma_cpu_aggregate
    k, n = batch.num_clients, batch.numel
    if batch.matrix is not None:
        stride = batch.matrix.stride(0) * batch.dtype.itemsize
        pointers = batch.matrix.data_ptr() + stride * np.arange(k, dtype=np.uint64)
    else:
        pointers = np.array([row.data_ptr() for row in batch.rows], dtype=np.uint64)
    mean_w = np.array(batch.mean_weights, dtype=np.float32)
    agree_w = None if agree_weights is None else np.array(agree_weights, dtype=np.float32)
    address = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    threads = max(1, min(torch.get_num_threads(), n // MIN_COLUMNS_PER_THREAD))
    bounds = [min(n, (n * i // threads + _ALIGN - 1) // _ALIGN * _ALIGN) for i in range(threads)]
    bounds.append(n)
    sums = np.zeros((threads, 3), dtype=np.float64)
    fixed = (pointers.ctypes.data, DTYPE_CODES[batch.dtype], k)
    rest = (mean_w.ctypes.data, None if agree_w is None else agree_w.ctypes.data,
            float(threshold), float(scale), int(hard), g.data_ptr(), address(a_out),
            address(m_out))

    def work(i: int) -> int:
        return fn(*fixed, bounds[i], bounds[i + 1], *rest, sums[i].ctypes.data)

    codes = [work(0)] if threads == 1 else list(_pool(threads).map(work, range(threads)))
    if any(codes):
        raise RuntimeError(f"native CPU kernel failed (codes {codes})")
    return sums.sum(0)
