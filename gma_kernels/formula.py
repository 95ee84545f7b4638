"""The GMA formula's pieces, one home for every backend.

* **Threshold** from ``τ`` and K (``mask_threshold``): unweighted, the smallest integer sign
  count ``c`` with ``c / K ≥ τ`` (``count_threshold``), so the mask compares integers and is
  bit-identical everywhere; weighted, ``τ`` lowered by the float32 rounding bound of the
  weighted sum (``weighted_threshold``).
* **Mask** from the signed count (``mask_from_count``, with ``MaskParams``: threshold, scale,
  hard, weighted): ``A = |count| · scale``; ``m = 1`` where ``|count| ≥ threshold``, else ``A``
  (soft) or 0 (hard). The Triton kernel and the C kernel compute the same two lines in
  registers, from the same ``MaskParams``.
* **Density rescale** (``rescale``): ``x / (density + 1e-12)``.
* **Streaming result** from the accumulated ``S = Σ p_k Δ_k`` and ``C = Σ a_k sign(Δ_k)``
  (``StreamSums``, ``streaming_result``): the mean ``S / Σp`` and the mask from ``C``
  (``C / Σp`` weighted).
* **Mask placement** (``step_input``): the step sees ``g = m ⊙ mean``, or the mean with ``m``
  on its direction (``StepConfig.masks_step``).
* **Server step** on a known ``g`` (``step_values``, ``apply_step``): sgd ``w += η g``;
  momentum ``v = β v + g, w += η v``; adam/yogi/adagrad ``m = β1 m + (1−β1) g``,
  ``v = β2 v + (1−β2) g²`` / ``v − (1−β2) g² sign(v − g²)`` / ``v + g²``,
  ``w += η m / (√v + ε)`` (Reddi et al. 2021, no bias correction).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .config import MaskConfig, StepConfig

STEP_BLOCK = {"cpu": 1 << 17, "other": 1 << 24}
"""Coordinates stepped together: on CPU the step's temporaries stay in cache; on a GPU they
stay within 64 MiB each, so a huge buffer is stepped in a few launches per block."""


def fp32_scalar(x: float) -> float:
    """``x`` rounded to float32, so every backend multiplies by the very same constant."""
    return float(np.float32(x))


def count_threshold(tau: float, num_clients: int) -> float:
    """Smallest integer sign count ``c`` with ``c / K ≥ τ``.

    ``c / K`` is evaluated as a float64 division, as ``A ≥ τ`` reads: the binary ``τ = 0.4``
    is a hair above 2/5, so an exact rational comparison would drop the tie ``A = 0.4``
    (4 of 10 clients) that ``A ≥ τ`` keeps.
    """
    k = num_clients
    c = min(k, max(0, math.ceil(tau * k)))
    while c > 0 and (c - 1) / k >= tau:
        c -= 1
    while c < k and c / k < tau:
        c += 1
    return float(c)


def weighted_threshold(tau: float, num_clients: int) -> float:
    """The threshold on the weighted agreement ``A = |Σ_k p̄_k sign(Δ_kj)|``: ``τ`` lowered by
    ``(K + 1)·2⁻²⁴``, the float32 rounding bound of that sum (weights included), so that an
    exact tie ``A = τ`` (all of 6 equal clients agreeing at τ = 1: 6 · fl32(1/6) is 1.0000001
    or 0.99999994) is kept on every backend, as ``A ≥ τ`` says."""
    return max(0.0, tau - (num_clients + 1) * 2.0 ** -24) if tau > 0 else 0.0


def mask_threshold(mask: MaskConfig, num_clients: int) -> tuple[float, float]:
    """(threshold on the score, score → agreement scale). Unweighted: the score is the exact
    sign count, compared with an integer threshold, and ``A = count · fl32(1/K)``."""
    if mask.weighted_agreement:
        return weighted_threshold(mask.tau, num_clients), 1.0
    return count_threshold(mask.tau, num_clients), fp32_scalar(1.0 / num_clients)


class MaskParams(NamedTuple):
    """The mask as every backend applies it to a score (the signed count, or the weighted
    agreement when ``weighted``): ``A = |score| · scale``; ``m = 1`` where
    ``|score| ≥ threshold``, else ``A`` (soft) or 0 (``hard``)."""

    threshold: float
    scale: float
    hard: bool
    weighted: bool

    @classmethod
    def of(cls, mask: MaskConfig, num_clients: int) -> MaskParams:
        """``mask`` over ``num_clients`` clients (``mask_threshold``)."""
        threshold, scale = mask_threshold(mask, num_clients)
        return cls(threshold, scale, mask.mask == "hard", mask.weighted_agreement)


def mask_from_count(count: Tensor, mask: MaskParams) -> tuple[Tensor, Tensor]:
    """(m, A) from the signed count, overwriting ``count`` with ``A = |count| · scale``;
    ``m = 1`` where ``|count| ≥ threshold``, else ``A`` (soft) or 0 (hard)."""
    score = count.abs_()
    keep = score >= mask.threshold
    agree = score.mul_(mask.scale) if mask.scale != 1.0 else score
    return (keep.to(torch.float32) if mask.hard else torch.where(keep, 1.0, agree)), agree


def rescale(x: Tensor, density: Tensor) -> Tensor:
    """The density rescale in place: ``x / (density + 1e-12)``."""
    return x.mul_(1.0 / (density + 1e-12))


class StreamSums(NamedTuple):
    """A streaming accumulator's sums: ``total = S = Σ p_k Δ_k``, ``count = C = Σ a_k
    sign(Δ_k)`` (float32, N each) and ``weight_sum = Σ p_k``."""

    total: Tensor
    count: Tensor
    weight_sum: float


def streaming_result(sums: StreamSums, *, mask: MaskParams
                     ) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(mean ``S/Σp``, mask ``m`` from ``C`` — ``C/Σp`` when ``mask.weighted`` — both new
    buffers, ``[[Σ m, Σ A]]`` float32, whether the mean is finite); the sums are only read."""
    count = sums.count / sums.weight_sum if mask.weighted else sums.count.clone()
    m, agree = mask_from_count(count, mask)
    mean = sums.total / sums.weight_sum
    return mean, m, torch.stack((m.sum(), agree.sum()))[None], bool(torch.isfinite(mean).all())


def step_input(config: StepConfig, mean: Tensor, m: Tensor) -> tuple[Tensor, Tensor | None]:
    """(the step's input, the mask on its direction): ``(m ⊙ mean, None)`` — ``mean``
    multiplied in place — or, when the mask multiplies the step (``config.masks_step``),
    ``(mean, m)``."""
    return (mean, m) if config.masks_step else (mean.mul_(m), None)


def step_values(step: StepConfig, params: Tensor, states: tuple[Tensor, ...], x: Tensor,
                mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One server step, out of place: the new params and state. ``x`` is ``g``, or, when the
    mask multiplies the step (``step.masks_step``), the unmasked average with ``mask``."""
    if step.kind == "sgd":
        new_states: tuple[Tensor, ...] = ()
        direction = x
    elif step.kind == "momentum":
        (velocity,) = states
        direction = velocity * step.momentum + x
        new_states = (direction,)
    else:
        first, second = states
        first = first * step.beta1 + x * (1.0 - step.beta1)
        sq = x * x
        if step.kind == "adam":
            second = second * step.beta2 + sq * (1.0 - step.beta2)
        elif step.kind == "yogi":
            second = second - (1.0 - step.beta2) * sq * torch.sign(second - sq)
        else:
            second = second + sq
        direction = first / (second.sqrt() + step.eps)
        new_states = (first, second)
    if mask is not None:
        direction = direction * mask
    return params + step.lr * direction, new_states


#: below float32's largest value (3.4e38) by a factor of 2, so the bound's own rounding is safe
_SAFE = 1.7e38


def _surely_finite(step: StepConfig, params: Tensor, states: tuple[Tensor, ...],
                   x: Tensor) -> bool:
    """Whether the step's new params and state are certainly finite, from bounds on the
    inputs' largest magnitudes (|direction| ≤ |m|/ε for the adaptive kinds, mask ≤ 1); False
    also when any input is not finite (every comparison with NaN is False)."""
    def biggest(t: Tensor) -> float:  # max |t| in one read-only pass (inf if NaN)
        lo, hi = (float(v) for v in torch.aminmax(t))
        return math.inf if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)

    g = biggest(x)
    if step.kind == "sgd":
        direction = g
    elif step.kind == "momentum":
        direction = step.momentum * biggest(states[0]) + g
    else:
        first = step.beta1 * biggest(states[0]) + (1.0 - step.beta1) * g
        second = biggest(states[1]) + g * g
        if not (g < 1e19 and first < _SAFE and second < _SAFE):
            return False
        direction = first / step.eps
    return direction < _SAFE and biggest(params) + step.lr * direction < _SAFE


def apply_step(*, config: StepConfig, params: Tensor, states: tuple[Tensor, ...], x: Tensor,
               mask: Tensor | None = None, guard: bool = False) -> bool:
    """One server step in place (``step_values``), block by block (``STEP_BLOCK``).
    With ``guard`` nothing is written unless every new value is finite: a bound from the
    inputs' largest magnitudes (``_surely_finite``, a few read-only passes) settles it in the
    common case, else every new value is computed and checked first. Returns whether it
    stepped."""
    n = params.numel()
    size = STEP_BLOCK["cpu" if params.device.type == "cpu" else "other"]
    blocks = [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def values(sl: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        return step_values(config, params[sl], tuple(t[sl] for t in states), x[sl],
                           None if mask is None else mask[sl])

    if guard and not _surely_finite(config, params, states, x):
        for sl in blocks:
            new_params, new_states = values(sl)
            if not all(bool(torch.isfinite(t).all()) for t in (new_params, *new_states)):
                return False
    for sl in blocks:
        new_params, new_states = values(sl)
        params[sl].copy_(new_params)
        for target, value in zip(states, new_states):
            target[sl].copy_(value)
    return True


def streaming_step(sums: StreamSums, *, mask: MaskParams, config: StepConfig, params: Tensor,
                   states: tuple[Tensor, ...]) -> tuple[Tensor, bool, bool]:
    """The guarded server step from a streaming accumulator's sums: ``streaming_result``, then
    ``apply_step`` on ``step_input``. Returns (``[[Σ m, Σ A]]``, whether the mean is finite,
    whether it stepped); unless both, params and state are as they were."""
    mean, m, stats, finite = streaming_result(sums, mask=mask)
    if not finite:
        return stats, False, False
    x, after = step_input(config, mean, m)
    return stats, True, apply_step(config=config, params=params, states=states, x=x, mask=after,
                                   guard=True)
