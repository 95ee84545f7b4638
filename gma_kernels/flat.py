"""One contiguous float32 buffer for a whole model, so one kernel launch steps every tensor."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Segment:
    """Where one named tensor lives in the flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class FlatLayout:
    """The segments of a flat buffer, in order; ``numel`` is their total size."""

    segments: tuple[Segment, ...]

    @property
    def numel(self) -> int:
        return self.segments[-1].stop if self.segments else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.segments)

    def offset_of(self, name: str) -> int:
        """Flat index where tensor ``name`` starts (e.g. the classifier, for FedPVR)."""
        for s in self.segments:
            if s.name == name:
                return s.offset
        raise KeyError(f"{name!r} is not in the layout (known: {', '.join(self.names)})")

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> FlatLayout:
        segments, offset = [], 0
        for name, t in tensors.items():
            segments.append(Segment(name, tuple(t.shape), offset))
            offset += t.numel()
        return cls(tuple(segments))

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Named views into ``flat`` (no copy)."""
        self._check(flat)
        return {s.name: flat[s.offset:s.stop].view(s.shape) for s in self.segments}

    def _check(self, flat: Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat buffer must be 1-D with {self.numel} elements, "
                             f"got shape {tuple(flat.shape)}")


def flatten(tensors: Mapping[str, Tensor], *, device: torch.device | str | None = None) -> tuple[Tensor, FlatLayout]:
    """Copy named tensors (a state_dict) into one new float32 buffer; return it and its layout."""
    if not tensors:
        raise ValueError("nothing to flatten: the mapping is empty")
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name!r} is not a floating-point tensor")
    layout = FlatLayout.of(tensors)
    first = next(iter(tensors.values()))
    flat = torch.empty(layout.numel, dtype=torch.float32, device=device or first.device)
    for s, t in zip(layout.segments, tensors.values()):
        flat[s.offset:s.stop].copy_(t.reshape(-1))
    return flat, layout


def unflatten(flat: Tensor, layout: FlatLayout) -> dict[str, Tensor]:
    """New tensors (copies) from a flat buffer, keyed as the layout names them."""
    return {name: v.clone() for name, v in layout.views(flat).items()}


class FlatParams:
    """A module's parameters re-pointed into one contiguous float32 buffer.

    After ``FlatParams(model)``, every ``p.data`` is a view into ``buffer``: stepping
    ``buffer`` (``gma_step(flat.buffer, updates)``) updates the model with no copy back, and
    ``flat.buffer.clone()`` is a snapshot of the whole model.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"FlatParams takes an nn.Module, got {type(module).__name__} (for a "
                            "dict of tensors use flatten)")
        named = dict(module.named_parameters())
        if not named:
            raise ValueError(f"{type(module).__name__} has no parameters to flatten")
        for name, p in named.items():
            if p.dtype != torch.float32:
                raise TypeError(f"parameter {name!r} is {p.dtype}; FlatParams needs float32")
        self.buffer, self.layout = flatten({n: p.detach() for n, p in named.items()})
        views = self.layout.views(self.buffer)
        for name, p in named.items():
            p.data = views[name]
        self.module = module

    def copy_(self, flat: Tensor) -> None:
        """Load parameters from another flat buffer of the same layout."""
        self.layout._check(flat)
        self.buffer.copy_(flat)

    def state_dict(self) -> dict[str, Tensor]:
        return unflatten(self.buffer, self.layout)

    def grad_buffer(self) -> Tensor:
        """The parameters' gradients gathered into one new flat buffer (zeros where None)."""
        out = torch.zeros_like(self.buffer)
        for s, p in zip(self.layout.segments, self.module.parameters()):
            if p.grad is not None:
                out[s.offset:s.stop].copy_(p.grad.reshape(-1))
        return out
