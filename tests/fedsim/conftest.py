"""Shared settings for the simulator's tests: tiny data, few rounds, one thread; a finished
checkpointed run; and how to run ``python -m fedsim.run`` in a subprocess.

The files mirror ``fedsim/``: ``test_<module>.py`` for each module with logic, in
``algorithms/`` and ``data/`` for those subpackages (``algorithms/test_registry.py`` is the
package's ``__init__``; ``algorithms/test_base.py`` what holds for every algorithm). Files
about a whole feature sit beside them: ``test_resume.py``, ``test_end_to_end.py``,
``test_ood_options.py``."""
import os
import sys
from pathlib import Path

import pytest

from fedsim.config import Config
from fedsim.loop import run_experiment

#: a run of a second or two: 240 colored digits among 4 clients, 3 per round, the MLP
TINY = {"num_clients": 4, "clients_per_round": 3, "max_train": 240, "model": "mlp", "rounds": 3,
        "seeds": (0,), "eval_every": 2, "batch_size": 16, "threads": 1}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


def as_flags(settings: dict) -> list[str]:
    """Settings as command-line flags (lists comma-separated)."""
    flags = []
    for key, value in settings.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += ["--" + key.replace("_", "-"), text]
    return flags


@pytest.fixture
def cli():
    """(command for ``python -m MODULE ARGS``, environment that finds this checkout)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return lambda module, *args: ([sys.executable, "-m", module, *args], env)


@pytest.fixture
def flags():
    return as_flags


@pytest.fixture
def checkpointed_run(tmp_path, tiny):
    """(config, run folder) of a finished tiny run of 4 rounds with a checkpoint every round:
    its last two checkpoints are the end of the run and the round before."""
    config = Config(**{**tiny, "rounds": 4, "checkpoint_every": 1})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config.to_toml())
    run_experiment(config, run_dir, progress=False)
    return config, run_dir
