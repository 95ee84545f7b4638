"""A float64 reference of gradient masked averaging (the README's formula table), written
from the formulas alone (not from the package).

Every function takes the very values the package reads (low-precision updates are upcast to
float64 without any other rounding) and computes in float64 on the CPU:

* ``A_j = |Σ_k a_k sign(Δ_kj)|`` with ``a_k = 1/K`` (computed as the exact integer count over K,
  ``count / K``, one correctly rounded division) or ``a_k = p̄_k`` (``weighted``);
* ``m_j = 1`` if ``A_j ≥ τ`` else ``A_j`` (soft) or ``0`` (hard);
* ``g = m ⊙ Σ_k p̄_k Δ_k``, divided by ``mean(m) + 1e-12`` with ``rescale``;
* the server steps (SGD, momentum, Adam, Yogi, Adagrad; Reddi et al. 2021, no bias correction)
  with the mask placed ``before`` (the optimizer sees ``g``) or ``after`` (the optimizer sees the
  unmasked average and the mask multiplies the step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

F64 = torch.float64


def as_matrix(updates) -> Tensor:
    """``[K, N]`` float64 CPU copy of the updates (a ``[K, N]`` tensor or a sequence of rows)."""
    if isinstance(updates, Tensor):
        return updates.detach().to("cpu", F64)
    return torch.stack([u.detach().to("cpu", F64) for u in updates])


def mean_weights(weights, num_clients: int) -> Tensor:
    """``p̄_k = p_k / Σ p`` in float64 (None: equal weights)."""
    if weights is None:
        return torch.full((num_clients,), 1.0 / num_clients, dtype=F64)
    p = torch.as_tensor(weights).detach().to("cpu", F64).reshape(-1)
    return p / p.sum()


def sign_count(updates) -> Tensor:
    """``Σ_k sign(Δ_kj)`` as exact integers (int64)."""
    u = as_matrix(updates)
    return (u > 0).to(torch.int64).sum(0) - (u < 0).to(torch.int64).sum(0)


def agreement(updates, weights=None, *, weighted: bool = False) -> Tensor:
    u = as_matrix(updates)
    k = u.shape[0]
    if weighted:
        return (mean_weights(weights, k) @ torch.sign(u)).abs()
    return sign_count(u).abs().to(F64) / k


def keep(updates, weights=None, *, tau: float, weighted: bool = False) -> Tensor:
    """Where ``A_j ≥ τ`` (bool). Weighted, a tie is ``A`` within ``(K + 1)·2⁻²⁴`` of ``τ`` (the
    float32 rounding of the weighted sum): it counts as agreement, as an exact tie does."""
    a = agreement(updates, weights, weighted=weighted)
    if not weighted or tau == 0:
        return a >= tau
    return a >= tau - (as_matrix(updates).shape[0] + 1) * 2.0 ** -24


def mask(updates, weights=None, *, tau: float, mask: str = "soft", weighted: bool = False) -> Tensor:
    a = agreement(updates, weights, weighted=weighted)
    kept = keep(updates, weights, tau=tau, weighted=weighted)
    if mask == "soft":
        return torch.where(kept, torch.ones_like(a), a)
    if mask == "hard":
        return kept.to(F64)
    raise ValueError(mask)


def average(updates, weights=None) -> Tensor:
    """Weighted FedAvg ``Σ_k p̄_k Δ_k``."""
    u = as_matrix(updates)
    return mean_weights(weights, u.shape[0]) @ u


def masked_mean(updates, weights=None, *, tau: float = 0.4, mask: str = "soft",
                weighted_agreement: bool = False, rescale: bool = False) -> Tensor:
    m = globals()["mask"](updates, weights, tau=tau, mask=mask, weighted=weighted_agreement)
    g = m * average(updates, weights)
    if rescale:
        g = g / (m.mean() + 1e-12)
    return g


def density(updates, weights=None, *, tau: float, mask: str = "soft", weighted: bool = False):
    return float(globals()["mask"](updates, weights, tau=tau, mask=mask, weighted=weighted).mean())


def mean_agreement(updates, weights=None, *, weighted: bool = False) -> float:
    return float(agreement(updates, weights, weighted=weighted).mean())


STATE_COUNT = {"sgd": 0, "momentum": 1, "adam": 2, "yogi": 2, "adagrad": 2}


@dataclass
class Optimizer:
    """The server optimizers (sgd, momentum, adam, yogi, adagrad) on float64 copies of params
    and state."""

    params: Tensor
    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3
    placement: str = "before"
    tau: float = 0.4
    mask: str = "soft"
    weighted_agreement: bool = False
    rescale: bool = False
    states: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = self.params.detach().to("cpu", F64).clone()
        self.states = [torch.zeros_like(self.params) for _ in range(STATE_COUNT[self.kind])]

    def step(self, updates, weights=None) -> None:
        avg = average(updates, weights)
        m = mask(updates, weights, tau=self.tau, mask=self.mask, weighted=self.weighted_agreement)
        if self.rescale:
            assert self.placement == "before"
            m = m / (m.mean() + 1e-12)
        self.apply(avg, m)

    def apply(self, avg: Tensor, m: Tensor) -> None:
        """One step from the unmasked average and the mask."""
        x = m * avg if self.placement == "before" else avg
        if self.kind == "sgd":
            direction = x
        elif self.kind == "momentum":
            (v,) = self.states
            v.mul_(self.momentum).add_(x)
            direction = v.clone()
        else:
            first, second = self.states
            first.mul_(self.beta1).add_((1 - self.beta1) * x)
            sq = x * x
            if self.kind == "adam":
                second.mul_(self.beta2).add_((1 - self.beta2) * sq)
            elif self.kind == "yogi":
                second.sub_((1 - self.beta2) * sq * torch.sign(second - sq))
            elif self.kind == "adagrad":
                second.add_(sq)
            else:
                raise ValueError(self.kind)
            direction = first / (second.sqrt() + self.eps)
        if self.placement == "after":
            direction = direction * m
        self.params.add_(self.lr * direction)
