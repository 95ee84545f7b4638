"""The PyTorch backend: any device, the same formula as the Triton kernel, in two phases.

Phase 1 (in ``run``) reads every update once and writes ``g``, in PyTorch ops on chunks of
L elements: each chunk of the K updates (at most ~4 MiB on CPU, so it stays in cache) is
reduced by a matrix-vector product for the weighted sum and a sign pass and a sum for the
count (``_BlockSums``), and every ``MASK_BLOCK`` coordinates the mask
(``formula.mask_from_count``) is applied while the block is still in cache. Nothing K×N is
ever allocated; the only full-size temporary is ``g``. Phase 2, the server step
(``formula.apply_step``), runs only once the whole aggregate is known to be finite, so a
guarded job never touches ``params`` or the optimizer state on bad input.

The entry points are those of ``backends.Backend``; ``step``, ``finish`` and ``step_from_sums``
are ``formula``'s own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..batch import ClientBatch
from ..formula import apply_step, mask_from_count, streaming_result, streaming_step
from ..job import Job, Outcome

CPU_CHUNK_BYTES = 1 << 22
DEVICE_CHUNK_BYTES = 1 << 28
MASK_BLOCK = 1 << 17  # coordinates masked together (the per-coordinate ops run on this block)

step = apply_step
finish = streaming_result
step_from_sums = streaming_step


def chunk_length(batch: ClientBatch) -> int:
    """Elements per chunk: K·L·4 bytes stays within the cache budget (CPU) or a memory cap."""
    budget = CPU_CHUNK_BYTES if batch.device.type == "cpu" else DEVICE_CHUNK_BYTES
    length = max(4096, budget // (4 * batch.num_clients)) // 1024 * 1024
    return min(length, batch.numel)


def _chunk(batch: ClientBatch, start: int, stop: int, buf: Tensor | None) -> Tensor:
    """The updates' columns ``[start, stop)`` as a ``[K, n]`` float32 matrix: a view of a
    float32 matrix (``buf`` is None then), else converted into ``buf``."""
    if buf is None:
        return batch.matrix[:, start:stop]
    out = buf[: batch.num_clients * (stop - start)].view(batch.num_clients, stop - start)
    if batch.matrix is not None:
        out.copy_(batch.matrix[:, start:stop])
    elif batch.dtype == torch.float32:
        torch.stack([row[start:stop] for row in batch.rows], out=out)  # one op, not K copies
    else:
        for k, row in enumerate(batch.rows):
            out[k].copy_(row[start:stop])
    return out


def run(job: Job) -> Outcome:
    """Phase 1: ``S`` and the count block by block (``_BlockSums``), the mask applied to each
    block into ``g`` (``m`` kept apart when the mask multiplies the step); then phase 2, the
    step, only once every ``S_j`` is finite (or the job is unguarded)."""
    batch = job.batch
    n = batch.numel
    f32 = dict(dtype=torch.float32, device=batch.device)
    g = job.g_out if job.g_out is not None else torch.empty(n, **f32)
    split = job.step is not None and job.step.masks_step
    mask_out = torch.empty(n, **f32) if split else None
    block_sums = _BlockSums(batch, job.mask.weighted_agreement)
    count = torch.empty(block_sums.block, **f32)
    mask_sum = torch.zeros((), **f32)
    agreement_sum = torch.zeros((), **f32)
    check = torch.zeros((), **f32)
    for lo in range(0, n, block_sums.block):
        hi = min(n, lo + block_sums.block)
        block_sums(lo, hi, g, count)
        mean = g[lo:hi]
        m, agree = mask_from_count(count[: hi - lo], job.mask_params)
        agreement_sum += agree.sum()
        mask_sum += m.sum()
        if job.guard:
            check += mean.sum()  # NaN/inf propagate; a finite overflow is re-checked below
        if job.a_out is not None:
            job.a_out[lo:hi] = agree
        if mask_out is not None:
            mask_out[lo:hi] = m
        else:
            mean.mul_(m)
    sums = torch.stack((mask_sum, agreement_sum))[None]
    if job.guard and not (bool(torch.isfinite(check)) or bool(torch.isfinite(g).all())):
        return Outcome(False, sums)
    if job.step is not None and not apply_step(config=job.step, params=job.params,
                                               states=job.states, x=g, mask=mask_out,
                                               guard=job.guard):
        return Outcome(False, sums)
    return Outcome(True, sums)


class _BlockSums:
    """``S_j = Σ_k p̄_k x_kj`` and the count ``Σ_k a_k sign(x_kj)`` of a block of columns, in
    PyTorch ops on chunks of ``chunk_length`` columns (``a_k = p̄_k`` when ``weighted``, else
    1), with the chunk buffers kept from block to block."""

    def __init__(self, batch: ClientBatch, weighted: bool) -> None:
        f32 = dict(dtype=torch.float32, device=batch.device)
        self.batch = batch
        self.length = chunk_length(batch)
        self.block = max(self.length, min(MASK_BLOCK, batch.numel))
        self.mean_w = torch.tensor(batch.mean_weights, **f32)
        self.agree_w = self.mean_w if weighted else None
        in_place = batch.matrix is not None and batch.dtype == torch.float32  # chunks are views
        self.xbuf = None if in_place else torch.empty(batch.num_clients * self.length, **f32)
        self.sbuf = torch.empty(batch.num_clients * self.length, **f32)

    def __call__(self, lo: int, hi: int, total: Tensor, count: Tensor) -> None:
        """``S`` of the columns ``[lo, hi)`` into ``total[lo:hi]``, the count into
        ``count[:hi - lo]``."""
        for start in range(lo, hi, self.length):
            stop = min(hi, start + self.length)
            x = _chunk(self.batch, start, stop, self.xbuf)
            torch.mv(x.t(), self.mean_w, out=total[start:stop])
            signs = torch.sign(x, out=self.sbuf[: x.numel()].view(x.shape))
            if self.agree_w is None:
                torch.sum(signs, 0, out=count[start - lo: stop - lo])
            else:
                torch.mv(signs.t(), self.agree_w, out=count[start - lo: stop - lo])


def nonfinite_rows(batch: ClientBatch) -> list[int]:
    """The clients whose update holds a NaN or an infinity."""
    return [k for k, row in enumerate(batch.rows) if not bool(torch.isfinite(row).all())]


def fold(batch: ClientBatch, *, total: Tensor, count: Tensor, weighted: bool) -> None:
    """Streaming fold in place, one client at a time: ``total += Σ p_k x_k``,
    ``count += Σ a_k sign(x_k)`` (raw weights ``p_k``; ``a_k = p_k`` when ``weighted``, else 1)."""
    for row, p in zip(batch.rows, batch.weights):
        total.add_(row, alpha=p)
        count.add_(torch.sign(row), alpha=p if weighted else 1.0)
