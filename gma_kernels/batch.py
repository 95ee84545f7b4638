"""Client updates, validated once: ``ClientBatch`` is what both backends read."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

UPDATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Updates = Tensor | Sequence[Tensor]
Weights = Tensor | Sequence[float] | None


@dataclass(frozen=True)
class ClientBatch:
    """K client updates of N elements each, with their weights.

    The updates are either ``matrix``, a ``[K, N]`` tensor with unit stride along N (its rows
    are at a fixed stride, so no per-row work is needed), or ``row_list``, K unit-stride 1-D
    tensors read where they lie. ``weights`` are the raw ``p_k`` (host floats, checked) and
    ``mean_weights`` the normalized ``p̄_k = p_k / Σ p``.
    """

    matrix: Tensor | None
    row_list: tuple[Tensor, ...] | None
    weights: tuple[float, ...]

    @cached_property
    def rows(self) -> tuple[Tensor, ...]:
        """The K updates as 1-D views (made on first use for a matrix)."""
        return tuple(self.matrix.unbind(0)) if self.matrix is not None else self.row_list

    @cached_property
    def mean_weights(self) -> tuple[float, ...]:
        """``p̄_k = p_k / Σ p`` (the sum is exact, ``math.fsum``); needs ``Σ p > 0``."""
        total = math.fsum(self.weights)
        if total <= 0:
            raise ValueError("weights sum to zero: at least one client needs a positive weight")
        return tuple((np.asarray(self.weights, dtype=np.float64) / total).tolist())

    @property
    def _first(self) -> Tensor:
        return self.matrix if self.matrix is not None else self.row_list[0]

    @property
    def num_clients(self) -> int:
        return len(self.weights)

    @property
    def numel(self) -> int:
        return self._first.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self._first.dtype

    @property
    def device(self) -> torch.device:
        return self._first.device

    def subset(self, keep: Sequence[int]) -> ClientBatch:
        """The batch of the clients ``keep`` only (their weights renormalize among them)."""
        return ClientBatch(None, tuple(self.rows[k] for k in keep),
                           tuple(self.weights[k] for k in keep))


def check_weights(weights: Weights, num_clients: int, *, allow_zero_sum: bool = False
                  ) -> tuple[float, ...]:
    """Weights as host floats: K finite, non-negative numbers with a positive sum (a zero sum is
    allowed for a streaming fold, whose total is checked when it is finalized). Checked as one
    NumPy array, so that hundreds of clients cost no per-client Python work."""
    if weights is None:
        return (1.0,) * num_clients
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(f"weights must be 1-D, got shape {tuple(weights.shape)}")
        values = weights.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            values = _as_float64(weights)
        except OverflowError:
            raise ValueError("weights holds an integer too large for a float64") from None
    if len(values) != num_clients:
        raise ValueError(f"weights has {len(values)} entries but there are {num_clients} updates")
    if not (np.isfinite(values).all() and (values >= 0).all()):
        for bad, what in ((~np.isfinite(values), "is not finite"), (values < 0, "is negative")):
            if bad.any():
                k = int(np.argmax(bad))
                raise ValueError(f"weights[{k}] {what} ({values[k]})")
    raw = tuple(values.tolist())
    if math.fsum(raw) <= 0 and not allow_zero_sum:
        raise ValueError("weights sum to zero: at least one client needs a positive weight")
    return raw


def _as_float64(weights: Sequence[float]) -> np.ndarray:
    """A sequence of numbers as a 1-D float64 array (element by element where NumPy cannot
    convert it at once, e.g. 0-d CUDA tensors); strings and bools are refused, not parsed."""
    if type(weights) in (list, tuple) and set(map(type, weights)) <= {float, int}:
        return np.array(weights, dtype=np.float64)  # plain numbers: no per-item checks needed
    items = weights.tolist() if isinstance(weights, np.ndarray) else weights
    if isinstance(items, (str, bytes)) or (isinstance(items, Sequence) and any(
            isinstance(p, (str, bytes, bool, np.bool_)) for p in items)):
        raise TypeError(f"weights must be numbers, got {weights!r}")
    try:
        values = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        try:
            values = np.array([float(p) for p in weights], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"weights must be a sequence of numbers or a 1-D tensor: {err}"
                            ) from None
    if values.ndim != 1:
        raise TypeError(f"weights must be a sequence of numbers or a 1-D tensor, got "
                        f"{type(weights).__name__} of shape {values.shape}")
    return values


def check_updates(updates: Updates) -> tuple[Tensor | None, tuple[Tensor, ...] | None]:
    """(matrix, None) for a ``[K, N]`` tensor, else (None, rows): unit stride along N, one
    dtype, device and length."""
    if isinstance(updates, Tensor):
        if updates.dim() != 2:
            raise ValueError(f"updates must be a [K, N] tensor or a sequence of 1-D tensors, "
                             f"got a tensor of shape {tuple(updates.shape)}")
        if updates.shape[0] == 0:
            raise ValueError("updates is empty: no client updates to aggregate")
        if updates.shape[1] == 0:
            raise ValueError("updates has N = 0 elements per client")
        _check_dtype("updates", updates)
        return (updates if updates.stride(1) == 1 else updates.contiguous()), None
    if not isinstance(updates, Sequence) or isinstance(updates, (str, bytes)):
        raise TypeError(f"updates must be a [K, N] tensor or a sequence of 1-D tensors, "
                        f"got {type(updates).__name__}")
    if len(updates) == 0:
        raise ValueError("updates is empty: no client updates to aggregate")
    rows = []
    first = updates[0]
    for k, u in enumerate(updates):
        if not isinstance(u, Tensor):
            raise TypeError(f"updates[{k}] is a {type(u).__name__}, not a tensor")
        if u.dim() != 1:
            raise ValueError(f"updates[{k}] must be 1-D, got shape {tuple(u.shape)}")
        _check_dtype(f"updates[{k}]", u)
        if u.numel() != first.numel():
            raise ValueError(f"updates[{k}] has {u.numel()} elements but updates[0] has {first.numel()}")
        if u.dtype != first.dtype:
            raise ValueError(f"updates[{k}] is {u.dtype} but updates[0] is {first.dtype}")
        if u.device != first.device:
            raise ValueError(f"updates[{k}] is on {u.device} but updates[0] is on {first.device}")
        rows.append(u if u.stride(0) == 1 else u.contiguous())
    if first.numel() == 0:
        raise ValueError("updates have N = 0 elements")
    return None, tuple(rows)


def _check_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in UPDATE_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")


def make_batch(updates: Updates, weights: Weights, *, allow_zero_sum: bool = False
               ) -> ClientBatch:
    """Validate updates and weights into a batch (a zero weight sum only with
    ``allow_zero_sum``, for a streaming fold)."""
    matrix, rows = check_updates(updates)
    raw = check_weights(weights, len(rows) if rows is not None else matrix.shape[0],
                        allow_zero_sum=allow_zero_sum)
    return ClientBatch(matrix, rows, raw)


def check_params(params: Tensor, batch: ClientBatch | None = None, name: str = "params") -> None:
    """``params`` must be a contiguous 1-D float32 tensor outside autograd (it is written in
    place) and, given ``batch``, hold N elements on the updates' device."""
    if not isinstance(params, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(params).__name__}")
    if params.dim() != 1:
        raise ValueError(f"{name} must be 1-D (FlatParams(model).buffer is), got shape "
                         f"{tuple(params.shape)}")
    if batch is not None and params.numel() != batch.numel:
        raise ValueError(f"{name} must be 1-D with {batch.numel} elements (one per update element), "
                         f"got shape {tuple(params.shape)}")
    if params.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {params.dtype}")
    if batch is not None and params.device != batch.device:
        raise ValueError(f"{name} is on {params.device} but the updates are on {batch.device}")
    if not params.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is written in place)")
    if params.requires_grad:
        raise ValueError(f"{name} requires grad, so it cannot be stepped in place: pass a tensor "
                         "outside autograd (FlatParams(model).buffer, or params.detach())")
