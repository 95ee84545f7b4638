"""Runs a ``Job`` on the chosen backend: backend choice, the non-finite policy and the density
rescale (two passes: the density must be known before the step)."""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, replace
from functools import cached_property
from types import ModuleType

import torch
from torch import Tensor

from .batch import ClientBatch
from .config import (NONFINITE_POLICIES, GMAStats, MaskConfig, NonFiniteError, NonFinitePolicy,
                     _check_choice)
from .job import Job, Outcome

BACKENDS = ("auto", "triton", "torch")
_OVERFLOW = ("the weighted sum of the updates, or the step it makes, overflows float32; params and "
             "optimizer state left unchanged")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend`` on ``device`` ("auto": Triton on CUDA when importable)."""
    _check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        from . import _torch
        return _torch
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton), "
                         "or use backend='torch'")
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"backend='triton' runs on CUDA tensors (got {device}); on CPU only under "
                         "Triton's interpreter (TRITON_INTERPRET=1 set before import)")
    from . import _triton
    return _triton


def nonfinite_clients(batch: ClientBatch) -> list[int]:
    """Indices of the clients whose update holds a NaN or an infinity (the slow, rare path)."""
    return [k for k, row in enumerate(batch.rows) if not bool(torch.isfinite(row).all())]


def execute(job: Job, raw_weights: tuple[float, ...], *, nonfinite: NonFinitePolicy = "raise",
            backend: str = "auto") -> GMAStats:
    """Run ``job``; on a non-finite update raise (state untouched) or drop those clients."""
    _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    impl = resolve_backend(backend, job.batch.device)
    job = replace(job, guard=nonfinite != "unchecked")
    stats = _run(impl, job)
    if stats is not None:
        return stats
    bad = nonfinite_clients(job.batch)
    if not bad:
        raise NonFiniteError(_OVERFLOW)
    names = ", ".join(f"updates[{k}]" for k in bad)
    untouched = "params and optimizer state left unchanged" if job.params is not None \
        else "nothing was computed"
    if nonfinite == "raise":
        raise NonFiniteError(f"{names} contain non-finite values (NaN or inf); {untouched} "
                             "(nonfinite='drop' aggregates the other clients)")
    keep = [k for k in range(job.batch.num_clients) if k not in bad]
    if not keep:
        raise NonFiniteError(f"every update is non-finite ({names}); {untouched}")
    stats = _run(impl, replace(job, batch=job.batch.subset(keep, raw_weights)))
    if stats is None:
        raise NonFiniteError(_OVERFLOW)
    return replace(stats, dropped=tuple(bad))


def _run(impl: ModuleType, job: Job) -> GMAStats | None:
    """One pass (two with rescale); None when the guard met a non-finite aggregate."""
    n = job.batch.numel
    if not job.mask.rescale:
        outcome = impl.run(job)
        return _stats(outcome, job) if outcome.finite else None
    g = job.g_out if job.g_out is not None else torch.empty(n, dtype=torch.float32,
                                                            device=job.batch.device)
    outcome = impl.run(replace(job, step=None, params=None, states=(), g_out=g))
    if not outcome.finite:
        return None
    g.mul_(1.0 / (outcome.mask_sum / n + 1e-12))
    if job.guard and not bool(torch.isfinite(g).all()):
        return None  # the rescale overflowed float32: nothing may reach params
    if job.step is not None:
        impl.run(Job(ClientBatch(None, (g,), (1.0,)), MaskConfig(tau=0.0), job.step, job.params,
                     job.states, guard=False))
    return _stats(outcome, job)


def _stats(outcome: Outcome, job: Job) -> GMAStats:
    return GMAStats(outcome.sums, job.batch.numel, job.batch.num_clients)
