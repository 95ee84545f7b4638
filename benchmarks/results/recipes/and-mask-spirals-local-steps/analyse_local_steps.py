"""The positive control at 2, 5 and 20 local steps, as one report: the sweeps of the same
settings (``sweep.toml`` here) that ran as one-thread lanes on the 2-core CPU: FedAvg with
FedGMA's hard mask at τ = 1 (``*-sweep-spirals-steps*``), and FedGMA's soft mask at τ = 0.4
alone (``*-sweep-soft-steps*``). Local steps 20 ran as two sweeps each (seeds 0-2 and 3-4):
each method's rows are joined, per setting, into one cell of seeds 0-4 (in a scratch folder)
before the analysis, which chooses the mask per local step on validation accuracy.

    python analyse_local_steps.py RUNS_DIR [RUNS_DIR ...] OUT_DIR
"""
import json
import sys
import tempfile
from pathlib import Path

from fedsim.algorithms import matters
from fedsim.analysis import analyse, write_report
from fedsim.config import tomllib

*runs, out = map(Path, sys.argv[1:])
joined: dict[tuple, list[str]] = {}
for sweep in sorted(s for r in runs for s in r.glob("*-sweep-*-steps*")):
    base = tomllib.loads((sweep / "sweep.toml").read_text())["base"]
    for cell in (sweep / "cells").iterdir():
        if not (cell / "results.json").is_file():
            sys.exit(f"{cell}: not finished")
        steps = int(cell.name.split("=")[1])
        for line in (cell / "metrics.jsonl").read_text().splitlines():
            method = json.loads(line)["method"]
            values = tuple((k, v) for k, v in (("local_steps", steps),
                                                ("gma_mask", base["gma_mask"]),
                                                ("gma_tau", base["gma_tau"]))
                           if matters(method, k))
            joined.setdefault(values, []).append(line)
cells = []
scratch = Path(tempfile.mkdtemp())
for i, (values, lines) in enumerate(sorted(joined.items(),
                                            key=lambda kv: (kv[0][0][1], len(kv[0]), str(kv[0])))):
    folder = scratch / str(i)
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    cells.append((values, folder, {}))
grid = {k: tuple(sorted({dict(v)[k] for v in joined if k in dict(v)}))
        for k in ("local_steps", "gma_mask", "gma_tau")}
out.mkdir(parents=True, exist_ok=True)
report = analyse(cells, grid, baseline="fedavg", conditions=("local_steps",))
write_report(out, report)
for cell in report["cells"]:
    paired = cell["paired_vs_baseline"]
    print(cell["method"], cell["values"], "OOD", cell["final"]["ood_acc"],
          "paired", paired and paired["ood_acc"])
