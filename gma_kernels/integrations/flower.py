"""Flower strategies with gradient masked averaging (GMA), for Flower's Message API:
``GMAFedAvg``, ``GMAFedAvgM``, ``GMAFedAdam``, ``GMAFedYogi`` and ``GMAFedAdagrad``, each its
Flower parent's step (``FedAvg``, ``FedAvgM``, ...) taken on the masked pseudo-gradient ``g``.

Each takes its parent's options as they are, plus, keyword-only: ``gma_tau`` (τ; not ``tau``,
which Flower's adaptive strategies use for their ε), ``mask``, ``mask_placement``,
``weighted_agreement``, ``rescale`` (as in ``ServerOptimizer``), ``nonfinite`` (default
``"drop"``: a reply holding NaN or inf is left out, with a warning naming its node),
``streaming``, ``device`` and ``backend``. ``aggregate_train`` reads every reply's arrays from
their bytes into one float32 update ``Δ_k = w_k − w`` per client (layout and the integer
arrays' rounded mean: ``codec``), runs one GMA server step and returns the global model's
arrays. The optimizer state is ``strategy.server_optimizer``, the last round's statistics
``strategy.last_stats``. Every option, with examples: ``docs/flower.md``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.common import log
    from flwr.serverapp import Grid
    from flwr.serverapp.exception import AggregationError
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
    from flwr.serverapp.strategy.fedopt import FedOpt
except ImportError as _err:  # pragma: no cover - exercised only without Flower
    raise ImportError("gma_kernels.integrations.flower needs Flower >= 1.22 (its Message API: "
                      "flwr.serverapp.strategy); install it with pip install 'flwr>=1.22' or "
                      "pip install 'gma-kernels[flower]'") from _err

from .. import Accumulator, GMAStats, MaskConfig, ServerOptimizer, StepConfig
from ..config import MaskKind, NonFinitePolicy, Placement
from .codec import ArrayLayout, ArraySpec, rounded_mean

__all__ = ["GMAFedAvg", "GMAFedAvgM", "GMAFedAdam", "GMAFedYogi", "GMAFedAdagrad"]

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY


# ----------------------------------------------------------------------------- arrays


def _layout(record: ArrayRecord) -> ArrayLayout:
    """The global model's layout, from its arrays' serialized metadata."""
    specs = []
    for key, array in record.items():
        if array.stype != NUMPY_STYPE:
            raise ValueError(f"array {key!r} is serialized as {array.stype!r}; GMA reads "
                             f"{NUMPY_STYPE!r} arrays (Array(ndarray) or Array(tensor))")
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "fiub":
            raise ValueError(f"array {key!r} has dtype {dtype}; GMA aggregates real "
                             "floating-point (and integer or boolean) arrays")
        specs.append(ArraySpec(key, tuple(int(d) for d in array.shape), dtype))
    layout = ArrayLayout.of(specs)
    if layout.numel == 0:
        raise ValueError("the global ArrayRecord holds no floating-point array to aggregate")
    return layout


def _values(array: Array) -> np.ndarray:
    """The array's values: a read-only view into its serialized ``.npy`` bytes (no copy), or
    ``Array.numpy()`` where the header is not one this reads."""
    data = array.data
    stream = BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return array.numpy()
    except ValueError:
        return array.numpy()
    if dtype.hasobject:
        return array.numpy()
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


# ----------------------------------------------------------------------------- the mixin


class _GMAStrategy:
    """The GMA half of every strategy here; placed before a Flower strategy in the bases.

    ``_names`` maps the core's argument names (``StepConfig``, ``ServerOptimizer``) to the ones
    the strategy takes, so that an error names the argument the caller wrote."""

    _names: dict[str, str] = {"tau": "gma_tau", "lr": "server_learning_rate"}

    def __init__(self, *args: Any, gma_tau: float = 0.4, mask: MaskKind = "soft",
                 mask_placement: Placement = "before", weighted_agreement: bool = False,
                 rescale: bool = False, nonfinite: NonFinitePolicy = "drop",
                 streaming: bool = False, device: torch.device | str | None = None,
                 backend: str = "auto", **kwargs: Any) -> None:
        if "tau" in kwargs and not isinstance(self, FedOpt):
            raise TypeError(f"{type(self).__name__} takes the GMA threshold as gma_tau= "
                            "(tau is FedAdam/FedYogi/FedAdagrad's epsilon)")
        super().__init__(*args, **kwargs)
        self.gma_tau = gma_tau
        self.mask = mask
        self.mask_placement = mask_placement
        self.weighted_agreement = weighted_agreement
        self.rescale = rescale
        self.nonfinite = nonfinite
        self.streaming = streaming
        self.device = torch.device(device if device is not None
                                   else "cuda" if torch.cuda.is_available() else "cpu")
        self.backend = backend
        self.server_optimizer: ServerOptimizer | None = None
        self.last_stats: GMAStats | None = None
        self._layout: ArrayLayout | None = None
        self._params: Tensor | None = None
        self._staging: Tensor | None = None
        self._updates: Tensor | None = None
        self._host_rows: Tensor | None = None
        # every setting checked now, by the library's own checks (on a one-element buffer), on
        # the values as the caller gave them (FedAdam's lr is its eta, before bias correction)
        settings = {**self._step_settings(1), "lr": getattr(self, self._names["lr"])}
        try:
            self._make_optimizer(torch.zeros(1), self._step_config(settings))
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {self._renamed(str(err))}") from None

    @classmethod
    def _renamed(cls, message: str) -> str:
        """A core error message with its leading argument name in the strategy's terms."""
        return re.sub(r"^(\w+)(?= must|=)", lambda m: cls._names.get(m.group(1), m.group(1)),
                      message)

    # -- what each strategy defines
    def _step_settings(self, server_round: int) -> dict[str, Any]:
        raise NotImplementedError

    def _step_config(self, settings: dict[str, Any]) -> StepConfig:
        return StepConfig(mask_placement=self.mask_placement, **settings)

    def _make_optimizer(self, params: Tensor, step: StepConfig) -> ServerOptimizer:
        mask = MaskConfig(tau=self.gma_tau, mask=self.mask,
                          weighted_agreement=self.weighted_agreement, rescale=self.rescale)
        return ServerOptimizer.from_configs(params, step, mask, backend=self.backend,
                                            nonfinite=self.nonfinite)

    def summary(self) -> None:
        log(INFO, "\t├──> GMA settings:")
        log(INFO, "\t│\t├── gma_tau (%s) | mask (%s) | mask_placement (%s)", self.gma_tau,
            self.mask, self.mask_placement)
        log(INFO, "\t│\t├── weighted agreement (%s) | rescale (%s) | non-finite (%s)",
            self.weighted_agreement, self.rescale, self.nonfinite)
        log(INFO, "\t│\t└── device (%s) | backend (%s) | streaming (%s)", self.device,
            self.backend, self.streaming)
        super().summary()

    # -- the global model
    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Take ``arrays`` as the global model the next replies' updates are measured from.

        The optimizer state is kept while the arrays' keys, shapes and dtypes stay the same,
        and restarts from zero when they change.
        """
        layout = _layout(arrays)
        if self._layout != layout or self._params is None:
            if self._layout is not None:
                log(WARNING, "GMA: the global arrays changed keys, shapes or dtypes; the server "
                    "optimizer state restarts from zero")
            self._layout = layout
            self._params = torch.empty(layout.numel, dtype=torch.float32, device=self.device)
            self._staging = self._updates = self._host_rows = None
            self.server_optimizer = None
        self._read_into(arrays, self._params, subtract=False, who="the global arrays")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember ``arrays`` as the global model, then configure as the parent does."""
        self.set_global_arrays(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _read_into(self, record: ArrayRecord, out: Tensor, *, subtract: bool, who: str
                   ) -> None:
        """``out ← values`` (or ``values − global`` with ``subtract``) of the record's floating
        arrays, read from their bytes in one pass (through a pinned staging buffer on CUDA)."""
        on_host = out.device.type == "cpu"
        if on_host:
            host = out
        else:
            if self._staging is None:
                self._staging = torch.empty(self._layout.numel, dtype=torch.float32,
                                            pin_memory=torch.cuda.is_available())
            host = self._staging
        host_np = host.numpy()
        global_np = self._params.numpy() if subtract and on_host else None
        for s in self._layout.flat.segments:
            src = _values(record[s.name])
            if src.shape != s.shape:
                raise AggregationError(reason=f"array {s.name!r} of {who} has shape "
                                       f"{src.shape}, the global model's has {s.shape}")
            dst = host_np[s.offset:s.stop].reshape(s.shape)
            if global_np is not None:
                np.subtract(src, global_np[s.offset:s.stop].reshape(s.shape), out=dst,
                            casting="unsafe")
            else:
                np.copyto(dst, src, casting="unsafe")
        if not on_host:
            out.copy_(host)
            if subtract:
                out.sub_(self._params)

    def _matrix(self, name: str, k: int, n: int, device: torch.device) -> Tensor:
        """A ``[k, n]`` float32 buffer kept in ``self.<name>`` between rounds (grown as needed;
        pinned when it is the host side of a CUDA copy)."""
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < k or buf.shape[1] != n or buf.device != device:
            setattr(self, name, None)
            pin = device.type == "cpu" and self.device.type == "cuda"
            buf = torch.empty(k, n, dtype=torch.float32, device=device, pin_memory=pin)
            setattr(self, name, buf)
        return buf[:k]

    def _record(self, ints: dict[str, list[np.ndarray]], weights: list[float]) -> ArrayRecord:
        """The new global model as an ArrayRecord: keys, shapes and dtypes of the global."""
        floats = self._layout.flat.views(self._params.cpu())
        arrays = {}
        for spec in self._layout.specs:
            if spec.floating:
                value = floats[spec.name].numpy().astype(spec.dtype, copy=False)
            else:
                value = rounded_mean(ints[spec.name], weights).astype(spec.dtype)
            arrays[spec.name] = Array(np.asarray(value))
        return ArrayRecord(arrays)

    # -- aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies as FedAvg does, then one GMA server step on their updates."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        if self._layout is None:
            raise AggregationError(reason=f"{type(self).__name__} has no global arrays to "
                                   "measure the updates from: configure_train (or "
                                   "set_global_arrays) must run before aggregate_train")
        contents = [msg.content for msg in valid_replies]
        nodes = [msg.metadata.src_node_id for msg in valid_replies]
        records = [next(iter(c.array_records.values())) for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key])
                   for c in contents]
        keys = set(self._layout.names)
        for node, record in zip(nodes, records):
            if set(record.keys()) != keys:
                raise AggregationError(reason=f"the arrays from node {node} have different keys "
                                       "from the global arrays this strategy holds: the "
                                       "updates w_k - w cannot be computed")
        try:
            opt = self._optimizer(server_round)
            ints = self._integer_values(records, nodes)
            stats = self._step(opt, records, weights, nodes)
        except ValueError as err:
            order = ", ".join(f"{k}: node {n}" for k, n in enumerate(nodes))
            raise AggregationError(reason=f"GMA aggregation failed in round {server_round}: "
                                   f"{err} (replies by index: {order})") from err
        if stats is None:
            log(WARNING, "aggregate_train: every reply holds non-finite values (nodes %s); "
                "round %s aggregates nothing", nodes, server_round)
            return None, None
        self.last_stats = stats
        kept = [k for k in range(len(records)) if k not in set(stats.dropped)]
        if stats.dropped:
            log(WARNING, "aggregate_train: left out the replies of nodes %s (non-finite values "
                "in their arrays)", [nodes[k] for k in stats.dropped])
        log(INFO, "aggregate_train: GMA over %s replies: mask density %.4f, mean agreement "
            "%.4f", len(kept), float(stats.density), float(stats.mean_agreement))
        arrays = self._record({key: [v[k] for k in kept] for key, v in ints.items()},
                              [weights[k] for k in kept])
        metrics = self.train_metrics_aggr_fn([contents[k] for k in kept], self.weighted_by_key)
        return arrays, metrics

    def _optimizer(self, server_round: int) -> ServerOptimizer:
        """The server optimizer, set to this round's step (made anew for new global arrays or
        another optimizer kind)."""
        step = self._step_config(self._step_settings(server_round))
        opt = self.server_optimizer
        if opt is None or opt.params is not self._params or opt.step_config.kind != step.kind:
            opt = self.server_optimizer = self._make_optimizer(self._params, step)
        opt.step_config = step
        return opt

    def _integer_values(self, records: list[ArrayRecord], nodes: list[int]
                        ) -> dict[str, list[np.ndarray]]:
        """Every reply's integer and boolean arrays, by key (checked against the global's
        shapes)."""
        ints: dict[str, list[np.ndarray]] = {}
        for spec in self._layout.others:
            ints[spec.name] = [_values(record[spec.name]) for record in records]
            for node, value in zip(nodes, ints[spec.name]):
                if value.shape != spec.shape:
                    raise AggregationError(reason=f"array {spec.name!r} from node {node} has "
                                           f"shape {value.shape}, the global model's has "
                                           f"{spec.shape}")
        return ints

    def _step(self, opt: ServerOptimizer, records: list[ArrayRecord], weights: list[float],
              nodes: list[int]) -> GMAStats | None:
        """Read the updates and step the global buffer (and the optimizer state) in place;
        None, with nothing stepped, when every reply is dropped (``nonfinite="drop"``: all
        hold non-finite values)."""
        n = self._layout.numel
        if self.streaming:
            acc = Accumulator(n, device=self.device, weighted_agreement=self.weighted_agreement,
                              backend=self.backend, nonfinite=self.nonfinite)
            delta = torch.empty(n, dtype=torch.float32, device=self.device)
            for node, record, w in zip(nodes, records, weights):
                self._read_into(record, delta, subtract=True, who=f"node {node}")
                acc.add(delta, [w])
            if acc.num_clients == 0:  # every reply dropped
                return None
            return opt.step_accumulated(acc)
        updates = self._read_updates(records, nodes)
        # every reply dropped: known before the step (any() stops at the first finite update,
        # so a round without NaN or inf reads one row)
        if self.nonfinite == "drop" and not any(map(_finite, updates)):
            return None
        return opt.step(updates, weights)

    def _read_updates(self, records: list[ArrayRecord], nodes: list[int]) -> Tensor:
        """The updates as the rows of one ``[K, N]`` matrix (on CUDA: read into a pinned host
        matrix, then one copy), kept between rounds: fresh ones would cost K·N·4 bytes of page
        faults a round."""
        k, n = len(records), self._layout.numel
        updates = self._matrix("_updates", k, n, self.device)
        on_host = self.device.type == "cpu"
        rows = updates if on_host else self._matrix("_host_rows", k, n, torch.device("cpu"))
        jobs = [(record, row, f"node {node}") for node, record, row in zip(nodes, records, rows)]
        workers = min(k, torch.get_num_threads())
        if workers > 1:  # NumPy releases the GIL while it copies
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda job: self._read_into(job[0], job[1], subtract=on_host,
                                                          who=job[2]), jobs))
        else:
            for record, row, who in jobs:
                self._read_into(record, row, subtract=on_host, who=who)
        if not on_host:
            updates.copy_(rows)
            updates.sub_(self._params)
        return updates


def _finite(update: Tensor) -> bool:
    """Whether ``update`` holds no NaN or infinity (on the CPU through NumPy, many times faster
    there than ``torch.isfinite``)."""
    if update.device.type == "cpu":
        return bool(np.isfinite(update.numpy()).all())
    return bool(torch.isfinite(update).all())


# ----------------------------------------------------------------------------- strategies


class GMAFedAvg(_GMAStrategy, FedAvg):
    """Flower's ``FedAvg`` with gradient masked averaging: ``w ← w + η · m ⊙ Σ p̄_k Δ_k``.

    Takes every ``FedAvg`` option, plus ``server_learning_rate`` (η, default 1.0) and the GMA
    options of this module (``gma_tau``, ``mask``, ``mask_placement``, ``weighted_agreement``,
    ``rescale``, ``nonfinite``, ``streaming``, ``device``, ``backend``). With ``gma_tau=0`` and
    η = 1 it returns FedAvg's weighted average (to float32 rounding).

    Example::

        strategy = GMAFedAvg(fraction_train=0.5, gma_tau=0.4, mask="soft")
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                num_rounds=10)
    """

    def __init__(self, *args: Any, server_learning_rate: float = 1.0, **kwargs: Any) -> None:
        self.server_learning_rate = server_learning_rate
        super().__init__(*args, **kwargs)

    def _step_settings(self, server_round: int) -> dict[str, Any]:
        return {"kind": "sgd", "lr": self.server_learning_rate}


class GMAFedAvgM(_GMAStrategy, FedAvgM):
    """Flower's ``FedAvgM`` with GMA: ``v ← β v + g``, ``w ← w + η v`` on the masked
    pseudo-gradient ``g`` (β = ``server_momentum``, η = ``server_learning_rate``; the same
    update as FedAvgM's ``v ← β v + (w − avg)``, ``w ← w − η v``)."""

    _names = {**_GMAStrategy._names, "momentum": "server_momentum"}

    def _step_settings(self, server_round: int) -> dict[str, Any]:
        kind = "momentum" if self.server_momentum > 0 else "sgd"
        return {"kind": kind, "lr": self.server_learning_rate,
                "momentum": self.server_momentum if kind == "momentum" else 0.9}


#: FedAdam/FedYogi/FedAdagrad's names for the core's arguments (their tau is the epsilon)
_FEDOPT_NAMES = {**_GMAStrategy._names, "lr": "eta", "beta1": "beta_1", "beta2": "beta_2",
                 "eps": "tau"}


class GMAFedAdam(_GMAStrategy, FedAdam):
    """Flower's ``FedAdam`` with GMA: ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``,
    ``w ← w + η_t m / (√v + ε)`` with Flower's bias-corrected
    ``η_t = eta · √(1 − β2^(r+1)) / (1 − β1^(r+1))`` in server round r, ε = Flower's ``tau``."""

    _names = _FEDOPT_NAMES

    def _step_settings(self, server_round: int) -> dict[str, Any]:
        eta_norm = (self.eta * math.sqrt(1 - self.beta_2 ** (server_round + 1.0))
                    / (1 - self.beta_1 ** (server_round + 1.0)))
        return {"kind": "adam", "lr": float(eta_norm), "beta1": self.beta_1,
                "beta2": self.beta_2, "eps": self.tau}


class GMAFedYogi(_GMAStrategy, FedYogi):
    """Flower's ``FedYogi`` with GMA: ``v ← v − (1−β2) g² sign(v − g²)``, ``w ← w + η m /
    (√v + ε)`` (η = ``eta``, ε = Flower's ``tau``, no bias correction, as Flower)."""

    _names = _FEDOPT_NAMES

    def _step_settings(self, server_round: int) -> dict[str, Any]:
        return {"kind": "yogi", "lr": self.eta, "beta1": self.beta_1, "beta2": self.beta_2,
                "eps": self.tau}


class GMAFedAdagrad(_GMAStrategy, FedAdagrad):
    """Flower's ``FedAdagrad`` with GMA: ``v ← v + g²``, ``w ← w + η g / (√v + ε)`` (Flower's
    FedAdagrad has β1 = 0, so ``m = g``; η = ``eta``, ε = Flower's ``tau``)."""

    _names = _FEDOPT_NAMES

    def _step_settings(self, server_round: int) -> dict[str, Any]:
        return {"kind": "adagrad", "lr": self.eta, "beta1": self.beta_1, "beta2": self.beta_2,
                "eps": self.tau}
