"""Atomic writes, safe loads, fallback to the previous good checkpoint."""
import os

import pytest
import torch

from bcssl.engine import checkpoint as ckpt


def test_save_load_roundtrip_keeps_previous(tmp_path):
    p = tmp_path / "checkpoint.pt"
    ckpt.save({"w": torch.ones(3), "step": 1}, p)
    ckpt.save({"w": torch.zeros(3), "step": 2}, p)
    assert ckpt.load(p)["step"] == 2
    assert ckpt.load(ckpt.prev_path(p))["step"] == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp files left


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    p = tmp_path / "checkpoint.pt"
    ckpt.save({"step": 1}, p)
    ckpt.save({"step": 2}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        assert ckpt.load(p)["step"] == 1


def test_corrupt_without_previous_is_a_clear_error(tmp_path):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.pt is unreadable"):
        ckpt.load(p)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "checkpoint.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(p)


def test_unwritable_dir_fails_loudly_and_keeps_old(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    ckpt.save({"step": 1}, p)

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt, "open", read_only, raising=False)  # as a read-only directory answers
    with pytest.raises(ckpt.CheckpointError, match="could not write.*Permission denied"):
        ckpt.save({"step": 2}, p)
    monkeypatch.undo()
    assert ckpt.load(p)["step"] == 1


def test_write_failure_leaves_old_intact(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    ckpt.save({"step": 1}, p)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        ckpt.save({"step": 2}, p)
    monkeypatch.undo()
    assert ckpt.load(p)["step"] == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
