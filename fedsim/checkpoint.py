"""Checkpoints: what a killed run needs to continue exactly where it stopped.

One file per run folder, replaced atomically: the job (method, seed) and round reached, the
simulation's state (global buffer, server optimizer, algorithm and client state, generators),
the process-wide RNGs and the metrics so far.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_save

CHECKPOINT_FILE = "checkpoint.pt"


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
    atomic_save(checkpoint, run_dir / CHECKPOINT_FILE)


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's checkpoint, or None when the run stopped before writing one."""
    path = run_dir / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
