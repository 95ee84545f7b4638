"""Client algorithms, by name (the names, and what a name fixes, are ``fedsim.methods``). A new
one subclasses ``Algorithm`` and is listed in ``CLASSES`` and ``fedsim.methods.PLAIN``; its GMA
twin ``<name>+gma`` runs the same class (the server masks the average).

| name | what |
| --- | --- |
| fedavg | local SGD, data-size weighted averaging (McMahan et al. 2017) |
| fedprox | + proximal term ``(μ/2)‖y − w‖²`` (``fedprox_mu``) |
| scaffold | option-II control variates, unweighted mean (Karimireddy et al. 2020) |
| fedpvr | SCAFFOLD's correction from ``fedpvr_start_layer`` on (Li et al. 2023) |
| fedga | start from ``w − β (ḡ − g_k)`` after an extra gradient exchange (``fedga_beta``) |
| gradalign | FedGA with one local step |
| fedavgm, fedadam, fedyogi, fedadagrad | FedAvg clients, server optimizer momentum / adam / yogi / adagrad (Hsu et al. 2019; Reddi et al. 2021); the learning rate is ``momentum_server_lr`` or ``adaptive_server_lr`` when set, else ``server_lr`` |
| fedgma-v1 | the workshop algorithm: FedAvg of parameters + hard-masked gradient step |
| irm | each client adds its IRMv1 penalty (Arjovsky et al. 2019; ``irm_penalty_weight``, ``irm_anneal_rounds``) |
| X+gma, fedgma | X with gradient masked averaging at the server (Tenison et al., TMLR 2023; ``gma_*`` settings) |
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..methods import PLAIN, is_masked, plain_name
from .base import Algorithm, Round
from .fedavg import FedAvg
from .fedga import FedGA
from .fedgma_v1 import FedGMAv1
from .fedprox import FedProx
from .fedpvr import FedPVR
from .gradalign import GradAlign
from .irm import IRM
from .scaffold import Scaffold

if TYPE_CHECKING:
    from ..config import Config

#: each plain algorithm's class (its GMA twin runs the same class)
CLASSES: dict[str, type[Algorithm]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold, "fedpvr": FedPVR, "fedga": FedGA,
    "gradalign": GradAlign, "fedavgm": FedAvg, "fedadam": FedAvg, "fedyogi": FedAvg,
    "fedadagrad": FedAvg, "fedgma-v1": FedGMAv1, "irm": IRM,
}
if CLASSES.keys() != PLAIN.keys():  # pragma: no cover - a new algorithm listed in one place only
    raise ImportError(f"fedsim.algorithms.CLASSES and fedsim.methods.PLAIN list different names: "
                      f"{sorted(CLASSES.keys() ^ PLAIN.keys())}")


def build_algorithm(name: str, config: Config) -> Algorithm:
    """The algorithm called ``name`` (one of ``fedsim.methods.ALGORITHMS``; ``Config`` has
    checked it), given its own hyperparameters from ``config`` (``Algorithm.hyperparameters``)."""
    cls = CLASSES[plain_name(name)]
    return cls(**{key: getattr(config, setting) for key, setting in cls.hyperparameters.items()})


#: settings that belong to one algorithm (its constructor's hyperparameters)
OWN_SETTINGS: frozenset[str] = frozenset(
    s for cls in CLASSES.values() for s in cls.hyperparameters.values()
    if s.startswith(("fedprox_", "fedpvr_", "fedga_", "fedgma_v1_", "irm_")))


def matters(method: str, setting: str) -> bool:
    """Whether ``setting`` can change what algorithm ``method`` computes: ``gma_*`` only with
    GMA, an algorithm's own hyperparameters (``OWN_SETTINGS``) only for that algorithm, any
    other setting always."""
    if setting.startswith("gma_"):
        return is_masked(method)
    if setting in OWN_SETTINGS:
        return setting in CLASSES[plain_name(method)].hyperparameters.values()
    return True


__all__ = ["Algorithm", "CLASSES", "OWN_SETTINGS", "Round", "build_algorithm", "matters"]
