"""GMAFedAvg with Flower: a complete ServerApp and ClientApp, run in Flower's simulation.

Three SuperNodes train a small MLP on non-IID synthetic data (each node sees mostly its own
classes, so the clients' updates disagree); the server aggregates with gradient masked
averaging (``GMAFedAvg``) instead of FedAvg. No dataset download.

    pip install "gma-kernels[flower]" "flwr[simulation]"
    python examples/flower_example.py [--rounds 2] [--nodes 3] [--strategy fedgma|gmafedadam|fedavg]

To deploy instead of simulating, point ``flwr run`` at ``server_app`` and ``client_app``.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from gma_kernels.integrations.flower import GMAFedAdam, GMAFedAvg

NUM_CLASSES, FEATURES = 4, 20


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def make_data(partition: int, num_partitions: int, n: int = 256):
    """Class-conditional Gaussians; partition p draws 80% of its examples from class p % 4."""
    g = torch.Generator().manual_seed(1000 + partition)
    centers = torch.randn(NUM_CLASSES, FEATURES, generator=torch.Generator().manual_seed(7))
    main_class = partition % NUM_CLASSES
    y = torch.where(torch.rand(n, generator=g) < 0.8, torch.full((n,), main_class),
                    torch.randint(0, NUM_CLASSES, (n,), generator=g))
    x = centers[y] + 0.8 * torch.randn(n, FEATURES, generator=g)
    return x, y


# ----------------------------------------------------------------------------- ClientApp

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = make_data(int(context.node_config["partition-id"]),
                     int(context.node_config["num-partitions"]))
    lr = float(msg.content["config"]["lr"])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(int(msg.content["config"]["local-epochs"])):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            opt.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss.item(),
                                                   "num-examples": len(x)})})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = make_data(int(context.node_config["partition-id"]) + 100,
                     int(context.node_config["num-partitions"]))
    with torch.no_grad():
        logits = model(x)
    metrics = MetricRecord({"eval_loss": float(nn.functional.cross_entropy(logits, y)),
                            "eval_acc": float((logits.argmax(1) == y).float().mean()),
                            "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- ServerApp

server_app = ServerApp()
STRATEGIES = {
    "fedgma": lambda: GMAFedAvg(gma_tau=0.4, mask="soft", server_learning_rate=1.0),
    "gmafedadam": lambda: GMAFedAdam(gma_tau=0.4, eta=0.05, eta_l=0.1),
    "fedavg": lambda: FedAvg(),
}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    name = os.environ.get("GMA_EXAMPLE_STRATEGY", "fedgma")
    rounds = int(os.environ.get("GMA_EXAMPLE_ROUNDS", "2"))
    strategy = STRATEGIES[name]()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                            num_rounds=rounds,
                            train_config=ConfigRecord({"lr": 0.1, "local-epochs": 1}))
    print(f"\n== {name}: {rounds} rounds ==")
    for r, metrics in result.train_metrics_clientapp.items():
        print(f"round {r} train: {dict(metrics)}")
    for r, metrics in result.evaluate_metrics_clientapp.items():
        print(f"round {r} evaluate: {dict(metrics)}")
    if getattr(strategy, "last_stats", None) is not None:
        print(f"last GMA round: {strategy.last_stats.as_dict()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="fedgma")
    args = parser.parse_args()
    os.environ["GMA_EXAMPLE_STRATEGY"] = args.strategy  # the ServerApp runs in this process
    os.environ["GMA_EXAMPLE_ROUNDS"] = str(args.rounds)
    start = time.monotonic()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    print(f"simulation took {time.monotonic() - start:.1f} s")
