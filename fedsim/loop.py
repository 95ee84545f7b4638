"""The simulation: rounds, client sampling, local training, aggregation, evaluation, and the
experiment around them (methods × seeds, checkpoints, resume), in one process or with each
round's clients shared over the ranks of a process group (``fedsim.distributed``)."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import functools
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from gma_kernels import NonFiniteError

from .algorithms import Algorithm, Round, build_algorithm
from .checkpoint import (CheckpointError, capture_rng, load_checkpoint, restore_rng,
                         save_checkpoint)
from .client import (CPU_ACTIVATION_BUDGET, ClientData, build_trainer, client_footprint,
                     footprint_bytes, resolve_engine)
from .config import Config
from .data import FederatedDataset, load_federated
from .data.coloring import swap_colors
from .distributed import Collective, current_collective
from .io import atomic_save
from .methods import is_masked, server_optimizer_of
from .models import build_model
from .report import COLUMNS, write_metrics
from .server import Server

if TYPE_CHECKING:
    from .client import Trainer

EVAL_BATCH = 1024


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
        if "rounds_played" not in state:
            raise ValueError("this state was saved by an older fedsim, whose clients shared one "
                             "shuffling generator: it cannot be continued; start the run afresh")
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


@torch.inference_mode()
def color_reliance(model: nn.Module, x: Tensor) -> float:
    """The fraction of binary-colored images ``x`` whose predicted class changes when only
    their color is swapped (red and green exchanged): 0 for a model that reads the digit alone,
    1 for one that reads the color alone."""
    model.eval()
    changed = torch.zeros((), dtype=torch.long, device=x.device)
    for xb in x.split(EVAL_BATCH):
        changed += (model(xb).argmax(1) != model(swap_colors(xb)).argmax(1)).sum()
    return changed.item() / len(x)


_DATA_FIELDS = ("dataset", "num_clients", "split", "alpha", "data_dir", "download",
                "min_client_size", "max_train", "validation_fraction", "ood_validation_fraction",
                "label_noise",
                "color_flip_range", "reversed_color_fraction", "spiral_client_size",
                "spiral_shortcut_dims", "spiral_revolutions")


def read_data(config: Config, seed: int) -> FederatedDataset:
    """The federated dataset ``config`` describes for ``seed``, on the host (the latest one is
    kept: the start-up check and the first seed's run read it once)."""
    return _read_data(seed, *(getattr(config, name) for name in _DATA_FIELDS))


@functools.lru_cache(maxsize=1)
def _read_data(seed: int, *values: object) -> FederatedDataset:
    settings = dict(zip(_DATA_FIELDS, values))
    return load_federated(settings.pop("dataset"), seed=seed, **settings)


def load_data(config: Config, seed: int) -> FederatedDataset:
    """The federated dataset for ``seed``, moved to the run's device once; the clients'
    examples are consecutive views of one pair of tensors (``ClientData`` reads them in place)."""
    data = read_data(config, seed)
    device = config.torch_device()
    move = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
    sizes = [len(y) for _, y in data.clients]
    x = torch.cat([x for x, _ in data.clients]).to(device).split(sizes)
    y = torch.cat([y for _, y in data.clients]).to(device).split(sizes)
    optional = lambda pair: None if pair is None else move(pair)  # noqa: E731
    return dataclasses.replace(data, clients=list(zip(x, y)), test=move(data.test),
                               ood_test=optional(data.ood_test), validation=optional(data.validation),
                               ood_validation=optional(data.ood_validation))


def default_threads() -> int:
    """Half the cores (shared among the ranks on this machine, ``LOCAL_WORLD_SIZE``), 1 to 4:
    small models gain little from more, and lose much when another process competes for the
    cores."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, (os.cpu_count() or 1) // (2 * ranks)))


@contextlib.contextmanager
def reused_heap():
    """Within the block, glibc's ``malloc`` keeps freed memory for reuse instead of handing it
    back to the OS (``mallopt``: blocks up to 32 MiB come from the heap, whose top is trimmed
    only past 1 GiB free); at its end ``malloc_trim(0)`` hands back what is free. A training
    step frees and allocates the same few MB of activations and gradients every time, and
    under glibc's adaptive defaults each step gave them back and took them again as fresh
    zeroed pages (28×28 CNN, 10 clients of 300 images, cohorts of 5, one thread: 300,000 page
    faults a round and 3.2–3.4 s, against 80,000 and 2.8–2.9 s here). The thresholds stay
    fixed for the process afterwards. Nothing happens where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or ``None`` (another C library, or none to be found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def run_experiment(config: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
                   comm: Collective | None = None) -> list[dict[str, Any]]:
    """Run every method for every seed (same data and seeds for every method); return the
    metrics rows. Checkpoints every ``checkpoint_every`` rounds, or (unset) at the first round
    end ``checkpoint_seconds`` after the previous checkpoint; ``resume`` continues from the
    run folder's checkpoint (if it has one; else from the start) and ends exactly as an
    uninterrupted run would.

    ``comm`` (default: the initialized process group, if any, else one process): the ranks
    that share each round's clients. Rank 0 alone evaluates, shows progress and writes the run
    folder (metrics, checkpoints, models); the other ranks' rows lack the evaluation columns.
    Every rank reads the checkpoint to resume, so ``run_dir`` must be one folder they all see."""
    comm = comm or current_collective()
    main = comm.is_main
    torch.set_num_threads(config.threads or default_threads())
    torch.backends.cudnn.deterministic = config.deterministic
    torch.backends.cudnn.benchmark = not config.deterministic
    jobs = [(seed, method) for seed in config.seeds for method in config.algorithms]
    first, start_round, state, rows = 0, 1, None, []
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        if checkpoint["config"] != config.to_dict():
            changed = sorted(k for k, v in config.to_dict().items()
                             if checkpoint["config"].get(k) != v)
            raise CheckpointError(f"{run_dir / 'config.toml'} was edited after the checkpoint "
                                  f"was written ({', '.join(changed)} differ): restore it, or "
                                  "start a new run with the new settings")
        first, rows, state = checkpoint["job"], checkpoint["rows"], checkpoint["state"]
        start_round = checkpoint["round"] + 1
    if resume:
        comm.barrier()  # every rank has read the checkpoint before rank 0 replaces it

    last_save = started = time.monotonic()
    before = checkpoint.get("elapsed_s", 0.0) if checkpoint is not None else 0.0

    def due(round_: int) -> bool:
        if config.checkpoint_every is not None:
            return round_ % config.checkpoint_every == 0
        return time.monotonic() - last_save >= config.checkpoint_seconds

    def save(job: int, round_: int, sim_state: dict | None) -> None:
        nonlocal last_save
        last_save = time.monotonic()
        save_checkpoint(run_dir, {"config": config.to_dict(), "job": job, "round": round_,
                                  "state": sim_state, "rows": rows,
                                  "elapsed_s": before + last_save - started})
        write_metrics(run_dir, rows)

    data, data_seed = None, None
    bar = tqdm(total=len(jobs) * config.rounds, initial=first * config.rounds + start_round - 1,
               disable=not (progress and main), unit="round", dynamic_ncols=True)
    with reused_heap(), bar:
        for job in range(first, len(jobs)):
            seed, method = jobs[job]
            if data_seed != seed:
                data, data_seed = load_data(config, seed), seed
            sim = Simulation(config, data, method, seed, comm)
            if state is not None:
                sim.load_state_dict(state)
            bar.set_description(f"{method} seed {seed} (run {job + 1}/{len(jobs)})")
            for r in range(start_round, config.rounds + 1):
                try:
                    metrics = sim.round()
                except NonFiniteError as err:  # the server is as it was before the round
                    row = dict.fromkeys(COLUMNS) | {"method": method, "seed": seed, "round": r,
                                                     "diverged": True}
                    if main:
                        row.update(sim.evaluate())
                        bar.write(f"{method} seed {seed} diverged in round {r} ({err}); its run "
                                  "stops there, with the model of the round before")
                    rows.append(row)
                    bar.update(config.rounds - r + 1)
                    if main:
                        save_model(sim.server.model, run_dir / f"model-{method}-seed{seed}.pt")
                        save(job + 1, 0, None)
                    break
                row = dict.fromkeys(COLUMNS) | {"method": method, "seed": seed, "round": r,
                                                 **metrics}
                last = r == config.rounds
                if main and (last or r % config.eval_every == 0):
                    row.update(sim.evaluate())
                    bar.set_postfix({k: row[k] for k in ("test_acc", "ood_acc") if row[k] is not None})
                rows.append(row)
                bar.update()
                if not main:
                    continue
                if last:
                    save_model(sim.server.model, run_dir / f"model-{method}-seed{seed}.pt")
                    save(job + 1, 0, None)
                elif due(r):
                    save(job, r, sim.state_dict())
            start_round, state = 1, None
    return rows


def save_model(model: nn.Module, path: Path) -> None:
    """The model's state_dict as independent CPU tensors (``torch.load(weights_only=True)``)."""
    atomic_save({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, path)
