"""The same FedAvg experiment run by fedsim and by Flower's simulation runtime, side by side.

10 clients holding two label shards each of the embedded 8×8 digits (fedsim's own split, so both
see identical client data), fedsim's MLP, 30 rounds of one local epoch (batch 32, lr 0.2),
every client every round; the final global model is evaluated on the same test set. Flower runs
``flwr.simulation.run_simulation`` (Ray backend, one CPU per client) with its own ``FedAvg``.

    pip install -e ".[sim,flower]" "flwr[simulation]"
    python benchmarks/flower_vs_fedsim.py [--rounds 30] [--out benchmarks/results/flower-vs-fedsim.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fedsim.config import Config
from fedsim.data import load_federated
from fedsim.loop import run_experiment
from fedsim.models import build_model

SETTINGS = {"dataset": "digits", "num_clients": 10, "clients_per_round": 10, "split": "shards",
            "model": "mlp", "local_epochs": 1, "batch_size": 32, "lr": 0.2, "seeds": (0,),
            "algorithms": ("fedavg",), "threads": 1}
ROUNDS = int(os.environ.get("FLOWER_VS_FEDSIM_ROUNDS", "30"))


def client_data():
    data = load_federated("digits", num_clients=10, split="shards", seed=0)
    return data, (1, 8, 8), data.num_classes


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", (1, 8, 8), 10)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_fedsim(rounds: int) -> dict:
    config = Config(**SETTINGS, rounds=rounds, eval_every=rounds)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        rows = run_experiment(config, Path(run_dir), progress=False)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "test_acc": rows[-1]["test_acc"]}


def run_flower(rounds: int) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    client_app, server_app, result = ClientApp(), ServerApp(), {}

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        data, _, _ = client_data()
        x, y = data.clients[int(context.node_config["partition-id"])]
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=SETTINGS["lr"])
        perm = torch.randperm(len(y))
        for i in range(0, len(y), SETTINGS["batch_size"]):
            idx = perm[i:i + SETTINGS["batch_size"]]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(y)})}),
                       reply_to=msg)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        out = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                             num_rounds=rounds, train_config=ConfigRecord({}))
        model = make_model()
        model.load_state_dict(out.arrays.to_torch_state_dict())
        data, _, _ = client_data()
        result["test_acc"] = accuracy(model, *data.test)

    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=10,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", default="benchmarks/results/flower-vs-fedsim.json")
    args = parser.parse_args()
    fedsim = run_fedsim(args.rounds)  # cold: the process's first run (imports, data, first calls)
    fedsim["warm_seconds"] = run_fedsim(args.rounds)["seconds"]
    print(f"fedsim: {fedsim['seconds']:.2f} s cold, {fedsim['warm_seconds']:.2f} s warm, "
          f"test accuracy {fedsim['test_acc']:.4f}", flush=True)
    flower = run_flower(args.rounds)
    print(f"Flower run_simulation: {flower['seconds']:.2f} s, test accuracy "
          f"{flower['test_acc']:.4f}")
    report = {"rounds": args.rounds, "settings": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in SETTINGS.items()},
              "fedsim": fedsim, "flower": flower, "speedup": flower["seconds"] / fedsim["seconds"],
              "speedup_warm": flower["seconds"] / fedsim["warm_seconds"],
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"fedsim is {report['speedup']:.1f}x faster cold, {report['speedup_warm']:.1f}x warm")


if __name__ == "__main__":
    main()
