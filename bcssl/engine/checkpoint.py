"""Atomic, safely loadable checkpoints.

``save`` writes to a temporary file in the same directory, fsyncs it, keeps the previous
checkpoint as ``<name>.prev.pt`` and renames the new one into place, so at every instant at
least one complete checkpoint exists. ``load`` uses ``weights_only=True`` (no pickled code is
ever executed) and falls back to the previous checkpoint when the latest is unreadable.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prev_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, prev_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                              "the previous checkpoint was left intact") from e


def _load_one(path: Path, map_location) -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign object: all mean "unusable"
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of states")
    return state


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load ``path``; if it is unreadable, warn and use ``<name>.prev.pt`` when that one is good."""
    return load_with_source(path, map_location)[0]


def load_with_source(path: str | os.PathLike, map_location="cpu") -> tuple[dict, Path]:
    """:func:`load`, also returning the file the state came from (``path`` or its ``.prev.pt``)."""
    path = Path(path)
    try:
        return _load_one(path, map_location), path
    except CheckpointError as err:
        prev = prev_path(path)
        if not prev.exists():
            raise
        warnings.warn(f"{err}; using the previous checkpoint {prev}", stacklevel=3)
        return _load_one(prev, map_location), prev


def latest(run_dir: str | os.PathLike, name: str = "checkpoint.pt") -> Path | None:
    """The checkpoint to resume from in ``run_dir`` (latest or its previous copy), if any."""
    path = Path(run_dir) / name
    if path.exists() or prev_path(path).exists():
        return path
    return None
