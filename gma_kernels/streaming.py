"""Streaming aggregation: fold client updates in one at a time with O(N) memory.

The accumulator keeps, in one float32 buffer of ``2N + 2`` elements,
``S = Σ_k p_k Δ_k``, ``C = Σ_k a_k sign(Δ_k)`` (``a_k = 1``, or ``p_k`` when weighted),
``Σ p_k`` and K. Two accumulators merge by adding their buffers, so a distributed
aggregation is one ``all_reduce(SUM)`` of ``buffer``. Finalizing gives ``A = |C| / K``
(or ``|C| / Σp``), the mask and ``S / Σp``: the batch API's result to float32 rounding, with
the identical unweighted mask.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import Backend
from .batch import ClientBatch, Updates, Weights, make_batch
from .config import (NONFINITE_POLICIES, GMAStats, MaskConfig, MaskKind, NonFiniteError,
                     NonFinitePolicy, StepConfig, _check_choice, as_count, as_number,
                     check_bool)
from .dispatch import resolve_backend, screen_nonfinite
from .formula import MaskParams, StreamSums, rescale, step_input

_STEP_OVERFLOW = "the accumulated step overflows float32; params and optimizer state left unchanged"


class Accumulator:
    """Running GMA sums over any number of clients. ``add`` folds updates in (fused kernel on
    CUDA), ``merge`` adds another accumulator, ``masked_mean`` / ``finalize`` read the result."""

    def __init__(self, numel: int, *, device: torch.device | str = "cpu",
                 weighted_agreement: bool = False, backend: str = "auto",
                 nonfinite: NonFinitePolicy = "raise") -> None:
        numel = as_count("numel", numel)
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.numel = numel
        self.weighted_agreement = check_bool("weighted_agreement", weighted_agreement)
        self.backend = backend
        self.nonfinite = nonfinite
        self.buffer = torch.zeros(2 * numel + 2, dtype=torch.float32, device=device)
        self.dropped: list[int] = []
        self._seen = 0

    @property
    def total(self) -> Tensor:
        """``S = Σ p_k Δ_k``."""
        return self.buffer[: self.numel]

    @property
    def count(self) -> Tensor:
        """``C = Σ a_k sign(Δ_k)``."""
        return self.buffer[self.numel: 2 * self.numel]

    @property
    def num_clients(self) -> int:
        return self._totals()[1]

    @property
    def weight_sum(self) -> float:
        return self._totals()[0]

    def _totals(self) -> tuple[float, int]:
        """(``Σ p``, K) in one read of the buffer (one device sync on a GPU)."""
        weight_sum, k = self.buffer[-2:].tolist()
        return weight_sum, int(round(k))

    def add(self, updates: Updates, weights: Weights | float = None) -> Accumulator:
        """Fold in one update (a 1-D tensor, with one number as its weight) or several (a
        ``[K, N]`` tensor or a sequence, with K weights).

        A non-finite update raises, naming its position in the stream, and leaves the
        accumulator unchanged (``nonfinite="drop"`` skips it and records it in ``dropped``).
        """
        if isinstance(updates, Tensor) and updates.dim() == 1:
            updates = [updates]
            if as_number(weights) is not None:
                weights = [weights]
        batch = make_batch(updates, weights, allow_zero_sum=True)
        if batch.numel != self.numel or batch.device != self.buffer.device:
            raise ValueError(f"updates have {batch.numel} elements on {batch.device}; this "
                             f"accumulator holds {self.numel} on {self.buffer.device}")
        seen = self._seen
        impl = resolve_backend(self.backend, self.buffer.device)
        keep = screen_nonfinite(impl, batch, self.nonfinite, name=lambda k: f"update #{seen + k}",
                                untouched="accumulator left unchanged")
        self.dropped.extend(seen + k for k in range(batch.num_clients) if k not in keep)
        self._seen += batch.num_clients
        if keep:
            self._fold(impl, batch if len(keep) == batch.num_clients else batch.subset(keep))
        return self

    def _fold(self, impl: Backend, batch: ClientBatch) -> None:
        """``S += Σ p_k Δ_k``, ``C += Σ a_k sign(Δ_k)`` with the raw weights ``p_k``."""
        impl.fold(batch, total=self.total, count=self.count, weighted=self.weighted_agreement)
        # two scalar adds on the device: a host tensor copied in would wait for the fold
        self.buffer[-2] += math.fsum(batch.weights)
        self.buffer[-1] += batch.num_clients

    def merge(self, other: Accumulator) -> Accumulator:
        """Add another accumulator's sums into this one (same size, device, agreement kind)."""
        if not isinstance(other, Accumulator):
            raise TypeError(f"can only merge an Accumulator, got {type(other).__name__}")
        if (other.numel, other.buffer.device, other.weighted_agreement) != \
                (self.numel, self.buffer.device, self.weighted_agreement):
            raise ValueError("accumulators differ in size, device or weighted_agreement")
        self.buffer += other.buffer
        self.dropped.extend(other.dropped)
        return self

    __iadd__ = merge

    def result_settings(self, config: MaskConfig) -> tuple[float, float, float]:
        """``(Σp, threshold, scale)`` of the result under ``config``, once the accumulator is
        known to hold a result for it (some client, a positive weight sum, the same kind of
        agreement)."""
        _, sums, mask = self._result(config)
        return sums.weight_sum, mask.threshold, mask.scale

    def _result(self, config: MaskConfig) -> tuple[int, StreamSums, MaskParams]:
        """(K, the sums, the mask) of the result under ``config``, from one read of the
        buffer; checked as ``result_settings`` says."""
        weight_sum, k = self._totals()
        if k == 0:
            raise ValueError("the accumulator holds no client update")
        if config.weighted_agreement != self.weighted_agreement:
            raise ValueError("weighted_agreement differs between the mask and the accumulator")
        if weight_sum <= 0:
            raise ValueError("the accumulated weights sum to zero")
        return k, StreamSums(self.total, self.count, weight_sum), MaskParams.of(config, k)

    def finalize(self, config: MaskConfig) -> tuple[Tensor, Tensor, GMAStats]:
        """(weighted mean ``S/Σp``, mask ``m`` — divided by its density with ``rescale`` —,
        stats). Both tensors are new float32 buffers of N elements."""
        k, sums, mask = self._result(config)
        impl = resolve_backend(self.backend, self.buffer.device)
        mean, m, mask_sums, finite = impl.finish(sums, mask=mask)
        stats = GMAStats(mask_sums, self.numel, k, tuple(self.dropped))
        if not finite:
            raise NonFiniteError("the accumulated sum overflowed float32")
        if config.rescale:
            rescale(m, stats.density)
            if not bool(torch.isfinite(mean * m).all()):
                raise NonFiniteError("the rescaled average overflowed float32; nothing was stepped")
        return mean, m, stats

    def masked_mean(self, *, tau: float = 0.4, mask: MaskKind = "soft",
                    rescale: bool = False) -> Tensor:
        """``g = m ⊙ S / Σp``, as ``gma_kernels.masked_mean`` computes it in one batch."""
        mean, m, _ = self.finalize(MaskConfig(tau, mask, self.weighted_agreement, rescale))
        return mean.mul_(m)


def step_from(accumulator: Accumulator, *, config: StepConfig, mask: MaskConfig,
              params: Tensor, states: tuple[Tensor, ...], guard: bool, backend: str
              ) -> GMAStats:
    """The server step ``config`` on ``params`` and ``states`` from ``accumulator``'s result
    under ``mask``: guarded and without ``rescale``, in one pass from the sums (the backend's
    ``step_from_sums``), else from ``finalize``'s mean and mask (``formula.step_input``, the
    backend's ``step``). A non-finite sum or step raises ``NonFiniteError`` with params and
    state left unchanged (unless unguarded)."""
    if guard and not mask.rescale:
        k, sums, mask_params = accumulator._result(mask)
        mask_sums, finite, stepped = resolve_backend(backend, params.device).step_from_sums(
            sums, mask=mask_params, config=config, params=params, states=states)
        if not finite:
            raise NonFiniteError("the accumulated sum overflowed float32; params and "
                                 "optimizer state left unchanged")
        if not stepped:
            raise NonFiniteError(_STEP_OVERFLOW)
        return GMAStats(mask_sums, accumulator.numel, k, tuple(accumulator.dropped))
    mean, m, stats = accumulator.finalize(mask)
    x, after = step_input(config, mean, m)
    if not resolve_backend(backend, params.device).step(config=config, params=params,
                                                        states=states, x=x, mask=after,
                                                        guard=guard):
        raise NonFiniteError(_STEP_OVERFLOW)
    return stats
