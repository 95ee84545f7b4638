"""The client algorithms' names, and what a name alone fixes: whether the server aggregates with
gradient masked averaging, and which server optimizer it uses.

This module needs nothing else from fedsim, so the settings (``fedsim.config``) check names
without loading the algorithms; ``fedsim.algorithms`` maps each plain name to its class.
Every plain algorithm ``X`` has a GMA twin ``X+gma`` (FedAvg's is called ``fedgma``): the same
clients and uploads, the server's average masked by the clients' sign agreement.
"""
from __future__ import annotations

#: each plain algorithm, in the order they are listed, and the server optimizer its name fixes
#: (``None``: the ``server_optimizer`` setting)
PLAIN: dict[str, str | None] = {
    "fedavg": None, "fedprox": None, "scaffold": None, "fedpvr": None, "fedga": None,
    "gradalign": None, "fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi",
    "fedadagrad": "adagrad", "fedgma-v1": None, "irm": None,
}
#: other accepted spellings, mapped to the listed name
ALIASES: dict[str, str] = {"fedavg+gma": "fedgma"}


def masked_name(plain: str) -> str:
    """The GMA twin of plain algorithm ``plain``: ``fedavg`` → ``fedgma``, else ``<plain>+gma``."""
    return "fedgma" if plain == "fedavg" else f"{plain}+gma"


#: every algorithm name, each plain one followed by its GMA twin
ALGORITHMS: tuple[str, ...] = tuple(n for p in PLAIN for n in (p, masked_name(p)))


def canonical(name: str) -> str:
    """The listed spelling of ``name`` (``fedavg+gma`` → ``fedgma``)."""
    return ALIASES.get(name, name)


def plain_name(name: str) -> str:
    """The algorithm without GMA: ``scaffold+gma`` → ``scaffold``, ``fedgma`` → ``fedavg``."""
    name = canonical(name)
    return "fedavg" if name == "fedgma" else name.removesuffix("+gma")


def is_masked(name: str) -> bool:
    """Whether algorithm ``name`` aggregates with GMA (else with ``τ = 0``, exact averaging)."""
    return canonical(name) not in PLAIN


def server_optimizer_of(name: str) -> str | None:
    """The server optimizer algorithm ``name`` is defined by (FedAdam: ``"adam"``), or ``None``."""
    return PLAIN[plain_name(name)]
