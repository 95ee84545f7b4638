"""The client-algorithm interface: how a round's clients train, what they upload, and how the
server folds the uploads in; every hook works on a whole cohort of clients as ``[C, N]``
matrices (``fedsim.client.Cohort``).

A round, as the loop drives it (``fedsim.loop.play_round``), on every rank::

    algorithm.begin_round(rnd)                   # the aggregations; an extra exchange (FedGA)
    for ids in rnd.chunks:                       # this rank's clients, cohort_size at a time
        cohort = rnd.cohort(ids)                 # params: every row w
        losses = algorithm.local_train(rnd, cohort)
        algorithm.collect(rnd, cohort)           # fold the cohort's uploads in
    stats = algorithm.end_round(rnd)             # one ServerOptimizer step (or more)

A cohort's matrices are reused by the next one: ``collect`` folds what it needs into the
round's aggregations (``rnd.updates``, a ``fedsim.server.Aggregation``) or keeps its own copy.

Across ranks (``fedsim.distributed``) every rank runs the round on its share and must end it
with the same server state: the aggregations already combine the ranks, and an algorithm that
needs more from the other ranks' clients uses ``rnd.server.comm`` (``all_reduce_`` for a sum
over clients, ``gather`` for per-client values in the sampled order). In one process these
are the identity, so an algorithm written this way runs unchanged in both.

``setup(server)`` runs once, after the server exists and before any round or
``load_state_dict``: algorithms that keep server-side tensors (SCAFFOLD's ``c``) allocate them
there, sized by the server's flat layout. Per-client state that persists across rounds
(SCAFFOLD's control variates) lives in ``client_state[client_id]`` and is saved with
``state_dict()``; any rank may train a client in a later round, so every rank keeps every
client's state (update it in ``end_round`` from what ``comm.gather`` returns).

An algorithm gets its own hyperparameters as constructor keywords; ``hyperparameters`` maps
each keyword to the ``Config`` setting it comes from (``build_algorithm`` reads them).

Every algorithm has a GMA twin, ``<name>+gma`` (``fedsim.methods``): the same class, so the same
clients and uploads, but the server aggregates the model updates with gradient masked averaging
(``gma_*`` settings). Without GMA the server uses ``τ = 0``, which ``gma_kernels`` guarantees is
exactly weighted averaging, so the plain algorithm is reproduced bit for bit. Which server
optimizer steps (FedAdam's adam) is also the name's business, not the class's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from gma_kernels import GMAStats

from ..client import Cohort, client_generator

if TYPE_CHECKING:
    from ..client import Trainer
    from ..server import Aggregation, Server


@dataclass
class Round:
    """One round on this rank: the server, the trainer (which holds the clients' data), this
    rank's share of the sampled clients in ``chunks`` of at most the cohort size, and the run's
    seed and round number (which, with the client id, seed each client's shuffling)."""

    server: Server
    trainer: Trainer
    chunks: list[list[int]]
    seed: int
    number: int
    updates: Aggregation | None = None

    def cohort(self, ids: Sequence[int]) -> Cohort:
        """Clients ``ids`` ready to train from ``w``, each with its own shuffling generator."""
        device = self.trainer.data.device
        gens = [client_generator(self.seed, self.number, k, device) for k in ids]
        return self.trainer.cohort(ids, self.server.params, gens)


class Algorithm:
    """Plain local SGD, upload ``Δ_k``, aggregate weighted by client size (FedAvg's behaviour).

    ``equal_weights`` (a class attribute a subclass may set): aggregate with equal client weights
    (SCAFFOLD, FedPVR) instead of the clients' example counts.
    """

    equal_weights: ClassVar[bool] = False
    #: constructor keyword -> the Config setting it comes from
    hyperparameters: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self.client_state: dict[int, dict[str, Tensor]] = {}

    def setup(self, server: Server) -> None:
        """Once, after the server is built (allocate server-side state here)."""

    def weights(self, cohort: Cohort) -> list[float]:
        """The clients' aggregation weights: their numbers of examples, or 1 (``equal_weights``)."""
        return [1.0] * len(cohort) if self.equal_weights else [float(n) for n in cohort.sizes]

    def begin_round(self, rnd: Round) -> None:
        """Before any cohort trains: the round's aggregation of the model updates."""
        rnd.updates = rnd.server.aggregation(len(rnd.chunks))

    def local_train(self, rnd: Round, cohort: Cohort) -> Tensor:
        """Train the cohort from ``w``; each client's mean loss (``[C]``)."""
        return rnd.trainer.train(cohort)

    def collect(self, rnd: Round, cohort: Cohort) -> None:
        """Fold the trained cohort's uploads into the round (its updates ``Δ``)."""
        rnd.updates.add(cohort.updates(), self.weights(cohort))

    def end_round(self, rnd: Round) -> GMAStats:
        """After every cohort: step the server."""
        return rnd.updates.step()

    def communication(self, num_params: int) -> tuple[int, int]:
        """Floats (down, up) one participating client exchanges with the server in a round, for
        a model of ``num_params`` parameters. FedAvg: the model down, its update up."""
        return num_params, num_params

    def state_dict(self) -> dict:
        return {"client_state": self.client_state}

    def load_state_dict(self, state: dict) -> None:
        self.client_state = state["client_state"]

