"""The Flower App of examples/flower-app on Flower's own engines, in real processes on
localhost: ``flwr run`` on the Simulation Engine, and on the Deployment Engine (a SuperLink and
two SuperNodes), once with a SuperNode killed in the middle of a round.

Every Flower setting lives in a temporary ``FLWR_HOME`` (its ``config.toml`` names the
SuperLink connection); every process a test starts is stopped, with its descendants, by pid
when the test ends, passed or failed.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[3]
APP = ROOT / "examples" / "flower-app"
BIN = Path(sys.executable).parent  # flwr, flower-superlink and flower-supernode
CONNECTION = "test"  # the SuperLink connection's name in FLWR_HOME/config.toml
ROUND_LINE = re.compile(r"round (\d+): (\d+)/(\d+) replies, gma mask density (\S+)")


# ----------------------------------------------------------------------------- processes


def _descendants(pid: int) -> list[int]:
    """The pids below ``pid`` in the process tree (Linux /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Processes:
    """The processes a test starts, each in a session of its own, its output in a log."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *command: str) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL, grace: float = 10.0) -> None:
        """Send ``sig`` to the process and its descendants; SIGKILL whatever is left after
        ``grace`` seconds."""
        proc = self.started[name]
        others = _descendants(proc.pid)
        _signal([proc.pid, *others], sig)
        deadline = time.monotonic() + grace
        while (proc.poll() is None or any(map(_alive, others))) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal([p for p in others if _alive(p)] + ([proc.pid] if proc.poll() is None else []),
                signal.SIGKILL)
        proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name, proc in self.started.items():
            if proc.poll() is None:
                self.kill(name, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path) -> Path:
    """A temporary FLWR_HOME."""
    path = tmp_path / "flwr-home"
    path.mkdir()
    return path


@pytest.fixture
def procs(tmp_path, home):
    def first(path: Path, variable: str) -> str:
        return os.pathsep.join(filter(None, [str(path), os.environ.get(variable)]))

    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": first(BIN, "PATH"), "PYTHONPATH": first(ROOT, "PYTHONPATH")}
    started = Processes(env, tmp_path)
    yield started
    started.stop_all()


def start_superlink(procs: Processes, home: Path, *options: str, timeout: float = 60) -> str:
    """Start a SuperLink on a free loopback port, name it as the connection ``test`` in
    ``FLWR_HOME/config.toml`` and return its address once it answers."""
    port = _free_port()
    proc = procs.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
                       "--port", str(port), "--disable-runtime-dependency-installation",
                       *options)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, procs.log("superlink")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"127.0.0.1:{port}"
        except OSError:
            assert time.monotonic() < deadline, "SuperLink did not listen in time\n" + \
                procs.log("superlink")
            time.sleep(0.2)


def start_supernodes(procs: Processes, superlink: str, n: int) -> None:
    for k in range(n):
        procs.start(f"supernode-{k}", "flower-supernode", "--insecure", "--superlink",
                    superlink, "--port", str(_free_port()),
                    "--node-config", f"partition-id={k} num-partitions={n}")


def run_config(**values: object) -> str:
    """``--run-config``'s text: TOML values, keys with dashes."""
    return " ".join(f"{key.replace('_', '-')}="
                    + (f"'{v}'" if isinstance(v, str) else json.dumps(v))
                    for key, v in values.items())


def flwr_run(procs: Processes, config: str, *extra: str) -> subprocess.Popen:
    return procs.start("flwr-run", "flwr", "run", str(APP), CONNECTION, "--run-config", config,
                       "--stream", *extra)


def wait_run(procs: Processes, run: subprocess.Popen, timeout: float) -> str:
    """Wait for ``flwr run --stream`` to end; its output, once the run completed."""
    try:
        run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not end within {timeout} s:\n{procs.log('flwr-run')[-6000:]}")
    out = procs.log("flwr-run")
    assert run.returncode == 0, out[-6000:]
    run_id = re.search(r"Successfully started run (\d+)", out)
    assert run_id, out[-6000:]
    listed = subprocess.run([str(BIN / "flwr"), "ls", "--run-id", run_id[1], "--format",
                             "json"], env=procs.env, capture_output=True, text=True, timeout=60)
    status = json.loads(listed.stdout)["runs"][0]["status"]
    assert status == "finished:completed", out[-6000:]
    return out


def check_rounds(out: str, metrics: Path, rounds: int) -> list[dict]:
    """Every round logged a finite GMA mask density and aggregated into finite arrays; the
    per-round records of the metrics file."""
    logged = ROUND_LINE.findall(out)
    assert [int(r) for r, *_ in logged] == list(range(1, rounds + 1)), out[-6000:]
    record = json.loads(metrics.read_text(encoding="utf-8"))
    rows = record["rounds"]
    assert [row["round"] for row in rows] == list(range(1, rounds + 1))
    for (_, ok, sent, density), row in zip(logged, rows):
        assert (int(ok), int(sent)) == (row["replies"], row["sent"])
        assert row["aggregated"] and row["finite"], row
        assert math.isfinite(row["density"]) and 0 < row["density"] <= 1, row
        assert float(density) == pytest.approx(row["density"], abs=1e-4)
    assert math.isfinite(record["accuracy"])
    return rows


# ----------------------------------------------------------------------------- the app itself


@pytest.fixture
def server_app(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from gma_flower_app import server_app
    return server_app


def test_every_strategy_from_the_run_config(server_app):
    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert config["components"] == {"serverapp": "gma_flower_app.server_app:app",
                                    "clientapp": "gma_flower_app.client_app:app"}
    defaults = config["config"]
    from flwr.serverapp.strategy import FedAvg
    from gma_kernels.integrations import flower as gma
    expected = {"fedavg": FedAvg, "gmafedavg": gma.GMAFedAvg, "gmafedavgm": gma.GMAFedAvgM,
                "gmafedadam": gma.GMAFedAdam, "gmafedyogi": gma.GMAFedYogi,
                "gmafedadagrad": gma.GMAFedAdagrad}
    assert set(server_app.STRATEGIES) == set(expected)
    for name, cls in expected.items():
        strategy = server_app.make_strategy({**defaults, "strategy": name.upper(),
                                             "gma-tau": 0.3})
        assert type(strategy).__bases__ == (server_app.RoundLog, cls)
        assert cls is FedAvg or strategy.gma_tau == 0.3
    with pytest.raises(ValueError, match=r"^unknown strategy 'fedgma': choose one of fedavg, "):
        server_app.make_strategy({**defaults, "strategy": "fedgma"})


# ----------------------------------------------------------------------------- the engines


def test_simulation_engine(procs, home, tmp_path):
    pytest.importorskip("ray")  # flwr[simulation]
    start_superlink(procs, home, "--simulation")
    metrics = tmp_path / "metrics.json"
    run = flwr_run(procs, run_config(num_server_rounds=2, strategy="gmafedadam",
                                                gma_tau=0.3, metrics_file=str(metrics)),
                   "--federation-config", "num-supernodes=2")
    out = wait_run(procs, run, timeout=240)
    rows = check_rounds(out, metrics, rounds=2)
    assert all(row["sent"] == row["replies"] == 2 for row in rows), rows
    assert json.loads(metrics.read_text())["strategy"] == "gmafedadam"


def test_deployment_engine(procs, home, tmp_path):
    superlink = start_superlink(procs, home)
    start_supernodes(procs, superlink, 2)
    metrics = tmp_path / "metrics.json"
    run = flwr_run(procs, run_config(num_server_rounds=2, fraction_evaluate=0.0,
                                                metrics_file=str(metrics)))
    out = wait_run(procs, run, timeout=240)
    rows = check_rounds(out, metrics, rounds=2)
    assert all(row["sent"] == row["replies"] == 2 for row in rows), rows


def test_deployment_engine_supernode_killed_mid_round(procs, home, tmp_path):
    """SuperNode 1 is killed (SIGKILL) once it holds round 2's train message: round 2 waits
    its ``round-timeout`` and aggregates the one reply it got, as Flower's FedAvg does."""
    superlink = start_superlink(procs, home)
    start_supernodes(procs, superlink, 2)
    metrics = tmp_path / "metrics.json"
    run = flwr_run(procs, run_config(
        num_server_rounds=2, strategy="gmafedavgm", fraction_evaluate=0.0, round_timeout=30.0,
        train_sleep=1.0, metrics_file=str(metrics)))
    deadline = time.monotonic() + 180
    while procs.log("supernode-1").count("Receiving: train message") < 2:
        assert run.poll() is None, procs.log("flwr-run")[-6000:]
        assert time.monotonic() < deadline, procs.log("supernode-1")[-4000:]
        time.sleep(0.1)
    procs.kill("supernode-1")
    out = wait_run(procs, run, timeout=180)
    first, second = check_rounds(out, metrics, rounds=2)
    assert first["sent"] == first["replies"] == 2, first
    assert second["sent"] == 2 and second["replies"] == 1, second
