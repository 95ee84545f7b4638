"""One rank of the distributed tests: ``run(...)`` in a forked process (test_distributed.py),
or as a script: ``_dist_worker.py MODE RANK WORLD STORE_FILE OUT_DIR TIMEOUT_S [CALL_TIMEOUT_S]``.

MODE ``fold``: fold this rank's share of the clients, all-reduce, save the buffer.
MODE ``die``: rank 0 all-reduces; the other ranks exit right after joining the group.
MODE ``stall``: rank 0 all-reduces; the other ranks sleep instead of joining the collective.
Rank 0 of ``die``/``stall`` writes ``error.json`` (the error's type and message, seconds waited).
TIMEOUT_S is the process group's timeout; CALL_TIMEOUT_S, when given, is passed as
``all_reduce_accumulator(timeout=...)``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from gma_kernels import Accumulator
from gma_kernels.distributed import all_reduce_accumulator, shard_clients

NUM_CLIENTS, NUMEL = 7, 1000


def client_updates() -> tuple[list[torch.Tensor], list[float]]:
    """The same clients on every rank (and in the test process)."""
    g = torch.Generator().manual_seed(1234)
    updates = [torch.randn(NUMEL, generator=g) + 0.3 for _ in range(NUM_CLIENTS)]
    for u in updates:
        u[torch.rand(NUMEL, generator=g) < 0.05] = 0.0
    weights = [float(w) for w in torch.randint(1, 100, (NUM_CLIENTS,), generator=g)]
    return updates, weights


def run(mode: str, rank: int, world: int, store: str, out_dir: str, timeout_s: float,
        call_timeout: float | None = None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    updates, weights = client_updates()
    acc = Accumulator(NUMEL, weighted_agreement=mode == "fold_weighted")
    for k in shard_clients(list(range(NUM_CLIENTS))):
        acc.add(updates[k], [weights[k]])
    if mode.startswith("fold"):
        all_reduce_accumulator(acc)
        torch.save(acc.buffer, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
        return
    if rank != 0:
        if mode == "die":
            os._exit(0)  # leaves without a word: no destroy_process_group
        time.sleep(60)  # "stall": never reaches the collective (the test kills it)
        return
    if mode == "die":
        time.sleep(1.0)  # let the other rank be gone first
    start = time.monotonic()
    try:
        all_reduce_accumulator(acc, timeout=call_timeout)
    except Exception as err:  # noqa: BLE001 - the test checks which
        report = {"type": type(err).__name__, "message": str(err),
                  "is_runtime_error": isinstance(err, RuntimeError),
                  "seconds": time.monotonic() - start}
    else:
        report = {"type": None, "message": "", "seconds": time.monotonic() - start}
    with open(os.path.join(out_dir, "error.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)  # the group is broken: skip its teardown


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
        float(sys.argv[6]), float(sys.argv[7]) if len(sys.argv) > 7 else None)
