"""GMA across processes: each rank folds its share of the clients into an ``Accumulator``, and
one ``all_reduce(SUM)`` of the accumulators' buffers gives every rank the sums over all
clients (the buffer holds ``[Σ p_k Δ_k | Σ a_k sign(Δ_k) | Σ p | K]``, which add).

Recipe (gloo on CPU, NCCL on GPU)::

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    acc = Accumulator(n, device=device)
    for update, weight in shard_clients(my_clients_updates_and_weights):
        acc.add(update, [weight])
    all_reduce_accumulator(acc)          # every rank now holds the global sums
    optimizer.step_accumulated(acc)      # identical step on every rank

A rank that dies or never reaches the collective makes the others raise
``DistributedAggregationError`` (a ``RuntimeError``) naming the operation, once the process
group's timeout (or the ``timeout`` given here) has passed, instead of hanging.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .streaming import Accumulator

__all__ = ["DistributedAggregationError", "all_reduce_accumulator", "shard_clients"]

T = TypeVar("T")


class DistributedAggregationError(RuntimeError):
    """A collective over the accumulators failed: a rank died, timed out or disagreed."""


def all_reduce_accumulator(acc: Accumulator, group: dist.ProcessGroup | None = None, *,
                           timeout: float | timedelta | None = None) -> Accumulator:
    """Sum ``acc.buffer`` over every rank of ``group`` in place (one ``all_reduce(SUM)``).

    Afterwards every rank's ``acc`` holds the sums over all ranks' clients: finalize it (or
    ``ServerOptimizer.step_accumulated(acc)``) on each rank for the same result everywhere.
    ``acc.dropped`` stays the rank's own list. Every rank must pass an accumulator of the same
    size and kind (``weighted_agreement``); with NCCL the buffer must be on this rank's GPU.

    ``timeout`` (seconds or a ``timedelta``): how long to wait for the other ranks (default:
    the process group's timeout, ``init_process_group(timeout=...)``). On a dead or late rank
    raises ``DistributedAggregationError`` naming the operation; the buffer's content is then
    undefined.
    """
    if not isinstance(acc, Accumulator):
        raise TypeError(f"acc must be a gma_kernels.Accumulator, got {type(acc).__name__}")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise RuntimeError("all_reduce_accumulator needs an initialized process group: call "
                           "torch.distributed.init_process_group(...) first")
    backend = str(dist.get_backend(group))
    device = acc.buffer.device
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("the NCCL backend reduces CUDA tensors: build the Accumulator with "
                         "device='cuda' (or use the gloo backend for a CPU accumulator)")
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    what = (f"all_reduce_accumulator: all_reduce(SUM) of the GMA accumulator "
            f"({acc.buffer.numel()} float32 on {device}, backend {backend}, rank "
            f"{dist.get_rank(group)} of {dist.get_world_size(group)})")
    try:
        if timeout is None:
            dist.all_reduce(acc.buffer, op=dist.ReduceOp.SUM, group=group)
        else:
            work = dist.all_reduce(acc.buffer, op=dist.ReduceOp.SUM, group=group, async_op=True)
            if not work.wait(timeout):
                raise RuntimeError(f"not complete after {timeout.total_seconds():g} s")
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    except RuntimeError as err:  # DistBackendError, DistNetworkError are RuntimeErrors
        raise DistributedAggregationError(
            f"{what} failed: another rank died, left early or did not reach the collective "
            f"within the timeout ({type(err).__name__}: {err})") from err
    return acc


def shard_clients(clients: Sequence[T], rank: int | None = None,
                  world_size: int | None = None) -> list[T]:
    """Rank ``r``'s share of ``clients``: items ``r, r + W, r + 2W, ...`` (W = world size).

    ``rank`` and ``world_size`` default to the initialized process group's. Every client
    goes to exactly one rank, and the shares differ in size by at most one.
    """
    if rank is None or world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard_clients needs rank and world_size, or an initialized "
                               "torch.distributed process group to take them from")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(clients[rank::world_size])
