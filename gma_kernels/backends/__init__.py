"""The backends: ``torch_ops`` runs PyTorch ops on any device, ``native`` the whole pass on CPU
in C (``csrc/``), ``triton_kernel`` the fused GPU kernels. Each module is a ``Backend``, and
only ``gma_kernels.dispatch`` imports them."""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from ..batch import ClientBatch
from ..config import StepConfig
from ..formula import MaskParams, StreamSums
from ..job import Job, Outcome


class Backend(Protocol):
    """What a backend module provides: the whole pass (``run``), a step on a known ``g``, the
    streaming accumulator's fold, result and step from its sums, and the non-finite screen."""

    def run(self, job: Job) -> Outcome:
        """Aggregate ``job.batch`` and, with ``job.step``, step in the same pass where it can
        (see ``Job`` for the guard)."""

    def step(self, *, config: StepConfig, params: Tensor, states: tuple[Tensor, ...], x: Tensor,
             mask: Tensor | None = None, guard: bool) -> bool:
        """The step on ``g = x`` in place (``mask`` multiplies its direction); whether it
        stepped (with ``guard``, only if every new value is finite)."""

    def fold(self, batch: ClientBatch, *, total: Tensor, count: Tensor, weighted: bool
             ) -> None:
        """``total += Σ p_k x_k``, ``count += Σ a_k sign(x_k)`` (``a_k = p_k`` when
        ``weighted``, else 1) in place."""

    def finish(self, sums: StreamSums, *, mask: MaskParams
               ) -> tuple[Tensor, Tensor, Tensor, bool]:
        """``formula.streaming_result``: (mean, m, ``[[Σ m, Σ A]]``, whether the mean is
        finite)."""

    def step_from_sums(self, sums: StreamSums, *, mask: MaskParams, config: StepConfig,
                       params: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, bool, bool]:
        """``formula.streaming_step``: the guarded step from the sums (``[[Σ m, Σ A]]``,
        whether the mean is finite, whether it stepped)."""

    def nonfinite_rows(self, batch: ClientBatch) -> list[int]:
        """The clients whose update holds a NaN or an infinity."""
