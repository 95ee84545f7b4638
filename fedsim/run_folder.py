"""Run folders: a new ``OUT_DIR/<time>-<name>`` folder, and a finished run's results in it."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT_FILE, CheckpointError, read_checkpoint
from .config import Config
from .io import atomic_write
from .report import plot_accuracy, summarize, write_results


def new_folder(out_dir: str | Path, name: str) -> Path:
    """``OUT_DIR/<YYYYmmdd-HHMMSS>-<name>``, made (a numeric suffix if that folder exists)."""
    base = Path(out_dir) / f"{datetime.now():%Y%m%d-%H%M%S}-{name}"
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a folder next to {base}")


def write_run_results(run_dir: Path, config: Config, rows: list[dict[str, Any]], *,
                      resumed: bool, seconds: float, world_size: int = 1) -> dict:
    """A finished run's ``results.json``/``results.md`` and ``accuracy.png``; its summary.
    ``seconds``: this invocation's time (the run's total comes from its checkpoints)."""
    summary = summarize(rows)
    write_results(run_dir, summary, config=config, resumed=resumed,
                  wall_time_s=run_time(run_dir, seconds), torch=torch.__version__,
                  device=str(config.torch_device()), threads=torch.get_num_threads(),
                  world_size=world_size)
    plot_accuracy(run_dir, rows, config)
    return summary


def run_time(run_dir: Path, this_call: float) -> float:
    """Seconds the run has taken over all its invocations (kept in its checkpoints; a resumed
    run adds up, a resumed finished run does not reset it), else ``this_call``."""
    try:
        return float(read_checkpoint(run_dir / CHECKPOINT_FILE).get("elapsed_s", this_call))
    except CheckpointError:
        return this_call


def create_run_dir(config: Config) -> Path:
    """A new run folder for ``config``, holding its config.toml."""
    run_dir = new_folder(config.out_dir, config.run_name)
    atomic_write(run_dir / "config.toml", config.to_toml())
    return run_dir
