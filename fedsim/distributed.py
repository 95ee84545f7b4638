"""fedsim across processes: each round's sampled clients shared over the ranks of a
``torch.distributed`` process group (``torchrun --nproc-per-node N -m fedsim.run ...``).

Every rank holds the whole simulation (data, global model, server optimizer, algorithm state)
and draws the same client sample; rank ``r`` of ``W`` trains clients ``r, r + W, ...`` of it
(``gma_kernels.distributed.shard_clients``), each with its own shuffling generator (a function
of seed, round and client only, so any rank trains any client identically). The ranks then
combine their clients' uploads with collectives and every rank takes the same server step:

* model updates: each rank folds its clients into a ``gma_kernels.Accumulator``
  (``fedsim.server.Aggregation``), one ``all_reduce`` of its ``2N + 2`` floats
  (``Collective.reduce_accumulator``), then ``ServerOptimizer.step_accumulated``;
* sums over the clients (FedGA's ``Σ p_k g_k``): one ``all_reduce`` (``Collective.all_reduce_``);
* per-client values every rank needs (the losses, SCAFFOLD's new ``c_k``): one ``all_gather``,
  returned in the sampled order (``Collective.gather``).

Algorithms reach these through ``server.comm``. The base ``Collective`` is one process: every
operation is the identity. This module only communicates: the GMA math stays with the
server. ``ProcessGroupCollective`` runs them over a process group;
a rank that dies or stalls makes the others raise
``gma_kernels.distributed.DistributedAggregationError`` (a ``RuntimeError``) naming the
operation, instead of hanging.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from gma_kernels import Accumulator
from gma_kernels.distributed import (DistributedAggregationError, all_reduce_accumulator,
                                     shard_clients)

__all__ = ["Collective", "DistributedAggregationError", "ProcessGroupCollective",
           "current_collective", "distributed_session", "env_world_size"]

T = TypeVar("T")
#: default seconds a rank waits for the others at a collective (``--dist-timeout``)
DEFAULT_TIMEOUT_S = 600.0


class Collective:
    """The ranks a round's clients are shared over. This base class is a single process: it
    keeps every client, and every exchange is the identity."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that evaluates and writes files."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (the same list on every rank): items
        ``rank, rank + W, ...``."""
        return shard_clients(items, self.rank, self.world_size)

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        return tensor

    def gather(self, rows: Sequence[Tensor], like: Tensor) -> list[Tensor]:
        """Every sampled client's row, in the sampled order, on every rank, from this rank's
        ``rows`` (one per client of its ``shard``, in that order). ``like`` gives a row's
        shape, dtype and device (a rank may have no client)."""
        return list(rows)

    def reduce_accumulator(self, acc: Accumulator) -> Accumulator:
        """``acc`` summed over the ranks, in place (every rank gets the total)."""
        return acc

    def barrier(self) -> None:
        """Wait for every rank."""

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable), on every rank."""
        return obj


class ProcessGroupCollective(Collective):
    """The exchanges over a ``torch.distributed`` process group (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ProcessGroupCollective needs an initialized process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def _run(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, its collective's failure raised as ``DistributedAggregationError``."""
        try:
            return call()
        except DistributedAggregationError:
            raise
        except RuntimeError as err:  # DistBackendError, DistNetworkError are RuntimeErrors
            raise DistributedAggregationError(
                f"fedsim: {what} (backend {self.backend}, rank {self.rank} of "
                f"{self.world_size}) failed: another rank died, left early or did not reach "
                f"the collective within the timeout ({type(err).__name__}: {err})") from err

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        self._run(f"all_reduce(SUM) of {tensor.numel()} {tensor.dtype}",
                  lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group))
        return tensor

    def gather(self, rows: Sequence[Tensor], like: Tensor) -> list[Tensor]:
        world = self.world_size
        counts = [torch.zeros(1, dtype=torch.int64, device=like.device) for _ in range(world)]
        mine = torch.tensor([len(rows)], dtype=torch.int64, device=like.device)
        self._run("all_gather of the client counts",
                  lambda: dist.all_gather(counts, mine, group=self.group))
        sizes = [int(c) for c in counts]
        total = sum(sizes)
        if sizes != [len(range(r, total, world)) for r in range(world)]:
            raise ValueError(f"gather: the ranks hold {sizes} rows; expected the shares of "
                             f"Collective.shard ({total} clients over {world} ranks)")
        block = torch.zeros((max(sizes), *like.shape), dtype=like.dtype, device=like.device)
        for i, row in enumerate(rows):
            block[i].copy_(row)
        blocks = [torch.empty_like(block) for _ in range(world)]
        self._run(f"all_gather of {len(rows)} client rows of {like.numel()} {like.dtype}",
                  lambda: dist.all_gather(blocks, block, group=self.group))
        return [blocks[i % world][i // world].clone() for i in range(total)]  # shard i%W, row i//W

    def reduce_accumulator(self, acc: Accumulator) -> Accumulator:
        return all_reduce_accumulator(acc, self.group)

    def barrier(self) -> None:
        self._run("barrier", lambda: dist.barrier(group=self.group))

    def broadcast_object(self, obj: T) -> T:
        box: list[Any] = [obj]
        self._run("broadcast from rank 0",
                  lambda: dist.broadcast_object_list(box, src=0, group=self.group))
        return box[0]


def current_collective() -> Collective:
    """The default process group's ``ProcessGroupCollective`` when one is initialized, else
    the single process."""
    if dist.is_available() and dist.is_initialized():
        return ProcessGroupCollective()
    return Collective()


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it; 1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def distributed_session(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
                        ) -> Iterator[Collective]:
    """The ranks of this run: with ``WORLD_SIZE > 1`` in the environment (torchrun sets it,
    with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), joins the default process
    group (gloo for a CPU ``device``, NCCL on CUDA, each rank on GPU ``LOCAL_RANK``) with
    ``timeout_s`` as its timeout, and leaves it at the end. A group initialized by the caller
    is used as it is and left alone; otherwise the single process. After an error the group is
    not torn down (a failed collective leaves it broken, and teardown could block)."""
    if dist.is_available() and dist.is_initialized():
        yield ProcessGroupCollective()
        return
    if env_world_size() <= 1:
        yield Collective()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    backend = "gloo"
    if device.type == "cuda":
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device={device} would put every rank on one GPU: give "
                             "--device cuda (each rank then uses GPU LOCAL_RANK)")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    comm = ProcessGroupCollective()
    yield comm
    # after a clean run only (a failure may have broken the group): wait until every rank is
    # done with the group, so that none tears its connections down under another's feet
    comm.barrier()
    dist.destroy_process_group()
