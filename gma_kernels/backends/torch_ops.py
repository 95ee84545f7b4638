"""The PyTorch backend: any device, the same formula as the Triton kernel, in two phases.

Phase 1 (``_aggregate``) reads every update once and writes ``g``, in PyTorch ops on chunks of
L elements: each chunk of the K updates (at most ~4 MiB on CPU, so it stays in cache) is
reduced by a matrix-vector product for the weighted sum and a sign pass and a sum for the
count, and every ``MASK_BLOCK`` coordinates the mask (``formula.mask_from_count``) is applied
while the block is still in cache. Nothing K×N is ever allocated; the only full-size temporary
is ``g``. Phase 2, the server step (``formula.apply_step``), runs only once the whole aggregate
is known to be finite, so a guarded job never touches ``params`` or the optimizer state on bad
input.

Entry points, as every backend has them: ``run(job)`` (aggregate and step), ``step`` (a step on
a known ``g``), ``fold`` (the streaming accumulator's sums), ``finish`` (its result),
``step_from_sums`` (a guarded step from them) and ``nonfinite_rows``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..batch import ClientBatch
from ..formula import (apply_step, mask_from_count, mask_threshold, streaming_result,
                       streaming_step)
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
    """Phase 1 in PyTorch ops (``_aggregate``: sums, count, mask) into ``g``, with ``m`` apart
    when the mask multiplies the step; then phase 2, the step, only once every value of phase 1
    is finite (or the job is unguarded)."""
    f32 = dict(dtype=torch.float32, device=job.batch.device)
    g = job.g_out if job.g_out is not None else torch.empty(job.batch.numel, **f32)
    split = job.step is not None and job.step.masks_step
    mask_out = torch.empty(job.batch.numel, **f32) if split else None
    finite, sums = _aggregate(job, g, mask_out)
    if job.guard and not finite:
        return Outcome(False, sums)
    if job.step is not None and not apply_step(job.step, job.params, job.states, g, mask_out,
                                               guard=job.guard):
        return Outcome(False, sums)
    return Outcome(True, sums)


def _aggregate(job: Job, g: Tensor, mask_out: Tensor | None) -> tuple[bool, Tensor]:
    """Phase 1 in PyTorch ops on cache-sized chunks: (every ``S_j`` finite, ``[[Σ m, Σ A]]``)."""
    batch = job.batch
    device, n_total, k_total = batch.device, batch.numel, batch.num_clients
    length = chunk_length(batch)
    block = max(length, min(MASK_BLOCK, n_total))
    f32 = dict(dtype=torch.float32, device=device)
    mean_w = torch.tensor(batch.mean_weights, **f32)
    agree_w = mean_w if job.mask.weighted_agreement else None  # a_k = p̄_k
    threshold, scale = mask_threshold(job.mask, k_total)
    hard = job.mask.mask == "hard"

    in_place = batch.matrix is not None and batch.dtype == torch.float32  # chunks are views
    xbuf = None if in_place else torch.empty(k_total * length, **f32)
    sbuf = torch.empty(k_total * length, **f32)
    count = torch.empty(block, **f32)
    mask_sum = torch.zeros((), **f32)
    agreement_sum = torch.zeros((), **f32)
    check = torch.zeros((), **f32)

    for lo in range(0, n_total, block):
        hi = min(n_total, lo + block)
        for start in range(lo, hi, length):
            stop = min(hi, start + length)
            x = _chunk(batch, start, stop, xbuf)
            torch.mv(x.t(), mean_w, out=g[start:stop])
            signs = torch.sign(x, out=sbuf[: x.numel()].view(x.shape))
            if agree_w is None:
                torch.sum(signs, 0, out=count[start - lo: stop - lo])
            else:
                torch.mv(signs.t(), agree_w, out=count[start - lo: stop - lo])
        mean = g[lo:hi]
        m, agree = mask_from_count(count[: hi - lo], threshold, scale, hard)
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
    finite = not job.guard or bool(torch.isfinite(check)) or bool(torch.isfinite(g).all())
    return finite, torch.stack((mask_sum, agreement_sum))[None]


def nonfinite_rows(batch: ClientBatch) -> list[int]:
    """The clients whose update holds a NaN or an infinity."""
    return [k for k, row in enumerate(batch.rows) if not bool(torch.isfinite(row).all())]


def fold(batch: ClientBatch, total: Tensor, count: Tensor, weighted: bool) -> None:
    """Streaming fold in place, one client at a time: ``total += Σ p_k x_k``,
    ``count += Σ a_k sign(x_k)`` (raw weights ``p_k``; ``a_k = p_k`` when ``weighted``, else 1)."""
    for row, p in zip(batch.rows, batch.weights):
        total.add_(row, alpha=p)
        count.add_(torch.sign(row), alpha=p if weighted else 1.0)
