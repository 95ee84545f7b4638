"""``python -m fedsim.recipes NAME --scale small|full``: the papers' experiments as sweeps.

Each recipe is a ``fedsim.sweep.Sweep`` (settings, grid, conditions) at two scales: ``small``
runs on the embedded 8×8 digits in minutes on a laptop CPU; ``full`` on the 28×28 sets
(``colored-mnist`` where its files are present, else Debian's Fashion-MNIST) with the papers'
client counts, sized for one GPU (add ``--device cuda``). Every method's settings are chosen on
the held-out validation set (``fedsim.analysis``); the sweep folder gets the report and figures
and resumes with ``python -m fedsim.sweep --resume SWEEP_DIR``.

| recipe | what |
| --- | --- |
| workshop-fig2 | the workshop's Figure 2: binary and 10-class Colored MNIST, IID and non-IID (conditions), FedAvg against FedGMA v1 (hard mask, p = 0.8, 3 local epochs, SGD lr 0.001) at several server step sizes |
| journal-table | FedAvg, FedProx, SCAFFOLD, FedPVR, FedGA, FedAdam, each ± GMA (soft mask, τ from {0.2, 0.4, 0.6} chosen on validation), label skew by Dirichlet and shards (conditions) |
| and-mask-spirals | the positive control: the AND-mask's synthetic task (``spirals``), where the shortcut's sign differs across clients and the mechanism's does not; FedSGD FedAvg against FedGMA (the AND-mask itself: hard mask, τ = 1, rescaled, server Adam) and the soft mask at τ = 0.4; ``full`` adds 2, 5 and 20 local steps |
| irm-cmnist | the IRM protocol on 14×14 two-channel Fashion-MNIST with IRMv1 as the control known to work: FedSGD FedAvg (ERM), ``irm`` and FedGMA at the IRM paper's settings, and the grayscale oracle; ``full``: 10 clients and the share of clients whose color rule is reversed from 0 to 0.5 (the curve), with the OOD-validation selection |
| fair-ood | benchmarks that can tell invariance from step size: 25 % label noise, a binary label skew that does not depend on the seed (``binary-skew``), with and without clients whose color rule is reversed (conditions); FedAvg and FedGMA both tuned (server lr, τ), and FedAvg at FedGMA's mean step (``--step-size-control``) |
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .config import Config, ConfigError
from .data.sources import source_available
from .cli import OneLineParser
from .sweep import Sweep, add_run_flags, create_sweep_dir, run_and_report

SCALES = ("small", "full")
SEEDS = (0, 1, 2, 3, 4)


def _full_dataset(binary: bool = True) -> str:
    """``colored-mnist`` where MNIST's files are present, else ``colored-fashion-mnist``."""
    name = "colored-mnist" if source_available("mnist") else "colored-fashion-mnist"
    return name if binary else f"{name}-10"


def workshop_fig2(scale: str) -> Sweep:
    small = scale == "small"
    datasets = ("colored-digits", "colored-digits-10") if small \
        else (_full_dataset(), _full_dataset(binary=False))
    base = {"model": "cnn", "algorithms": ("fedavg", "fedgma-v1"), "local_epochs": 3,
            "lr": 0.001, "fedgma_v1_p": 0.8, "batch_size": 32, "seeds": SEEDS,
            "num_clients": 10, "clients_per_round": 10, "rounds": 50 if small else 100,
            "eval_every": 5, "validation_fraction": 0.1}
    grid = {"dataset": datasets, "split": ("iid", "shards"), "server_lr": (0.5, 1.0, 2.0)}
    return Sweep(base, grid, conditions=("dataset", "split"), baseline="fedavg")


def journal_table(scale: str) -> Sweep:
    small = scale == "small"
    methods = ("fedavg", "fedprox", "scaffold", "fedpvr", "fedga", "fedadam")
    base = {"dataset": "colored-digits" if small else _full_dataset(), "model": "cnn",
            "algorithms": tuple(n for m in methods for n in (m, "fedgma" if m == "fedavg"
                                                           else f"{m}+gma")),
            "gma_mask": "soft", "local_epochs": 1, "seeds": SEEDS, "rounds": 40 if small else 100,
            "num_clients": 10 if small else 100, "clients_per_round": 10, "eval_every": 5,
            "validation_fraction": 0.1, "adaptive_server_lr": 0.01}
    grid = {"split": ("dirichlet", "shards"), "gma_tau": (0.2, 0.4, 0.6)}
    return Sweep(base, grid, conditions=("split",), baseline="fedavg")


def fair_ood(scale: str) -> Sweep:
    small = scale == "small"
    base = {"dataset": "colored-digits" if small else _full_dataset(), "model": "cnn",
            "algorithms": ("fedavg", "fedgma"), "split": "binary-skew", "local_epochs": 1,
            "seeds": SEEDS, "rounds": 40 if small else 100, "eval_every": 5,
            "num_clients": 10 if small else 100, "clients_per_round": 10,
            "validation_fraction": 0.1, "label_noise": 0.25}
    grid = {"reversed_color_fraction": (0.0, 0.3), "server_lr": (1.0, 2.0),
            "gma_tau": (0.2, 0.5)}
    return Sweep(base, grid, conditions=("reversed_color_fraction",), baseline="fedavg",
                 step_size_control=True)


def and_mask_spirals(scale: str) -> Sweep:
    """The positive control: the AND-mask's own task and settings (Parascandolo et al. 2021:
    16 environments, hard mask at τ = 1 rescaled by its density, Adam at lr 0.01 with
    ``torch.optim.Adam``'s bias correction, β2 0.999, ε 1e-8, L2 1e-3, batches of 256, 600
    steps), as FedSGD (one local step a round, every client every round), so FedGMA is the
    AND-mask and FedAvg is the same training without the mask; ``full`` adds 2, 5 and 20
    local steps, where the mask sees multi-step deltas instead of gradients."""
    base = {"dataset": "spirals", "model": "leaky-mlp", "algorithms": ("fedavg", "fedgma"),
            "num_clients": 16, "clients_per_round": 16, "batch_size": 256, "lr": 0.1,
            "server_optimizer": "adam", "adaptive_server_lr": 0.01, "server_beta2": 0.999,
            "server_eps": 1e-8, "server_bias_correction": True, "server_weight_decay": 1e-3,
            "gma_rescale": True, "rounds": 600, "eval_every": 50, "seeds": SEEDS,
            "validation_fraction": 0.1}
    grid = {"local_steps": (1,) if scale == "small" else (1, 2, 5, 20),
            "gma_mask": ("hard", "soft"), "gma_tau": (1.0, 0.4)}
    return Sweep(base, grid, conditions=tuple(grid), baseline="fedavg")


def irm_cmnist(scale: str) -> Sweep:
    """The IRM protocol (Arjovsky et al. 2019) on Fashion-MNIST, 14×14 in two color channels,
    25 % label noise, the IRM paper's settings as FedSGD (one full-batch step a round, every
    client every round, server Adam with bias correction at lr 4.8985e-4, L2 0.00110794568 as
    ``weight_decay`` 2·l2, penalty 91257.186 from round 190, 501 rounds): FedAvg (ERM), IRMv1
    (``irm``) and FedGMA (the AND-mask: hard, τ = 1, rescaled), on 11,112 training images.
    ``small``: two environments (flip 0.1 and 0.2) and the grayscale oracle (condition);
    ``full``: the curve, 10 clients (flips over [0.1, 0.2]) with a ``reversed_color_fraction``
    of 0 to 0.5, the step-size control, and half the OOD test set held out for the test-domain
    selection."""
    small = scale == "small"
    base = {"dataset": "irm-fashion-mnist", "model": "irm-mlp", "split": "iid",
            "algorithms": ("fedavg", "irm", "fedgma"), "num_clients": 2 if small else 10,
            "clients_per_round": 2 if small else 10, "max_train": 11112,
            "local_steps": 1, "batch_size": 25000, "lr": 1.0, "weight_decay": 0.00221589136,
            "server_optimizer": "adam", "adaptive_server_lr": 4.8985e-4, "server_beta2": 0.999,
            "server_eps": 1e-8, "server_bias_correction": True, "gma_mask": "hard",
            "gma_tau": 1.0, "gma_rescale": True, "rounds": 501, "eval_every": 50,
            "seeds": SEEDS, "validation_fraction": 0.1,
            "ood_validation_fraction": 0.0 if small else 0.5}
    grid: dict[str, tuple] = {"dataset": ("irm-fashion-mnist", "irm-fashion-mnist-gray")} \
        if small else {"reversed_color_fraction": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)}
    return Sweep(base, grid, conditions=tuple(grid), baseline="fedavg",
                 step_size_control=not small)


RECIPES = {"workshop-fig2": workshop_fig2, "journal-table": journal_table, "fair-ood": fair_ood,
           "and-mask-spirals": and_mask_spirals, "irm-cmnist": irm_cmnist}


def build(name: str, scale: str, overrides: dict[str, Any] | None = None) -> Sweep:
    """Recipe ``name`` at ``scale``, its base settings updated with ``overrides``."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    sweep = RECIPES[name](scale)
    if not overrides:
        return sweep
    base = Config.from_dict({**sweep.base, **overrides}, source=f"recipe {name}").to_dict()
    return Sweep({k: v for k, v in base.items() if v is not None}, sweep.grid, sweep.conditions,
                 sweep.baseline, sweep.step_size_control)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = OneLineParser(prog="python -m fedsim.recipes",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("recipe", choices=list(RECIPES))
    parser.add_argument("--scale", choices=SCALES, default="small")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2,3,4)")
    parser.add_argument("--rounds", type=int, help="communication rounds (default: the recipe's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out-dir", default="runs", help="folder that receives the sweep folder")
    add_run_flags(parser)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    try:
        if args.seeds:
            overrides["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        for key in ("rounds", "device"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        sweep = build(args.recipe, args.scale, overrides)
        sweep_dir = create_sweep_dir(sweep, args.out_dir, f"recipe-{args.recipe}-{args.scale}")
    except (ConfigError, ValueError, OSError) as err:
        parser.error(str(err))
    print(f"sweep folder: {sweep_dir}", flush=True)
    report = run_and_report(parser, sweep_dir, sweep, progress=not args.quiet,
                            jobs=args.jobs or 1)
    print((sweep_dir / "summary.md").read_text())
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
