"""What the framework adapters share: a model's arrays laid out for one flat float32 buffer, and
the rounded weighted mean of its integer and boolean arrays.

A model handed over as named arrays (a Flower ``ArrayRecord``, a list of NumPy arrays, a state
dict) is aggregated as one flat float32 buffer of its floating-point arrays, in order (a
``gma_kernels.FlatLayout`` of them). Its integer and boolean arrays (BatchNorm's
``num_batches_tracked``, say) are not masked: they get the clients' weighted mean, rounded to the
nearest integer (half to even). Needs only NumPy and PyTorch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..flat import FlatLayout, Segment

__all__ = ["ArraySpec", "ArrayLayout", "rounded_mean"]


@dataclass(frozen=True)
class ArraySpec:
    """One array of a model: its name, shape and dtype (a NumPy or a PyTorch dtype)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype | torch.dtype

    @property
    def floating(self) -> bool:
        """Whether the array is aggregated in the flat float32 buffer (else: rounded mean)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype.is_floating_point
        return self.dtype.kind == "f"


@dataclass(frozen=True)
class ArrayLayout:
    """A model's arrays in order (``specs``); ``flat`` places the floating-point ones, one
    segment each, in a flat float32 buffer of ``numel`` elements."""

    specs: tuple[ArraySpec, ...]
    flat: FlatLayout

    @classmethod
    def of(cls, specs: Iterable[ArraySpec]) -> ArrayLayout:
        specs = tuple(specs)
        segments, offset = [], 0
        for spec in specs:
            if spec.floating:
                segments.append(Segment(spec.name, spec.shape, offset))
                offset += math.prod(spec.shape)
        return cls(specs, FlatLayout(tuple(segments)))

    @property
    def numel(self) -> int:
        return self.flat.numel

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    @property
    def others(self) -> tuple[ArraySpec, ...]:
        """The integer and boolean arrays, in order."""
        return tuple(spec for spec in self.specs if not spec.floating)


def rounded_mean(values: Sequence[np.ndarray], weights: Sequence[float],
                 base: np.ndarray | None = None) -> np.ndarray:
    """``rint(base + Σ_k w_k v_k / Σ_k w_k)``, computed in float64 (``base``: the global value,
    when ``values`` are the clients' updates). Returns a float64 array of integral values, for
    the caller to cast to the array's dtype."""
    total = math.fsum(weights)
    mean = sum(np.asarray(v).astype(np.float64) * (w / total) for v, w in zip(values, weights))
    if base is not None:
        mean = np.asarray(base).astype(np.float64) + mean
    return np.asarray(np.rint(mean))
