"""The ServerApp: the strategy named by the run config's ``strategy``, every round logged.

Each round logs one line, ``round 2: 2/2 replies, gma mask density 0.7340`` (replies received
without error out of the messages sent; the density of the GMA mask, from
``strategy.last_stats``); with ``metrics-file`` set, the run ends by writing every round's
record and the final accuracy to that JSON file.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, UserConfig
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from gma_kernels.integrations.flower import (GMAFedAdagrad, GMAFedAdam, GMAFedAvg, GMAFedAvgM,
                                             GMAFedYogi)
from gma_flower_app.task import load_data, make_model, test


class RoundLog:
    """Placed before a strategy in the bases: records and logs every training round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[dict[str, Any]] = []
        self._sent = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        before = getattr(self, "last_stats", None)
        arrays, metrics = super().aggregate_train(server_round, replies)
        stats = getattr(self, "last_stats", None)
        ok = sum(not reply.has_error() for reply in replies)
        row = {"round": server_round, "sent": self._sent, "replies": ok,
               "failures": len(replies) - ok, "aggregated": arrays is not None,
               "finite": arrays is None or all(np.isfinite(a.numpy()).all()
                                               for a in arrays.values()),
               "density": None if stats is None or stats is before else float(stats.density)}
        self.rounds.append(row)
        mask = ("no gma mask" if row["density"] is None
                else f"gma mask density {row['density']:.4f}")
        log(INFO, "round %s: %s/%s replies, %s", server_round, ok, self._sent, mask)
        return arrays, metrics


def _logged(cls: type[Strategy]) -> type[RoundLog]:
    return type(cls.__name__, (RoundLog, cls), {"__module__": __name__})


def _server_lr(cfg: UserConfig) -> dict[str, Any]:
    return {"server_learning_rate": float(cfg["server-lr"])}


def _eta(cfg: UserConfig) -> dict[str, Any]:
    return {"eta": float(cfg["eta"])}


#: the run config's ``strategy`` -> the strategy class and its settings from the run config
STRATEGIES: dict[str, tuple[type[Strategy], Callable[[UserConfig], dict[str, Any]]]] = {
    "fedavg": (FedAvg, lambda cfg: {}),
    "gmafedavg": (GMAFedAvg, _server_lr),
    "gmafedavgm": (GMAFedAvgM, lambda cfg: {**_server_lr(cfg),
                                            "server_momentum": float(cfg["server-momentum"])}),
    "gmafedadam": (GMAFedAdam, _eta),
    "gmafedyogi": (GMAFedYogi, _eta),
    "gmafedadagrad": (GMAFedAdagrad, _eta),
}


def make_strategy(cfg: UserConfig) -> RoundLog:
    """The run config's strategy, with its settings, wrapped in ``RoundLog``."""
    name = str(cfg["strategy"]).lower()
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg['strategy']!r}: choose one of "
                         f"{', '.join(STRATEGIES)}")
    nodes = int(cfg["min-nodes"])
    kwargs = {"fraction_train": float(cfg["fraction-train"]),
              "fraction_evaluate": float(cfg["fraction-evaluate"]),
              "min_available_nodes": nodes, "min_train_nodes": nodes,
              "min_evaluate_nodes": nodes}
    cls, settings = STRATEGIES[name]
    if cls is not FedAvg:
        kwargs.update(gma_tau=float(cfg["gma-tau"]), mask=str(cfg["mask"]))
    return _logged(cls)(**kwargs, **settings(cfg))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy's rounds; log (and write) each round and the final accuracy."""
    cfg = context.run_config
    strategy = make_strategy(cfg)
    model = make_model()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]),
                            timeout=float(cfg["round-timeout"]))
    model.load_state_dict(result.arrays.to_torch_state_dict())
    _, accuracy = test(model, load_data(-1, n=1024, test=True))
    log(INFO, "final accuracy on the balanced test set: %.4f", accuracy)
    if cfg["metrics-file"]:
        summary = {"strategy": str(cfg["strategy"]), "rounds": strategy.rounds,
                   "accuracy": accuracy}
        Path(str(cfg["metrics-file"])).write_text(json.dumps(summary, indent=1),
                                                  encoding="utf-8")
