"""Kill a run mid-way (SIGKILL, no warning), resume it, and end exactly where an uninterrupted
run ends: same metrics, same final models."""
import signal
import subprocess
import time

import pytest
import torch

from fedsim.checkpoint import CHECKPOINT_FILE, load_checkpoint
from fedsim.config import Config
from fedsim.loop import run_experiment


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny, cli, flags):
    out = tmp_path / "runs"
    settings = {**tiny, "rounds": 12, "checkpoint_every": 2, "eval_every": 3, "out_dir": str(out)}
    command, env = cli("fedsim.run", "--quiet", *flags(settings))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob(f"*/{CHECKPOINT_FILE}")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = out.iterdir()
    assert not (run_dir / "results.json").exists(), "the run finished before the kill"
    assert load_checkpoint(run_dir)["state"] is not None  # killed in the middle of a method's rounds

    command, env = cli("fedsim.run", "--quiet", "--resume", str(run_dir))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fedavg" in done.stdout and "fedgma" in done.stdout  # the final table

    reference = tmp_path / "reference"  # the same run, uninterrupted, in this process
    reference.mkdir()
    run_experiment(Config(**settings), reference, progress=False)
    assert (run_dir / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    for method in ("fedavg", "fedgma"):
        got = torch.load(run_dir / f"model-{method}-seed0.pt", weights_only=True)
        want = torch.load(reference / f"model-{method}-seed0.pt", weights_only=True)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, tiny):
    config = Config(**tiny)
    rows = run_experiment(config, tmp_path, progress=False)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert run_experiment(config, tmp_path, resume=True, progress=False) == rows
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_resume_refuses_other_settings(tmp_path, tiny):
    run_experiment(Config(**tiny), tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_experiment(Config(**{**tiny, "rounds": 5}), tmp_path, resume=True, progress=False)


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, tiny):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config = Config(**tiny)
    assert run_experiment(config, tmp_path, resume=True, progress=False) == \
        run_experiment(config, fresh, progress=False)
