"""``python -m fedsim.run``: settings from flags and/or a TOML file, the run, the report.

With no setting at all it compares FedAvg and FedGMA on colored digits split non-IID (shards),
each at the server step the selection protocol chose on validation (``DEFAULT_COMPARISON``);
so does a run given only settings of where and how it runs (``PLACEMENT``: ``--out-dir``,
``--threads``, ``--device``...). Any other setting starts from the plain defaults instead.
Every ``Config`` field is a flag (``--local-epochs 3``; lists comma-separated: ``--seeds 0,1``)
and a TOML key (``--config run.toml``); flags win over the file.

Under ``torchrun --nproc-per-node N -m fedsim.run ...`` (``WORLD_SIZE > 1`` in the
environment) it joins the process group itself (gloo on CPU, NCCL with ``--device cuda``),
shares each round's clients over the ranks (``fedsim.distributed``) and leaves the group at the
end; rank 0 alone prints and writes the run folder. A rank that dies makes the others exit with
status 1 and an error naming the failed collective.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .cli import OneLineParser, add_settings
from .config import FIELD_TYPES, Config, ConfigError
from .data.cache import read_data
from .distributed import (DEFAULT_TIMEOUT_S, DistributedAggregationError, distributed_session,
                          env_world_size)
from .loop import run_experiment
from .report import format_paired, format_table
from .run_folder import create_run_dir, write_run_results

#: what the run without any setting changes from the defaults: FedGMA's server step and τ as the
#: selection protocol chose them on validation for this comparison (FedAvg's choice, server lr
#: 1, is the default): ``python -m fedsim.sweep --grid server_lr=0.5,1,2 --grid
#: gma_tau=0.2,0.4,0.6 --seeds 0,1,2,3,4``, benchmarks/results/recipes/default-choice/
DEFAULT_COMPARISON = {"gma_server_lr": 2.0, "gma_tau": 0.2}
#: settings of where and how a run goes, not of what it computes: given alone, they keep the
#: default comparison
PLACEMENT = frozenset({"data_dir", "download", "engine", "cohort_size", "eval_every",
                       "checkpoint_every", "checkpoint_seconds", "device", "deterministic",
                       "threads", "out_dir", "name"})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m fedsim.run",
        description="Simulate federated learning through gma_kernels. With no setting at all: "
                    "FedAvg against FedGMA on colored digits split non-IID (shards), each at "
                    "the server step the selection protocol chose on validation (FedAvg: "
                    "server lr 1; FedGMA: --gma-server-lr 2 --gma-tau 0.2), also when only settings "
                    "of where and how it runs are given (" + ", ".join(
                        "--" + k.replace("_", "-") for k in sorted(PLACEMENT)) + "). Any "
                    "other setting starts from the defaults below instead.",
        epilog="A run folder (OUT_DIR/<time>-<name>) receives config.toml, metrics.jsonl, "
               "metrics.csv, results.json, results.md, accuracy.png, one "
               "model-<algorithm>-seed<n>.pt per run, checkpoint.pt and the one before it, "
               "checkpoint-previous.pt.", argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a stopped run from its checkpoint, with its config.toml")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others at an "
                             f"exchange before failing (default: {DEFAULT_TIMEOUT_S:g})")
    add_settings(parser)
    return parser


def resolve(args: argparse.Namespace,
            parser: argparse.ArgumentParser) -> tuple[Config, Path | None]:
    """(config, the run folder to resume or None for a new run) from the parsed flags."""
    settings = {k: v for k, v in vars(args).items() if k in FIELD_TYPES}
    if "resume" in args:
        given = [k for k in vars(args) if k in FIELD_TYPES or k == "config"]
        if given:
            parser.error("--resume continues a run with its own config.toml; drop "
                         + ", ".join("--" + k.replace("_", "-") for k in given))
        config_file = args.resume / "config.toml"
        if not config_file.is_file():
            parser.error(f"--resume {args.resume}: no config.toml there (not a run folder?)")
        return Config.from_toml(config_file), args.resume
    if "config" in args:
        return Config.from_toml(args.config, **settings), None
    if not settings.keys() - PLACEMENT:  # the default comparison, wherever it runs
        return Config.from_dict(DEFAULT_COMPARISON | settings,
                                source="the default comparison and the command line"), None
    return Config.from_dict(settings, source="the command line"), None


def check_data(config: Config) -> None:
    """Load the first seed's data once, so that settings only the data can refuse (more
    clients than examples, a Dirichlet split that cannot give every client its minimum, a
    dataset that is not on this machine) fail before the run folder is made."""
    read_data(config, config.seeds[0])


def main(argv: Sequence[str] | None = None) -> dict:
    """Run from the command line; return the summary (per algorithm, final ID and OOD accuracy;
    empty on the ranks other than 0 of a distributed run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, run_dir = resolve(args, parser)
        check_data(config)  # what only the data can tell, before any folder exists
    except (ConfigError, ValueError, OSError) as err:
        parser.error(str(err))
    try:
        with distributed_session(config.torch_device(),
                                 getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S)) as comm:
            resume = run_dir is not None
            if not resume:  # rank 0 makes the folder and tells the others
                try:
                    made = create_run_dir(config) if comm.is_main else None
                except OSError as err:
                    parser.error(f"cannot create a run folder in out_dir={config.out_dir!r}: "
                                 f"{err.strerror or err}")
                run_dir = comm.broadcast_object(made)
            if comm.is_main:
                print(f"run folder: {run_dir}", flush=True)
            start = time.perf_counter()
            try:
                rows = run_experiment(config, run_dir, resume=resume,
                                      progress="quiet" not in args, comm=comm)
            except (ValueError, OSError) as err:  # a damaged checkpoint, a full disk...
                parser.exit(1, f"{parser.prog}: error: {err}\n")
            except KeyboardInterrupt:
                parser.exit(130, f"\ninterrupted: continue from the last checkpoint with "
                                 f"{parser.prog} --resume {run_dir}\n")
            if not comm.is_main:
                return {}
            summary = write_run_results(run_dir, config, rows, resumed=resume,
                                        seconds=time.perf_counter() - start,
                                        world_size=comm.world_size)
            print(format_table(summary, config=config))
            paired = format_paired(summary, config=config)
            if paired:
                print(paired)
            return summary
    except DistributedAggregationError as err:  # a rank died or stalled
        # the failed collective leaves the process group's threads in a state that can abort
        # the interpreter's teardown (SIGABRT instead of status 1): report and leave at once;
        # checkpoints are written atomically, so nothing is left half-written
        sys.stdout.flush()
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        os._exit(1)


def script() -> None:
    """``main`` as a command. A rank of a distributed run leaves with ``os._exit`` once its
    files are written and the process group is torn down: gloo's threads can otherwise abort
    the interpreter's own teardown (``terminate called without an active exception``) and turn
    a clean run into a failed exit status."""
    main()
    if env_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    script()
