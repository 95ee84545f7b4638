"""The simulation: rounds, client sampling, local training, aggregation, evaluation, and the
experiment around them (methods × seeds, checkpoints, resume)."""
from __future__ import annotations

import copy
import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .algorithms import Algorithm, ClientContext, build_algorithm
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .client import ClientTrainer
from .config import Config
from .data import FederatedDataset, load_federated
from .io import atomic_save
from .models import build_model
from .report import COLUMNS, write_metrics
from .server import Server

EVAL_BATCH = 1024


class Simulation:
    """One method with one seed: the global model and its server, the client algorithm, the one
    reusable client trainer, and the generators for client sampling and batch shuffling."""

    def __init__(self, config: Config, data: FederatedDataset, method: str, seed: int) -> None:
        device = config.torch_device()
        seed_everything(seed)
        model = build_model(config.model, data.input_shape, data.num_classes).to(device)
        self.config, self.data = config, data
        self.trainer = ClientTrainer(copy.deepcopy(model), lr=config.lr, batch_size=config.batch_size,
                                     local_epochs=config.local_epochs, local_steps=config.local_steps,
                                     weight_decay=config.weight_decay)
        self.algorithm = build_algorithm(method, config)
        self.server = Server(model, config, masked=self.algorithm.masked,
                             optimizer=self.algorithm.server_optimizer)
        self.algorithm.setup(self.server)
        self.sampler = np.random.default_rng(seed)
        self.generator = torch.Generator(device).manual_seed(seed)

    def round(self) -> dict[str, float]:
        """Sample clients, train each locally from ``w``, aggregate and step the server."""
        num = len(self.data.clients)
        ids = np.sort(self.sampler.choice(num, size=self.config.clients_per_round, replace=False))
        return play_round(self.algorithm, self.server, self.trainer,
                          [(int(k), *self.data.clients[k]) for k in ids], self.generator)

    def evaluate(self) -> dict[str, float | None]:
        """Accuracy and loss of the global model in distribution and, if there is one, OOD."""
        acc, loss = evaluate(self.server.model, *self.data.test)
        ood_acc, ood_loss = evaluate(self.server.model, *self.data.ood_test) \
            if self.data.ood_test is not None else (None, None)
        return {"test_acc": acc, "test_loss": loss, "ood_acc": ood_acc, "ood_loss": ood_loss}

    def state_dict(self) -> dict[str, Any]:
        return {"server": self.server.state_dict(), "algorithm": self.algorithm.state_dict(),
                "sampler": self.sampler.bit_generator.state, "generator": self.generator.get_state(),
                "rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.sampler.bit_generator.state = state["sampler"]
        self.generator.set_state(state["generator"])
        restore_rng(state["rng"])


def play_round(algorithm: Algorithm, server: Server, trainer: ClientTrainer,
               clients: list[tuple[int, Tensor, Tensor]], generator: torch.Generator) -> dict[str, float]:
    """One round with the sampled ``clients`` (id, x, y): the algorithm's extra exchange, local
    training of each from ``w``, aggregation. Returns the round's metrics: mean local loss,
    mask statistics and the floats exchanged (totals over the clients, and the ratio to
    FedAvg's ``2 N`` per client)."""
    contexts = [ClientContext(k, x, y, server.params, trainer, generator) for k, x, y in clients]
    algorithm.pre_round(server, contexts)
    results = []
    for ctx in contexts:
        trainer.reset(server.params)
        results.append(algorithm.local_train(ctx))
    stats = algorithm.aggregate(server, results)
    n = server.params.numel()
    down, up = algorithm.communication(n)
    return {"train_loss": float(torch.stack([r.loss for r in results]).mean()),
            "mask_density": float(stats.density), "mean_agreement": float(stats.mean_agreement),
            "floats_down": down * len(results), "floats_up": up * len(results),
            "comm_vs_fedavg": (down + up) / (2 * n)}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@torch.inference_mode()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``(x, y)``, in batches of ``EVAL_BATCH``."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    loss = torch.zeros((), device=x.device)
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return correct.item() / len(y), loss.item() / len(y)


def load_data(config: Config, seed: int) -> FederatedDataset:
    """The federated dataset for ``seed``, moved to the run's device once."""
    data = load_federated(config.dataset, num_clients=config.num_clients, split=config.split,
                          alpha=config.alpha, seed=seed, data_dir=config.data_dir,
                          download=config.download, min_client_size=config.min_client_size,
                          max_train=config.max_train)
    device = config.torch_device()
    move = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
    return dataclasses.replace(data, clients=[move(c) for c in data.clients], test=move(data.test),
                               ood_test=move(data.ood_test) if data.ood_test is not None else None)


def default_threads() -> int:
    """Half the cores, 1 to 4: small models gain little from more, and lose much when another
    process competes for the cores."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def run_experiment(config: Config, run_dir: Path, *, resume: bool = False,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Run every method for every seed (same data and seeds for every method); return the
    metrics rows. Checkpoints every ``checkpoint_every`` rounds; ``resume`` continues from the
    run folder's checkpoint (if it has one; else from the start) and ends exactly as an
    uninterrupted run would."""
    torch.set_num_threads(config.threads or default_threads())
    torch.backends.cudnn.deterministic = config.deterministic
    torch.backends.cudnn.benchmark = not config.deterministic
    jobs = [(seed, method) for seed in config.seeds for method in config.algorithms]
    first, start_round, state, rows = 0, 1, None, []
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        if checkpoint["config"] != config.to_dict():
            raise ValueError(f"the checkpoint in {run_dir} was written with other settings "
                             "than its config.toml")
        first, rows, state = checkpoint["job"], checkpoint["rows"], checkpoint["state"]
        start_round = checkpoint["round"] + 1

    def save(job: int, round_: int, sim_state: dict | None) -> None:
        save_checkpoint(run_dir, {"config": config.to_dict(), "job": job, "round": round_,
                                  "state": sim_state, "rows": rows})
        write_metrics(run_dir, rows)

    data, data_seed = None, None
    with tqdm(total=len(jobs) * config.rounds, initial=len(rows), disable=not progress,
              unit="round", dynamic_ncols=True) as bar:
        for job in range(first, len(jobs)):
            seed, method = jobs[job]
            if data_seed != seed:
                data, data_seed = load_data(config, seed), seed
            sim = Simulation(config, data, method, seed)
            if state is not None:
                sim.load_state_dict(state)
            bar.set_description(f"{method} seed {seed}")
            for r in range(start_round, config.rounds + 1):
                row = dict.fromkeys(COLUMNS) | {"method": method, "seed": seed, "round": r,
                                                 **sim.round()}
                last = r == config.rounds
                if last or r % config.eval_every == 0:
                    row.update(sim.evaluate())
                    bar.set_postfix({k: row[k] for k in ("test_acc", "ood_acc") if row[k] is not None})
                rows.append(row)
                bar.update()
                if last:
                    save_model(sim.server.model, run_dir / f"model-{method}-seed{seed}.pt")
                    save(job + 1, 0, None)
                elif r % config.checkpoint_every == 0:
                    save(job, r, sim.state_dict())
            start_round, state = 1, None
    return rows


def save_model(model: nn.Module, path: Path) -> None:
    """The model's state_dict as independent CPU tensors (``torch.load(weights_only=True)``)."""
    atomic_save({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, path)
