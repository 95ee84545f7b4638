"""The fused Triton kernel: one launch, one pass over every client's update.

Each program owns ``BLOCK`` coordinates. It reads that slice of each of the K updates once
(through a table of K row addresses, so a list of tensors is read where it lies), accumulates
the weighted sum and the sign count in registers, applies the threshold and mask and, in the
same pass, the server optimizer: state update and parameter write. K and N are runtime
arguments (no recompilation when the number of clients changes).

Guard: where a block's aggregate is non-finite the program writes nothing and raises a flag;
every program saves the old parameters/state it overwrites into ``backup`` so the launcher
can restore them. Per-program partial sums of ``m`` and ``A`` give the mask statistics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch import ClientBatch
from .job import Job, Outcome
from ._torch import mask_threshold

OPTIMIZER_CODES = {None: 0, "sgd": 1, "momentum": 2, "adam": 3, "yogi": 4, "adagrad": 5}
TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _load_client(table, k, offs, valid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    row = tl.load(table + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        row = tl.multiple_of(row, 16)
    return tl.load(row + offs, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _accumulate(table, weights, K, offs, valid, BLOCK: tl.constexpr, DTYPE: tl.constexpr,
                WEIGHTED: tl.constexpr, ALIGNED: tl.constexpr):
    """Σ_k p̄_k x_k and Σ_k a_k sign(x_k) over the K rows; ``weights`` holds p̄ then a."""
    total = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.float32)
    for k in range(K):
        x = _load_client(table, k, offs, valid, DTYPE, ALIGNED)
        total += tl.load(weights + k) * x
        if WEIGHTED:
            count += tl.load(weights + K + k) * _sign(x)
        else:
            count += _sign(x)
    return total, count


@triton.jit(do_not_specialize=["N", "K"])
def _gma_kernel(table, weights, N, K, threshold, scale,
                params, state1, state2, g_out, a_out, backup, partials, flag,
                lr, momentum, beta1, beta2, eps,
                DTYPE: tl.constexpr, WEIGHTED: tl.constexpr, HARD: tl.constexpr,
                OPT: tl.constexpr, AFTER: tl.constexpr, GUARD: tl.constexpr,
                WRITE_G: tl.constexpr, WRITE_A: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    total, count = _accumulate(table, weights, K, offs, valid, BLOCK, DTYPE, WEIGHTED, ALIGNED)

    score = tl.abs(count)
    agree = score * scale
    keep = score >= threshold
    if HARD:
        m = keep.to(tl.float32)
    else:
        m = tl.where(keep, 1.0, agree)
    tl.store(partials + 2 * pid, tl.sum(tl.where(valid, m, 0.0), axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum(tl.where(valid, agree, 0.0), axis=0))
    g = m * total

    ok = valid
    if GUARD:
        finite = (total == total) & (tl.abs(total) < float("inf"))
        n_bad = tl.sum((valid & ~finite).to(tl.int32), axis=0)
        if n_bad > 0:
            tl.store(flag, 1)
        ok = valid & (n_bad == 0)
    if WRITE_A:
        tl.store(a_out + offs, agree, mask=valid)
    if WRITE_G:
        tl.store(g_out + offs, g, mask=ok)

    if OPT > 0:
        w = tl.load(params + offs, mask=valid, other=0.0)
        if GUARD:
            tl.store(backup + offs, w, mask=valid)
        if AFTER:
            x = total
        else:
            x = g
        if OPT == 1:
            direction = x
        elif OPT == 2:
            velocity = tl.load(state1 + offs, mask=valid, other=0.0)
            if GUARD:
                tl.store(backup + N + offs, velocity, mask=valid)
            velocity = momentum * velocity + x
            tl.store(state1 + offs, velocity, mask=ok)
            direction = velocity
        else:
            first = tl.load(state1 + offs, mask=valid, other=0.0)
            second = tl.load(state2 + offs, mask=valid, other=0.0)
            if GUARD:
                tl.store(backup + N + offs, first, mask=valid)
                tl.store(backup + 2 * N + offs, second, mask=valid)
            first = beta1 * first + (1.0 - beta1) * x
            sq = x * x
            if OPT == 3:
                second = beta2 * second + (1.0 - beta2) * sq
            elif OPT == 4:
                second = second - (1.0 - beta2) * sq * _sign(second - sq)
            else:
                second = second + sq
            tl.store(state1 + offs, first, mask=ok)
            tl.store(state2 + offs, second, mask=ok)
            direction = tl.div_rn(first, tl.sqrt_rn(second) + eps)
        if AFTER:
            direction = direction * m
        tl.store(params + offs, w + lr * direction, mask=ok)


@triton.jit(do_not_specialize=["N", "K"])
def _fold_kernel(table, weights, N, K, total, count, DTYPE: tl.constexpr,
                 WEIGHTED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Streaming fold: ``S += Σ p_k x_k``, ``C += Σ a_k sign(x_k)`` in one pass."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    add_total, add_count = _accumulate(table, weights, K, offs, valid, BLOCK, DTYPE, WEIGHTED,
                                       ALIGNED)
    tl.store(total + offs, tl.load(total + offs, mask=valid) + add_total, mask=valid)
    tl.store(count + offs, tl.load(count + offs, mask=valid) + add_count, mask=valid)


def launch_config(batch_numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps): big blocks for big buffers, small ones so tiny buffers still spread."""
    if batch_numel >= 1 << 20:
        return 2048, 8
    return 1024, 4


def _row_table(batch: ClientBatch, weighted: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(row address table, weights ``p`` then ``a``, whether every row is 16-byte aligned)."""
    addresses = [row.data_ptr() for row in batch.rows]
    aligned = all(a % 16 == 0 for a in addresses)
    agree = batch.mean_weights if weighted else (1.0,) * batch.num_clients
    weights = torch.tensor(batch.mean_weights + agree, dtype=torch.float32).to(batch.device)
    return torch.tensor(addresses, dtype=torch.int64).to(batch.device), weights, aligned


def fold(batch: ClientBatch, total: torch.Tensor, count: torch.Tensor, weighted: bool) -> None:
    """Streaming accumulator fold (``batch.mean_weights`` carry the raw weights here)."""
    table, weights, aligned = _row_table(batch, weighted)
    block, warps = launch_config(batch.numel)
    _fold_kernel[(triton.cdiv(batch.numel, block),)](
        table, weights, batch.numel, batch.num_clients, total, count,
        DTYPE=TRITON_DTYPES[batch.dtype], WEIGHTED=weighted, ALIGNED=aligned, BLOCK=block,
        num_warps=warps)


def run(job: Job) -> Outcome:
    batch, step = job.batch, job.step
    device, n, k = batch.device, batch.numel, batch.num_clients
    table, weights, aligned = _row_table(batch, job.mask.weighted_agreement)
    threshold, scale = mask_threshold(job.mask, k)
    block, warps = launch_config(n)
    grid = triton.cdiv(n, block)
    partials = torch.empty(2 * grid, dtype=torch.float32, device=device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    opt = OPTIMIZER_CODES[step.kind if step else None]
    states = tuple(job.states) + (None,) * (2 - len(job.states))
    guard_step = job.guard and step is not None
    backup = (torch.empty((1 + len(job.states)) * n, dtype=torch.float32, device=device)
              if guard_step else None)
    after = step is not None and step.placement == "after" and step.kind != "sgd"
    dummy = partials  # stands in for pointers a variant never touches
    _gma_kernel[(grid,)](
        table, weights, n, k, float(threshold), float(scale),
        job.params if step else dummy, states[0] if states[0] is not None else dummy,
        states[1] if states[1] is not None else dummy,
        job.g_out if job.g_out is not None else dummy,
        job.a_out if job.a_out is not None else dummy,
        backup if backup is not None else dummy, partials, flag,
        float(step.lr) if step else 0.0, float(step.momentum) if step else 0.0,
        float(step.beta1) if step else 0.0, float(step.beta2) if step else 0.0,
        float(step.eps) if step else 1.0,
        DTYPE=TRITON_DTYPES[batch.dtype], WEIGHTED=job.mask.weighted_agreement,
        HARD=job.mask.mask == "hard", OPT=opt, AFTER=after, GUARD=job.guard,
        WRITE_G=job.g_out is not None, WRITE_A=job.a_out is not None, ALIGNED=aligned,
        BLOCK=block, num_warps=warps,
    )
    sums = partials.view(grid, 2).sum(0)
    finite = not job.guard or int(flag.item()) == 0
    if not finite and guard_step:
        _restore(job, backup)
    return Outcome(finite, sums[0], sums[1])


def _restore(job: Job, backup: torch.Tensor) -> None:
    """Undo a guarded step that met a non-finite block: put back params and state."""
    n = job.batch.numel
    for i, target in enumerate((job.params, *job.states)):
        target.copy_(backup[i * n:(i + 1) * n])
