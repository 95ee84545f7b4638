"""Fixtures of the algorithm tests; the tiny problem itself (the net, the by-hand gradient,
``make`` and ``play``) is ``tiny_problem.py``. A test file on the tiny problem runs every test
on both engines with ``pytestmark = pytest.mark.usefixtures("engine")``."""
import pytest
import torch

from .tiny_problem import Engine


@pytest.fixture(params=["cohort", "sequential"])
def engine(request, monkeypatch):
    """The engine ``tiny_problem.make`` builds the trainer for: each test runs on both."""
    monkeypatch.setattr(Engine, "name", request.param)
    return request.param


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tiny problems gain nothing from more, and lose much when other
    processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
