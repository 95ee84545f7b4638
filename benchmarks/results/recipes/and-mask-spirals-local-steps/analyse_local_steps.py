"""The positive control at 2, 5 and 20 local steps, as one report: four sweeps of the same
settings (``sweep.toml`` here), run as two one-thread lanes on the 2-core CPU, each cell
holding FedAvg and FedGMA (hard, τ = 1, rescaled). Local steps 20 ran as two sweeps (seeds
0-2 and 3-4); their metrics are joined into one cell of seeds 0-4 (in a scratch folder)
before the analysis.

    python analyse_local_steps.py RUNS_DIR OUT_DIR
"""
import sys
import tempfile
from pathlib import Path

from fedsim.analysis import analyse, condition_curve, write_report

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
joined: dict[int, list[str]] = {}
for sweep in sorted(runs.glob("*-sweep-spirals-steps*")):
    for cell in (sweep / "cells").iterdir():
        if not (cell / "results.json").is_file():
            sys.exit(f"{cell}: not finished")
        steps = int(cell.name.split("=")[1])
        joined.setdefault(steps, []).extend((cell / "metrics.jsonl").read_text().splitlines())
cells = []
scratch = Path(tempfile.mkdtemp())
for steps, lines in sorted(joined.items()):
    folder = scratch / f"local_steps={steps}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    cells.append(((("local_steps", steps),), folder, {}))
report = analyse(cells, {"local_steps": tuple(sorted(joined))}, baseline="fedavg",
                 conditions=("local_steps",))
write_report(out, report)
for label, points in condition_curve(report, "local_steps").items():
    print(label, [(x, round(100 * o["mean"], 1), round(100 * o["std"], 1)) for x, o, _ in points])
for row in report["selection"]:
    paired = row["paired_vs_baseline"]
    if row["method"] == "fedgma" and paired:
        print(row["condition"], "fedgma - fedavg OOD", paired)
