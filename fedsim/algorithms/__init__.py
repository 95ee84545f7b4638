"""Client algorithms, by name. A new one subclasses ``Algorithm`` and is listed here."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Algorithm, ClientContext, ClientResult
from .fedavg import FedAvg
from .fedgma import FedGMA

if TYPE_CHECKING:
    from ..config import Config

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedGMA)}
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)


def build_algorithm(name: str, config: Config) -> Algorithm:
    """The algorithm called ``name`` (one of ``ALGORITHMS``; ``Config`` has checked it)."""
    return REGISTRY[name](config)


__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "ClientResult", "build_algorithm"]
