"""PyTorch backend: any device, the same formula as the Triton kernel, in two phases.

Phase 1 reads every update once and writes ``g``. On CPU it runs the optional native kernel
(``_native``: fused C loop, one pass, threads over columns) when it was built; otherwise, and on
other devices, PyTorch ops on chunks of L elements: each chunk of the K updates (at most ~4 MiB
on CPU, so it stays in cache) is reduced by a matrix-vector product for the weighted sum and a
sign pass and a sum for the count, and every ``MASK_BLOCK`` coordinates the mask is applied
while the block is still in cache. Nothing K×N is ever allocated; the only full-size temporary
is ``g``. Phase 2 (the server step) runs only once the whole aggregate is known to be finite,
so a guarded job never touches ``params`` or the optimizer state on bad input.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import _native
from .batch import ClientBatch
from .config import MaskConfig, StepConfig
from .job import Job, Outcome

CPU_CHUNK_BYTES = 1 << 22
DEVICE_CHUNK_BYTES = 1 << 28
MASK_BLOCK = 1 << 17  # coordinates masked together (the per-coordinate ops run on this block)


def chunk_length(batch: ClientBatch) -> int:
    """Elements per chunk: K·L·4 bytes stays within the cache budget (CPU) or a memory cap."""
    budget = CPU_CHUNK_BYTES if batch.device.type == "cpu" else DEVICE_CHUNK_BYTES
    length = max(4096, budget // (4 * batch.num_clients)) // 1024 * 1024
    return min(length, batch.numel)


def fp32_scalar(x: float) -> float:
    """``x`` rounded to float32, so both backends multiply by the very same constant."""
    return float(np.float32(x))


def mask_threshold(mask: MaskConfig, num_clients: int) -> tuple[float, float]:
    """(threshold on the score, score → agreement scale). Unweighted: the score is the exact
    sign count, compared with an integer threshold, and ``A = count · fl32(1/K)``."""
    if mask.weighted_agreement:
        return mask.weighted_threshold(num_clients), 1.0
    return mask.count_threshold(num_clients), fp32_scalar(1.0 / num_clients)


def mask_from_count(count: Tensor, threshold: float, scale: float, hard: bool
                    ) -> tuple[Tensor, Tensor]:
    """(m, A) from the signed count, overwriting ``count`` with ``A = |count| · scale``;
    ``m = 1`` where ``|count| ≥ threshold``, else ``A`` (soft) or 0 (hard)."""
    score = count.abs_()
    keep = score >= threshold
    agree = score.mul_(scale) if scale != 1.0 else score
    return (keep.to(torch.float32) if hard else torch.where(keep, 1.0, agree)), agree


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
    batch, step = job.batch, job.step
    n_total = batch.numel
    f32 = dict(dtype=torch.float32, device=batch.device)
    split = step is not None and step.masks_step
    # ``g`` holds the masked mean (or, with ``split``, the unmasked mean and ``m`` apart)
    g = job.g_out if job.g_out is not None else torch.empty(n_total, **f32)
    mask_out = torch.empty(n_total, **f32) if split else None
    aggregate = _aggregate_native if _native.supports(batch) else _aggregate_chunks
    finite, sums = aggregate(job, g, mask_out)
    if job.guard and not finite:
        return Outcome(False, sums)
    if step is not None and not apply_step(step, job.params, job.states, g, mask_out,
                                           guard=job.guard):
        return Outcome(False, sums)
    return Outcome(True, sums)


def _aggregate_native(job: Job, g: Tensor, mask_out: Tensor | None) -> tuple[bool, Tensor]:
    """Phase 1 in the fused C kernel: (every ``S_j`` finite, ``[[Σ m, Σ A]]``)."""
    batch = job.batch
    threshold, scale = mask_threshold(job.mask, batch.num_clients)
    agree_w = batch.mean_weights if job.mask.weighted_agreement else None
    mask_sum, agreement_sum, bad = _native.aggregate(
        batch, agree_w, threshold, scale, job.mask.mask == "hard", g, job.a_out, mask_out)
    return bad == 0, torch.tensor([[mask_sum, agreement_sum]], dtype=torch.float32)


def _aggregate_chunks(job: Job, g: Tensor, mask_out: Tensor | None) -> tuple[bool, Tensor]:
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


def fold(batch: ClientBatch, total: Tensor, count: Tensor, weighted: bool) -> None:
    """Streaming fold in place: ``total += Σ p_k x_k``, ``count += Σ a_k sign(x_k)``
    (``batch.mean_weights`` carry the raw weights ``p_k``; ``a_k = p_k`` when ``weighted``,
    else 1): the native kernel on CPU when it is built, else one client at a time."""
    if _native.supports(batch):
        _native.fold(batch, total, count, weighted)
        return
    for row, p in zip(batch.rows, batch.mean_weights):
        total.add_(row, alpha=p)
        count.add_(torch.sign(row), alpha=p if weighted else 1.0)


def step_values(step: StepConfig, params: Tensor, states: tuple[Tensor, ...], x: Tensor,
                mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One server step, out of place: the new params and state. ``x`` is ``g`` (placement
    "before") or the unmasked average, in which case ``mask`` multiplies the step (placement
    "after")."""
    if step.kind == "sgd":
        new_states: tuple[Tensor, ...] = ()
        direction = x
    elif step.kind == "momentum":
        (velocity,) = states
        direction = velocity * step.momentum + x
        new_states = (direction,)
    else:
        first, second = states
        first = first * step.beta1 + x * (1.0 - step.beta1)
        sq = x * x
        if step.kind == "adam":
            second = second * step.beta2 + sq * (1.0 - step.beta2)
        elif step.kind == "yogi":
            second = second - (1.0 - step.beta2) * sq * torch.sign(second - sq)
        else:
            second = second + sq
        direction = first / (second.sqrt() + step.eps)
        new_states = (first, second)
    if mask is not None:
        direction = direction * mask
    return params + step.lr * direction, new_states


#: below float32's largest value (3.4e38) by a factor of 2, so the bound's own rounding is safe
_SAFE = 1.7e38


def _surely_finite(step: StepConfig, params: Tensor, states: tuple[Tensor, ...],
                   x: Tensor) -> bool:
    """Whether the step's new params and state are certainly finite, from bounds on the
    inputs' largest magnitudes (|direction| ≤ |m|/ε for the adaptive kinds, mask ≤ 1); False
    also when any input is not finite (every comparison with NaN is False)."""
    def biggest(t: Tensor) -> float:  # max |t| in one read-only pass (inf if NaN)
        lo, hi = (float(v) for v in torch.aminmax(t))
        return math.inf if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)

    g = biggest(x)
    if step.kind == "sgd":
        direction = g
    elif step.kind == "momentum":
        direction = step.momentum * biggest(states[0]) + g
    else:
        first = step.beta1 * biggest(states[0]) + (1.0 - step.beta1) * g
        second = biggest(states[1]) + g * g
        if not (g < 1e19 and first < _SAFE and second < _SAFE):
            return False
        direction = first / step.eps
    return direction < _SAFE and biggest(params) + step.lr * direction < _SAFE


def apply_step(step: StepConfig, params: Tensor, states: tuple[Tensor, ...], x: Tensor,
               mask: Tensor | None = None, *, guard: bool = False) -> bool:
    """One server step in place, block by block (``step_values``). With ``guard`` nothing is
    written unless every new value is finite: a bound from the inputs' largest magnitudes
    (``_surely_finite``, a few read-only passes) settles it in the common case, else every new
    value is computed and checked first. Returns whether it stepped."""
    n = params.numel()
    blocks = [slice(lo, min(n, lo + MASK_BLOCK)) for lo in range(0, n, MASK_BLOCK)]

    def values(sl: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        return step_values(step, params[sl], tuple(t[sl] for t in states), x[sl],
                           None if mask is None else mask[sl])

    if guard and not _surely_finite(step, params, states, x):
        for sl in blocks:
            new_params, new_states = values(sl)
            if not all(bool(torch.isfinite(t).all()) for t in (new_params, *new_states)):
                return False
    for sl in blocks:
        new_params, new_states = values(sl)
        params[sl].copy_(new_params)
        for target, value in zip(states, new_states):
            target[sl].copy_(value)
    return True