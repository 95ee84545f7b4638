"""Sweeps: the cells a grid makes, the selection protocol (validation only; the oracle apart),
paired differences computed by hand from the metrics files, resume, and refusals."""
import json
import shutil

import pytest

from fedsim.analysis import analyse, format_report, mean_std, read_rows
from fedsim.config import Config, ConfigError
from fedsim.sweep import Sweep, main, parse_grid


def names(sweep):
    return {c.name: c.config.algorithms for c in sweep.cells()}


def test_a_method_runs_only_on_the_cells_that_differ_for_it():
    base = Config(algorithms=("fedavg", "fedgma", "fedprox"), validation_fraction=0.1).to_dict()
    base = {k: v for k, v in base.items() if v is not None}
    sweep = Sweep(base, {"server_lr": (1.0, 2.0), "gma_tau": (0.2, 0.6), "fedprox_mu": (0.0, 0.1)})
    assert names(sweep) == {
        "server_lr=1.0": ("fedavg",), "server_lr=2.0": ("fedavg",),
        **{f"server_lr={lr},gma_tau={t}": ("fedgma",) for lr in (1.0, 2.0) for t in (0.2, 0.6)},
        **{f"server_lr={lr},fedprox_mu={mu}": ("fedprox",) for lr in (1.0, 2.0) for mu in (0.0, 0.1)},
    }
    cell = next(c for c in sweep.cells() if c.name == "server_lr=2.0,gma_tau=0.6")
    assert (cell.config.server_lr, cell.config.gma_tau) == (2.0, 0.6)
    # no grid: one cell with every method
    assert names(Sweep(base, {})) == {"base": ("fedavg", "fedgma", "fedprox")}


@pytest.mark.parametrize("items, message", [
    (["server_lr"], "write SETTING=VALUE"),
    (["serverlr=1,2"], "no setting 'serverlr'"),
    (["seeds=0,1"], "the sweep sets it itself"),
    (["server_lr=1,x"], "'x' is not a value of type float"),
    (["gma_tau=0.2,0.2"], "duplicates"),
    (["rounds=1", "rounds=2"], "given twice"),
    (["gma_rescale=yes"], "not true or false"),
])
def test_bad_grids(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_grid_values_are_typed():
    assert parse_grid(["gma-mask=soft,hard", "rounds=3,5", "color_flip_range=0.1,0.2;0.05,0.1",
                       "gma_rescale=true,false"]) == {
        "gma_mask": ("soft", "hard"), "rounds": (3, 5),
        "color_flip_range": ((0.1, 0.2), (0.05, 0.1)), "gma_rescale": (True, False)}


def write_cell(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_of(method, per_seed, rounds=(10, 20)):
    """Evaluation rows of ``method``: per seed, (val, test, ood) at the last round; earlier
    rounds at half those values."""
    out = []
    for seed, (val, test, ood) in per_seed.items():
        for r in rounds:
            scale = 1.0 if r == rounds[-1] else 0.5
            out.append({"method": method, "seed": seed, "round": r, "mask_density": 0.5,
                        "val_acc": val * scale, "test_acc": test * scale, "ood_acc": ood * scale,
                        "color_reliance": 0.3})
    return out


def test_selection_looks_at_validation_only_and_pairs_by_seed(tmp_path):
    # fedgma: lr 1 is best on validation, lr 2 best on OOD test; fedavg: lr 2 best on validation
    cells = {
        (("server_lr", 1.0),): {"fedavg": {0: (.70, .80, .20), 1: (.72, .81, .30)}},
        (("server_lr", 2.0),): {"fedavg": {0: (.80, .85, .40), 1: (.78, .86, .44)}},
        (("server_lr", 1.0), ("gma_tau", 0.4)): {"fedgma": {0: (.90, .70, .10), 1: (.88, .72, .16)}},
        (("server_lr", 2.0), ("gma_tau", 0.4)): {"fedgma": {0: (.60, .90, .90), 1: (.62, .91, .80)}},
    }
    folders = []
    for i, (values, methods) in enumerate(cells.items()):
        rows = [row for m, seeds in methods.items() for row in rows_of(m, seeds)]
        write_cell(tmp_path / str(i), rows)
        folders.append((values, tmp_path / str(i), {}))
    report = analyse(folders, {"server_lr": (1.0, 2.0), "gma_tau": (0.4,)})
    picks = {s["method"]: s for s in report["selection"]}
    assert picks["fedavg"]["values"] == {"server_lr": 2.0}
    assert picks["fedgma"]["values"] == {"server_lr": 1.0, "gma_tau": 0.4}  # not the OOD-best
    assert picks["fedgma"]["oracle"]["values"] == {"server_lr": 2.0, "gma_tau": 0.4}
    assert picks["fedgma"]["oracle"]["ood_acc"]["mean"] == pytest.approx(0.85)
    # last10: the mean of the evaluations in the last 10 rounds (round 20 only: 11..20)
    assert picks["fedgma"]["last10"]["val_acc"]["mean"] == pytest.approx(0.89)
    # paired OOD difference at each one's choice, by hand: (0.10 − 0.40, 0.16 − 0.44)
    diff = picks["fedgma"]["paired_vs_baseline"]["ood_acc"]
    assert diff == mean_std([0.10 - 0.40, 0.16 - 0.44])
    assert report["baseline"] == "fedavg" and any("2 seed(s)" in w for w in report["warnings"])
    # per cell: paired against the baseline at the same server_lr
    cell = next(c for c in report["cells"] if c["values"] == {"server_lr": 2.0, "gma_tau": 0.4})
    assert cell["paired_vs_baseline"]["ood_acc"] == mean_std([0.90 - 0.40, 0.80 - 0.44])


def test_test_domain_selection_uses_the_ood_validation_set_only(tmp_path):
    """Three cells, each best on one criterion: ID validation, OOD validation, OOD test; the
    test-domain pick is the OOD-validation one, with its own OOD test accuracy."""
    folders = []
    for i, (lr, val, ood_val, ood) in enumerate([(1.0, .9, .2, .3), (2.0, .5, .8, .4),
                                                 (3.0, .4, .1, .9)]):
        rows = [{**row, "ood_val_acc": ood_val * (1.0 if row["round"] == 20 else 0.5)}
                for row in rows_of("fedavg", {0: (val, .8, ood), 1: (val, .8, ood)})]
        write_cell(tmp_path / str(i), rows)
        folders.append(((("server_lr", lr),), tmp_path / str(i), {}))
    report = analyse(folders, {"server_lr": (1.0, 2.0, 3.0)})
    (pick,) = report["selection"]
    assert pick["values"] == {"server_lr": 1.0}
    assert pick["test_domain"]["values"] == {"server_lr": 2.0}
    assert pick["test_domain"]["ood_acc"]["mean"] == pytest.approx(0.4)
    assert pick["oracle"]["values"] == {"server_lr": 3.0}
    text = format_report(report)
    assert "| 40.0 ± 0.0 | server_lr=2.0 | 90.0 ± 0.0 | server_lr=3.0 |" in text


def test_without_an_ood_validation_set_there_is_no_test_domain_pick(tmp_path):
    write_cell(tmp_path / "0", rows_of("fedavg", {0: (.9, .8, .3)}))
    report = analyse([((("server_lr", 1.0),), tmp_path / "0", {})], {"server_lr": (1.0,)})
    assert report["selection"][0]["test_domain"] is None
    assert "| n/a | n/a |" in format_report(report)


def test_conditions_are_chosen_within(tmp_path):
    folders = []
    for i, (split, lr, val) in enumerate([("iid", 1.0, .9), ("iid", 2.0, .5),
                                          ("shards", 1.0, .5), ("shards", 2.0, .9)]):
        write_cell(tmp_path / str(i), rows_of("fedavg", {0: (val, .8, .3)}))
        folders.append(((("split", split), ("server_lr", lr)), tmp_path / str(i), {}))
    report = analyse(folders, {"split": ("iid", "shards"), "server_lr": (1.0, 2.0)},
                     conditions=("split",))
    chosen = {s["condition"]["split"]: s["values"]["server_lr"] for s in report["selection"]}
    assert chosen == {"iid": 1.0, "shards": 2.0}


def test_a_sweep_end_to_end_with_controls_and_resume(tmp_path, tiny, flags, capsys):
    settings = {**tiny, "rounds": 2, "eval_every": 1, "seeds": (0, 1), "out_dir": str(tmp_path),
                "name": "t", "algorithms": ("fedavg", "fedgma")}
    report = main(["--quiet", "--grid", "server_lr=1,2", "--grid", "gma_tau=0.2,0.6",
                   "--step-size-control", *flags(settings)])
    (sweep_dir,) = tmp_path.iterdir()
    cells = sorted(p.name for p in (sweep_dir / "cells").iterdir())
    assert len(cells) == 2 + 4 + 4 and sum(c.startswith("control-") for c in cells) == 4
    for name in ("summary.md", "summary.json", "ood_vs_rounds.png", "final_vs_server_lr.png",
                 "final_vs_gma_tau.png", "sweep.toml"):
        assert (sweep_dir / name).is_file(), name
    assert "best OOD test (test-chosen)" in capsys.readouterr().out
    # the validation set is on by default in a sweep
    cell = sweep_dir / "cells" / "server_lr=2.0,gma_tau=0.6"
    assert Config.from_toml(cell / "config.toml").validation_fraction == 0.1
    # a control runs fedavg at server_lr × the GMA cell's mean density
    density = sum(r["mask_density"] for r in read_rows(cell)) / 4
    control = Config.from_toml(sweep_dir / "cells" / "control-fedgma-server_lr=2.0,gma_tau=0.6"
                               / "config.toml")
    assert control.algorithms == ("fedavg",)
    assert control.server_lr == pytest.approx(2.0 * density, abs=1e-6)
    # selection: the highest validation mean among fedgma's cells
    fedgma = [c for c in report["cells"] if c["method"] == "fedgma"]
    best = max(c["last10"]["val_acc"]["mean"] for c in fedgma)
    pick = next(s for s in report["selection"] if s["method"] == "fedgma")
    assert pick["last10"]["val_acc"]["mean"] == best
    # resume: a cell whose results are gone reruns (from its checkpoint); the report is the same
    (cell / "results.json").unlink()
    shutil.rmtree(sweep_dir / "cells" / "server_lr=1.0")
    again = main(["--quiet", "--resume", str(sweep_dir)])
    assert again["selection"] == report["selection"] and again["cells"] == report["cells"]


def test_cells_run_in_parallel_processes_give_the_same_rows(tmp_path, tiny, flags, capsys):
    settings = {**tiny, "rounds": 2, "eval_every": 1, "seeds": (0, 1),
                "algorithms": ("fedavg", "fedgma")}
    rows, logs = {}, {}
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        main(["--quiet", "--jobs", jobs, "--grid", "server_lr=1,2", "--step-size-control",
              *flags({**settings, "out_dir": str(out)})])
        (sweep_dir,) = out.iterdir()
        cells = sorted((sweep_dir / "cells").iterdir())
        assert len(cells) == 2 + 2  # and the two step-size controls, after their GMA cells
        rows[jobs] = {c.name: read_rows(c) for c in cells}
        logs[jobs] = capsys.readouterr().out
    assert logs["2"].count("2 cells, 2 at a time") == 2  # the cells, then their controls
    assert "at a time" not in logs["1"]
    assert rows["1"] == rows["2"]


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "--jobs: expected a whole number of at least 1, got '0'"),
    (["--grid", "gma_tau=0.5,2"], "gma_tau must be a finite number"),
    (["--grid", "server_lr=1", "--condition", "split"], "--condition split: not a swept setting"),
    (["--baseline", "scaffold"], "--baseline 'scaffold' is not one of the compared methods"),
    (["--grid", "algorithms=fedavg"], "the sweep sets it itself"),
])
def test_impossible_sweeps_are_refused_before_any_folder(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_resume_refuses_new_settings(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path), "--rounds", "3"])
    assert "drop --rounds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path)])
    assert "cannot read" in capsys.readouterr().err


def test_a_cell_that_diverged_on_a_seed_is_never_chosen(tmp_path):
    folders = []
    for i, (lr, val, diverged) in enumerate([(1.0, .70, False), (2.0, .90, True)]):
        rows = rows_of("fedavg", {0: (val, .8, .3), 1: (val, .8, .3)})
        rows[-1]["diverged"] = diverged
        write_cell(tmp_path / str(i), rows)
        folders.append(((("server_lr", lr),), tmp_path / str(i), {}))
    report = analyse(folders, {"server_lr": (1.0, 2.0)})
    (pick,) = report["selection"]
    assert pick["values"] == {"server_lr": 1.0}
    assert [c["diverged"] for c in report["cells"]] == [0, 1]
