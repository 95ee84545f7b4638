"""What happens around the rounds of ``fedsim.loop.run_experiment``: evaluation, the progress
bar, checkpoints and the divergence stop, each a ``Callback`` on the one loop.

The loop runs, for each (seed, method) of the experiment, ``Callback.begin_run``, then for
each round the round itself and every callback's ``end_round`` in list order (a callback may
stop the run), then ``end_run``. A round's metrics row is already in ``Progress.rows`` when
``end_round`` sees it, so a later callback (checkpoints) saves what an earlier one
(evaluation) added to it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .config import Config
from .io import atomic_save
from .report import write_metrics

if TYPE_CHECKING:
    from torch import nn

    from .loop import Simulation


@dataclass
class Progress:
    """Where the experiment is: its ``jobs`` (seed, method) in order, the current ``job`` and
    its simulation ``sim``, the metrics ``rows`` so far (every job's), and why the last round
    diverged (``error``, else None)."""

    config: Config
    run_dir: Path
    jobs: list[tuple[int, str]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    job: int = 0
    sim: Simulation | None = None
    error: str | None = None

    @property
    def seed(self) -> int:
        return self.jobs[self.job][0]

    @property
    def method(self) -> str:
        return self.jobs[self.job][1]


class Callback:
    """Hooks on the loop; each does nothing unless a subclass says otherwise."""

    def begin_run(self, progress: Progress) -> None:
        """Before the first round (played or resumed) of ``progress.job``'s run."""

    def end_round(self, progress: Progress, row: dict[str, Any]) -> bool:
        """After round ``row["round"]``, whose row is the last of ``progress.rows``; True
        stops this run (the loop goes on with the next job)."""
        return False

    def end_run(self, progress: Progress, last_round: int) -> None:
        """After the run's last round (``config.rounds``, or the round that stopped it)."""

    def close(self) -> None:
        """Once, when the experiment ends or fails."""


class Evaluation(Callback):
    """Evaluate the global model (``Simulation.evaluate``) into the row every ``every`` rounds,
    at the last round and at a round that diverged."""

    def __init__(self, every: int) -> None:
        self.every = every

    def end_round(self, progress: Progress, row: dict[str, Any]) -> bool:
        r = row["round"]
        if row["diverged"] or r == progress.config.rounds or r % self.every == 0:
            row.update(progress.sim.evaluate())
        return False


class DivergenceStop(Callback):
    """Stop a run at its first round whose step was not finite (``row["diverged"]``: the
    server is as it was before that round), saying so when ``report``."""

    def __init__(self, report: bool) -> None:
        self.report = report

    def end_round(self, progress: Progress, row: dict[str, Any]) -> bool:
        if row["diverged"] and self.report:
            tqdm.write(f"{progress.method} seed {progress.seed} diverged in round {row['round']} "
                       f"({progress.error}); its run stops there, with the model of the round "
                       "before")
        return bool(row["diverged"])


class ProgressBar(Callback):
    """One tqdm bar over every job's rounds, starting at ``done`` rounds (a resumed run), with
    the latest test and OOD accuracy; off unless ``show``."""

    def __init__(self, progress: Progress, done: int, show: bool) -> None:
        self.bar = tqdm(total=len(progress.jobs) * progress.config.rounds, initial=done,
                        disable=not show, unit="round", dynamic_ncols=True)

    def begin_run(self, progress: Progress) -> None:
        self.bar.set_description(f"{progress.method} seed {progress.seed} "
                                 f"(run {progress.job + 1}/{len(progress.jobs)})")

    def end_round(self, progress: Progress, row: dict[str, Any]) -> bool:
        shown = {k: row[k] for k in ("test_acc", "ood_acc") if row[k] is not None}
        if shown:
            self.bar.set_postfix(shown)
        self.bar.update()
        return False

    def end_run(self, progress: Progress, last_round: int) -> None:
        self.bar.update(progress.config.rounds - last_round)  # the rounds a stop skipped

    def close(self) -> None:
        self.bar.close()


class Checkpointing(Callback):
    """The run folder's checkpoint (``fedsim.checkpoint``) and metrics file: every
    ``checkpoint_every`` rounds, or (unset) at the first round end ``checkpoint_seconds``
    after the previous save; at a run's end, its model (``model-METHOD-seedS.pt``) and a
    checkpoint that starts the next job. ``elapsed_s``: the time of earlier invocations (a
    resumed run), to which this one's is added."""

    def __init__(self, elapsed_s: float = 0.0) -> None:
        self.before = elapsed_s
        self.started = self.last_save = time.monotonic()

    def _due(self, config: Config, round_: int) -> bool:
        if config.checkpoint_every is not None:
            return round_ % config.checkpoint_every == 0
        return time.monotonic() - self.last_save >= config.checkpoint_seconds

    def _save(self, progress: Progress, job: int, round_: int, state: dict | None) -> None:
        self.last_save = time.monotonic()
        save_checkpoint(progress.run_dir, {
            "config": progress.config.to_dict(), "job": job, "round": round_, "state": state,
            "rows": progress.rows, "elapsed_s": self.before + self.last_save - self.started})
        write_metrics(progress.run_dir, progress.rows)

    def end_round(self, progress: Progress, row: dict[str, Any]) -> bool:
        r = row["round"]
        if r < progress.config.rounds and not row["diverged"] and self._due(progress.config, r):
            self._save(progress, progress.job, r, progress.sim.state_dict())
        return False

    def end_run(self, progress: Progress, last_round: int) -> None:
        save_model(progress.sim.server.model,
                   progress.run_dir / f"model-{progress.method}-seed{progress.seed}.pt")
        self._save(progress, progress.job + 1, 0, None)


def save_model(model: nn.Module, path: Path) -> None:
    """The model's state_dict as independent CPU tensors (``torch.load(weights_only=True)``)."""
    atomic_save({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, path)
