"""gma_kernels.distributed: sharding, and accumulators all-reduced across two gloo processes
(equal to one process folding every client; a rank that dies or stalls makes the other raise
a clear error within the timeout)."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gma_kernels as gk
from _dist_worker import NUM_CLIENTS, NUMEL, client_updates, run
from gma_kernels.distributed import (DistributedAggregationError, all_reduce_accumulator,
                                     shard_clients)

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    # Python >= 3.12 warns on fork from a multi-threaded process: the ranks run no OpenMP
    # region (their tensors are far below PyTorch's parallel grain) and every join is bounded
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]
#: fork: the ranks start in milliseconds with torch already imported (spawn where unavailable)
CONTEXT = multiprocessing.get_context(
    "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def launch(mode: str, tmp_path: Path, timeout_s: float, call_timeout: float | None = None
           ) -> list[multiprocessing.Process]:
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = str(tmp_path / f"store-{mode}")
    procs = [CONTEXT.Process(target=run, args=(mode, rank, 2, store, str(tmp_path), timeout_s,
                                                call_timeout), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    return procs


def finish(procs: list[multiprocessing.Process], timeout: float) -> list[int | None]:
    """Wait for each process (at most ``timeout`` s each), killing those still running."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def test_shard_clients():
    clients = list(range(10))
    shards = [shard_clients(clients, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert shard_clients("abc", 0, 1) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="rank"):
        shard_clients(clients, 3, 3)
    with pytest.raises(ValueError, match="world_size"):
        shard_clients(clients, 0, 0)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="process group"):
            shard_clients(clients)


def test_all_reduce_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_accumulator(gk.Accumulator(4))
    with pytest.raises(TypeError, match="Accumulator"):
        all_reduce_accumulator(torch.zeros(4))


def test_two_ranks_equal_one_process(tmp_path):
    assert finish(launch("fold", tmp_path, 20), 60) == [0, 0]
    reduced = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(reduced[0], reduced[1])  # every rank holds the same sums

    updates, weights = client_updates()
    single = gk.Accumulator(NUMEL)
    for u, w in zip(updates, weights):
        single.add(u, [w])
    merged = gk.Accumulator(NUMEL)
    merged.buffer.copy_(reduced[0])
    assert merged.num_clients == NUM_CLIENTS and merged.weight_sum == sum(weights)
    assert torch.equal(merged.count, single.count)  # sign counts: exact integers
    torch.testing.assert_close(merged.total, single.total, rtol=1e-5, atol=1e-4)
    for mask in ("soft", "hard"):
        torch.testing.assert_close(merged.masked_mean(tau=0.4, mask=mask),
                                   gk.masked_mean(updates, weights, tau=0.4, mask=mask),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["die", "stall"])
def test_dead_rank_raises_clear_error_within_timeout(tmp_path, mode):
    """``die``: the other rank exits right after joining (gloo sees the closed connection);
    ``stall``: it never reaches the collective (the 4 s call timeout fires)."""
    start = time.monotonic()
    procs = launch(mode, tmp_path, 30 if mode == "stall" else 8, 4)
    finish(procs[:1], 40)
    finish(procs[1:], 1)  # kills the stalled rank
    report = json.loads((tmp_path / "error.json").read_text())
    assert report["type"] == DistributedAggregationError.__name__ and report["is_runtime_error"]
    assert "all_reduce_accumulator" in report["message"]
    assert "another rank died" in report["message"]
    assert report["seconds"] < (6 if mode == "stall" else 3)
    assert time.monotonic() - start < 40
