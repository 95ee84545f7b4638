"""GMA for frameworks whose aggregation hook hands over plain arrays.

NVFlare, FedML, pfl-research and many home-grown servers give the aggregator the global model
and the clients' models as lists of NumPy arrays (or as PyTorch state dicts). These two functions
take exactly that and return the new global model, dtypes and shapes preserved:

* ``aggregate_arrays(global_arrays, client_arrays, weights)``: lists of ``np.ndarray``;
* ``aggregate_state_dicts(global_state, client_states, weights)``: mappings of tensors (or
  arrays), keyed alike.

Both compute ``Δ_k = w_k − w`` (or take the clients' updates as they are, ``are_updates=True``),
then ``w + lr · m ⊙ Σ_k p̄_k Δ_k`` through ``gma_kernels.gma_step`` over one flat float32 buffer
(on CUDA when available, for arrays). ``tau=0`` with ``lr=1`` is plain weighted FedAvg.
Floating-point arrays are aggregated in float32 and cast back to their dtype. Integer and
boolean arrays (BatchNorm's ``num_batches_tracked``, say) are not masked: they get the weighted
mean of the clients' values, rounded to the nearest integer. The layout and that mean are
``gma_kernels.integrations.codec``'s, shared with the Flower strategies.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import GMAStats, gma_step
from ..config import MaskKind, NonFinitePolicy
from .codec import ArrayLayout, ArraySpec, rounded_mean

__all__ = ["aggregate_arrays", "aggregate_state_dicts"]


def aggregate_arrays(global_arrays: Sequence[np.ndarray],
                     client_arrays: Sequence[Sequence[np.ndarray]],
                     weights: Sequence[float] | None = None, *, lr: float = 1.0,
                     tau: float = 0.4, mask: MaskKind = "soft", weighted_agreement: bool = False,
                     rescale: bool = False, are_updates: bool = False,
                     nonfinite: NonFinitePolicy = "raise", backend: str = "auto",
                     device: torch.device | str | None = None, return_stats: bool = False
                     ) -> list[np.ndarray] | tuple[list[np.ndarray], GMAStats]:
    """The new global model ``w + lr · m ⊙ Σ_k p̄_k (w_k − w)`` as a list of NumPy arrays.

    ``global_arrays``: the model the clients started from, one array per tensor.
    ``client_arrays[k]``: client k's model after local training (or its update
    ``w_k − w`` with ``are_updates=True``), the same number of arrays with the same shapes.
    ``weights``: one non-negative number per client (example counts), None for equal weights.
    ``device``: where the aggregation runs (default: CUDA when available, else the CPU).
    Other options as in ``gma_kernels.gma_step``; in its error messages ``updates[k]`` is
    client k. Returns new arrays (the inputs are not modified), each with its input's dtype
    and shape; with ``return_stats``, ``(arrays, GMAStats)``.
    """
    if isinstance(global_arrays, np.ndarray) or not isinstance(global_arrays, Sequence):
        raise TypeError("global_arrays must be a list of NumPy arrays, got "
                        f"{type(global_arrays).__name__}")
    clients = _client_list(client_arrays, "client_arrays")
    names = [f"array {i}" for i in range(len(global_arrays))]
    global_tensors = [_as_tensor(a, f"global_arrays[{i}]") for i, a in enumerate(global_arrays)]
    client_tensors = []
    for k, arrays in enumerate(clients):
        if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
            raise TypeError(f"client_arrays[{k}] must be a list of NumPy arrays, got "
                            f"{type(arrays).__name__}")
        if len(arrays) != len(global_arrays):
            raise ValueError(f"client_arrays[{k}] has {len(arrays)} arrays but global_arrays "
                             f"has {len(global_arrays)}")
        client_tensors.append([_as_tensor(a, f"client_arrays[{k}][{i}]")
                               for i, a in enumerate(arrays)])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out, stats = _aggregate(names, global_tensors, client_tensors, weights, device=device,
                            lr=lr, tau=tau, mask=mask, weighted_agreement=weighted_agreement,
                            rescale=rescale, are_updates=are_updates, nonfinite=nonfinite,
                            backend=backend)
    arrays = [t.cpu().numpy() for t in out]
    return (arrays, stats) if return_stats else arrays


def aggregate_state_dicts(global_state: Mapping[str, Any],
                          client_states: Sequence[Mapping[str, Any]],
                          weights: Sequence[float] | None = None, *, lr: float = 1.0,
                          tau: float = 0.4, mask: MaskKind = "soft",
                          weighted_agreement: bool = False, rescale: bool = False,
                          are_updates: bool = False, nonfinite: NonFinitePolicy = "raise",
                          backend: str = "auto", device: torch.device | str | None = None,
                          return_stats: bool = False
                          ) -> dict[str, Any] | tuple[dict[str, Any], GMAStats]:
    """The new global state dict ``w + lr · m ⊙ Σ_k p̄_k (w_k − w)``.

    ``global_state`` and every ``client_states[k]`` map the same names to tensors (or NumPy
    arrays) of the same shapes. The result has the global's keys in its order; each value is
    of the global value's kind (tensor or array), dtype, shape and device. ``device``: where
    the aggregation runs (default: the device of the global's first floating-point tensor).
    Other options as in ``aggregate_arrays``.
    """
    if not isinstance(global_state, Mapping):
        raise TypeError(f"global_state must be a mapping of names to tensors, got "
                        f"{type(global_state).__name__}")
    clients = _client_list(client_states, "client_states")
    names = list(global_state)
    global_tensors = [_as_tensor(global_state[n], f"global_state[{n!r}]") for n in names]
    client_tensors = []
    for k, state in enumerate(clients):
        if not isinstance(state, Mapping):
            raise TypeError(f"client_states[{k}] must be a mapping, got {type(state).__name__}")
        if set(state) != set(names):
            missing = sorted(set(names) - set(state))
            extra = sorted(set(state) - set(names))
            raise ValueError(f"client_states[{k}] has different keys from global_state "
                             f"(missing: {missing}, unexpected: {extra})")
        client_tensors.append([_as_tensor(state[n], f"client_states[{k}][{n!r}]")
                               for n in names])
    if device is None:
        floats = [t for t in global_tensors if t.is_floating_point()]
        device = floats[0].device if floats else "cpu"
    out, stats = _aggregate(names, global_tensors, client_tensors, weights, device=device,
                            lr=lr, tau=tau, mask=mask, weighted_agreement=weighted_agreement,
                            rescale=rescale, are_updates=are_updates, nonfinite=nonfinite,
                            backend=backend)
    result = {}
    for name, value, original in zip(names, out, (global_state[n] for n in names)):
        result[name] = value.cpu().numpy() if isinstance(original, np.ndarray) else value
    return (result, stats) if return_stats else result


# ----------------------------------------------------------------------------- internals


def _client_list(clients: Any, name: str) -> list:
    if isinstance(clients, (Mapping, np.ndarray, Tensor, str, bytes)) \
            or not isinstance(clients, Sequence):
        raise TypeError(f"{name} must be a sequence with one entry per client, got "
                        f"{type(clients).__name__}")
    if len(clients) == 0:
        raise ValueError(f"{name} is empty: no client to aggregate")
    return list(clients)


def _as_tensor(value: Any, name: str) -> Tensor:
    """A tensor sharing the array's memory where it can (a copy for read-only, byte-swapped
    or negatively strided arrays)."""
    if isinstance(value, Tensor):
        tensor = value.detach()
    elif isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.writeable or any(s < 0 for s in array.strides):
            array = array.copy()
        try:
            tensor = torch.from_numpy(array)
        except TypeError as err:
            raise TypeError(f"{name} has dtype {array.dtype}, which PyTorch cannot hold: "
                            f"{err}") from None
    else:
        raise TypeError(f"{name} must be a NumPy array or a tensor, got {type(value).__name__}")
    if tensor.is_complex():
        raise TypeError(f"{name} is complex ({tensor.dtype}); GMA aggregates real values")
    return tensor


def _aggregate(names: list[str], global_tensors: list[Tensor], clients: list[list[Tensor]],
               weights: Sequence[float] | None, *, device: torch.device | str, lr: float,
               are_updates: bool, nonfinite: NonFinitePolicy, **gma: Any
               ) -> tuple[list[Tensor], GMAStats]:
    """Floating-point entries through ``gma_step`` over one flat buffer; integer and boolean
    entries by the rounded weighted mean. Returns new tensors (dtype and device of the
    global's) and the stats."""
    device = torch.device(device)
    layout = ArrayLayout.of(ArraySpec(name, tuple(t.shape), t.dtype)
                            for name, t in zip(names, global_tensors))
    if not layout.flat.segments:
        raise ValueError("the global model has no floating-point array to aggregate")
    for k, tensors in enumerate(clients):
        for name, t, g in zip(names, tensors, global_tensors):
            if t.shape != g.shape:
                raise ValueError(f"client {k}'s {name} has shape {tuple(t.shape)}, the global "
                                 f"model's has {tuple(g.shape)}")

    def flat(tensors: list[Tensor]) -> Tensor:
        out = torch.empty(layout.numel, dtype=torch.float32, device=device)
        views = layout.flat.views(out)
        for spec, t in zip(layout.specs, tensors):
            if spec.floating:
                views[spec.name].copy_(t)
        return out

    params = flat(global_tensors)
    updates = []
    for tensors in clients:
        u = flat(tensors)
        if not are_updates:
            u.sub_(params)
        updates.append(u)
    _, stats = gma_step(params, updates, weights, lr=lr, nonfinite=nonfinite,
                        return_stats=True, **gma)

    raw = [1.0] * len(clients) if weights is None else [float(w) for w in weights]
    kept = [k for k in range(len(clients)) if k not in set(stats.dropped)]
    views = layout.flat.views(params)
    out = []
    for i, (spec, g) in enumerate(zip(layout.specs, global_tensors)):
        if spec.floating:
            out.append(views[spec.name].to(device=g.device, dtype=g.dtype, copy=True))
            continue
        mean = rounded_mean([_float64(clients[k][i]) for k in kept], [raw[k] for k in kept],
                            _float64(g) if are_updates else None)
        out.append(torch.from_numpy(mean).to(dtype=g.dtype, device=g.device))
    return out, stats


def _float64(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()
