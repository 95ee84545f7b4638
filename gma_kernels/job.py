"""``Job``: one aggregation pass as both backends receive it, and the ``Outcome`` they return."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .batch import ClientBatch
from .config import MaskConfig, StepConfig


@dataclass(frozen=True)
class Job:
    """Read every update once; compute ``A``, ``m`` and ``Σ p̄_k Δ_k``; then, as asked, write the
    masked pseudo-gradient ``g`` to ``g_out``, the agreement to ``a_out`` and step ``params``
    (with the optimizer ``states``) in the same pass.

    With ``guard``, a non-finite aggregate never reaches ``params``, ``states`` or the outputs
    of a step: the backend reports ``finite=False`` and leaves ``params`` and ``states`` as
    they were.
    """

    batch: ClientBatch
    mask: MaskConfig
    step: StepConfig | None = None
    params: Tensor | None = None
    states: tuple[Tensor, ...] = ()
    g_out: Tensor | None = None
    a_out: Tensor | None = None
    guard: bool = True


@dataclass(frozen=True)
class Outcome:
    """``finite`` is False when a guarded job met a non-finite value and wrote nothing.
    ``mask_sum`` and ``agreement_sum`` are 0-d float32 tensors: ``Σ_j m_j`` and ``Σ_j A_j``."""

    finite: bool
    mask_sum: Tensor
    agreement_sum: Tensor
