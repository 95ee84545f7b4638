"""Checkpoints (``fedsim.checkpoint``): the newest and the one before it, each file checked as it
is read; a damaged newest checkpoint (truncated, empty, random bytes, the wrong contents) falls
back to the previous one, and resuming from it ends where the run ended; two damaged ones give
one line naming both; the process-wide RNGs captured and restored."""
import random
import subprocess

import numpy as np
import pytest
import torch

from fedsim.checkpoint import (CHECKPOINT_FILE, PREVIOUS_FILE, CheckpointError, capture_rng,
                               load_checkpoint, read_checkpoint, restore_rng, save_checkpoint)
from fedsim.loop import run_experiment


def damage(kind, path):
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8).numpy().tobytes())
    elif kind == "wrong-shape":
        torch.save({}, path)
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], path)


KINDS = ["truncated", "empty", "random", "wrong-shape", "not-a-dict"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(checkpointed_run, kind):
    config, run_dir = checkpointed_run
    reference = (run_dir / "metrics.jsonl").read_text()
    assert (run_dir / PREVIOUS_FILE).is_file()
    damage(kind, run_dir / CHECKPOINT_FILE)
    warnings = []
    checkpoint = load_checkpoint(run_dir, warn=warnings.append)
    assert len(warnings) == 1 and str(run_dir / CHECKPOINT_FILE) in warnings[0]
    assert "resuming from checkpoint-previous.pt" in warnings[0]
    # the previous checkpoint: the second method's round 3 (the newest marks the run's end)
    assert (checkpoint["job"], checkpoint["round"]) == (1, 3)
    # resuming from it ends exactly where the run ended
    assert run_experiment(config, run_dir, resume=True, progress=False)
    assert (run_dir / "metrics.jsonl").read_text() == reference


@pytest.mark.parametrize("kind", KINDS)
def test_two_damaged_checkpoints_give_one_line_naming_both(checkpointed_run, kind, cli):
    _, run_dir = checkpointed_run
    for name in (CHECKPOINT_FILE, PREVIOUS_FILE):
        damage(kind, run_dir / name)
    before = sorted(p.name for p in run_dir.iterdir())
    command, env = cli("fedsim.run", "--quiet", "--resume", str(run_dir))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert CHECKPOINT_FILE in lines[0] and PREVIOUS_FILE in lines[0]
    assert "start the run afresh" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == before


def checkpoint_at(round_, **changes):
    """A checkpoint of the shape a run writes, at ``round_`` of the first job."""
    return {"config": {"rounds": 9}, "job": 0, "round": round_, "state": None, "rows": [],
            **changes}


def test_a_new_checkpoint_keeps_the_one_it_replaces_as_the_previous(tmp_path):
    save_checkpoint(tmp_path, checkpoint_at(1))
    assert not (tmp_path / PREVIOUS_FILE).exists()
    assert load_checkpoint(tmp_path, warn=pytest.fail)["round"] == 1
    save_checkpoint(tmp_path, checkpoint_at(2))
    save_checkpoint(tmp_path, checkpoint_at(3))
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["round"] == 3
    assert read_checkpoint(tmp_path / PREVIOUS_FILE)["round"] == 2  # only one kept before it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_FILE, PREVIOUS_FILE])


def test_no_checkpoint_is_none_and_a_missing_newest_falls_back(tmp_path):
    assert load_checkpoint(tmp_path, warn=pytest.fail) is None
    save_checkpoint(tmp_path, checkpoint_at(4))
    save_checkpoint(tmp_path, checkpoint_at(5))
    (tmp_path / CHECKPOINT_FILE).unlink()
    warnings = []
    assert load_checkpoint(tmp_path, warn=warnings.append)["round"] == 4
    assert len(warnings) == 1 and "is missing" in warnings[0]
    assert "resuming from checkpoint-previous.pt instead (round 4 of job 1)" in warnings[0]


def test_a_damaged_checkpoint_with_no_previous_one_is_an_error(tmp_path):
    save_checkpoint(tmp_path, checkpoint_at(1))
    damage("truncated", tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="is damaged or not a checkpoint"):
        load_checkpoint(tmp_path, warn=pytest.fail)


@pytest.mark.parametrize("changes", [{"job": "0"}, {"round": 2.0}, {"config": "rounds = 9"},
                                     {"rows": {}}])
def test_a_checkpoint_with_every_key_but_a_wrong_type_is_refused(tmp_path, changes):
    torch.save(checkpoint_at(1, **changes), tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="holds a checkpoint of the wrong shape"):
        read_checkpoint(tmp_path / CHECKPOINT_FILE)
    torch.save(checkpoint_at(1), tmp_path / CHECKPOINT_FILE)
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE) == checkpoint_at(1)


def test_restored_rngs_draw_what_they_drew_after_the_capture(tmp_path):
    def draws():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")  # as a checkpoint carries it
    first = draws()
    assert draws() != first  # the generators moved on
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == first
