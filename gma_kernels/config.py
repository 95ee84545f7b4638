"""The public types: validated settings (``MaskConfig``: what to mask, ``StepConfig``: how to
step), the statistics of an aggregation (``GMAStats``) and the error a refused one raises.

Every check on hyperparameters lives here (``__post_init__``), so the kernels never repeat it;
the formula that uses them is in ``formula.py``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from functools import cached_property
from fractions import Fraction
from typing import Literal

import numpy as np
import torch
from torch import Tensor

MaskKind = Literal["soft", "hard"]
OptimizerKind = Literal["sgd", "momentum", "adam", "yogi", "adagrad"]
Placement = Literal["before", "after"]
NonFinitePolicy = Literal["raise", "drop", "unchecked"]

MASK_KINDS = ("soft", "hard")
OPTIMIZER_KINDS = ("sgd", "momentum", "adam", "yogi", "adagrad")
PLACEMENTS = ("before", "after")
NONFINITE_POLICIES = ("raise", "drop", "unchecked")


class NonFiniteError(ValueError):
    """An aggregation refused because an update, or its result, is not finite (NaN or inf):
    params and optimizer state are left unchanged. The message names the clients."""

#: number of optimizer state buffers each kind keeps (``v`` for momentum, ``m, v`` for adaptive)
STATE_COUNT = {"sgd": 0, "momentum": 1, "adam": 2, "yogi": 2, "adagrad": 2}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def as_number(value: object) -> float | None:
    """``value`` as a float if it is a real number (Python, NumPy, or a 0-d real torch tensor;
    not a bool, not a string), else None. A number of less than 64 bits is read by its
    shortest decimal form (``np.float32(0.4)`` is 0.4, not 0.4000000059604645), as the user
    wrote it."""
    if type(value) is float or type(value) is int:  # the common case, before the ABC checks
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        narrow = value.is_floating_point() and value.dtype != torch.float64
        value = np.float32(value.item()) if narrow else value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    return float(value)


def as_count(name: str, value: object, low: int = 1) -> int:
    """``value`` as an int ``>= low`` (Python, NumPy or 0-d integer tensor), else ValueError."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (or a NumPy bool), else ValueError."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_finite(name: str, value: float, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """``value`` as a float, checked finite and within the bounds, else ValueError."""
    number = as_number(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = number
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return float(value)


def tau_from_agreeing_fraction(fraction: float) -> float:
    """τ for "at least ``fraction`` of the clients agree on the sign": ``τ = 2·fraction − 1``.

    The workshop paper's prose ("80% of clients agree") is ``tau_from_agreeing_fraction(0.8) = 0.6``;
    its formula ``I{p·K ≤ |Σ sign|}`` is ``τ = p`` directly.
    """
    fraction = _check_finite("fraction", fraction, low=0.5, high=1.0)
    # from the shortest decimal form: 2 * 0.8 - 1 is 0.6000000000000001 in floating point,
    # which would reject 8 agreeing clients out of 10
    return float(2 * Fraction(repr(fraction)) - 1)


@dataclass(frozen=True)
class MaskConfig:
    """The GMA mask: agreement ``A_j = |Σ_k a_k sign(Δ_kj)|``; ``m_j = 1`` if ``A_j ≥ τ``,
    else ``A_j`` (soft) or ``0`` (hard). ``rescale`` divides by the density ``mean(m)``."""

    tau: float = 0.4
    mask: MaskKind = "soft"
    weighted_agreement: bool = False
    rescale: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _check_finite("tau", self.tau, low=0.0, high=1.0))
        _check_choice("mask", self.mask, MASK_KINDS)
        for name in ("weighted_agreement", "rescale"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))


#: each hyperparameter of ``StepConfig`` with its bounds (``_check_finite``)
_STEP_BOUNDS = (("lr", {"low": 0.0}), ("momentum", {"low": 0.0, "high": 1.0}),
                ("beta1", {"low": 0.0, "high": 1.0}), ("beta2", {"low": 0.0, "high": 1.0}),
                ("eps", {"low": 0.0, "low_open": True}))


@dataclass(frozen=True)
class StepConfig:
    """A server step on the masked pseudo-gradient ``g`` (Reddi et al. 2021, no bias correction).

    sgd ``w += η g``; momentum ``v = β v + g, w += η v``; adam/yogi/adagrad
    ``m = β1 m + (1−β1) g``, ``v`` per kind, ``w += η m / (√v + ε)``. With
    ``mask_placement="after"`` the state sees the unmasked average and the mask multiplies the
    step (``masks_step``). ``bias_correction`` (adam only): ``torch.optim.Adam``'s step
    ``w += η m̂ / (√v̂ + ε)`` with ``m̂ = m / (1−β1^t)``, ``v̂ = v / (1−β2^t)`` at step ``t``
    (``at_step``).
    """

    kind: OptimizerKind = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3
    mask_placement: Placement = "before"
    bias_correction: bool = False

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.kind, OPTIMIZER_KINDS)
        _check_choice("mask_placement", self.mask_placement, PLACEMENTS)
        for name, bounds in _STEP_BOUNDS:
            object.__setattr__(self, name, _check_finite(name, getattr(self, name), **bounds))
        object.__setattr__(self, "bias_correction", check_bool("bias_correction",
                                                               self.bias_correction))
        if self.bias_correction and self.kind != "adam":
            raise ValueError(f"bias_correction applies to optimizer 'adam' only, not "
                             f"{self.kind!r}")
        if self.bias_correction and max(self.beta1, self.beta2) == 1.0:
            raise ValueError("bias_correction needs beta1 < 1 and beta2 < 1 (it divides by "
                             "1 - beta^t)")

    def at_step(self, t: int) -> StepConfig:
        """The step ``t`` (1, 2, ...) as a step without bias correction: Adam's corrected
        step is ``η √(1−β2^t) / (1−β1^t) · m / (√v + ε √(1−β2^t))``, so only ``η`` and ``ε``
        change. Without ``bias_correction``: this config itself."""
        if not self.bias_correction:
            return self
        root = math.sqrt(1.0 - self.beta2 ** t)
        return dataclasses.replace(self, lr=self.lr * root / (1.0 - self.beta1 ** t),
                                   eps=self.eps * root, bias_correction=False)

    @property
    def state_count(self) -> int:
        return STATE_COUNT[self.kind]

    @property
    def masks_step(self) -> bool:
        """Whether the mask multiplies the optimizer's step rather than its input: placement
        "after" with a stateful kind (for sgd the two placements are the same step)."""
        return self.mask_placement == "after" and self.kind != "sgd"


@dataclass(frozen=True)
class GMAStats:
    """Mask statistics of one aggregation: ``density = mean_j m_j``, ``mean_agreement =
    mean_j A_j`` (0-d float32 tensors on the updates' device, reduced on first access from the
    ``[P, 2]`` partial sums), the number of clients aggregated and those dropped for
    non-finite values."""

    sums: Tensor
    numel: int
    num_clients: int
    dropped: tuple[int, ...] = ()

    @cached_property
    def _means(self) -> Tensor:
        return self.sums.sum(0) / self.numel

    @property
    def density(self) -> Tensor:
        return self._means[0]

    @property
    def mean_agreement(self) -> Tensor:
        return self._means[1]

    def as_dict(self) -> dict[str, float]:
        density, agreement = self._means.tolist()  # one device read for both
        return {"mask_density": density, "mean_agreement": agreement,
                "clients": self.num_clients, "dropped": len(self.dropped)}
