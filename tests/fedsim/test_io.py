"""Atomic file writes (``fedsim.io``): the new content whole, the umask's mode, no temporary
file left behind, the old file untouched when a write fails; ``atomic_save`` loads back."""
import os

import pytest
import torch

from fedsim.io import FILE_MODE, atomic_save, atomic_write


def test_the_mode_is_what_the_umask_gives_a_plainly_created_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")  # created the ordinary way, through the umask
    atomic_write(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert FILE_MODE == plain.stat().st_mode & 0o777


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.txt"
    atomic_write(path, "old")
    atomic_write(path, b"new \xff bytes")
    assert path.read_bytes() == b"new \xff bytes"
    atomic_write(path, "text é")
    assert path.read_text(encoding="utf-8") == "text é"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "file.txt"
    atomic_write(path, "old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_atomic_save_loads_back_as_torch_save_wrote_it(tmp_path):
    obj = {"params": torch.arange(5.0), "round": 3, "rows": [{"a": 1.5}]}
    atomic_save(obj, tmp_path / "state.pt")
    torch.save(obj, tmp_path / "plain.pt")
    got = torch.load(tmp_path / "state.pt", weights_only=True)
    want = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert torch.equal(got["params"], want["params"])
    assert got["round"] == 3 and got["rows"] == [{"a": 1.5}]
