"""The C allocator's tuning for training loops: freed memory stays in the heap for reuse
(glibc only; measured in ``docs/fedsim-engines.md``)."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """Within the block, glibc's ``malloc`` keeps freed memory for reuse instead of handing it
    back to the OS (``mallopt``: blocks up to 32 MiB come from the heap, whose top is trimmed
    only past 1 GiB free); at its end ``malloc_trim(0)`` hands back what is free. A training
    step frees and allocates the same few MB of activations and gradients every time, which
    glibc's adaptive defaults would hand back and take again as fresh zeroed pages. The
    thresholds stay fixed for the process afterwards. Nothing happens where the C library is
    not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or ``None`` (another C library, or none to be found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc
