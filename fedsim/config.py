"""Every setting of a run, and every check on it: a ``Config`` that exists is a valid one.

Loaded from TOML (flat keys, the field names below) and/or the command line, whose flags are
the same names in kebab case (``fedsim.run`` builds them from the fields and their help).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gma_kernels.config import MASK_KINDS, OPTIMIZER_KINDS, PLACEMENTS

from .client import ENGINES
from .data import DATASETS, coloring_of
from .data.coloring import CLIENT_FLIP_RANGE, check_binary_options
from .data.splits import SPLITS, check_split_args
from .data.spirals import check_spiral_options
from .methods import ALGORITHMS, canonical, is_masked, server_optimizer_of
from .models import MODELS, parameter_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """An impossible setting, refused before any work starts."""


def _setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A field with its help text and, for a named choice, the valid names (checked, and listed
    in ``--help``)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Config:
    """A federated experiment: data, model, local training, server, GMA and the run itself."""

    # data
    dataset: str = _setting("colored-digits", "dataset", DATASETS)
    data_dir: str | None = _setting(None, "folder of downloaded datasets (default: ./data)")
    download: bool = _setting(False, "download torchvision datasets when missing")
    num_clients: int = _setting(10, "number of clients the training set is split among")
    split: str = _setting("shards", "how the training set is split among clients (binary-skew, "
                          "binary colored data only: client k's share of label 1 evenly spaced "
                          "from 0.2 to 0.8, whatever the seed)", SPLITS)
    alpha: float = _setting(0.5, "Dirichlet concentration (split = dirichlet)")
    min_client_size: int = _setting(10, "fewest examples per client (split = dirichlet)")
    max_train: int | None = _setting(None, "keep at most this many training examples")
    validation_fraction: float = _setting(0.0, "fraction of each client's examples held out as "
                                          "an in-distribution validation set (val_acc), to "
                                          "choose settings without the test sets")
    ood_validation_fraction: float = _setting(0.0, "fraction of the OOD test set held out as "
                                              "an OOD validation set (ood_val_acc), disjoint "
                                              "from the OOD test set, for the test-domain "
                                              "(oracle) selection")
    label_noise: float = _setting(0.0, "binary colored datasets: each label flipped with this "
                                  "probability before the color is drawn from it (every set)")
    color_flip_range: tuple[float, ...] = _setting(CLIENT_FLIP_RANGE, "binary colored datasets: "
                                                   "low,high of the clients' color-flip "
                                                   "probabilities (uniform)")
    reversed_color_fraction: float = _setting(0.0, "binary colored datasets: fraction of the "
                                              "clients whose color rule is reversed (flip "
                                              "probability 1 - p)")
    spiral_client_size: int = _setting(1024, "spirals: examples per client (environment)")
    spiral_shortcut_dims: int = _setting(16, "spirals: shortcut features d_S, s_e (2y - 1) in "
                                         "environment e, noise in the OOD test set")
    spiral_revolutions: float = _setting(3.0, "spirals: turns of each spiral")
    # model and local training
    model: str = _setting("cnn", "model architecture", MODELS)
    local_epochs: int = _setting(2, "local epochs per round (ignored when local_steps is set)")
    local_steps: int | None = _setting(None, "local SGD steps per round, instead of epochs")
    batch_size: int = _setting(32, "local batch size")
    lr: float = _setting(0.2, "local SGD learning rate")
    weight_decay: float = _setting(0.0, "local L2 weight decay")
    engine: str = _setting("auto", "how a round's clients train: cohort (together, as one batched "
                           "model), sequential (one after another), auto (cohort, except on a "
                           "CPU for convolutional models on inputs of 16x16 or more that "
                           "fedsim cannot run layer by layer, such as the resnet)", ENGINES)
    cohort_size: int = _setting(0, "most clients trained together; a larger round trains in "
                                "consecutive cohorts. Memory grows linearly with it: about "
                                "5 x 4 bytes per parameter plus 3 batches of activations per "
                                "client (0: as many as fit in a quarter of the free memory and, on a "
                                "CPU, keep one batch's activations within 64 MiB)")
    # federation and server
    algorithms: tuple[str, ...] = _setting(("fedavg", "fedgma"), "client algorithms to compare, "
                                           "on the same data and seeds (<name>+gma: with gradient "
                                           "masked averaging; fedgma is fedavg+gma; all: every "
                                           "one)", ALGORITHMS)
    rounds: int = _setting(30, "communication rounds")
    clients_per_round: int = _setting(10, "clients sampled each round")
    server_optimizer: str = _setting("sgd", "server optimizer of the algorithms that do not name "
                                     "their own (fedavgm, fedadam, fedyogi, fedadagrad do)",
                                     OPTIMIZER_KINDS)
    server_lr: float = _setting(1.0, "server learning rate")
    momentum_server_lr: float | None = _setting(0.3, "server learning rate when the server optimizer "
                                                "is momentum, e.g. fedavgm (with momentum 0.9 an "
                                                "effective step of 3)")
    adaptive_server_lr: float | None = _setting(0.03, "server learning rate when the server "
                                                "optimizer is adam, yogi or adagrad, e.g. fedadam "
                                                "(within Reddi et al. 2021's tuned range, 1e-3 to "
                                                "1e-1; server_lr's 1.0 collapses to the color rule)")
    gma_server_lr: float | None = _setting(None, "server learning rate of the GMA methods whose "
                                           "server optimizer is sgd, e.g. fedgma (default: "
                                           "server_lr)")
    server_momentum: float = _setting(0.9, "server momentum (server_optimizer = momentum)")
    server_beta1: float = _setting(0.9, "server beta1 (adam, yogi, adagrad)")
    server_beta2: float = _setting(0.99, "server beta2 (adam, yogi)")
    server_eps: float = _setting(1e-3, "server epsilon (adam, yogi, adagrad)")
    server_weight_decay: float = _setting(0.0, "server L2 weight lambda: the server optimizer "
                                          "steps on m * mean(delta) - lambda w (every "
                                          "coordinate decays, masked or not, as with "
                                          "torch.optim.Adam's weight_decay on a masked gradient)")
    server_bias_correction: bool = _setting(False, "server adam with torch.optim.Adam's bias "
                                            "correction m/(1-beta1^t), v/(1-beta2^t) (Reddi et "
                                            "al. 2021's FedAdam has none)")
    # gradient masked averaging (algorithms with GMA only)
    gma_tau: float = _setting(0.4, "agreement threshold tau in [0, 1]")
    gma_mask: str = _setting("soft", "mask kind", MASK_KINDS)
    gma_mask_placement: str = _setting("before", "mask the average before the optimizer, or its "
                                       "step after", PLACEMENTS)
    gma_rescale: bool = _setting(False, "divide the masked average by the mask density")
    gma_weighted_agreement: bool = _setting(False, "weight the sign agreement by client size")
    # client algorithms
    fedprox_mu: float = _setting(0.01, "FedProx: weight mu >= 0 of the proximal term "
                                 "(mu/2)||y - w||^2")
    fedpvr_start_layer: str = _setting("classifier.weight", "FedPVR: the parameter (a name from "
                                       "the model's named_parameters()) from which on SCAFFOLD's "
                                       "correction applies")
    fedga_beta: float = _setting(0.1, "FedGA / GradAlign: beta >= 0 of the start shift "
                                 "w - beta (g_mean - g_k)")
    fedgma_v1_p: float = _setting(0.8, "FedGMA v1: hard-mask threshold p in [0, 1] on the last "
                                  "local gradients (the workshop formula: tau = p)")
    fedgma_v1_server_lr: float | None = _setting(None, "FedGMA v1: step size eta_s of the masked "
                                                 "gradient step (default: lr)")
    irm_penalty_weight: float = _setting(91257.186, "IRM: weight lambda >= 0 of each client's "
                                         "IRMv1 penalty from round irm_anneal_rounds on (1 "
                                         "before; the loss divided by lambda when > 1)")
    irm_anneal_rounds: int = _setting(190, "IRM: rounds (counted from 0) with penalty weight 1")
    # the run
    seeds: tuple[int, ...] = _setting((0, 1), "seeds (data split, model init, sampling)")
    eval_every: int = _setting(5, "evaluate every n rounds (and at the last)")
    checkpoint_every: int | None = _setting(None, "checkpoint every n rounds (default: at the "
                                            "first round end checkpoint_seconds after the last "
                                            "checkpoint), and at the end of every run")
    checkpoint_seconds: float = _setting(30.0, "with checkpoint_every unset: seconds between "
                                         "checkpoints (0: every round)")
    device: str = _setting("cpu", "cpu, cuda, cuda:N or auto")
    deterministic: bool = _setting(True, "deterministic cuDNN kernels, so CUDA reruns and resumed runs "
                                   "match bit for bit (CPU runs always do)")
    threads: int = _setting(0, "torch CPU threads (0: half the cores, 1 to 4)")
    out_dir: str = _setting("runs", "folder that holds run folders")
    name: str | None = _setting(None, "run name (default: dataset and methods)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), FIELD_TYPES[f.name]))
        names = ALGORITHMS if self.algorithms == ("all",) else self.algorithms
        object.__setattr__(self, "algorithms", tuple(canonical(a) for a in names))
        try:
            self._check()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata["choices"]:
                value = getattr(self, f.name)
                for v in value if isinstance(value, tuple) else (value,):
                    if v not in f.metadata["choices"]:
                        raise ValueError(f"{f.name}: unknown name {v!r}; valid: "
                                         f"{', '.join(f.metadata['choices'])}")
        check_split_args(self.split, self.num_clients, self.alpha)
        self._check_data_options()
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(f"clients_per_round={self.clients_per_round} must be between 1 and "
                             f"num_clients={self.num_clients}")
        if not self.algorithms:
            raise ValueError("algorithms is empty: name at least one")
        _unique("algorithms", self.algorithms)
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        _unique("seeds", self.seeds)
        for name in ("max_train", "local_epochs", "local_steps", "batch_size",
                     "rounds", "eval_every", "checkpoint_every"):
            _at_least(name, getattr(self, name), 1)
        _at_least("threads", self.threads, 0)
        _at_least("cohort_size", self.cohort_size, 0)
        _number("checkpoint_seconds", self.checkpoint_seconds, low=0.0)
        _at_least("min_client_size", self.min_client_size, 0)
        for seed in self.seeds:
            _at_least("seeds", seed, 0)
        _number("lr", self.lr, low=0.0, low_open=True)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("server_lr", self.server_lr, low=0.0, low_open=True)
        for name in ("server_momentum", "server_beta1", "server_beta2", "gma_tau"):
            _number(name, getattr(self, name), low=0.0, high=1.0)
        _number("server_eps", self.server_eps, low=0.0, low_open=True)
        _number("server_weight_decay", self.server_weight_decay, low=0.0)
        for name in ("momentum_server_lr", "adaptive_server_lr", "gma_server_lr",
                     "fedgma_v1_server_lr"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), low=0.0, low_open=True)
        _number("fedprox_mu", self.fedprox_mu, low=0.0)
        _number("fedga_beta", self.fedga_beta, low=0.0)
        _number("fedgma_v1_p", self.fedgma_v1_p, low=0.0, high=1.0)
        _number("irm_penalty_weight", self.irm_penalty_weight, low=0.0)
        _at_least("irm_anneal_rounds", self.irm_anneal_rounds, 0)
        names = parameter_names(self.model)
        if self.fedpvr_start_layer not in names:
            raise ValueError(f"fedpvr_start_layer: {self.fedpvr_start_layer!r} is not a parameter "
                             f"of model {self.model!r}; valid: {', '.join(names)}")
        if self.server_bias_correction and not any(
                self.server_optimizer_for(name) == "adam" for name in self.algorithms):
            raise ValueError("server_bias_correction applies to a server adam: set "
                             "server_optimizer='adam' or run fedadam")
        if self.server_bias_correction and max(self.server_beta1, self.server_beta2) == 1.0:
            raise ValueError("server_bias_correction needs server_beta1 < 1 and server_beta2 < 1")
        if self.server_weight_decay and self.gma_mask_placement == "after":
            raise ValueError("server_weight_decay needs gma_mask_placement='before' (the L2 "
                             "term joins the masked average the optimizer sees)")
        if self.gma_rescale and self.gma_mask_placement == "after":
            for name in self.algorithms:
                kind = self.server_optimizer_for(name)
                if is_masked(name) and kind != "sgd":
                    raise ValueError("gma_rescale needs gma_mask_placement='before' with a stateful "
                                     f"server optimizer ({kind!r}, algorithm {name!r})")
        self.torch_device()

    def _check_data_options(self) -> None:
        for name in ("validation_fraction", "ood_validation_fraction"):
            _number(name, getattr(self, name), low=0.0)
            if getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be < 1, got {getattr(self, name)}")
        check_binary_options(self.label_noise, self.color_flip_range,
                             self.reversed_color_fraction)
        changed = [name for name, default in (("label_noise", 0.0), ("reversed_color_fraction", 0.0),
                                              ("color_flip_range", CLIENT_FLIP_RANGE))
                   if getattr(self, name) != default]
        if self.split == "binary-skew":
            changed.append("split 'binary-skew'")
        self._check_spirals()
        if changed and coloring_of(self.dataset) != "binary":
            raise ValueError(f"{', '.join(changed)} apply to the binary colored datasets only "
                             f"(colored-digits, colored-mnist, colored-fashion-mnist), not "
                             f"{self.dataset!r}")

    def _check_spirals(self) -> None:
        check_spiral_options(self.spiral_client_size, self.spiral_shortcut_dims,
                             self.spiral_revolutions)
        spiral = [f.name for f in dataclasses.fields(self)
                  if f.name.startswith("spiral_") and getattr(self, f.name) != f.default]
        if self.dataset != "spirals":
            if spiral:
                raise ValueError(f"{', '.join(spiral)} apply to dataset 'spirals' only, not "
                                 f"{self.dataset!r}")
            return
        if self.model not in ("mlp", "leaky-mlp"):
            raise ValueError(f"dataset 'spirals' holds feature vectors: model must be mlp or "
                             f"leaky-mlp, not {self.model!r}")
        split = [f.name for f in dataclasses.fields(self) if f.name in _SPLIT_SETTINGS
                 and getattr(self, f.name) != f.default]
        if split:
            raise ValueError(f"{', '.join(split)} do not apply to dataset 'spirals' (one "
                             "environment per client)")

    def torch_device(self) -> torch.device:
        """The device to run on ("auto": CUDA when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device={self.device!r} is not a device (cpu, cuda, cuda:N, auto)") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: only cpu and cuda are supported")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} but CUDA is not available here")
        return device

    def server_optimizer_for(self, method: str) -> str:
        """The server optimizer kind of ``method``: the one its name fixes (FedAdam: adam),
        else ``server_optimizer``."""
        return server_optimizer_of(method) or self.server_optimizer

    def server_lr_for(self, kind: str, masked: bool = False) -> float:
        """The server learning rate for server optimizer ``kind`` (``momentum_server_lr`` for
        momentum, ``adaptive_server_lr`` for adam/yogi/adagrad, ``gma_server_lr`` for sgd with
        GMA (``masked``), when set; else ``server_lr``)."""
        if kind == "momentum" and self.momentum_server_lr is not None:
            return self.momentum_server_lr
        if kind in ("adam", "yogi", "adagrad") and self.adaptive_server_lr is not None:
            return self.adaptive_server_lr
        if kind == "sgd" and masked and self.gma_server_lr is not None:
            return self.gma_server_lr
        return self.server_lr

    @property
    def run_name(self) -> str:
        """``name``, else the dataset and the methods (their count, when the list is long)."""
        methods = "-".join(self.algorithms)
        if len(methods) > 60:
            methods = f"{len(self.algorithms)}-algorithms"
        return self.name or f"{self.dataset}-{methods}"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "settings") -> Config:
        """A Config from a flat mapping of field names; unknown keys are refused."""
        unknown = sorted(set(values) - set(FIELD_TYPES))
        if unknown:
            close = {k: difflib.get_close_matches(k, FIELD_TYPES, n=1) for k in unknown}
            hints = "".join(f"; did you mean {m[0]!r} for {k!r}?" for k, m in close.items() if m)
            raise ConfigError(f"unknown key(s) in {source}: {', '.join(unknown)} "
                              f"(valid: {', '.join(FIELD_TYPES)}){hints}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> Config:
        """Load a TOML file; ``overrides`` (e.g. command-line flags) win over its keys."""
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from None
        return cls.from_dict({**values, **overrides}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        """The resolved settings as TOML (unset optional settings are left out)."""
        return "".join(f"{k} = {toml_value(v)}\n" for k, v in self.to_dict().items() if v is not None)


#: the settings of how a dataset is split among clients
_SPLIT_SETTINGS = ("split", "alpha", "min_client_size", "max_train")
#: each setting's type, by name
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Config)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (lists become tuples, ints become floats), or ConfigError."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # X | None
        return None if value is None else _coerce(name, value, args[0])
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(name, v, args[0]) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}")
    return value


def _unique(name: str, values: tuple) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {', '.join(map(str, values))}")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _number(name: str, value: float, *, low: float, high: float | None = None,
            low_open: bool = False) -> None:
    if not math.isfinite(value) or value < low or (low_open and value == low) \
            or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {bounds}, got {value}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"
