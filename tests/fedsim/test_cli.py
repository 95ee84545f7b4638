"""The command line: help, refusals with clear messages, a short run writing the whole run
folder, TOML files with flags on top."""
import json
import subprocess

import pytest
import torch

from fedsim.config import Config
from fedsim.models import build_model
from fedsim.run import main

RUN_FILES = {"config.toml", "metrics.jsonl", "metrics.csv", "results.json", "results.md", "accuracy.png",
             "checkpoint.pt", "checkpoint-previous.pt", "model-fedavg-seed0.pt",
             "model-fedgma-seed0.pt"}


@pytest.mark.parametrize("module", ["fedsim.run", "fedsim"])
def test_help_as_a_module(module, cli):
    command, env = cli(module, "--help")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    for flag in ("--config", "--resume", "--algorithms", "--compare", "--gma-tau", "--seeds", "--rounds"):
        assert flag in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "fedfoo"], "algorithms: unknown name 'fedfoo'; valid: fedavg, fedgma"),
    (["--compare", "fedavg,fednova"], "unknown name 'fednova'; valid: fedavg, fedgma"),
    (["--dataset", "svhn"], "dataset: unknown name 'svhn'; valid: colored-digits"),
    (["--clients-per-round", "20"], "clients_per_round=20 must be between 1 and num_clients=10"),
    (["--gma-tau", "2"], "gma_tau must be a finite number >= 0.0 and <= 1.0"),
    (["--rounds", "ten"], "invalid int value"),
    (["--resume", "somewhere", "--rounds", "3"],
     "--resume continues a run with its own config.toml; drop --rounds"),
    (["--resume", "nowhere"], "no config.toml there"),
    (["--seeds", "a,b"], "argument --seeds: invalid list of int value: 'a,b'"),
    # what only the data can refuse, still before the run folder exists
    (["--num-clients", "5000"], "num_clients=5000 exceeds the 1438 training examples"),
    (["--max-train", "5"], "num_clients=10 exceeds the 5 training examples"),
    (["--split", "dirichlet", "--min-client-size", "1000"], "dirichlet split cannot give 10"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"], "MNIST not found under /nonexistent"),
    (["--validation-fraction", "0.01", "--max-train", "100"], "holds out no example"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out-dir", str(tmp_path)] if "--resume" not in argv else argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err  # one line, no usage block
    assert err.strip().endswith("(see python -m fedsim.run --help)")
    assert not any(tmp_path.iterdir())  # refused before any work


def test_an_unusable_out_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["--rounds", "1", "--out-dir", str(blocker)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot create a run folder in out_dir={str(blocker)!r}" in err
    assert len(err.strip().splitlines()) == 1


def test_two_round_run_writes_the_whole_run_folder(tmp_path, tiny, flags, capsys):
    settings = {**tiny, "rounds": 2, "out_dir": str(tmp_path), "name": "smoke"}
    summary = main(["--quiet", *flags(settings)])
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.endswith("-smoke")
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    from fedsim.io import FILE_MODE
    assert {p.stat().st_mode & 0o777 for p in run_dir.iterdir()} == {FILE_MODE}  # the umask's
    out = capsys.readouterr().out
    assert f"run folder: {run_dir}" in out and "OOD accuracy %" in out
    # an equal server step: labelled rows, a plain paired line and no note about the step
    assert "\nfedavg (sgd, server lr 1)  " in out
    assert "\nfedgma (sgd, server lr 1, soft τ=0.4)  " in out
    assert "\nfedgma − fedavg, paired over 1 seed(s): " in out and "note:" not in out

    assert Config.from_toml(run_dir / "config.toml") == Config(**settings)
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["summary"]) == {"fedavg", "fedgma"} == set(summary)
    assert 0 <= results["summary"]["fedgma"]["ood_acc"]["mean"] <= 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2 * 2
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 2 * 2
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = torch.load(run_dir / "model-fedgma-seed0.pt", weights_only=True)
    model = build_model("mlp", (3, 8, 8), 2)
    model.load_state_dict(state)
    assert all(t.untyped_storage().nbytes() == t.numel() * 4 for t in state.values())  # not views


def test_a_larger_gma_step_is_named_on_screen_and_in_results_md(tmp_path, tiny, flags, capsys):
    main(["--quiet", *flags({**tiny, "rounds": 1, "eval_every": 1, "gma_server_lr": 2.0,
                             "gma_tau": 0.2, "out_dir": str(tmp_path)})])
    out = capsys.readouterr().out
    (run_dir,) = tmp_path.iterdir()
    markdown = (run_dir / "results.md").read_text()
    assert "\nfedavg (sgd, server lr 1)  " in out
    assert "\nfedgma (sgd, server lr 2, soft τ=0.2)  " in out
    assert "| fedavg (sgd, server lr 1) |" in markdown
    assert "| fedgma (sgd, server lr 2, soft τ=0.2) |" in markdown
    paired = [line for line in out.splitlines() if "paired over" in line]
    assert len(paired) == 1
    assert paired[0].startswith("fedgma (server lr 2) − fedavg (server lr 1), ")
    note = out.splitlines()[-1]
    assert note.startswith("note: the paired difference comes with a larger server step for fedgma")
    assert "at an equal server step GMA was not ahead of FedAvg" in note
    assert paired[0] in markdown and note in markdown


def test_toml_config_with_flags_on_top(tmp_path, tiny):
    path = tmp_path / "run.toml"
    path.write_text(Config(**{**tiny, "rounds": 9}, algorithms=("fedgma",)).to_toml())
    main(["--quiet", "--config", str(path), "--rounds", "1", "--out-dir", str(tmp_path / "runs")])
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = Config.from_toml(run_dir / "config.toml")
    assert config.rounds == 1 and config.algorithms == ("fedgma",) and config.model == "mlp"


def test_unknown_toml_key_exits_2(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("rounds = 1\nlearning_rate = 0.1\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    assert exit_.value.code == 2 and "unknown key(s)" in capsys.readouterr().err


def test_the_run_without_settings_is_the_protocol_choice_and_a_setting_starts_from_defaults():
    from fedsim.run import DEFAULT_COMPARISON, build_parser, resolve
    parser = build_parser()
    config, _ = resolve(parser.parse_args(["--quiet"]), parser)
    assert config == Config(**DEFAULT_COMPARISON)
    assert (config.gma_server_lr, config.gma_tau, config.server_lr) == (2.0, 0.2, 1.0)
    config, _ = resolve(parser.parse_args(["--rounds", "3"]), parser)
    assert (config.gma_server_lr, config.gma_tau) == (None, 0.4)


def test_settings_of_where_and_how_a_run_goes_keep_the_default_comparison(tmp_path):
    from fedsim.config import FIELD_TYPES
    from fedsim.run import DEFAULT_COMPARISON, PLACEMENT, build_parser, resolve
    assert PLACEMENT < FIELD_TYPES.keys()
    parser = build_parser()
    config, _ = resolve(parser.parse_args(["--out-dir", str(tmp_path), "--threads", "1",
                                           "--engine", "sequential", "--name", "x"]), parser)
    assert config == Config(**DEFAULT_COMPARISON, out_dir=str(tmp_path), threads=1,
                            engine="sequential", name="x")
    config, _ = resolve(parser.parse_args(["--out-dir", str(tmp_path), "--seeds", "0"]), parser)
    assert (config.gma_server_lr, config.gma_tau, config.seeds) == (None, 0.4, (0,))


@pytest.mark.parametrize("method, kind, lr", [("fedavg", "sgd", 1.0), ("fedgma", "sgd", 2.0),
                                              ("scaffold+gma", "sgd", 2.0),
                                              ("fedadam+gma", "adam", 0.01)])
def test_gma_server_lr_is_the_sgd_step_of_the_gma_methods(method, kind, lr):
    from fedsim.methods import is_masked, server_optimizer_of
    from fedsim.server import Server
    config = Config(algorithms=(method,), gma_server_lr=2.0, adaptive_server_lr=0.01, model="mlp")
    server = Server(build_model("mlp", (3, 8, 8), 2), config, masked=is_masked(method),
                    optimizer=server_optimizer_of(method))
    assert (server.optimizer.step_config.kind, server.optimizer.step_config.lr) == (kind, lr)
