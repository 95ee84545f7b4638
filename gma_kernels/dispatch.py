"""The dispatcher, the only module that imports a backend: it picks one (``resolve_backend``,
a ``backends.Backend``), applies the non-finite policy and runs the density rescale (two
passes: the density must be known before the step).

Call path, three Python hops from the public call to the mask: ``api.gma_step`` (or
``masked_mean``, ``agreement``, ``ServerOptimizer.step``) → ``execute`` → the backend's
``run(job)``, which applies the mask itself: ``torch_ops.run`` calls
``formula.mask_from_count`` block by block, ``native.run`` runs the C pass
(``csrc/gma_cpu.c``) over column chunks on its threads (``_over_columns``), and
``triton_kernel.run`` launches ``_aggregate_kernel``. With ``rescale``, ``execute`` goes
through ``_rescaled``, which calls ``run`` and then the backend's ``step``. The streaming
accumulator's result and step (``streaming.py``) call the backend's ``finish`` and
``step_from_sums`` directly; every mask is made from ``formula.MaskParams``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import replace

import torch

from .backends import Backend
from .batch import ClientBatch
from .config import NONFINITE_POLICIES, GMAStats, NonFiniteError, NonFinitePolicy, _check_choice
from .formula import rescale
from .job import Job, Outcome

BACKENDS = ("auto", "triton", "torch")
_OVERFLOW = ("the weighted sum of the updates, or the step it makes, overflows float32; params and "
             "optimizer state left unchanged")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend module for ``backend`` on ``device``: "auto" is Triton on CUDA when
    importable, else "torch"; "torch" on CPU is the native C kernel when it is usable."""
    _check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        from .backends import native, torch_ops
        return native if device.type == "cpu" and native.usable() else torch_ops
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton), "
                         "or use backend='torch'")
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"backend='triton' runs on CUDA tensors (got {device}); on CPU only under "
                         "Triton's interpreter (TRITON_INTERPRET=1 set before import)")
    from .backends import triton_kernel
    return triton_kernel


def screen_nonfinite(impl: Backend, batch: ClientBatch, policy: NonFinitePolicy, *,
                     name: Callable[[int], str], untouched: str, hint: str = "") -> list[int]:
    """The non-finite policy, one home for the batch path and the accumulator: the clients of
    ``batch`` to aggregate. "raise" raises ``NonFiniteError`` naming (``name(k)``) every client
    whose update holds a NaN or an infinity (found by the backend ``impl``) and saying what was
    left ``untouched``; "drop" returns the others; "unchecked" returns every client unread."""
    everyone = list(range(batch.num_clients))
    if policy == "unchecked":
        return everyone
    bad = impl.nonfinite_rows(batch)
    if bad and policy == "raise":
        names = ", ".join(name(k) for k in bad)
        verb = "contains" if len(bad) == 1 else "contain"
        raise NonFiniteError(f"{names} {verb} non-finite values (NaN or inf); {untouched}{hint}")
    return [k for k in everyone if k not in bad]


def execute(job: Job, *, nonfinite: NonFinitePolicy = "raise", backend: str = "auto"
            ) -> GMAStats:
    """Run ``job`` guarded (unless "unchecked"); when the guard meets a non-finite value,
    raise (state untouched) or, with "drop", aggregate the finite clients only."""
    _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    impl = resolve_backend(backend, job.batch.device)
    guard = nonfinite != "unchecked"
    if job.guard != guard:
        job = replace(job, guard=guard)
    outcome = _rescaled(impl, job) if job.mask.rescale else impl.run(job)
    if outcome.finite:
        return GMAStats(outcome.sums, job.batch.numel, job.batch.num_clients)
    untouched = "params and optimizer state left unchanged" if job.params is not None \
        else "nothing was computed"
    keep = screen_nonfinite(impl, job.batch, nonfinite, name=lambda k: f"updates[{k}]",
                            untouched=untouched,
                            hint=" (nonfinite='drop' aggregates the other clients)")
    if len(keep) == job.batch.num_clients:
        raise NonFiniteError(_OVERFLOW)
    if not keep:
        names = ", ".join(f"updates[{k}]" for k in range(job.batch.num_clients))
        raise NonFiniteError(f"every update is non-finite ({names}); {untouched}")
    dropped = tuple(k for k in range(job.batch.num_clients) if k not in keep)
    job = replace(job, batch=job.batch.subset(keep))
    outcome = _rescaled(impl, job) if job.mask.rescale else impl.run(job)
    if not outcome.finite:
        raise NonFiniteError(_OVERFLOW)
    return GMAStats(outcome.sums, job.batch.numel, job.batch.num_clients, dropped)


def _rescaled(impl: Backend, job: Job) -> Outcome:
    """The density rescale in two passes: ``g`` first, then ``g / (mean(m) + 1e-12)`` and the
    step; not finite when the guard met a non-finite value in either."""
    n = job.batch.numel
    g = job.g_out if job.g_out is not None else torch.empty(n, dtype=torch.float32,
                                                            device=job.batch.device)
    outcome = impl.run(replace(job, step=None, params=None, states=(), g_out=g))
    if not outcome.finite:
        return outcome
    rescale(g, outcome.mask_sum / n)
    if job.guard and not bool(torch.isfinite(g).all()):
        return Outcome(False, outcome.sums)  # the rescale overflowed: nothing may reach params
    if job.step is not None and not impl.step(config=job.step, params=job.params,
                                              states=job.states, x=g, guard=job.guard):
        return Outcome(False, outcome.sums)
    return outcome
