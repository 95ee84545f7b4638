"""The three public aggregation functions: ``agreement``, ``masked_mean`` and ``gma_step``.

Each validates its inputs into a ``Job`` and hands it to ``dispatch.execute``, which runs it on a
backend; the formula itself is in ``formula.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .batch import Updates, Weights, check_params, make_batch
from .config import GMAStats, MaskConfig, MaskKind, NonFinitePolicy, StepConfig
from .dispatch import execute
from .job import Job


def agreement(updates: Updates, weights: Weights = None, *, weighted: bool = False,
              backend: str = "auto", nonfinite: NonFinitePolicy = "raise") -> Tensor:
    """Sign agreement ``A_j = |Σ_k a_k sign(Δ_kj)|`` with ``a_k = 1/K`` (or ``p̄_k`` when
    ``weighted``), as a float32 tensor of N elements."""
    batch = make_batch(updates, weights)
    out = torch.empty(batch.numel, dtype=torch.float32, device=batch.device)
    execute(Job(batch, MaskConfig(weighted_agreement=weighted), a_out=out),
            nonfinite=nonfinite, backend=backend)
    return out


def masked_mean(updates: Updates, weights: Weights = None, *, tau: float = 0.4,
                mask: MaskKind = "soft", weighted_agreement: bool = False, rescale: bool = False,
                backend: str = "auto", nonfinite: NonFinitePolicy = "raise",
                return_stats: bool = False) -> Tensor | tuple[Tensor, GMAStats]:
    """Masked pseudo-gradient ``g = m ⊙ Σ_k p̄_k Δ_k`` (float32, N elements).

    ``m_j = 1`` where ``A_j ≥ τ``, else ``A_j`` (``mask="soft"``) or 0 (``"hard"``);
    ``rescale`` divides by ``mean(m) + 1e-12``. ``τ = 0`` is weighted FedAvg.
    """
    config = MaskConfig(tau, mask, weighted_agreement, rescale)
    batch = make_batch(updates, weights)
    out = torch.empty(batch.numel, dtype=torch.float32, device=batch.device)
    stats = execute(Job(batch, config, g_out=out), nonfinite=nonfinite, backend=backend)
    return (out, stats) if return_stats else out


def gma_step(params: Tensor, updates: Updates, weights: Weights = None, *, lr: float = 1.0,
             tau: float = 0.4, mask: MaskKind = "soft", weighted_agreement: bool = False,
             rescale: bool = False, backend: str = "auto", nonfinite: NonFinitePolicy = "raise",
             return_stats: bool = False) -> Tensor | tuple[Tensor, GMAStats]:
    """``params ← params + lr · g`` in place, fused with the masked mean (one pass on GPU).

    Returns ``params``. A non-finite update raises naming the client and leaves ``params``
    unchanged (``nonfinite="drop"`` aggregates the others; ``"unchecked"`` skips the guard).
    """
    config = MaskConfig(tau, mask, weighted_agreement, rescale)
    step = StepConfig("sgd", lr=lr)
    batch = make_batch(updates, weights)
    check_params(params, batch)
    stats = execute(Job(batch, config, step, params), nonfinite=nonfinite, backend=backend)
    return (params, stats) if return_stats else params
