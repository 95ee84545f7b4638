"""A sweep's report: every cell's statistics over seeds, paired differences to a baseline, and a
selection of each method's settings that never looks at the test sets.

For each method and cell (the swept values that matter to the method) and each seed: the
metrics at the last round (``final``) and their mean over the evaluations of the last 10 rounds
(``last10``); over seeds their mean and sample standard deviation. A paired difference
``Δ = mean_s (m_s − b_s)`` (and its std over seeds) compares a method with the baseline on the
same seeds and the same values of the settings that matter to the baseline.

**Selection.** Each method gets its own best cell among those where no seed diverged (a run
stops at a non-finite update; its metrics are those of the model before): the highest mean over
seeds of ``last10`` validation accuracy (``val_acc``, the in-distribution set held out of the clients' data); its
test accuracies there are the method's result. Where the runs hold out an OOD validation set
(``ood_validation_fraction``, disjoint from the OOD test set), a second pick is made the same
way on ``last10`` ``ood_val_acc``: DomainBed's test-domain ("oracle") selection, a labelled
column of its own, which assumes a few labelled examples of the target distribution. The cell
with the best OOD *test* accuracy is reported too, as the upper bound: it is chosen on the test
set, so it is never a result.
"""
from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write
from .algorithms import matters
from .methods import is_masked, plain_name
from .report import pyplot, render_table, save_figure

METRICS = ("val_acc", "ood_val_acc", "test_acc", "ood_acc", "color_reliance")
#: the criterion a method's settings are chosen by
SELECT_BY = ("last10", "val_acc")
#: the second criterion: DomainBed's test-domain selection, on held-out OOD examples
SELECT_BY_OOD = ("last10", "ood_val_acc")
#: the fewest seeds a paired comparison should rest on
MIN_SEEDS = 5

Values = tuple[tuple[str, Any], ...]


def mean_std(values: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "std", "n"}`` (sample std, 0 for one value), or None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A run folder's metrics rows (``metrics.jsonl``)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_seed(rows: Sequence[dict[str, Any]], window: int = 10) -> dict[int, dict[str, dict]]:
    """Per seed: each metric at the last round (``final``) and the mean of its evaluations in
    the last ``window`` rounds (``last10``); None where never measured."""
    out: dict[int, dict[str, dict]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        last = max(r["round"] for r in mine)
        final = next(r for r in mine if r["round"] == last)
        recent = [r for r in mine if r["round"] > last - window]
        out[seed] = {
            "final": {m: final.get(m) for m in METRICS},
            "last10": {m: _mean_or_none([r[m] for r in recent if r.get(m) is not None])
                       for m in METRICS},
            "mask_density": _mean_or_none([r["mask_density"] for r in mine
                                           if r.get("mask_density") is not None]),
            "diverged": any(r.get("diverged") for r in mine),
        }
    return out


def ood_curve(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """OOD test accuracy at each evaluated round: mean and std over seeds."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        if r.get("ood_acc") is not None:
            by_round.setdefault(r["round"], []).append(r["ood_acc"])
    stats = [mean_std(by_round[x]) for x in sorted(by_round)]
    return {"round": sorted(by_round), "mean": [s["mean"] for s in stats],
            "std": [s["std"] for s in stats]}


def _mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def analyse(cells: Sequence[tuple[Values, Path, dict[str, str]]],
            grid: dict[str, tuple[Any, ...]], *, baseline: str | None = None,
            conditions: Sequence[str] = ()) -> dict[str, Any]:
    """The report of a sweep whose ``cells`` are (swept values, run folder, renaming of the
    folder's methods) triples. ``conditions``: swept settings that define separate experiments
    (a dataset, a split) rather than choices: each method's settings are chosen, and compared,
    within each combination of their values."""
    entries: dict[tuple[str, Values], dict[int, dict]] = {}
    curves: dict[tuple[str, Values], dict[str, list]] = {}
    methods: list[str] = []
    for values, run_dir, rename in cells:
        rows = read_rows(run_dir)
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            name = rename.get(method, method)
            entries[(name, values)] = per_seed(mine)
            curves[(name, values)] = ood_curve(mine)
            if name not in methods:
                methods.append(name)
    baseline = baseline or next((m for m in methods if not is_masked(m)), methods[0])
    report: dict[str, Any] = {"baseline": baseline, "grid": {k: list(v) for k, v in grid.items()},
                              "conditions": list(conditions), "select_by": "/".join(SELECT_BY),
                              "cells": [], "selection": [], "warnings": []}
    fewest = min(len(s) for s in entries.values())
    if fewest < MIN_SEEDS:
        report["warnings"].append(f"only {fewest} seed(s): paired comparisons need at least "
                                  f"{MIN_SEEDS} to mean much")

    def base_of(values: Values) -> dict[int, dict] | None:
        wanted = tuple((k, v) for k, v in values if matters(baseline, k))
        return entries.get((baseline, wanted))

    for (method, values), seeds in entries.items():
        report["cells"].append({
            "method": method, "values": dict(values), "seeds": sorted(seeds),
            **{when: {m: mean_std(_collect(seeds, when, m)) for m in METRICS}
               for when in ("final", "last10")},
            "mask_density": mean_std([s["mask_density"] for s in seeds.values()
                                      if s["mask_density"] is not None]),
            "diverged": sum(s["diverged"] for s in seeds.values()),
            "paired_vs_baseline": _paired(seeds, base_of(values)),
            "ood_curve": curves[(method, values)],
        })
    for condition in itertools.product(*(grid[k] for k in conditions)):
        where = dict(zip(conditions, condition))
        here = [c for c in report["cells"] if all(c["values"].get(k) == v for k, v in where.items())]
        picks = {m: _select(m, [c for c in here if c["method"] == m], report, where)
                 for m in methods}
        base = picks.get(baseline)

        def at_choice(pick: dict) -> dict[int, dict]:
            return entries[(pick["method"], _key(pick["values"]))]

        for method, row in picks.items():
            if row is None:
                continue
            row["condition"] = where
            row["paired_vs_baseline"] = base and _paired(at_choice(row), at_choice(base))
            twin = picks.get(plain_name(method)) if is_masked(method) else None
            row["paired_vs_plain"] = twin and _paired(at_choice(row), at_choice(twin))
            report["selection"].append(row)
    return report


def _select(method: str, cells: list[dict], report: dict, where: dict[str, Any]) -> dict | None:
    """``method``'s cell of best mean validation accuracy among those where no seed diverged,
    its test-domain pick (best ``last10`` OOD validation accuracy) and its best OOD test cell
    (the upper bound)."""
    if not cells:
        return None
    scored = [c for c in cells if c[SELECT_BY[0]][SELECT_BY[1]] is not None and not c["diverged"]]
    if not scored:
        why = "every cell diverged on some seed" if all(c["diverged"] for c in cells) \
            else "no validation accuracy (validation_fraction = 0)"
        warning = f"{method}{f' ({_settings(where)})' if where else ''}: {why}: nothing selected"
        if warning not in report["warnings"]:
            report["warnings"].append(warning)
        return None
    pick = max(scored, key=lambda c: c[SELECT_BY[0]][SELECT_BY[1]]["mean"])
    when, metric = SELECT_BY_OOD
    on_ood = [c for c in cells if c[when][metric] is not None and not c["diverged"]]
    test_domain = max(on_ood, key=lambda c: c[when][metric]["mean"]) if on_ood else None
    with_ood = [c for c in cells if c["final"]["ood_acc"] is not None]
    oracle = max(with_ood, key=lambda c: c["final"]["ood_acc"]["mean"]) if with_ood else None
    return {"method": method, "values": pick["values"], "final": pick["final"],
            "last10": pick["last10"],
            "test_domain": test_domain and {"values": test_domain["values"],
                                            "ood_acc": test_domain["final"]["ood_acc"]},
            "oracle": oracle and {"values": oracle["values"], "ood_acc": oracle["final"]["ood_acc"]}}


def _key(values: dict[str, Any]) -> Values:
    return tuple(values.items())


def _collect(seeds: dict[int, dict], when: str, metric: str) -> list[float]:
    return [s[when][metric] for s in seeds.values() if s[when][metric] is not None]


def _paired(ours: dict[int, dict], theirs: dict[int, dict] | None) -> dict[str, Any] | None:
    """Per final metric: mean ± std over the common seeds of (ours − theirs)."""
    if theirs is None:
        return None
    common = sorted(set(ours) & set(theirs))
    out = {}
    for metric in ("test_acc", "ood_acc"):
        diffs = [ours[s]["final"][metric] - theirs[s]["final"][metric] for s in common
                 if ours[s]["final"][metric] is not None and theirs[s]["final"][metric] is not None]
        out[metric] = mean_std(diffs)
    return out


def _pct(entry: dict[str, float] | None, signed: bool = False) -> str:
    if entry is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{100 * entry['mean']:{sign}.1f} ± {100 * entry['std']:.1f}"


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(base)"


def _pick_columns(pick: dict | None) -> tuple[str, str]:
    """(OOD test accuracy, settings) of a second pick, or n/a."""
    return (_pct(pick["ood_acc"]), _settings(pick["values"])) if pick else ("n/a", "n/a")


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: the selection table, then every cell."""
    base = report["baseline"]
    parts = [f"# Sweep: {', '.join(report['grid']) or 'no grid'}", ""]
    parts += [f"> {w}" for w in report["warnings"]] + ([""] if report["warnings"] else [])
    parts += ["## Each method at its settings chosen on validation accuracy "
              f"({report['select_by']})", "",
              f"Accuracies in % (final round), mean ± std over seeds; Δ: paired difference to "
              f"{base} (and, for a GMA method, to the same algorithm without GMA), each at its "
              "own chosen settings, same seeds. The OOD-validation columns choose on held-out "
              "OOD examples, disjoint from the OOD test set (DomainBed's test-domain selection; "
              "n/a without ood_validation_fraction). The last two columns choose on the OOD "
              "test set itself: an upper bound, not a result.", ""]
    parts.append(render_table(
        ("condition", "method", "chosen settings", "val", "ID test", "OOD test", "color reliance",
         f"Δ ID vs {base}", f"Δ OOD vs {base}", "Δ OOD vs the method without GMA",
         "OOD test, chosen on OOD validation", "its settings",
         "best OOD test (test-chosen)", "its settings"),
        [(_settings(s["condition"]) if s["condition"] else "all", s["method"],
          _settings({k: v for k, v in s["values"].items() if k not in s["condition"]}),
          _pct(s["last10"]["val_acc"]),
          _pct(s["final"]["test_acc"]), _pct(s["final"]["ood_acc"]),
          _pct(s["final"]["color_reliance"]),
          *(_pct((s.get("paired_vs_baseline") or {}).get(m), signed=True)
            for m in ("test_acc", "ood_acc")),
          _pct((s.get("paired_vs_plain") or {}).get("ood_acc"), signed=True)
          if s.get("paired_vs_plain") else "",
          *_pick_columns(s["test_domain"]), *_pick_columns(s["oracle"]))
         for s in report["selection"]], markdown=True))
    parts += ["", "## Every cell", "",
              f"Final-round accuracies in % and the mean of the last 10 rounds' evaluations "
              f"(OOD last 10); Δ OOD: paired difference to {base} at the same settings.", ""]
    parts.append(render_table(
        ("method", "settings", "seeds (diverged)", "val (last 10)", "ID test", "OOD test",
         "OOD last 10", "color reliance", "mask density", f"Δ OOD vs {base}"),
        [(c["method"], _settings(c["values"]),
          f"{len(c['seeds'])}" + (f" ({c['diverged']})" if c["diverged"] else ""),
          _pct(c["last10"]["val_acc"]),
          _pct(c["final"]["test_acc"]), _pct(c["final"]["ood_acc"]), _pct(c["last10"]["ood_acc"]),
          _pct(c["final"]["color_reliance"]),
          f"{c['mask_density']['mean']:.2f}" if c["mask_density"] else "n/a",
          _pct((c["paired_vs_baseline"] or {}).get("ood_acc"), signed=True))
         for c in report["cells"]], markdown=True))
    return "\n".join(parts) + "\n"


def write_report(sweep_dir: Path, report: dict[str, Any]) -> None:
    """``summary.json``, ``summary.md``, ``ood_vs_rounds.png``, one ``final_vs_<setting>.png``
    per swept setting with several values and, with conditions, ``ood_by_condition.png`` and
    one ``curve_vs_<condition>.png`` per numeric condition of three values or more."""
    atomic_write(sweep_dir / "summary.json", json.dumps(report, indent=2) + "\n")
    atomic_write(sweep_dir / "summary.md", format_report(report))
    plot_curves(sweep_dir / "ood_vs_rounds.png", report)
    if report["conditions"]:
        plot_conditions(sweep_dir / "ood_by_condition.png", report)
    for setting in report["conditions"]:
        values = report["grid"][setting]
        if len(values) >= 3 and all(isinstance(v, (int, float)) for v in values):
            plot_condition_curve(sweep_dir / f"curve_vs_{setting}.png", report, setting)
    for setting, values in report["grid"].items():
        if len(values) > 1 and setting not in report["conditions"]:
            plot_final_vs(sweep_dir / f"final_vs_{setting}.png", report, setting)


def _panel_grid(count: int, cols: int, width: float, height: float):  # noqa: ANN202
    """(figure, axes) of ``count`` panels sharing the y axis, ``cols`` a row; the grid's
    unused panels hidden."""
    rows = -(-count // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(width * cols, height * rows),
                                  squeeze=False, sharey=True)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    return fig, axes


def _finish_panel(ax, title: str, legend_size: int) -> None:  # noqa: ANN001 - an Axes
    """An accuracy-against-rounds panel's title, axis, range, grid and legend."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_curves(path: Path, report: dict[str, Any]) -> None:
    """OOD accuracy against rounds, one panel per grid point, one line per method (its cell at
    that point; mean over seeds, the band ± std)."""
    grid = report["grid"]
    points = [dict(zip(grid, p)) for p in itertools.product(*grid.values())]
    methods = list(dict.fromkeys(c["method"] for c in report["cells"]))
    fig, axes = _panel_grid(len(points), min(len(points), 4), 4, 3.2)
    for ax, point in zip(axes.flat, points):
        for i, method in enumerate(methods):
            cell = next((c for c in report["cells"] if c["method"] == method
                         and all(point.get(k) == v for k, v in c["values"].items())), None)
            curve = cell and cell["ood_curve"]
            if not curve or not curve["round"]:
                continue
            low = [m - s for m, s in zip(curve["mean"], curve["std"])]
            high = [m + s for m, s in zip(curve["mean"], curve["std"])]
            ax.plot(curve["round"], curve["mean"], color=f"C{i}", marker=".", label=method)
            ax.fill_between(curve["round"], low, high, color=f"C{i}", alpha=0.15)
        _finish_panel(ax, _settings(point), 7)
    axes[0][0].set_ylabel("OOD test accuracy")
    save_figure(fig, path, dpi=110)


def plot_conditions(path: Path, report: dict[str, Any]) -> None:
    """OOD accuracy against rounds, one panel per condition (the papers' layout: e.g. binary and
    10 classes × IID and non-IID), one line per method and setting (the other swept values)."""
    conditions = report["conditions"]
    combos = [dict(zip(conditions, c))
              for c in itertools.product(*(report["grid"][k] for k in conditions))]
    fig, axes = _panel_grid(len(combos), min(len(combos), 2 if len(combos) == 4 else 4), 5.5, 3.8)
    methods = list(dict.fromkeys(c["method"] for c in report["cells"]))
    styles = ["-", "--", ":", "-."]
    for ax, where in zip(axes.flat, combos):
        seen: dict[str, int] = {}
        for cell in report["cells"]:
            if any(cell["values"].get(k) != v for k, v in where.items()):
                continue
            curve = cell["ood_curve"]
            if not curve["round"]:
                continue
            method = cell["method"]
            style = styles[seen.setdefault(method, 0) % len(styles)]
            seen[method] += 1
            rest = {k: v for k, v in cell["values"].items() if k not in where}
            ax.plot(curve["round"], curve["mean"], linestyle=style, marker=".",
                    color=f"C{methods.index(method)}",
                    label=f"{method} {_settings(rest)}" if rest else method)
        _finish_panel(ax, _settings(where), 6)
    for row in axes:
        row[0].set_ylabel("OOD test accuracy (mean over seeds)")
    save_figure(fig, path, dpi=110)


def condition_curve(report: dict[str, Any], setting: str
                    ) -> dict[str, list[tuple[Any, dict | None, dict | None]]]:
    """Each method's choice (``report["selection"]``) along the condition ``setting``: label
    (the method, and the other conditions' values) → ``[(value, OOD test accuracy, color
    reliance)]`` sorted by value, each a mean/std/n dict (or None)."""
    lines: dict[str, list[tuple[Any, dict | None, dict | None]]] = {}
    for row in report["selection"]:
        if setting not in row["condition"]:
            continue
        rest = {k: v for k, v in row["condition"].items() if k != setting}
        label = row["method"] + (f" ({_settings(rest)})" if rest else "")
        lines.setdefault(label, []).append((row["condition"][setting], row["final"]["ood_acc"],
                                            row["final"]["color_reliance"]))
    return {label: sorted(points, key=lambda p: p[0]) for label, points in lines.items()}


def plot_condition_curve(path: Path, report: dict[str, Any], setting: str) -> None:
    """OOD test accuracy and color reliance (mean ± std over seeds) against the condition
    ``setting``, one line per method at its settings chosen on validation (``condition_curve``)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for i, (label, points) in enumerate(condition_curve(report, setting).items()):
        for ax, k in zip(axes, (1, 2)):
            kept = [(p[0], p[k]) for p in points if p[k] is not None]
            if kept:
                ax.errorbar([x for x, _ in kept], [100 * m["mean"] for _, m in kept],
                            yerr=[100 * m["std"] for _, m in kept], color=f"C{i}", marker="o",
                            capsize=3, label=label)
    for ax, label in zip(axes, ("OOD test accuracy %", "color reliance %")):
        ax.set_xlabel(setting)
        ax.set_ylabel(label + " (chosen on validation)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def plot_final_vs(path: Path, report: dict[str, Any], setting: str) -> None:
    """Validation and OOD test accuracy (mean ± std over seeds) against ``setting``: one line
    per method (and condition) that depends on it, its other swept settings at the method's
    choice."""
    fig, (ax_val, ax_ood) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    colors: dict[str, str] = {}
    for i, row in enumerate(report["selection"]):
        method = row["method"]
        others = {k: v for k, v in row["values"].items() if k != setting}
        line = sorted((c for c in report["cells"] if c["method"] == method and setting in c["values"]
                       and all(c["values"].get(k) == v for k, v in others.items())),
                      key=lambda c: c["values"][setting])
        if len(line) < 2:
            continue
        color = colors.setdefault(method, f"C{len(colors)}")
        label = method + (f" ({_settings(row['condition'])})" if row["condition"] else "")
        style = ["-", "--", ":", "-."][len([r for r in report["selection"][:i]
                                            if r["method"] == method]) % 4]
        xs = [c["values"][setting] for c in line]
        for ax, when, metric in ((ax_val, "last10", "val_acc"), (ax_ood, "final", "ood_acc")):
            points = [c[when][metric] for c in line]
            if any(p is None for p in points):
                continue
            ax.errorbar(range(len(xs)) if isinstance(xs[0], str) else xs,
                        [p["mean"] for p in points], yerr=[p["std"] for p in points],
                        color=color, linestyle=style, marker="o", capsize=3, label=label)
            if isinstance(xs[0], str):
                ax.set_xticks(range(len(xs)), xs)
    for ax, label in ((ax_val, "validation accuracy (last 10)"), (ax_ood, "OOD test accuracy")):
        ax.set_xlabel(setting)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
