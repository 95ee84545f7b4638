"""The simulation: rounds, client sampling, local training, aggregation, evaluation, and the
experiment around them (methods × seeds, checkpoints, resume), in one process or with each
round's clients shared over the ranks of a process group (``fedsim.distributed``)."""
from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gma_kernels import NonFiniteError

from .algorithms import Algorithm, Round, build_algorithm
from .callbacks import (Callback, Checkpointing, DivergenceStop, Evaluation, Progress,
                        ProgressBar)
from .checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng
from .client import (CPU_ACTIVATION_BUDGET, ClientData, build_trainer, client_footprint,
                     footprint_bytes, resolve_engine)
from .config import Config
from .data import FederatedDataset
from .data.cache import load_data
from .distributed import Collective, current_collective
from .evaluation import color_reliance, evaluate
from .heap import reused_heap
from .methods import is_masked, server_optimizer_of
from .models import build_model
from .report import COLUMNS
from .server import Server

if TYPE_CHECKING:
    from .client import Trainer

class Simulation:
    """One method with one seed: the global model and its server, the client algorithm, the
    trainer of the clients' cohorts (``config.engine``), and the client sampler. Each client's
    batches are shuffled by ``client_generator(seed, round, client)``, so they depend on
    nothing else (not on the clients trained with it or before it, nor on the rank or the
    engine that trains it).

    ``comm``: the ranks that share each round's clients (default: the initialized process
    group, if any, else one process). Every rank builds the same simulation and draws the same
    sample; each trains its share and all take the same server step."""

    def __init__(self, config: Config, data: FederatedDataset, method: str, seed: int,
                 comm: Collective | None = None) -> None:
        device = config.torch_device()
        seed_everything(seed)
        model = build_model(config.model, data.input_shape, data.num_classes).to(device)
        self.config, self.data, self.seed = config, data, seed
        self.comm = comm or current_collective()
        share = len(self.comm.shard(range(config.clients_per_round)))
        self.cohort_size = config.cohort_size or auto_cohort_size(
            model, data.input_shape, config.batch_size, device, max(1, share))
        self.engine = resolve_engine(config.engine, model, data.input_shape, device)
        self.trainer = build_trainer(
            self.engine, copy.deepcopy(model), ClientData(data.clients), lr=config.lr,
            batch_size=config.batch_size, local_epochs=config.local_epochs,
            local_steps=config.local_steps, weight_decay=config.weight_decay,
            cohort_size=self.cohort_size)
        self.algorithm = build_algorithm(method, config)
        self.server = Server(model, config, masked=is_masked(method),
                             optimizer=server_optimizer_of(method), comm=self.comm)
        self.algorithm.setup(self.server)
        self.sampler = np.random.default_rng(seed)
        self.rounds_played = 0

    def sample(self) -> list[int]:
        """This round's clients, sorted (the same on every rank: a shared sampler)."""
        num = len(self.data.clients)
        return np.sort(self.sampler.choice(num, size=self.config.clients_per_round,
                                           replace=False)).tolist()

    def round(self) -> dict[str, float]:
        """Sample clients, train them locally from ``w``, aggregate and step the server."""
        ids = self.sample()
        self.rounds_played += 1
        return play_round(self.algorithm, self.server, self.trainer, ids, seed=self.seed,
                          round_=self.rounds_played)

    def evaluate(self) -> dict[str, float | None]:
        """Accuracy and loss of the global model on the validation set (if there is one), the
        in-distribution test set, the OOD validation set and the OOD test set (where there are
        ones); on binary colored data the color reliance on the in-distribution test set
        (``color_reliance``)."""
        model, data = self.server.model, self.data
        none = (None, None)
        val_acc, val_loss = evaluate(model, *data.validation) if data.validation is not None else none
        ood_val_acc, ood_val_loss = evaluate(model, *data.ood_validation) \
            if data.ood_validation is not None else none
        acc, loss = evaluate(model, *data.test)
        ood_acc, ood_loss = evaluate(model, *data.ood_test) if data.ood_test is not None else none
        reliance = color_reliance(model, data.test[0]) \
            if data.meta.get("coloring") == "binary" else None
        return {"val_acc": val_acc, "val_loss": val_loss, "ood_val_acc": ood_val_acc,
                "ood_val_loss": ood_val_loss, "test_acc": acc, "test_loss": loss,
                "ood_acc": ood_acc, "ood_loss": ood_loss, "color_reliance": reliance}

    def state_dict(self) -> dict[str, Any]:
        return {"server": self.server.state_dict(), "algorithm": self.algorithm.state_dict(),
                "sampler": self.sampler.bit_generator.state, "seed": self.seed,
                "rounds_played": self.rounds_played, "rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.sampler.bit_generator.state = state["sampler"]
        self.seed, self.rounds_played = state["seed"], state["rounds_played"]
        restore_rng(state["rng"])


def play_round(algorithm: Algorithm, server: Server, trainer: Trainer, clients: Sequence[int],
               *, seed: int = 0, round_: int = 0) -> dict[str, float]:
    """One round with the sampled ``clients`` (ids into the trainer's ``ClientData``): this
    rank's share of them (``server.comm``), in cohorts of at most ``trainer.cohort_size``,
    each trained from ``w`` (client ``k`` shuffled by ``client_generator(seed, round_, k)``)
    and folded into the round's aggregation as it finishes; then the server step. Returns the
    round's metrics, the same on every rank: mean local loss over all the clients, mask
    statistics and the floats exchanged (totals over the clients, and the ratio to FedAvg's
    ``2 N`` per client)."""
    comm = server.comm
    mine = comm.shard(list(clients))
    size = trainer.cohort_size
    rnd = Round(server, trainer, [mine[i:i + size] for i in range(0, len(mine), size)], seed,
                round_)
    algorithm.begin_round(rnd)
    losses = []
    for ids in rnd.chunks:
        cohort = rnd.cohort(ids)
        losses += list(algorithm.local_train(rnd, cohort).detach())
        algorithm.collect(rnd, cohort)
    stats = algorithm.end_round(rnd)
    losses = comm.gather(losses, like=server.params.new_zeros(()))
    n = server.params.numel()
    down, up = algorithm.communication(n)
    mask = stats.as_dict()
    return {"train_loss": float(torch.stack(losses).mean()),
            "mask_density": mask["mask_density"], "mean_agreement": mask["mean_agreement"],
            "floats_down": down * len(clients), "floats_up": up * len(clients),
            "comm_vs_fedavg": (down + up) / (2 * n)}


def auto_cohort_size(model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                     device: torch.device, clients: int) -> int:
    """How many clients train together by default: all of this rank's ``clients`` when their
    cohort fits in a quarter of the device's free memory (``footprint_bytes`` each),
    else as many as fit (at least 1); on a CPU also no more than keep one batch's activations
    within ``CPU_ACTIVATION_BUDGET``."""
    n, activations = client_footprint(model, input_shape, batch_size)
    per_client = footprint_bytes(n, activations)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        cap = clients
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        cap = CPU_ACTIVATION_BUDGET // (4 * max(1, activations))
    return max(1, min(clients, cap, int(free // 4 // per_client)))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def default_threads() -> int:
    """Half the cores (shared among the ranks on this machine, ``LOCAL_WORLD_SIZE``), 1 to 4:
    small models gain little from more, and lose much when another process competes for the
    cores."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, (os.cpu_count() or 1) // (2 * ranks)))


def run_experiment(config: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
                   comm: Collective | None = None, callbacks: Sequence[Callback] = ()
                   ) -> list[dict[str, Any]]:
    """Run every method for every seed (same data and seeds for every method); return the
    metrics rows, and write the run folder ``run_dir`` (made if missing). Checkpoints every
    ``checkpoint_every`` rounds, or (unset) at the first round end ``checkpoint_seconds``
    after the previous checkpoint; ``resume`` continues from the run folder's checkpoint (if it has one; else from the start) and ends exactly as an
    uninterrupted run would.

    ``comm`` (default: the initialized process group, if any, else one process): the ranks
    that share each round's clients. Rank 0 alone evaluates, shows progress and writes the run
    folder (metrics, checkpoints, models); the other ranks' rows lack the evaluation columns.
    Every rank reads the checkpoint to resume, so ``run_dir`` must be one folder they all see.
    Around the rounds run the ``fedsim.callbacks``: evaluation, the divergence stop, the
    progress bar and checkpoints, then ``callbacks`` (yours: they see each round's finished
    row, and may stop a run)."""
    comm = comm or current_collective()
    if comm.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads or default_threads())
    torch.backends.cudnn.deterministic = config.deterministic
    torch.backends.cudnn.benchmark = not config.deterministic
    at = Progress(config, run_dir, [(s, m) for s in config.seeds for m in config.algorithms])
    start_round, state, elapsed = 1, None, 0.0
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        if checkpoint["config"] != config.to_dict():
            changed = sorted(k for k, v in config.to_dict().items()
                             if checkpoint["config"].get(k) != v)
            raise CheckpointError(f"{run_dir / 'config.toml'} was edited after the checkpoint "
                                  f"was written ({', '.join(changed)} differ): restore it, or "
                                  "start a new run with the new settings")
        at.job, at.rows, state = checkpoint["job"], checkpoint["rows"], checkpoint["state"]
        start_round, elapsed = checkpoint["round"] + 1, checkpoint.get("elapsed_s", 0.0)
    if resume:
        comm.barrier()  # every rank has read the checkpoint before rank 0 replaces it
    bar = ProgressBar(at, at.job * config.rounds + start_round - 1, progress and comm.is_main)
    callbacks = [*([Evaluation(config.eval_every), DivergenceStop(report=True), bar,
                    Checkpointing(elapsed)] if comm.is_main else [DivergenceStop(report=False), bar]),
                 *callbacks]
    data, data_seed = None, None
    with reused_heap(), contextlib.ExitStack() as stack:
        for callback in callbacks:
            stack.callback(callback.close)
        for at.job in range(at.job, len(at.jobs)):
            if data_seed != at.seed:
                data, data_seed = load_data(config, at.seed), at.seed
            at.sim = Simulation(config, data, at.method, at.seed, comm)
            if state is not None:
                at.sim.load_state_dict(state)
            for callback in callbacks:
                callback.begin_run(at)
            for r in range(start_round, config.rounds + 1):
                row = dict.fromkeys(COLUMNS) | {"method": at.method, "seed": at.seed, "round": r}
                try:
                    row.update(at.sim.round())
                    at.error = None
                except NonFiniteError as err:  # the server is as it was before the round
                    row["diverged"], at.error = True, str(err)
                at.rows.append(row)
                stop = [callback.end_round(at, row) for callback in callbacks]
                if any(stop) or r == config.rounds:
                    break
            for callback in callbacks:
                callback.end_run(at, r)
            start_round, state = 1, None
    return at.rows
