"""The Triton kernels, each beside its launcher: ``_aggregate_kernel`` (``run``: the rows to
``g``, ``A`` and the server step in one pass), ``_from_sums_kernel`` (``step_from_sums``: the
same step from a streaming accumulator's sums), ``_fold_kernel`` (``fold``) and
``_nonfinite_kernel`` (``nonfinite_rows``). They share small ``@triton.jit`` helpers: ``_mask``
(``A = |count|·scale``; ``m = 1`` where ``|count| ≥ threshold``, else ``A`` or 0), ``_step``
(the optimizer's state update and parameter write), ``_finite`` and ``_checked`` (the guard).

Each program owns ``BLOCK`` coordinates. The aggregate kernel reads that slice of each of the
K updates once (through a table of K row offsets from one base tensor, so a list of tensors is
read where it lies) and accumulates the weighted sum and the sign count in registers. K and N
are runtime arguments (no recompilation when the number of clients changes).

Guard: where a block's aggregate, or the new params or state it steps to, is non-finite the
program writes nothing and raises a flag; every program saves the old parameters/state it
overwrites into ``backup`` so the launcher can restore them. Per-program partial sums of ``m``
and ``A`` give the mask statistics. Arguments a variant never reads are passed as None.

``step`` (a step on a known ``g``) is the aggregate kernel reading ``g`` as its only row,
every coordinate kept (``formula.apply_step`` when a mask multiplies the step).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

from ..batch import ClientBatch
from ..config import MaskConfig, StepConfig
from ..formula import MaskParams, StreamSums, apply_step, streaming_result
from ..job import Job, Outcome

finish = streaming_result  # the streaming result: a few element-wise ops, not worth a kernel

_FLOAT32_MAX = torch.finfo(torch.float32).max
OPTIMIZER_CODES = {None: 0, "sgd": 1, "momentum": 2, "adam": 3, "yogi": 4, "adagrad": 5}


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _finite(x):
    """Neither NaN nor ±inf."""
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _checked(valid, fine, flag):
    """Whether ``fine`` holds at every valid coordinate of the block; if not, raise ``flag``."""
    n_bad = tl.sum((valid & ~fine).to(tl.int32), axis=0)
    if n_bad > 0:
        tl.store(flag, 1)
    return n_bad == 0


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


@triton.jit
def _mask(count, threshold, scale, HARD: tl.constexpr):
    """(m, A): ``A = |count|·scale``; ``m = 1`` where ``|count| ≥ threshold``, else ``A``
    (soft) or 0 (hard)."""
    score = tl.abs(count)
    agree = score * scale
    keep = score >= threshold
    if HARD:
        m = keep.to(tl.float32)
    else:
        m = tl.where(keep, 1.0, agree)
    return m, agree


@triton.jit
def _block_sums(partials, pid, m, agree, valid):
    """This program's ``Σ m`` and ``Σ A`` into ``partials[pid]``."""
    tl.store(partials + 2 * pid, tl.sum(tl.where(valid, m, 0.0), axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum(tl.where(valid, agree, 0.0), axis=0))


@triton.jit
def _step(x, m, offs, valid, ok, N, params, state1, state2, backup, flag, lr, momentum, beta1,
          beta2, eps, OPT: tl.constexpr, MASKS_STEP: tl.constexpr, GUARD: tl.constexpr):
    """The server step on ``x`` (``direction · m`` when MASKS_STEP), written where ``ok``:
    sgd ``d = x``; momentum ``v = β v + x, d = v``; adam/yogi/adagrad (OPT 3/4/5)
    ``m1 = β1 m1 + (1−β1) x``, ``v`` per kind, ``d = m1 / (√v + ε)``; ``w += lr · d``.
    With GUARD the old values go to ``backup`` first, and a block writes none of its new
    values unless all are finite (a finite aggregate can still overflow in the step)."""
    w = tl.load(params + offs, mask=valid, other=0.0)
    if GUARD:
        tl.store(backup + offs, w, mask=valid)
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
        fine = _finite(new_w)
        if OPT >= 2:
            fine = fine & _finite(first)
        if OPT >= 3:
            fine = fine & _finite(second)
        ok = ok & _checked(valid, fine, flag)
    if OPT >= 2:
        tl.store(state1 + offs, first, mask=ok)
    if OPT >= 3:
        tl.store(state2 + offs, second, mask=ok)
    tl.store(params + offs, new_w, mask=ok)


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


@triton.jit(do_not_specialize=["N", "K"])
def _aggregate_kernel(base, offsets, weights, N, K, threshold, scale, g_out, a_out, partials,
                      flag, params, state1, state2, backup, lr, momentum, beta1, beta2, eps,
                      WEIGHTED: tl.constexpr, HARD: tl.constexpr, OPT: tl.constexpr,
                      MASKS_STEP: tl.constexpr, GUARD: tl.constexpr, WRITE_G: tl.constexpr,
                      WRITE_A: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
                      UNROLL: tl.constexpr):
    """``S = Σ_k p̄_k x_k``, ``C = Σ_k a_k sign(x_k)``, the mask from C, ``g = m · S`` (to
    ``g_out``), ``A`` (to ``a_out``) and, with OPT > 0, the step on ``g`` (on ``S`` with
    ``m`` on the direction when MASKS_STEP)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    total, count = _accumulate(base, offsets, weights, K, offs, valid, BLOCK, VEC, WEIGHTED,
                               UNROLL)
    m, agree = _mask(count, threshold, scale, HARD)
    _block_sums(partials, pid, m, agree, valid)
    g = m * total
    ok = valid
    if GUARD:
        ok = valid & _checked(valid, _finite(total), flag)
    if WRITE_A:
        tl.store(a_out + offs, agree, mask=valid)
    if WRITE_G:
        tl.store(g_out + offs, g, mask=ok)
    if OPT > 0:
        if MASKS_STEP:
            x = total
        else:
            x = g
        _step(x, m, offs, valid, ok, N, params, state1, state2, backup, flag, lr, momentum,
              beta1, beta2, eps, OPT, MASKS_STEP, GUARD)


def run(job: Job) -> Outcome:
    """Aggregate and step in one launch (the guard restores what a failed block overwrote)."""
    batch = job.batch
    k, n = batch.num_clients, batch.numel
    p = batch.mean_weights
    agree = p if job.mask.weighted_agreement else (1.0,) * k
    base, offsets, weights, vec, flag = _row_table(batch, p, agree)
    mask = job.mask_params
    grid = triton.cdiv(n, LAUNCH["BLOCK"])
    partials = torch.empty(2 * grid, dtype=torch.float32, device=batch.device)
    targets = (job.params, *job.states) if job.step is not None else ()
    backup = _backup(targets) if job.guard else None
    _aggregate_kernel[(grid,)](
        base, offsets, weights, n, k, float(mask.threshold), float(mask.scale), job.g_out,
        job.a_out, partials, flag, **_step_arguments(job.step, targets, backup),
        WEIGHTED=mask.weighted, HARD=mask.hard, GUARD=job.guard,
        WRITE_G=job.g_out is not None, WRITE_A=job.a_out is not None, VEC=vec, **LAUNCH)
    finite = not job.guard or _flag_clear(flag, targets, backup)
    return Outcome(finite, partials.view(grid, 2))


def step(*, config: StepConfig, params: torch.Tensor, states: tuple[torch.Tensor, ...],
         x: torch.Tensor, mask: torch.Tensor | None = None, guard: bool = False) -> bool:
    """A server step on a known ``g = x`` in place; returns whether it stepped (with ``guard``,
    nothing is written unless every new value is finite)."""
    if mask is not None:
        return apply_step(config=config, params=params, states=states, x=x, mask=mask,
                          guard=guard)
    one_row = ClientBatch(None, (x,), (1.0,))
    return run(Job(one_row, MaskConfig(tau=0.0), config, params, states, guard=guard)).finite


@triton.jit(do_not_specialize=["N"])
def _from_sums_kernel(total_ptr, count_ptr, weight_sum, N, threshold, scale, partials, flag,
                      params, state1, state2, backup, lr, momentum, beta1, beta2, eps,
                      WEIGHTED: tl.constexpr, HARD: tl.constexpr, OPT: tl.constexpr,
                      MASKS_STEP: tl.constexpr, BLOCK: tl.constexpr):
    """The guarded step from a streaming accumulator's sums: the mean ``S / Σp``, the mask
    from ``C`` (``C / Σp`` when WEIGHTED) and the step on ``m · S/Σp`` (on ``S/Σp`` with ``m``
    on the direction when MASKS_STEP)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    total = tl.div_rn(tl.load(total_ptr + offs, mask=valid, other=0.0), weight_sum)
    count = tl.load(count_ptr + offs, mask=valid, other=0.0)
    if WEIGHTED:
        count = tl.div_rn(count, weight_sum)
    m, agree = _mask(count, threshold, scale, HARD)
    _block_sums(partials, pid, m, agree, valid)
    ok = valid & _checked(valid, _finite(total), flag)
    if MASKS_STEP:
        x = total
    else:
        x = m * total
    _step(x, m, offs, valid, ok, N, params, state1, state2, backup, flag, lr, momentum, beta1,
          beta2, eps, OPT, MASKS_STEP, True)


def step_from_sums(sums: StreamSums, *, mask: MaskParams, config: StepConfig,
                   params: torch.Tensor, states: tuple[torch.Tensor, ...]
                   ) -> tuple[torch.Tensor, bool, bool]:
    """The guarded server step straight from a streaming accumulator's sums, in one launch
    that reads ``S`` and ``C`` in place of the rows (no buffer of N values besides the
    guard's backup): (``[[Σ m, Σ A]]`` per block, whether ``S/Σp`` is finite, whether it
    stepped). Unless both, params and state are as they were."""
    n = sums.total.numel()
    grid = triton.cdiv(n, LAUNCH["BLOCK"])
    partials = torch.empty(2 * grid, dtype=torch.float32, device=sums.total.device)
    flag = _flag(sums.total.device)
    targets = (params, *states)
    backup = _backup(targets)
    _from_sums_kernel[(grid,)](
        sums.total, sums.count, float(sums.weight_sum), n, float(mask.threshold),
        float(mask.scale), partials, flag, **_step_arguments(config, targets, backup),
        WEIGHTED=mask.weighted, HARD=mask.hard, **_launch_options())
    stats = partials.view(grid, 2)
    if _flag_clear(flag, targets, backup):
        return stats, True, True
    # after a refusal only, which of the two: is S/Σp finite (a reduction, no N-sized copy)
    biggest = float(torch.linalg.vector_norm(sums.total, float("inf")))
    return stats, biggest / sums.weight_sum <= _FLOAT32_MAX, False


_STEP_ARGUMENTS = ("params", "state1", "state2", "backup", "lr", "momentum", "beta1", "beta2",
                   "eps")


def _step_arguments(config: StepConfig | None, targets: tuple[torch.Tensor, ...],
                    backup: torch.Tensor | None) -> dict:
    """The kernels' step arguments by name: ``targets`` (params, then the states) and the
    config's scalars; None for what the step (or no step, OPT 0) does not read."""
    if config is None:
        return dict.fromkeys(_STEP_ARGUMENTS) | {"OPT": OPTIMIZER_CODES[None], "MASKS_STEP": False}
    params, state1, state2 = targets + (None,) * (3 - len(targets))
    return {"params": params, "state1": state1, "state2": state2, "backup": backup,
            "lr": float(config.lr), "momentum": float(config.momentum),
            "beta1": float(config.beta1), "beta2": float(config.beta2),
            "eps": float(config.eps), "OPT": OPTIMIZER_CODES[config.kind],
            "MASKS_STEP": config.masks_step}


def _backup(targets: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The guard's backup of the stepped tensors (None without a step)."""
    if not targets:
        return None
    n = targets[0].numel()
    return torch.empty(len(targets) * n, dtype=torch.float32, device=targets[0].device)


def _flag_clear(flag: torch.Tensor, targets: tuple[torch.Tensor, ...],
                backup: torch.Tensor | None) -> bool:
    """Whether the guard flag stayed clear; if not, clear it (the device's flag is reused) and
    put back the ``targets`` from ``backup``."""
    if int(flag.item()) == 0:
        return True
    flag.zero_()
    if backup is not None:
        n = targets[0].numel()
        for i, target in enumerate(targets):
            target.copy_(backup[i * n:(i + 1) * n])
    return False


def _launch_options() -> dict:
    """``LAUNCH`` without the K-loop's unrolling, for the kernels that have no K loop."""
    return {key: LAUNCH[key] for key in ("BLOCK", "num_warps", "num_stages")}


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


def fold(batch: ClientBatch, *, total: torch.Tensor, count: torch.Tensor, weighted: bool
         ) -> None:
    """Streaming fold in place: ``total += Σ p_k x_k``, ``count += Σ a_k sign(x_k)`` (raw
    weights ``p_k``; ``a_k = p_k`` when ``weighted``, else 1 — the kernel counts exactly)."""
    p = batch.weights
    base, offsets, weights, vec, _ = _row_table(batch, p, p if weighted else (1.0,) * len(p))
    _fold_kernel[(triton.cdiv(batch.numel, LAUNCH["BLOCK"]),)](
        base, offsets, weights, batch.numel, batch.num_clients, total, count,
        WEIGHTED=weighted, VEC=vec, **LAUNCH)


@triton.jit(do_not_specialize=["N", "K"])
def _nonfinite_kernel(base, offsets, N, K, flags, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """``flags[k] = 1`` where row k holds a NaN or an infinity in this program's block (every
    writer writes the same 1, so their order does not matter)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    for k in range(0, K):
        x = _load_client(base, offsets, k, offs, valid, VEC)
        _checked(valid, _finite(x), flags + k)


def nonfinite_rows(batch: ClientBatch) -> list[int]:
    """The clients whose update holds a NaN or an infinity: one launch that reads each row once
    (no buffer of N, unlike ``torch.isfinite``), one device sync for all. It reads the rows
    through the unweighted fold's table, which the accumulator's fold then finds cached."""
    p = batch.weights
    base, offsets, _, vec, _ = _row_table(batch, p, (1.0,) * len(p))
    flags = torch.zeros(batch.num_clients, dtype=torch.int32, device=batch.device)
    _nonfinite_kernel[(triton.cdiv(batch.numel, LAUNCH["BLOCK"]),)](
        base, offsets, batch.numel, batch.num_clients, flags, VEC=vec, **_launch_options())
    return torch.nonzero(flags).flatten().tolist()
