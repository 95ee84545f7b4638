"""Sweeps: the cells a grid makes, a sweep end to end (controls, resume, cells in parallel
processes), and refusals. (The report a sweep ends with, selection included:
``test_analysis.py``.)"""
import os
import shutil

import pytest

from fedsim.analysis import read_rows
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


def test_ctrl_c_stops_a_parallel_sweep_and_starts_no_other_cell(tmp_path, tiny, cli, flags):
    import contextlib
    import signal
    import subprocess
    import time

    settings = {**tiny, "rounds": 100_000, "checkpoint_every": 1, "algorithms": ("fedavg",),
                "out_dir": str(tmp_path)}
    command, env = cli("fedsim.sweep", "--quiet", "--jobs", "2",
                       "--grid", "server_lr=0.5,1,2,4", *flags(settings))
    # its own process group, with SIGINT's default (why: test_resume's Ctrl-C test)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    try:
        while len(list(tmp_path.glob("*/cells/*/checkpoint.pt"))) < 2:  # both workers training
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no two checkpoints within 120 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the sweep and its workers, one group
        err = proc.communicate(timeout=60)[1]
    finally:  # whatever failed, no process of the sweep is left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted: continue with python -m fedsim.sweep --resume" in err
    # the two cells that were running are resumable; the other two never started
    (sweep_dir,) = tmp_path.iterdir()
    assert len(list((sweep_dir / "cells").iterdir())) == 2


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
