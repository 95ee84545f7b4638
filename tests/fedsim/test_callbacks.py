"""The loop's callbacks: evaluation cadence, a user callback that sees finished rows and stops
a run, and the files a stopped run still leaves."""
import torch

from fedsim.callbacks import Callback
from fedsim.config import Config
from fedsim.loop import run_experiment
from fedsim.analysis import read_rows


class StopAt(Callback):
    """Stops every run after ``round_``; records what it saw."""

    def __init__(self, round_):
        self.round_, self.seen, self.runs = round_, [], []

    def begin_run(self, progress):
        self.runs.append((progress.seed, progress.method))

    def end_round(self, progress, row):
        assert progress.rows[-1] is row  # the row is in the experiment's rows already
        self.seen.append((row["method"], row["seed"], row["round"], row["test_acc"] is not None))
        return row["round"] == self.round_


def test_evaluation_runs_every_eval_every_rounds_and_at_the_last(tmp_path, tiny):
    config = Config(**{**tiny, "rounds": 5, "eval_every": 2, "algorithms": ("fedavg",)})
    rows = run_experiment(config, tmp_path, progress=False)
    assert [r["round"] for r in rows if r["test_acc"] is not None] == [2, 4, 5]


def test_a_callback_sees_finished_rows_and_can_stop_a_run(tmp_path, tiny):
    config = Config(**{**tiny, "rounds": 6, "eval_every": 2, "seeds": (0, 1),
                       "algorithms": ("fedavg", "fedgma")})
    stop = StopAt(3)
    rows = run_experiment(config, tmp_path, progress=False, callbacks=[stop])
    jobs = [(s, m) for s in (0, 1) for m in ("fedavg", "fedgma")]
    assert stop.runs == jobs
    # every run stops after round 3; round 2 was evaluated before the callback saw it
    assert stop.seen == [(m, s, r, r == 2) for s, m in jobs for r in (1, 2, 3)]
    assert [(r["seed"], r["method"], r["round"]) for r in rows] == \
        [(s, m, r) for s, m in jobs for r in (1, 2, 3)]
    # a stopped run still leaves its model and the metrics of every round it played
    assert read_rows(tmp_path) == rows
    for seed, method in jobs:
        state = torch.load(tmp_path / f"model-{method}-seed{seed}.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state.values())
