"""The curve with its step-size controls and FedGMA's tau grid: every cell of the curve sweep
(FedAvg, IRM, FedGMA at tau 1, the controls) plus the tau = 0.6 sweep, selected per share on
validation (and on OOD validation), as one report."""
import sys
from pathlib import Path
from fedsim.analysis import analyse, write_report, condition_curve
curve, tau, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
cells = []
for d in sorted((curve / "cells").iterdir()):
    if not (d / "results.json").is_file():
        continue
    name, rename = d.name, {}
    if name.startswith("control-"):
        _, _, rest = name[len("control-"):].partition("-reversed")
        rest = "reversed" + rest
        rename = {"fedavg": "fedavg (step x fedgma density)"}
    else:
        rest = name
    key, val = rest.split("=")
    cells.append((((key, float(val)), ("gma_tau", 1.0)), d, rename))
if tau.is_dir():
    for d in sorted((tau / "cells").iterdir()):
        if (d / "results.json").is_file():
            key, val = d.name.split("=")
            cells.append((((key, float(val)), ("gma_tau", 0.6)), d, {}))
fractions = tuple(sorted({c[0][0][1] for c in cells}))
report = analyse(cells, {"reversed_color_fraction": fractions, "gma_tau": (1.0, 0.6)},
                 baseline="fedavg", conditions=("reversed_color_fraction",))
write_report(out, report)
for label, pts in condition_curve(report, "reversed_color_fraction").items():
    print(label, [(x, round(100*o["mean"],1), round(100*o["std"],1)) for x, o, r in pts])
for row in report["selection"]:
    if row["method"] == "fedgma":
        td = row["test_domain"]
        print(row["condition"], "val pick", row["values"].get("gma_tau"),
              "ood", round(100*row["final"]["ood_acc"]["mean"],1),
              "| ood-val pick", td["values"].get("gma_tau"), round(100*td["ood_acc"]["mean"],1))
