"""Metrics files, the summary table and the accuracy plot of a run folder."""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import atomic_write
from .methods import is_masked, plain_name

if TYPE_CHECKING:
    from .config import Config

#: one metrics row per round per method per seed; evaluation columns are None between
#: evaluations; ``diverged`` is True on the last row of a run stopped by a non-finite update
COLUMNS = ("method", "seed", "round", "train_loss", "mask_density", "mean_agreement",
           "floats_down", "floats_up", "comm_vs_fedavg", "val_acc", "val_loss", "ood_val_acc",
           "ood_val_loss", "test_acc", "test_loss", "ood_acc", "ood_loss", "color_reliance",
           "diverged")
FINAL_METRICS = ("test_acc", "ood_acc")
#: what the project found about a GMA method that takes another server step than FedAvg
STEP_FINDING = ("at an equal server step GMA was not ahead of FedAvg on colored digits "
                "(see docs/fedsim-experiments.md); where it is: python -m fedsim.recipes "
                "and-mask-spirals")


def server_step(method: str, config: Config) -> tuple[str, float]:
    """(server optimizer, server learning rate) of ``method`` in a run of ``config``."""
    kind = config.server_optimizer_for(method)
    return kind, config.server_lr_for(kind, is_masked(method))


def _step_text(kind: str, lr: float, *, with_kind: bool = True) -> str:
    return f"{kind + ', ' if with_kind else ''}server lr {lr:g}"


def method_label(method: str, config: Config | None) -> str:
    """``method`` with its server step and, with GMA, its mask and τ:
    ``fedgma (sgd, server lr 2, soft τ=0.2)``; the bare name without a config."""
    if config is None:
        return method
    gma = f", {config.gma_mask} τ={config.gma_tau:g}" if is_masked(method) else ""
    return f"{method} ({_step_text(*server_step(method, config))}{gma})"


def write_metrics(run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` (empty cells where a metric is None)."""
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "metrics.csv", text.getvalue())


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and final metric: the value at each seed's last round, their mean and std
    (sample standard deviation over seeds; 0 with one seed). OOD is None without an OOD set.
    ``comm``: floats exchanged per round (down, up, total; mean over rounds and seeds) and the
    ratio to FedAvg's ``2 N`` floats per participating client."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    comm: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["method"], row["seed"])
        if key not in last or row["round"] > last[key]["round"]:
            last[key] = row
        if row.get("floats_up") is not None:
            comm.setdefault(row["method"], []).append(row)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for (method, seed), row in last.items():
        for metric in FINAL_METRICS:
            entry = summary.setdefault(method, {}).setdefault(metric, {"per_seed": {}})
            entry["per_seed"][seed] = row[metric]
    for method, metrics in summary.items():
        for entry in metrics.values():
            values = [v for v in entry["per_seed"].values() if v is not None]
            entry["mean"] = statistics.fmean(values) if values else None
            entry["std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        if method in comm:
            got = comm[method]
            down = statistics.fmean(r["floats_down"] for r in got)
            up = statistics.fmean(r["floats_up"] for r in got)
            metrics["comm"] = {"floats_down": down, "floats_up": up, "floats_per_round": down + up,
                               "vs_fedavg": statistics.fmean(r["comm_vs_fedavg"] for r in got)}
    return summary


def _accuracy_cell(entry: dict[str, Any] | None) -> str:
    if entry is None or entry["mean"] is None:
        return "n/a"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def _comm_cells(metrics: dict[str, Any]) -> tuple[str, str]:
    comm = metrics.get("comm")
    if comm is None:
        return "n/a", "n/a"
    return f"{comm['floats_per_round'] / 1e6:.3f}", f"{comm['vs_fedavg']:.2f}×"


def render_table(header: Sequence[str], lines: Sequence[Sequence[str]], *,
                 markdown: bool) -> str:
    """``lines`` under ``header``: a Markdown table, or plain text in padded columns."""
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |",
                          "|" + "|".join("---" for _ in header) + "|",
                          *("| " + " | ".join(r) + " |" for r in lines)])
    widths = [max(len(r[i]) for r in (header, *lines)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*r) for r in lines)])


def format_table(summary: dict[str, dict[str, dict[str, Any]]], *, markdown: bool = False,
                 config: Config | None = None) -> str:
    """One line per method (``method_label``, given the run's ``config``): accuracy in % as
    mean ± std over seeds, and the communication per round (millions of floats, up and down,
    all sampled clients; and as a multiple of FedAvg's). Plain text, or a Markdown table."""
    header = ("method", "seeds", "ID accuracy %", "OOD accuracy %", "comm MFloats/round",
              "comm ×FedAvg")
    lines = [(method_label(m, config), str(len(s["test_acc"]["per_seed"])),
              _accuracy_cell(s["test_acc"]), _accuracy_cell(s["ood_acc"]), *_comm_cells(s))
             for m, s in summary.items()]
    return render_table(header, lines, markdown=markdown)


def _pair_names(method: str, base: str, config: Config | None) -> tuple[str, bool]:
    """``method − base``, each with its server step where the steps differ (the optimizer only
    where that differs); and whether they differ in size only."""
    if config is None or server_step(method, config) == server_step(base, config):
        return f"{method} − {base}", False
    (kind, lr), (base_kind, base_lr) = server_step(method, config), server_step(base, config)
    shown = kind != base_kind
    return (f"{method} ({_step_text(kind, lr, with_kind=shown)}) − "
            f"{base} ({_step_text(base_kind, base_lr, with_kind=shown)})"), not shown


def format_paired(summary: dict[str, dict[str, dict[str, Any]]], *,
                  config: Config | None = None) -> str:
    """One line per method after the first: its final ID and OOD accuracy minus the first
    method's, paired by seed (mean ± std over the common seeds, in points). Given the run's
    ``config``, a pair whose server steps differ names them, and where they differ in size
    only, a last line says so and what the project found at an equal step (``STEP_FINDING``)."""
    if len(summary) < 2:
        return ""
    base, *others = summary
    lines, resized = [], []
    for method in others:
        names, sized = _pair_names(method, base, config)
        cells = []
        for metric, label in (("test_acc", "ID"), ("ood_acc", "OOD")):
            ours, theirs = summary[method][metric]["per_seed"], summary[base][metric]["per_seed"]
            diffs = [100 * (ours[s] - theirs[s]) for s in ours
                     if s in theirs and ours[s] is not None and theirs[s] is not None]
            if diffs:
                std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                cells.append(f"{label} {statistics.fmean(diffs):+.2f} ± {std:.2f}")
        if cells:
            lines.append(f"{names}, paired over {len(ours)} seed(s): {', '.join(cells)} points")
            resized += [method] if sized else []
    if resized:
        larger = server_step(resized[0], config)[1] > server_step(base, config)[1]
        lines.append(f"note: the paired difference comes with a {'larger' if larger else 'smaller'}"
                     f" server step for {', '.join(resized)}; {STEP_FINDING}")
    return "\n".join(lines)


def format_gma_table(summary: dict[str, dict[str, dict[str, Any]]], *, markdown: bool = True) -> str:
    """Each algorithm beside its GMA twin (``X`` and ``X+gma``; FedAvg and ``fedgma``): ID and
    OOD accuracy without and with GMA, and the communication per round (GMA is server side and
    costs none)."""
    pairs: dict[str, dict[str, str]] = {}
    for method in summary:
        plain = plain_name(method)
        pairs.setdefault(plain, {})["gma" if method != plain else "plain"] = method
    header = ("algorithm", "ID %", "ID % +GMA", "OOD %", "OOD % +GMA", "comm MFloats/round",
              "comm ×FedAvg")
    lines = []
    for plain, names in pairs.items():
        a, b = summary.get(names.get("plain", "")), summary.get(names.get("gma", ""))
        either = a or b
        lines.append((plain, _accuracy_cell(a and a["test_acc"]), _accuracy_cell(b and b["test_acc"]),
                      _accuracy_cell(a and a["ood_acc"]), _accuracy_cell(b and b["ood_acc"]),
                      *_comm_cells(either)))
    return render_table(header, lines, markdown=markdown)


def write_results(run_dir: Path, summary: dict, *, config: Config | None = None,
                  **extra: Any) -> None:
    """``results.json`` (the summary, the run's ``config`` and ``extra``) and ``results.md``
    (the Markdown table per method, the paired differences, then each algorithm beside its GMA
    twin; labelled as ``format_table`` and ``format_paired`` do given ``config``)."""
    settings = {} if config is None else {"config": config.to_dict()}
    atomic_write(run_dir / "results.json",
                 json.dumps({"summary": summary, **settings, **extra}, indent=2) + "\n")
    paired = format_paired(summary, config=config)
    atomic_write(run_dir / "results.md", format_table(summary, markdown=True, config=config)
                 + "\n\n" + (paired + "\n\n" if paired else "") + format_gma_table(summary) + "\n")


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """``matplotlib.pyplot`` on the Agg backend (no display), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:  # noqa: ANN001 - a Figure
    """``fig`` as a PNG at ``path`` (written atomically), then closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write(path, buffer.getvalue())


def plot_accuracy(run_dir: Path, rows: Sequence[dict[str, Any]],
                  config: Config | None = None) -> None:
    """``accuracy.png``: accuracy per round per method, mean over seeds (ID solid, OOD dashed);
    titled with each method's ``method_label`` given the run's ``config``."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if config is not None:
        ax.set_title("\n".join(method_label(m, config) for m in methods), fontsize=9)
    for i, method in enumerate(methods):
        color = f"C{i}"
        for metric, style, label in (("test_acc", "-", "ID"), ("ood_acc", "--", "OOD")):
            by_round: dict[int, list[float]] = {}
            for r in rows:
                if r["method"] == method and r[metric] is not None:
                    by_round.setdefault(r["round"], []).append(r[metric])
            if by_round:
                xs = sorted(by_round)
                ax.plot(xs, [statistics.fmean(by_round[x]) for x in xs], style, color=color,
                        marker=".", label=f"{method} {label}")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, run_dir / "accuracy.png")
