"""``python -m fedsim.sweep``: a grid of settings × methods × seeds as one resumable command.

    python -m fedsim.sweep --grid server_lr=0.5,1,2 --grid gma_tau=0.2,0.4,0.6 \\
        --compare fedavg,fedgma --seeds 0,1,2,3,4 --rounds 50 --name lr-tau

Every other flag of ``python -m fedsim.run`` sets the sweep's base settings. The sweep folder
(``OUT_DIR/<time>-sweep-<name>``) holds ``sweep.toml`` (the base settings and the grid), one
normal run folder per cell under ``cells/`` and, at the end, the report of ``fedsim.analysis``
(``summary.md``, ``summary.json``, the figures). A method runs only on the cells that differ for
it: a plain method ignores the ``gma_*`` settings and an algorithm the other algorithms'
hyperparameters (``fedprox_mu``...), so FedAvg trains once per server learning rate, not once
per τ. ``--resume SWEEP_DIR`` skips finished cells and resumes the one that was interrupted
from its checkpoint.

``--condition SETTING`` marks a swept setting as separate experiments (a dataset, a split):
choices are made within each of its values. ``--step-size-control`` adds, for each GMA cell,
its plain algorithm at the server learning rate times the cell's mean mask density, which
tells what the mask does from what its smaller step does. Settings are chosen on the held-out
validation set (``validation_fraction``, 0.1 unless given): see ``fedsim.analysis``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any


from .algorithms import matters
from .analysis import analyse, read_rows, write_report
from .config import FIELD_TYPES, Config, ConfigError, toml_value, tomllib
from .io import atomic_write
from .loop import run_experiment
from .methods import is_masked, plain_name
from .cli import OneLineParser, add_settings, at_least_one, parse_value, show_value
from .run_folder import new_folder, write_run_results

#: settings a sweep cannot vary (its own axes, or where the cells go)
FIXED = ("algorithms", "seeds", "out_dir", "name")
#: the sweep's default held-out share of each client's data, when the settings give none
DEFAULT_VALIDATION = 0.1
@dataclass(frozen=True)
class Cell:
    """One run folder of the sweep: ``config`` (methods and all), the swept values it has, and
    the names its methods go by in the report (a step-size control's label)."""

    name: str
    values: tuple[tuple[str, Any], ...]
    config: Config
    rename: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    """A sweep's plan: ``base`` settings, the ``grid`` (setting → values; their product), which
    grid settings are ``conditions`` (separate experiments: choices are made within each),
    the ``baseline`` method, and whether to add ``step_size_control`` runs: for each GMA cell,
    its plain algorithm at the server learning rate times the cell's mean mask density."""

    base: dict[str, Any]
    grid: dict[str, tuple[Any, ...]]
    conditions: tuple[str, ...] = ()
    baseline: str | None = None
    step_size_control: bool = False

    def __post_init__(self) -> None:
        unknown = [c for c in self.conditions if c not in self.grid]
        if unknown:
            raise ConfigError(f"--condition {', '.join(unknown)}: not a swept setting")
        methods = Config.from_dict(self.base, source="the sweep's settings").algorithms
        if self.baseline is not None and self.baseline not in methods:
            raise ConfigError(f"--baseline {self.baseline!r} is not one of the compared methods "
                              f"({', '.join(methods)})")
        self.cells()  # every cell's settings checked before anything runs

    def cells(self) -> list[Cell]:
        """The grid's cells: for each grid point and method, the swept values that matter to
        the method; methods that share those values share a cell."""
        methods = Config.from_dict(self.base, source="the sweep's settings").algorithms
        groups: dict[tuple[tuple[str, Any], ...], list[str]] = {}
        for point in itertools.product(*self.grid.values()):
            for method in methods:
                values = tuple((k, v) for k, v in zip(self.grid, point) if matters(method, k))
                if method not in groups.setdefault(values, []):
                    groups[values].append(method)
        return [self._cell(",".join(f"{k}={show_value(v)}" for k, v in values) or "base", values,
                           {"algorithms": tuple(names)})
                for values, names in groups.items()]

    def controls(self, sweep_dir: Path) -> list[Cell]:
        """The step-size controls of the finished GMA cells (none unless
        ``step_size_control``): the plain algorithm at the GMA method's server learning rates
        times ``density``, its mean mask density over its seeds and rounds in that cell."""
        if not self.step_size_control:
            return []
        controls = []
        for cell in self.cells():
            rows = read_rows(sweep_dir / "cells" / cell.name)
            for method in cell.config.algorithms:
                if not is_masked(method):
                    continue
                density = statistics.fmean(r["mask_density"] for r in rows if r["method"] == method)
                plain = plain_name(method)
                scaled = {k: round(getattr(cell.config, k) * density, 6)
                          for k in ("momentum_server_lr", "adaptive_server_lr")
                          if getattr(cell.config, k) is not None}
                scaled["server_lr"] = round(cell.config.server_lr_for("sgd", masked=True)
                                            * density, 6)
                label = f"{plain} (step x {method} density)"
                controls.append(self._cell(f"control-{method}-{cell.name}", cell.values,
                                           {"algorithms": (plain,), **scaled}, {plain: label}))
        return controls

    def _cell(self, name: str, values: tuple, settings: dict[str, Any],
              rename: dict[str, str] | None = None) -> Cell:
        try:
            config = Config.from_dict({**self.base, **dict(values), **settings, "name": name},
                                      source=f"sweep cell {name}")
        except ConfigError as err:
            raise ConfigError(f"cell {name}: {err}") from None
        return Cell(name, values, config, rename or {})

    def to_toml(self) -> str:
        head = {"baseline": self.baseline or "", "conditions": list(self.conditions),
                "step_size_control": self.step_size_control}
        return "".join(["[sweep]\n", *(f"{k} = {toml_value(v)}\n" for k, v in head.items()),
                        "[base]\n", *(f"{k} = {toml_value(v)}\n" for k, v in self.base.items()
                                      if v is not None),
                        "[grid]\n", *(f"{k} = {toml_value(list(v))}\n" for k, v in self.grid.items())])

    @classmethod
    def from_toml(cls, path: Path) -> Sweep:
        try:
            with open(path, "rb") as f:
                saved = tomllib.load(f)
            head = saved["sweep"]
            grid = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                    for k, v in saved["grid"].items()}
            return cls(saved["base"], grid, tuple(head["conditions"]), head["baseline"] or None,
                       head["step_size_control"])
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"cannot read {path}: {err!r}") from None


def run_sweep(sweep_dir: Path, sweep: Sweep, *, progress: bool = True,
              log: Callable[[str], None] = print, jobs: int = 1) -> list[Cell]:
    """Run (or finish) every cell of ``sweep`` in ``sweep_dir``, then its step-size controls;
    return all the cells. A cell whose ``results.json`` exists is done; one with a
    ``config.toml`` is resumed from its checkpoint. ``jobs`` > 1 runs that many cells at once,
    each in its own process (without progress bars; each uses the cell's ``threads``)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    cells = sweep.cells()
    _run_cells(sweep_dir, cells, progress, log, jobs)
    controls = sweep.controls(sweep_dir)
    _run_cells(sweep_dir, controls, progress, log, jobs)
    return cells + controls


def _run_cells(sweep_dir: Path, cells: list[Cell], progress: bool,
               log: Callable[[str], None], jobs: int) -> None:
    todo = []
    for i, cell in enumerate(cells, 1):
        run_dir = sweep_dir / "cells" / cell.name
        if (run_dir / "results.json").is_file():
            log(f"[{i}/{len(cells)}] {cell.name}: done")
            continue
        resume = (run_dir / "config.toml").is_file()
        if resume and Config.from_toml(run_dir / "config.toml") != cell.config:
            raise ConfigError(f"{run_dir}: its config.toml differs from the sweep's cell; "
                              "move the folder away to rerun it")
        todo.append((f"[{i}/{len(cells)}] {cell.name}", run_dir, cell.config, resume))
    if jobs == 1 or len(todo) <= 1:
        for label, run_dir, config, resume in todo:
            log(f"{label}: {', '.join(config.algorithms)}" + (" (resumed)" if resume else ""))
            _run_cell(run_dir, config, resume, progress)
        return
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=get_context("spawn")) as pool:
        running = {pool.submit(_run_cell_in_worker, run_dir, config, resume): label
                   for label, run_dir, config, resume in todo}
        log(f"{len(todo)} cells, {min(jobs, len(todo))} at a time")
        for future in as_completed(running):
            seconds = future.result()
            log(f"{running[future]}: finished in {seconds:.0f} s")


def _run_cell_in_worker(run_dir: Path, config: Config, resume: bool) -> float:
    """``_run_cell`` in a pool's process, which Ctrl-C ends at once: the pool would otherwise
    take the interrupt as this cell's result and start the next cell (the cell resumes from
    its checkpoint)."""
    try:
        return _run_cell(run_dir, config, resume, progress=False)
    except KeyboardInterrupt:
        os._exit(130)


def _run_cell(run_dir: Path, config: Config, resume: bool, progress: bool) -> float:
    """Run one cell's folder (resumed from its checkpoint if ``resume``); return its seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write(run_dir / "config.toml", config.to_toml())
    start = time.perf_counter()
    rows = run_experiment(config, run_dir, resume=resume, progress=progress)
    seconds = time.perf_counter() - start
    write_run_results(run_dir, config, rows, resumed=resume, seconds=seconds)
    return seconds


def analyse_sweep(sweep_dir: Path, sweep: Sweep, cells: list[Cell]) -> dict[str, Any]:
    """Analyse the finished ``cells`` and write the report into ``sweep_dir``."""
    folders = [(c.values, sweep_dir / "cells" / c.name, c.rename) for c in cells]
    report = analyse(folders, sweep.grid, baseline=sweep.baseline, conditions=sweep.conditions)
    write_report(sweep_dir, report)
    return report


def parse_grid(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``["server_lr=1,2", "gma_mask=soft,hard"]`` → ``{"server_lr": (1.0, 2.0), ...}``; names
    in kebab or snake case."""
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--grid {item!r}: write SETTING=VALUE,VALUE,...")
        if key not in FIELD_TYPES:
            raise ConfigError(f"--grid {item!r}: no setting {key!r}")
        if key in FIXED:
            raise ConfigError(f"--grid {key}: the sweep sets it itself (use --{key.replace('_', '-')})")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        hint = FIELD_TYPES[key]
        separator = ";" if typing.get_origin(hint) is tuple else ","
        try:
            parsed = tuple(parse_value(hint, v.strip()) for v in values.split(separator))
        except ConfigError as err:
            raise ConfigError(f"--grid {key}: {err}") from None
        if len(set(parsed)) != len(parsed):
            raise ConfigError(f"--grid {key} has duplicates: {values}")
        grid[key] = parsed
    return grid


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m fedsim.sweep", description=__doc__.splitlines()[0].replace("``", ""),
        epilog="A list-valued setting takes its values separated by ';' "
               "(--grid color_flip_range='0.1,0.2;0.05,0.1').", argument_default=argparse.SUPPRESS)
    parser.add_argument("--grid", action="append", metavar="SETTING=V1,V2,...",
                        help="a swept setting and its values (repeat for more: their product)")
    parser.add_argument("--condition", action="append", metavar="SETTING",
                        help="a swept setting that defines separate experiments (dataset, "
                             "split...): settings are chosen within each of its values")
    parser.add_argument("--baseline", help="the method the others are compared with, paired by "
                        "seed (default: the first plain method)")
    parser.add_argument("--step-size-control", action="store_true",
                        help="also run, for each GMA cell, its plain algorithm at the server "
                             "learning rate times the cell's mean mask density")
    parser.add_argument("--resume", type=Path, metavar="SWEEP_DIR",
                        help="finish a stopped sweep with its own sweep.toml")
    add_run_flags(parser)
    add_settings(parser)
    return parser


def create_sweep_dir(sweep: Sweep, out_dir: str | Path, name: str) -> Path:
    """A new ``OUT_DIR/<time>-<name>`` folder holding the sweep's ``sweep.toml``."""
    sweep_dir = new_folder(out_dir, name)
    atomic_write(sweep_dir / "sweep.toml", sweep.to_toml())
    return sweep_dir


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    """The sweep the parsed flags describe (``validation_fraction`` 0.1 unless given)."""
    settings = {k: v for k, v in vars(args).items() if k in FIELD_TYPES}
    if "config" in args:
        settings = {**Config.from_toml(args.config).to_dict(), **settings}
    settings.setdefault("validation_fraction", DEFAULT_VALIDATION)
    base = Config.from_dict(settings, source="the command line").to_dict()
    return Sweep({k: v for k, v in base.items() if v is not None},
                 parse_grid(getattr(args, "grid", [])),
                 tuple(c.replace("-", "_") for c in getattr(args, "condition", [])),
                 getattr(args, "baseline", None), "step_size_control" in args)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run a sweep from the command line; return its report (``fedsim.analysis.analyse``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if "resume" in args:
            given = [k for k in vars(args) if k not in ("resume", "quiet", "jobs")]
            if given:
                parser.error("--resume finishes a sweep with its own sweep.toml; drop "
                             + ", ".join("--" + k.replace("_", "-") for k in given))
            sweep_dir, sweep = args.resume, Sweep.from_toml(args.resume / "sweep.toml")
        else:
            sweep = sweep_from_args(args)  # every cell checked before the folder exists
            sweep_dir = create_sweep_dir(sweep, sweep.base.get("out_dir", "runs"),
                                         f"sweep-{sweep.base.get('name') or 'sweep'}")
    except (ConfigError, OSError) as err:
        parser.error(str(err))
    print(f"sweep folder: {sweep_dir}", flush=True)
    report = run_and_report(parser, sweep_dir, sweep, progress="quiet" not in args,
                            jobs=getattr(args, "jobs", 1))
    print((sweep_dir / "summary.md").read_text())
    return report


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say how a sweep runs, not what it runs: ``--jobs`` and ``--quiet``."""
    parser.add_argument("--jobs", type=at_least_one, metavar="N",
                        help="cells run at once, each in its own process (default 1; 2 fills "
                             "two cores at the default threads, half the cores per run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_and_report(parser: argparse.ArgumentParser, sweep_dir: Path, sweep: Sweep, *,
                   progress: bool, jobs: int = 1) -> dict[str, Any]:
    """Run the sweep and write its report; a failure or Ctrl-C ends with one line that says
    how to continue (``--resume``)."""
    resume = f"python -m fedsim.sweep --resume {sweep_dir}"
    try:
        cells = run_sweep(sweep_dir, sweep, progress=progress, jobs=jobs)
        return analyse_sweep(sweep_dir, sweep, cells)
    except (ValueError, OSError) as err:
        parser.exit(1, f"{parser.prog}: error: {err} (then: {resume})\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\ninterrupted: continue with {resume}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
