"""fedsim across processes: ranks started as torchrun starts them (``python -m fedsim.run`` with
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; gloo on localhost) give the metrics and final
models of a one-process run with the same seed, up to float32 summation order (integers
exactly); rank 0 alone writes; shares of unequal size (and empty ones) work; a rank that dies
makes the other exit non-zero with a clear error, and the run then resumes across ranks."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fedsim.algorithms import Round
from fedsim.checkpoint import CHECKPOINT_FILE
from fedsim.client import client_generator
from fedsim.config import Config
from fedsim.loop import Simulation, load_data, run_experiment
from fedsim.report import COLUMNS

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

REPO = Path(__file__).resolve().parents[2]
#: columns that must match exactly; the other floats to float32 summation order
EXACT = ("method", "seed", "round", "floats_down", "floats_up", "comm_vs_fedavg")
#: means over the N coordinates, summed in another order by the accumulator
MEANS = ("mask_density", "mean_agreement")


@pytest.fixture
def small(tiny) -> dict:
    """6 clients, 5 a round: every client takes part in most rounds, on one rank or another."""
    return {**tiny, "num_clients": 6, "clients_per_round": 5, "eval_every": 1,
            "adaptive_server_lr": 0.03}


def as_flags(settings: dict) -> list[str]:
    """Settings as command-line flags (lists comma-separated)."""
    return [item for key, value in settings.items() for item in
            ("--" + key.replace("_", "-"),
             ",".join(map(str, value)) if isinstance(value, tuple) else str(value))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(world: int, *args: str) -> list[subprocess.Popen]:
    """``world`` ranks of ``python -m fedsim.run ARGS``, with torchrun's environment."""
    port, procs = free_port(), []
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
             "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for rank in range(world):
        env = base | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "fedsim.run", "--quiet", *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[tuple[int, str, str]]:
    """(return code, stdout, stderr) of each rank; kills every rank still running at the end."""
    deadline, done = time.monotonic() + timeout, []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            done.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def run_ranks(world: int, settings: dict, out: Path) -> Path:
    """A distributed run of ``settings``; returns its run folder (the only one rank 0 made)."""
    results = finish(start(world, *as_flags({**settings, "out_dir": str(out)})))
    for rank, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"rank {rank}: {stderr}"
        if rank:
            assert stdout == "", "only rank 0 prints"
    (run_dir,) = out.iterdir()
    assert f"run folder: {run_dir}" in results[0][1]
    return run_dir


def run_here(settings: dict, out: Path) -> Path:
    """The same run in this process (the batch path)."""
    out.mkdir()
    run_experiment(Config(**settings), out, progress=False)
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: Path, want: Path, methods: tuple[str, ...]) -> None:
    got_rows, want_rows = rows(got), rows(want)
    assert len(got_rows) == len(want_rows) == len(methods) * len({r["round"] for r in want_rows})
    for g, w in zip(got_rows, want_rows):
        assert list(g) == list(COLUMNS)
        for key in COLUMNS:
            if key in EXACT or w[key] is None:
                assert g[key] == w[key], (key, g, w)
            else:
                torch.testing.assert_close(g[key], w[key], rtol=1e-4 if key in MEANS else 1e-5,
                                           atol=1e-6, msg=lambda m, k=key, r=w: f"{k} {r}: {m}")
    for method in methods:
        a = torch.load(got / f"model-{method}-seed0.pt", weights_only=True)
        b = torch.load(want / f"model-{method}-seed0.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- in one process

def test_client_generator_is_a_function_of_seed_round_and_client():
    perm = lambda *key: torch.randperm(50, generator=client_generator(*key))  # noqa: E731
    assert torch.equal(perm(0, 1, 2), perm(0, 1, 2))
    assert not torch.equal(perm(0, 1, 2), perm(0, 1, 3))
    assert not torch.equal(perm(0, 1, 2), perm(0, 2, 2))
    assert not torch.equal(perm(0, 1, 2), perm(1, 1, 2))


@pytest.mark.parametrize("engine", ["sequential", "cohort"])
def test_a_client_trains_the_same_whoever_trains_with_it(tiny, engine):
    """Client 2's update alone, after others, and among others in one cohort: the same (bit for
    bit one after another; to float32 rounding in a batched cohort)."""
    config = Config(**tiny, engine=engine)
    sim = Simulation(config, load_data(config, 0), "fedavg", 0)

    def train(ids: list[int]) -> torch.Tensor:
        """The last client's update."""
        rnd = Round(sim.server, sim.trainer, [ids], 0, 1)
        cohort = rnd.cohort(ids)
        sim.algorithm.local_train(rnd, cohort)
        return cohort.updates()[-1].clone()

    alone = train([2])
    train([0]), train([1])
    assert torch.equal(train([2]), alone)
    together = train([0, 1, 2])
    if engine == "sequential":
        assert torch.equal(together, alone)
    else:
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- across processes

def test_two_ranks_equal_one_process(tmp_path, small):
    methods = ("fedavg", "fedgma", "scaffold+gma", "fedga", "fedadam+gma")
    settings = {**small, "algorithms": methods}
    dist_dir = run_ranks(2, settings, tmp_path / "ranks")
    here = run_here(settings, tmp_path / "here")
    assert_same_run(dist_dir, here, methods)
    report = {"config.toml", "results.json", "results.md", "accuracy.png"}
    assert {p.name for p in dist_dir.iterdir()} == {p.name for p in here.iterdir()} | report
    assert json.loads((dist_dir / "results.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("world, per_round", [(3, 5), (2, 1)], ids=["shares-2-2-1", "shares-1-0"])
def test_unequal_or_empty_shares(tmp_path, small, world, per_round):
    """The exchanges of SCAFFOLD, FedGA and FedGMA v1 with shares of unequal size, and with a
    rank that has no client in a round."""
    methods = ("scaffold", "fedga", "fedgma-v1+gma")
    settings = {**small, "clients_per_round": per_round, "algorithms": methods}
    assert_same_run(run_ranks(world, settings, tmp_path / "ranks"),
                    run_here(settings, tmp_path / "here"), methods)


def test_a_dead_rank_fails_the_other_and_the_run_resumes(tmp_path, small):
    """SIGKILL rank 1 after the first checkpoint: rank 0 exits 1 with the error at once; the
    run then resumes on two ranks (each reads the checkpoint) to the one-process result."""
    methods = ("fedavg", "scaffold")
    settings = {**small, "rounds": 10, "eval_every": 3, "checkpoint_every": 1,
                "algorithms": methods}
    out = tmp_path / "ranks"
    procs = start(2, *as_flags({**settings, "out_dir": str(out)}), "--dist-timeout", "30")
    deadline = time.monotonic() + 60
    while not (seen := bool(list(out.glob(f"*/{CHECKPOINT_FILE}")))) \
            and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.005)
    if seen:
        procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    (code, _, stderr), _ = finish(procs, 30)
    assert seen, f"no checkpoint before a rank exited or within 60 s: {stderr}"
    assert time.monotonic() - killed < 20
    assert code == 1, stderr
    assert "error:" in stderr and "another rank died" in stderr and "rank 0 of 2" in stderr
    (run_dir,) = out.iterdir()
    assert not (run_dir / "results.json").exists(), "the run finished before the kill"

    results = finish(start(2, "--resume", str(run_dir)))
    assert [code for code, _, _ in results] == [0, 0], results[0][2] + results[1][2]
    assert_same_run(run_dir, run_here(settings, tmp_path / "here"), methods)
