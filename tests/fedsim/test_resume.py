"""Resuming, in one place: a simulation's state saved and restored in process continues exactly
(every stateful algorithm, both engines); a run interrupted (KeyboardInterrupt, SIGKILL with no
warning, Ctrl-C) and resumed ends exactly where an uninterrupted run ends, same metrics, same
final models; what resume refuses and what it keeps. (The checkpoint files themselves, damaged
ones included: ``test_checkpoint.py``.)"""
import signal
import subprocess
import time

import pytest
import torch

from fedsim.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from fedsim.config import Config
from fedsim.loop import Simulation, load_data, run_experiment


#: an algorithm with state across rounds (control variates, server optimizer state) of each kind
STATEFUL = ["scaffold", "fedpvr+gma", "fedga", "fedadam+gma", "fedavgm", "fedgma-v1+gma"]


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
@pytest.mark.parametrize("method", STATEFUL)
def test_simulation_save_and_restore_continues_exactly(tmp_path, tiny, method, engine):
    config = Config(**tiny, algorithms=(method,), adaptive_server_lr=0.03, momentum_server_lr=0.1,
                    engine=engine)
    data = load_data(config, 0)
    straight = Simulation(config, data, method, 0)
    expected = [straight.round() for _ in range(4)]
    first = Simulation(config, data, method, 0)
    got = [first.round() for _ in range(2)]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(123)
    second = Simulation(config, data, method, 3)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got += [second.round() for _ in range(2)]
    assert got == expected
    assert torch.equal(second.server.params, straight.server.params)
    a, b = second.algorithm.state_dict(), straight.algorithm.state_dict()
    assert a["client_state"].keys() == b["client_state"].keys()
    if "c" in a:
        assert torch.equal(a["c"], b["c"])


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
@pytest.mark.parametrize("method", ["scaffold", "fedpvr+gma"])
def test_interrupted_run_resumes_exactly(tmp_path, tiny, monkeypatch, method, engine):
    """Stop a run after its 3rd round (checkpoint at round 2 of 4), resume: the same metrics and
    final model as an uninterrupted run, control variates included."""
    config = Config(**{**tiny, "rounds": 4, "checkpoint_every": 2}, algorithms=(method,),
                    engine=engine)
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    reference.mkdir()
    stopped.mkdir()
    run_experiment(config, reference, progress=False)

    original, calls = Simulation.round, []

    def stop_on_third(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Simulation, "round", stop_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, stopped, progress=False)
    monkeypatch.setattr(Simulation, "round", original)
    run_experiment(config, stopped, resume=True, progress=False)
    assert (stopped / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    got = torch.load(stopped / f"model-{method}-seed0.pt", weights_only=True)
    want = torch.load(reference / f"model-{method}-seed0.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)


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
    with pytest.raises(CheckpointError, match=r"config.toml was edited after the checkpoint was written \(rounds differ\)"):
        run_experiment(Config(**{**tiny, "rounds": 5}), tmp_path, resume=True, progress=False)


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, tiny):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config = Config(**tiny)
    assert run_experiment(config, tmp_path, resume=True, progress=False) == \
        run_experiment(config, fresh, progress=False)


def test_an_edited_config_is_named_in_one_line(checkpointed_run, cli):
    config, run_dir = checkpointed_run
    (run_dir / "config.toml").write_text(Config(**{**config.to_dict(), "lr": 0.05}).to_toml())
    command, env = cli("fedsim.run", "--quiet", "--resume", str(run_dir))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "config.toml was edited after the checkpoint was written (lr differ)" in done.stderr


def test_ctrl_c_says_how_to_resume_in_one_line(tmp_path, tiny, cli, flags):
    out = tmp_path / "runs"
    settings = {**tiny, "rounds": 400, "checkpoint_every": 1, "out_dir": str(out)}
    command, env = cli("fedsim.run", "--quiet", *flags(settings))
    # SIGINT back to its default in the child: a shell that starts a job in the background
    # (``cmd &``, as CI may run pytest) ignores SIGINT in it, and Python then installs no
    # KeyboardInterrupt handler, so the run would go on to the end
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not list(out.glob(f"*/{CHECKPOINT_FILE}")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    (run_dir,) = out.iterdir()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"interrupted: continue from the last checkpoint with "
                                        f"python -m fedsim.run --resume {run_dir}"]


def test_resuming_a_finished_run_keeps_its_wall_time(tmp_path, tiny, flags):
    import json

    from fedsim.run import main
    main(["--quiet", *flags({**tiny, "out_dir": str(tmp_path)})])
    (run_dir,) = tmp_path.iterdir()
    first = json.loads((run_dir / "results.json").read_text())["wall_time_s"]
    main(["--quiet", "--resume", str(run_dir)])
    again = json.loads((run_dir / "results.json").read_text())
    # the run's own time, not the instant the finished resume took
    assert again["resumed"] and again["wall_time_s"] == first


def test_simulation_state_restores_an_exact_continuation(tmp_path, tiny):
    config = Config(**tiny, server_optimizer="adam", server_lr=0.01)
    data = load_data(config, 0)
    straight = Simulation(config, data, "fedgma", 0)
    expected = [straight.round() for _ in range(4)]
    first = Simulation(config, data, "fedgma", 0)
    got = [first.round() for _ in range(2)]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(123)  # disturb every RNG the state must restore
    second = Simulation(config, data, "fedgma", 7)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got += [second.round() for _ in range(2)]
    assert got == expected
    assert torch.equal(second.server.params, straight.server.params)
    assert torch.equal(second.server.optimizer.states[0], straight.server.optimizer.states[0])
