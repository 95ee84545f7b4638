"""Checkpoints: what a killed run needs to continue exactly where it stopped.

Two files per run folder: ``checkpoint.pt``, replaced atomically, and the one before it,
``checkpoint-previous.pt``. Each holds the job (method, seed) and round reached, the
simulation's state (global buffer, server optimizer, algorithm and client state, generators),
the process-wide RNGs and the metrics so far. A damaged newest checkpoint (a disk that filled
up, a file copied in half) is reported and the previous one is used; when neither can be read,
``CheckpointError`` says which file is wrong and how.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_save

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint-previous.pt"
#: what every checkpoint holds
KEYS = ("config", "job", "round", "state", "rows")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: the message names the file and the fault."""


def capture_rng() -> dict[str, Any]:
    """The process-wide RNG states: torch (and CUDA), numpy's legacy global, Python's random."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, keys.tolist(), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` as the newest, keeping the one it replaces as the previous."""
    newest = run_dir / CHECKPOINT_FILE
    if newest.is_file():
        os.replace(newest, run_dir / PREVIOUS_FILE)
    atomic_save(checkpoint, newest)


def load_checkpoint(run_dir: Path, warn: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The run folder's newest readable checkpoint (``warn`` says so when it has to fall back to
    the previous one), or None when the run stopped before writing any. CheckpointError when
    there are checkpoints and none can be read."""
    newest, previous = run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_FILE
    if not newest.is_file() and not previous.is_file():
        return None
    try:
        return read_checkpoint(newest)
    except CheckpointError as fault:
        if not previous.is_file():
            raise
        try:
            checkpoint = read_checkpoint(previous)
        except CheckpointError as older:
            raise CheckpointError(f"{fault}; and {older}") from None
        warn(f"warning: {fault}; resuming from {previous.name} instead (round "
             f"{checkpoint['round']} of job {checkpoint['job'] + 1})")
        return checkpoint


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file, checked for the keys and types a checkpoint has."""
    what = "start the run afresh (move the folder away)"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): {what}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({reason[:120]}): "
                              f"{what}") from None
    missing = [k for k in KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a fedsim checkpoint (no {', '.join(missing)}): "
                              f"{what}")
    if not (isinstance(checkpoint["config"], dict) and isinstance(checkpoint["job"], int)
            and isinstance(checkpoint["round"], int) and isinstance(checkpoint["rows"], list)):
        raise CheckpointError(f"{path} holds a checkpoint of the wrong shape: {what}")
    return checkpoint
