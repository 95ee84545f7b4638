"""Client algorithms, by name. A new one subclasses ``Algorithm`` and is listed in ``BASE``;
its GMA twin ``<name>+gma`` is made by ``masked_variant`` (FedAvg's is called ``fedgma``).

| name | what |
| --- | --- |
| fedavg | local SGD, data-size weighted averaging (McMahan et al. 2017) |
| fedprox | + proximal term ``(μ/2)‖y − w‖²`` (``fedprox_mu``) |
| scaffold | option-II control variates, unweighted mean (Karimireddy et al. 2020) |
| fedpvr | SCAFFOLD's correction from ``fedpvr_start_layer`` on (Li et al. 2023) |
| fedga | start from ``w − β (ḡ − g_k)`` after an extra gradient exchange (``fedga_beta``) |
| gradalign | FedGA with one local step |
| fedavgm, fedadam, fedyogi, fedadagrad | FedAvg clients, server optimizer momentum / adam / yogi / adagrad |
| fedgma-v1 | the workshop algorithm: FedAvg of parameters + hard-masked gradient step |
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Algorithm, Round, masked_variant
from .fedavg import FedAvg
from .fedga import FedGA
from .fedgma import FedGMA
from .fedgma_v1 import FedGMAv1
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from .fedprox import FedProx
from .fedpvr import FedPVR
from .gradalign import GradAlign
from .scaffold import Scaffold

if TYPE_CHECKING:
    from ..config import Config

#: the plain algorithms, in the order they are listed
BASE: tuple[type[Algorithm], ...] = (FedAvg, FedProx, Scaffold, FedPVR, FedGA, GradAlign,
                                     FedAvgM, FedAdam, FedYogi, FedAdagrad, FedGMAv1)
REGISTRY: dict[str, type[Algorithm]] = {}
for _cls in BASE:
    REGISTRY[_cls.name] = _cls
    _masked = FedGMA if _cls is FedAvg else masked_variant(_cls)
    REGISTRY[_masked.name] = _masked
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)
#: other accepted spellings, mapped to the registered name
ALGORITHM_ALIASES: dict[str, str] = {"fedavg+gma": "fedgma"}


def build_algorithm(name: str, config: Config) -> Algorithm:
    """The algorithm called ``name`` (one of ``ALGORITHMS``; ``Config`` has checked it), given
    its own hyperparameters from ``config`` (``Algorithm.hyperparameters``)."""
    cls = REGISTRY[ALGORITHM_ALIASES.get(name, name)]
    return cls(**{key: getattr(config, setting) for key, setting in cls.hyperparameters.items()})


def plain_name(name: str) -> str:
    """The algorithm without GMA: ``scaffold+gma`` → ``scaffold``, ``fedgma`` → ``fedavg``."""
    name = ALGORITHM_ALIASES.get(name, name)
    return "fedavg" if name == "fedgma" else name.removesuffix("+gma")


__all__ = ["ALGORITHMS", "ALGORITHM_ALIASES", "Algorithm", "REGISTRY", "Round", "build_algorithm",
           "masked_variant", "plain_name"]
