"""The fused Triton kernel: one launch, one pass over every client's update.

Each program owns ``BLOCK`` coordinates. It reads that slice of each of the K updates once
(through a table of K row offsets from one base tensor, so a list of tensors is read where it
lies), accumulates
the weighted sum and the sign count in registers, applies the threshold and mask and, in the
same pass, the server optimizer: state update and parameter write. K and N are runtime
arguments (no recompilation when the number of clients changes).

Guard: where a block's aggregate, or the new params or state it steps to, is non-finite the
program writes nothing and raises a flag;
every program saves the old parameters/state it overwrites into ``backup`` so the launcher
can restore them. Per-program partial sums of ``m`` and ``A`` give the mask statistics.

Entry points, as every backend has them: ``run(job)`` (aggregate and step in the one launch),
``step`` (a step on a known ``g``: the same kernel reading ``g`` as its only row, every
coordinate kept; ``formula.apply_step`` when a mask multiplies the step), ``fold`` and
``nonfinite_rows``.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

from ..batch import ClientBatch
from ..config import MaskConfig, StepConfig
from ..formula import apply_step, mask_threshold, streaming_result
from ..job import Job, Outcome

finish = streaming_result  # the streaming result: a few element-wise ops, not worth a kernel

_FLOAT32_MAX = torch.finfo(torch.float32).max
OPTIMIZER_CODES = {None: 0, "sgd": 1, "momentum": 2, "adam": 3, "yogi": 4, "adagrad": 5}


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _load_client(base, offsets, k, offs, valid, VEC: tl.constexpr):
    """Row k's slice as float32. Rows are addressed as ``base + offsets[k]`` (in elements) so
    that, when every row is 16-byte aligned (VEC > 1), the compiler knows it and issues
    128-bit vector loads; a pointer loaded from memory would carry no alignment."""
    index = tl.load(offsets + k) + offs
    if VEC > 1:
        index = tl.multiple_of(index, VEC)
    return tl.load(base + index, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _accumulate(base, offsets, weights, K, offs, valid, BLOCK: tl.constexpr, VEC: tl.constexpr,
                WEIGHTED: tl.constexpr, UNROLL: tl.constexpr):
    """Σ_k p̄_k x_k and Σ_k a_k sign(x_k) over the K rows; ``weights`` holds p̄ then a."""
    total = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.float32)
    for k in tl.range(0, K, loop_unroll_factor=UNROLL):
        x = _load_client(base, offsets, k, offs, valid, VEC)
        total += tl.load(weights + k) * x
        if WEIGHTED:
            count += tl.load(weights + K + k) * _sign(x)
        else:
            count += _sign(x)
    return total, count


@triton.jit(do_not_specialize=["N", "K"])
def _gma_kernel(base, offsets, weights, N, K, threshold, scale,
                param_ptr, state1, state2, g_out, a_out, backup, partials, flag,
                lr, momentum, beta1, beta2, eps, sums_count, weight_sum,
                WEIGHTED: tl.constexpr, HARD: tl.constexpr,
                OPT: tl.constexpr, MASKS_STEP: tl.constexpr, GUARD: tl.constexpr,
                WRITE_G: tl.constexpr, WRITE_A: tl.constexpr, VEC: tl.constexpr,
                FROM_SUMS: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    if FROM_SUMS:  # a streaming accumulator's S (at base) and C (at sums_count): S/Σp, C
        total = tl.div_rn(tl.load(base + offs, mask=valid, other=0.0), weight_sum)
        count = tl.load(sums_count + offs, mask=valid, other=0.0)
        if WEIGHTED:
            count = tl.div_rn(count, weight_sum)
    else:
        total, count = _accumulate(base, offsets, weights, K, offs, valid, BLOCK, VEC,
                                   WEIGHTED, UNROLL)

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
        w = tl.load(param_ptr + offs, mask=valid, other=0.0)
        if GUARD:
            tl.store(backup + offs, w, mask=valid)
        if MASKS_STEP:
            x = total
        else:
            x = g
        # the new state and params first; with GUARD a block writes none of them unless all
        # are finite (a finite aggregate can still overflow in the step)
        first = x
        second = x
        if OPT == 1:
            direction = x
        elif OPT == 2:
            first = tl.load(state1 + offs, mask=valid, other=0.0)
            if GUARD:
                tl.store(backup + N + offs, first, mask=valid)
            first = momentum * first + x
            direction = first
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
            direction = tl.div_rn(first, tl.sqrt_rn(second) + eps)
        if MASKS_STEP:
            direction = direction * m
        new_w = w + lr * direction
        if GUARD:
            fine = (new_w == new_w) & (tl.abs(new_w) < float("inf"))
            if OPT >= 2:
                fine = fine & (tl.abs(first) < float("inf")) & (first == first)
            if OPT >= 3:
                fine = fine & (tl.abs(second) < float("inf")) & (second == second)
            n_over = tl.sum((valid & ~fine).to(tl.int32), axis=0)
            if n_over > 0:
                tl.store(flag, 1)
            ok = ok & (n_over == 0)
        if OPT >= 2:
            tl.store(state1 + offs, first, mask=ok)
        if OPT >= 3:
            tl.store(state2 + offs, second, mask=ok)
        tl.store(param_ptr + offs, new_w, mask=ok)


@triton.jit(do_not_specialize=["N", "K"])
def _fold_kernel(base, offsets, weights, N, K, total, count, WEIGHTED: tl.constexpr,
                 VEC: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Streaming fold: ``S += Σ p_k x_k``, ``C += Σ a_k sign(x_k)`` in one pass."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    add_total, add_count = _accumulate(base, offsets, weights, K, offs, valid, BLOCK, VEC,
                                       WEIGHTED, UNROLL)
    tl.store(total + offs, tl.load(total + offs, mask=valid) + add_total, mask=valid)
    tl.store(count + offs, tl.load(count + offs, mask=valid) + add_count, mask=valid)


@triton.jit(do_not_specialize=["N", "K"])
def _nonfinite_kernel(base, offsets, N, K, flags, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """``flags[k] = 1`` where row k holds a NaN or an infinity in this program's block (every
    writer writes the same 1, so their order does not matter)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    for k in range(0, K):
        x = _load_client(base, offsets, k, offs, valid, VEC)
        finite = (x == x) & (tl.abs(x) < float("inf"))
        if tl.sum((valid & ~finite).to(tl.int32), axis=0) > 0:
            tl.store(flags + k, 1)


LAUNCH = {"BLOCK": 1024, "UNROLL": 1, "num_warps": 4, "num_stages": 1}
"""Block size, K-loop unrolling, warps and pipeline stages, chosen on an H100 with
benchmarks/tune_triton.py."""


_TABLE_CACHE_SIZE = 32
_tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_flags: dict[torch.device, torch.Tensor] = {}


def _row_table(batch: ClientBatch, weights: tuple[float, ...], agree: tuple[float, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(base tensor, row offsets from it in elements, ``weights`` then the agreement weights
    ``agree``, VEC, the device's zeroed int64 guard flag).

    VEC is the number of elements in 16 bytes when every row is 16-byte aligned (vector loads),
    else 1. Offsets and weights travel in one pinned host buffer and one asynchronous copy, so
    building them never waits for the GPU; the device copy is cached (keyed by everything it
    holds: the offsets and the weights), so repeated calls on same-shaped updates pay no copy
    at all. A matrix's offsets are computed, not gathered."""
    k, itemsize = batch.num_clients, batch.dtype.itemsize
    if batch.matrix is not None:
        base = batch.matrix
        stride = batch.matrix.stride(0)
        pointers = (base.data_ptr(), base.data_ptr() + stride * itemsize)
        key = (batch.device, "matrix", stride, k)
    else:
        base = batch.rows[0]
        pointers = tuple(row.data_ptr() for row in batch.rows)
        key = (batch.device, "rows", itemsize, tuple(p - pointers[0] for p in pointers))
    key += (weights, agree)
    vec = 16 // itemsize if all(p % 16 == 0 for p in pointers) else 1
    table = _tables.get(key)
    if table is None:
        packed = _pack(batch, weights + agree, pointers if batch.matrix is None else None)
        table = _tables[key] = (packed[:k], packed[k:].view(torch.float32))  # views made once
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return base, *table, vec, _flag(batch.device)


def _flag(device: torch.device) -> torch.Tensor:
    """The device's zeroed int64 guard flag (kept: a guarded call leaves it zeroed)."""
    flag = _flags.get(device)
    if flag is None:
        flag = _flags[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return flag


def _pack(batch: ClientBatch, weights: tuple[float, ...], pointers: tuple[int, ...] | None
          ) -> torch.Tensor:
    """Offsets (int64) then the 2K weights (float32 pairs) in one device tensor."""
    k, itemsize = batch.num_clients, batch.dtype.itemsize
    on_cuda = batch.device.type == "cuda"
    host = torch.empty(2 * k, dtype=torch.int64, pin_memory=on_cuda)
    fill = host.numpy()  # filled through NumPy: no per-element torch ops
    if pointers is None:
        fill[:k] = batch.matrix.stride(0) * np.arange(k, dtype=np.int64)
    else:
        fill[:k] = (np.array(pointers, dtype=np.int64) - pointers[0]) // itemsize
    fill[k:].view(np.float32)[:] = weights
    return host.to(batch.device, non_blocking=True) if on_cuda else host


def fold(batch: ClientBatch, total: torch.Tensor, count: torch.Tensor, weighted: bool) -> None:
    """Streaming fold in place: ``total += Σ p_k x_k``, ``count += Σ a_k sign(x_k)`` (raw
    weights ``p_k``; ``a_k = p_k`` when ``weighted``, else 1 — the kernel counts exactly)."""
    p = batch.weights
    base, offsets, weights, vec, _ = _row_table(batch, p, p if weighted else (1.0,) * len(p))
    _fold_kernel[(triton.cdiv(batch.numel, LAUNCH["BLOCK"]),)](
        base, offsets, weights, batch.numel, batch.num_clients, total, count,
        WEIGHTED=weighted, VEC=vec, **LAUNCH)


def nonfinite_rows(batch: ClientBatch) -> list[int]:
    """The clients whose update holds a NaN or an infinity: one launch that reads each row once
    (no buffer of N, unlike ``torch.isfinite``), one device sync for all. It reads the rows
    through the unweighted fold's table, which the accumulator's fold then finds cached."""
    p = batch.weights
    base, offsets, _, vec, _ = _row_table(batch, p, (1.0,) * len(p))
    flags = torch.zeros(batch.num_clients, dtype=torch.int32, device=batch.device)
    _nonfinite_kernel[(triton.cdiv(batch.numel, LAUNCH["BLOCK"]),)](
        base, offsets, batch.numel, batch.num_clients, flags, VEC=vec, BLOCK=LAUNCH["BLOCK"],
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])
    return torch.nonzero(flags).flatten().tolist()


def step(config: StepConfig, params: torch.Tensor, states: tuple[torch.Tensor, ...],
         x: torch.Tensor, mask: torch.Tensor | None = None, *, guard: bool = False) -> bool:
    """A server step on a known ``g = x`` in place; returns whether it stepped (with ``guard``,
    nothing is written unless every new value is finite)."""
    if mask is not None:
        return apply_step(config, params, states, x, mask, guard=guard)
    one_row = ClientBatch(None, (x,), (1.0,))
    return run(Job(one_row, MaskConfig(tau=0.0), config, params, states, guard=guard)).finite


def run(job: Job) -> Outcome:
    """Aggregate and step in one launch (the guard restores what a failed block overwrote)."""
    batch = job.batch
    k = batch.num_clients
    p = batch.mean_weights
    agree = p if job.mask.weighted_agreement else (1.0,) * k
    base, offsets, weights, vec, flag = _row_table(batch, p, agree)
    threshold, scale = mask_threshold(job.mask, k)
    return _launch(job, (base, offsets, weights), k, threshold, scale, flag, vec=vec)


def step_from_sums(config: StepConfig, params: torch.Tensor, states: tuple[torch.Tensor, ...],
                   total: torch.Tensor, count: torch.Tensor, weight_sum: float,
                   threshold: float, scale: float, hard: bool, weighted: bool
                   ) -> tuple[torch.Tensor, bool, bool]:
    """The guarded server step straight from a streaming accumulator's sums, in one launch
    that reads ``S`` and ``C`` in place of the rows (no buffer of N values besides the
    guard's backup): (``[[Σ m, Σ A]]`` per block, whether ``S/Σp`` is finite, whether it
    stepped). Unless both, params and state are as they were."""
    job = Job(ClientBatch(None, (total,), (1.0,)), MaskConfig(0.0, "hard" if hard else "soft",
                                                               weighted),
              config, params, states, guard=True)
    flag = _flag(total.device)
    outcome = _launch(job, (total, count, float(weight_sum)), 1, threshold, scale, flag, vec=1,
                      from_sums=True)
    if outcome.finite:
        return outcome.sums, True, True
    # after a refusal only, which of the two: is S/Σp finite (a reduction, no N-sized copy)
    finite = float(torch.linalg.vector_norm(total, float("inf"))) / weight_sum <= _FLOAT32_MAX
    return outcome.sums, finite, False


def _launch(job: Job, source: tuple, k: int, threshold: float, scale: float,
            flag: torch.Tensor, *, vec: int, from_sums: bool = False) -> Outcome:
    """One launch of ``_gma_kernel`` over ``job``'s N columns, reading the rows (``source``:
    base, offsets, weights) or, ``from_sums``, an accumulator's sums (``source``: S, C, Σp)."""
    step, n, device = job.step, job.batch.numel, job.batch.device
    grid = triton.cdiv(n, LAUNCH["BLOCK"])
    partials = torch.empty(2 * grid, dtype=torch.float32, device=device)
    opt = OPTIMIZER_CODES[step.kind if step else None]
    states = tuple(job.states) + (None,) * (2 - len(job.states))
    guard_step = job.guard and step is not None
    backup = (torch.empty((1 + len(job.states)) * n, dtype=torch.float32, device=device)
              if guard_step else None)
    masks_step = step is not None and step.masks_step
    dummy = partials  # stands in for pointers a variant never touches
    if from_sums:
        base, sums_count, weight_sum = source
        rows = (base, dummy, dummy)
    else:
        rows, sums_count, weight_sum = source, dummy, 1.0
    _gma_kernel[(grid,)](
        *rows, n, k, float(threshold), float(scale),
        job.params if step else dummy, states[0] if states[0] is not None else dummy,
        states[1] if states[1] is not None else dummy,
        job.g_out if job.g_out is not None else dummy,
        job.a_out if job.a_out is not None else dummy,
        backup if backup is not None else dummy, partials, flag,
        float(step.lr) if step else 0.0, float(step.momentum) if step else 0.0,
        float(step.beta1) if step else 0.0, float(step.beta2) if step else 0.0,
        float(step.eps) if step else 1.0, sums_count, float(weight_sum),
        WEIGHTED=job.mask.weighted_agreement,
        HARD=job.mask.mask == "hard", OPT=opt, MASKS_STEP=masks_step, GUARD=job.guard,
        WRITE_G=job.g_out is not None, WRITE_A=job.a_out is not None, VEC=vec,
        FROM_SUMS=from_sums, **LAUNCH,
    )
    finite = not job.guard or int(flag.item()) == 0
    if not finite:
        flag.zero_()  # the device's flag is reused: leave it clear for the next guarded call
    if not finite and guard_step:
        _restore(job, backup)
    return Outcome(finite, partials.view(grid, 2))


def _restore(job: Job, backup: torch.Tensor) -> None:
    """Undo a guarded step that met a non-finite block: put back params and state."""
    n = job.batch.numel
    for i, target in enumerate((job.params, *job.states)):
        target.copy_(backup[i * n:(i + 1) * n])
