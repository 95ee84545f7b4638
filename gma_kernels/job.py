"""``Job``: one aggregation pass as every backend receives it, and the ``Outcome`` it returns."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .batch import ClientBatch
from .config import MaskConfig, StepConfig
from .formula import MaskParams


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

    @property
    def mask_params(self) -> MaskParams:
        """The mask over this batch's clients, as the backends apply it."""
        return MaskParams.of(self.mask, self.batch.num_clients)


@dataclass(frozen=True)
class Outcome:
    """``finite`` is False when a guarded job met a non-finite value and wrote nothing.
    ``sums`` is a ``[P, 2]`` float32 tensor of partial sums of ``m`` and ``A`` (P blocks),
    left unreduced so that nobody pays for statistics they don't read."""

    finite: bool
    sums: Tensor

    @property
    def mask_sum(self) -> Tensor:
        return self.sums[:, 0].sum()
