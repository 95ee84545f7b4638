"""fedsim against the other simulators, on the same FedAvg experiments, side by side in one run.

Every contender gets fedsim's own client split (identical data), fedsim's model with the same
initialization, FedAvg weighted by client size, one local epoch of SGD (batch 32, lr 0.2) and
one torch thread; the final global model is evaluated on the same test set.

* ``fedsim-cohort``: ``run_experiment`` with ``engine="cohort"`` (the whole run: data, model,
  training, evaluation at the end, metrics and model files);
* ``fedsim-sequential``: the same with ``engine="sequential"``;
* ``pfl``: Apple's pfl-research (``pip install pfl``), ``benchmarks/_pfl_runner.py``;
* ``flower``: Flower's ``run_simulation`` (Ray backend), experiment (a) only (``--flower``), in a
  process of its own;
* ``floor``: the compute floor, one forward and backward pass of the model over all of a
  round's examples in batches of 1024, times the rounds: no engine does less work on a CPU
  (timed in every repeat beside the others, so its median sees the same machine).

Experiments: (a) ``digits-mlp``: 10 clients, all every round, MLP, 30 rounds; (b)
``digits-mlp-100``: 100 clients, 10 a round, 50 rounds; (c) ``digits-cnn``: (a) with the CNN;
(d) ``default``: ``python -m fedsim.run``'s default run (FedAvg and FedGMA, 2 seeds, 2 local
epochs) against its own floor.

    pip install -e ".[sim]" pfl            # and "flwr[simulation]" for --flower
    python benchmarks/simulators.py [--repeat 3] [--flower] [--out benchmarks/results/fedsim/simulators-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.config import Config
from fedsim.loop import load_data, run_experiment
from fedsim.models import build_model

COMMON = {"dataset": "digits", "split": "shards", "local_epochs": 1, "batch_size": 32, "lr": 0.2,
          "seeds": (0,), "algorithms": ("fedavg",), "threads": 1}
EXPERIMENTS = {
    "digits-mlp": {**COMMON, "num_clients": 10, "clients_per_round": 10, "model": "mlp", "rounds": 30},
    "digits-mlp-100": {**COMMON, "num_clients": 100, "clients_per_round": 10, "model": "mlp",
                       "rounds": 50},
    "digits-cnn": {**COMMON, "num_clients": 10, "clients_per_round": 10, "model": "cnn", "rounds": 30},
    "default": {"threads": 1},
}


def run_fedsim(settings: dict, engine: str) -> dict:
    config = Config(**settings, engine=engine, eval_every=settings.get("rounds", 30))
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        rows = run_experiment(config, Path(run_dir), progress=False)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "test_acc": statistics.fmean(
        r["test_acc"] for r in rows if r["round"] == config.rounds)}


def compute_floor(settings: dict, batch: int = 1024) -> dict:
    """Seconds of one forward and backward pass over a round's examples (``local_epochs``
    times), in batches of ``batch``, times the rounds, methods and seeds of the run."""
    config = Config(**settings)
    data = load_data(config, config.seeds[0])
    model = build_model(config.model, data.input_shape, data.num_classes)
    sizes = sorted(len(y) for _, y in data.clients)
    per_round = sum(sizes[-config.clients_per_round:]) * config.local_epochs  # the largest clients
    x = torch.cat([x for x, _ in data.clients])[:batch]
    y = torch.cat([y for _, y in data.clients])[:batch]
    passes = per_round / len(y)

    def once() -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    once()
    start, repeats = time.perf_counter(), max(3, math.ceil(passes))
    for _ in range(repeats):
        once()
    seconds = (time.perf_counter() - start) / repeats * passes
    runs = config.rounds * len(config.seeds) * len(config.algorithms)
    return {"seconds": seconds * runs, "examples_per_round": per_round}


def run_pfl_experiment(settings: dict) -> dict:
    from _pfl_runner import run_pfl

    config = Config(**settings)
    data = load_data(config, config.seeds[0])

    def make_model() -> nn.Module:
        torch.manual_seed(config.seeds[0])
        return build_model(config.model, data.input_shape, data.num_classes)

    return run_pfl(list(data.clients), make_model, rounds=config.rounds,
                   clients_per_round=config.clients_per_round, lr=config.lr,
                   batch_size=config.batch_size, local_epochs=config.local_epochs,
                   test=data.test, seed=config.seeds[0])


def run_flower(settings: dict) -> dict:
    """Flower's ``run_simulation`` with its own ``FedAvg``; each client trains fedsim's model
    on fedsim's split of the same data."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    config = Config(**settings)
    client_app, server_app, result = ClientApp(), ServerApp(), {}

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return build_model(config.model, (1, 8, 8), 10)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        x, y = load_data(config, 0).clients[int(context.node_config["partition-id"])]
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=config.lr)
        perm = torch.randperm(len(y))
        for i in range(0, len(y), config.batch_size):
            idx = perm[i:i + config.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(y)})}),
                       reply_to=msg)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=config.clients_per_round / config.num_clients,
                          fraction_evaluate=0.0)
        out = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                             num_rounds=config.rounds, train_config=ConfigRecord({}))
        model = make_model()
        model.load_state_dict(out.arrays.to_torch_state_dict())
        x, y = load_data(config, 0).test
        with torch.no_grad():
            result["test_acc"] = float((model(x).argmax(1) == y).float().mean())

    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    result["seconds"] = time.perf_counter() - start
    return result


def run_isolated(fn: Callable[..., dict], *args: object) -> dict:
    """``fn(*args)`` in a fresh process (spawned), so that whatever it leaves running (Flower's
    Ray runtime) ends with it and cannot share the machine with the experiments after it."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender (median)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--flower", action="store_true", help="also run Flower on digits-mlp")
    parser.add_argument("--no-pfl", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/fedsim/simulators-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "threads": 1, "repeat": args.repeat, "experiments": {}}
    for name in args.experiments.split(","):
        settings = EXPERIMENTS[name]
        contenders = {"fedsim-cohort": lambda s=settings: run_fedsim(s, "cohort"),
                      "fedsim-sequential": lambda s=settings: run_fedsim(s, "sequential")}
        if not args.no_pfl and name != "default":
            contenders["pfl"] = lambda s=settings: run_pfl_experiment(s)
        contenders["floor"] = lambda s=settings: compute_floor(s)  # timed with the others
        results = {}
        for run in contenders.values():
            run()  # warm-up, untimed: imports, first calls, the digits file
            torch.set_num_threads(1)
        for _ in range(args.repeat):  # interleaved: each repeat runs every contender once
            for who, run in contenders.items():
                results.setdefault(who, {"runs": []})["runs"].append(run())
                torch.set_num_threads(1)  # fedsim sets it for its run; keep both sides equal
        if args.flower and name == "digits-mlp":  # one run (about 20 s), after the others
            results["flower"] = {"runs": [run_isolated(run_flower, settings)]}
        for who, entry in results.items():
            entry["seconds"] = statistics.median(r["seconds"] for r in entry["runs"])
            if who != "floor":
                entry["test_acc"] = entry["runs"][-1]["test_acc"]
        cohort = results["fedsim-cohort"]["seconds"]
        summary = {f"{who}_s": round(e["seconds"], 3) for who, e in results.items()}
        summary["cohort_vs_floor"] = round(cohort / results["floor"]["seconds"], 2)
        for who in ("fedsim-sequential", "pfl", "flower"):
            if who in results:
                summary[f"{who}_vs_cohort"] = round(results[who]["seconds"] / cohort, 2)
        summary |= {f"{who}_acc": round(e["test_acc"], 4) for who, e in results.items() if who != "floor"}
        print(name, json.dumps(summary), flush=True)
        report["experiments"][name] = {"settings": {k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in settings.items()},
                                       "summary": summary, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
