"""Fixtures of the backend tests: the CPU path of ``backend="torch"`` and many threads."""
import pytest
import torch

from gma_kernels.backends import native as _native


@pytest.fixture
def path(request, monkeypatch):
    """Force ``backend="torch"`` on CPU onto one path: "native" (the C kernel) or "torch_ops"
    (its PyTorch chunks)."""
    if request.param == "torch_ops":
        monkeypatch.setattr(_native, "ENABLED", False)
    return request.param


@pytest.fixture
def many_threads(monkeypatch):
    """Split even small N over several threads, so thread boundaries fall mid-tile."""
    monkeypatch.setattr(_native, "MIN_COLUMNS_PER_THREAD", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)
