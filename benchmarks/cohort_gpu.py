"""The cohort engine's GPU targets, both engines side by side, in one prepared run.

(1) A Colored-MNIST-sized round: 60,000 examples of 2×28×28 over 10 clients, the 28×28 CNN
(1.66 M parameters), one local epoch, batch 32, FedAvg (target: under 1 s with the cohort
engine on an H100/H200). (2) 100 clients a round of 600 examples each, the same model
(target: at least 10× the sequential engine's throughput). Synthetic images (timing only:
the machine may have no dataset files); each round timed after a warm-up round, with CUDA
synchronized around it.

    python benchmarks/cohort_gpu.py --device cuda --out gpu-cohort.json
    python benchmarks/cohort_gpu.py --device cpu --scale 0.01     # a smoke test anywhere
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from fedsim.algorithms import build_algorithm
from fedsim.client import ClientData, build_trainer
from fedsim.config import Config
from fedsim.heap import reused_heap
from fedsim.loop import play_round
from fedsim.models import build_model
from fedsim.server import Server


def timed_round(engine: str, clients: int, per_client: int, device: torch.device,
                rounds: int = 2) -> dict:
    g = torch.Generator(device).manual_seed(0)
    data = ClientData([(torch.rand(per_client, 2, 28, 28, device=device, generator=g),
                        torch.randint(0, 2, (per_client,), device=device, generator=g))
                       for _ in range(clients)])
    config = Config(device=str(device), lr=0.05, algorithms=("fedavg",), num_clients=clients,
                    clients_per_round=clients)
    torch.manual_seed(0)
    model = build_model("cnn", (2, 28, 28), 2).to(device)
    trainer = build_trainer(engine, copy.deepcopy(model), data, lr=config.lr, batch_size=32,
                            local_epochs=1, cohort_size=clients)
    algorithm = build_algorithm("fedavg", config)
    server = Server(model, config, masked=False)
    algorithm.setup(server)
    seconds = []
    for r in range(rounds + 1):  # round 0: warm-up (cuDNN plans, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        metrics = play_round(algorithm, server, trainer, list(range(clients)), round_=r)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    best = min(seconds[1:])
    return {"engine": engine, "clients": clients, "examples_per_client": per_client,
            "round_s": best, "examples_per_s": clients * per_client / best,
            "train_loss": metrics["train_loss"],
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9
            if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the examples")
    parser.add_argument("--out", default="benchmarks/results/fedsim/cohort-gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    results = []
    with reused_heap():  # as in run_experiment
        for clients, per_client in ((10, 6000), (100, 600)):
            n = max(1, round(per_client * args.scale))
            for engine in ("cohort", "sequential"):
                results.append(timed_round(engine, clients, n, device))
                print(json.dumps(results[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "scale": args.scale, "results": results}
    for pair in (results[0:2], results[2:4]):
        report[f"speedup_{pair[0]['clients']}_clients"] = pair[1]["round_s"] / pair[0]["round_s"]
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
