"""Atomic file writes (temporary name, fsync, rename): a reader, or a rerun after a kill, sees the old file or the
new one, never half a file. Used by the checkpoint writer, the pruner's progress files, its report and model card."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")  # hidden, and not *.safetensors: never read as a weight file


def _replace(tmp: Path, path: Path) -> None:
    """Make the fully written ``tmp`` durable and give it ``path``'s name in one step (a reader, or a rerun after a
    kill, sees the old file or the new one, never half a file)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename); an OSError (full disk, read-only
    folder) leaves no temporary file behind."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                     before_replace: Callable[[], None] | None = None) -> None:
    """`safetensors.torch.save_file` made atomic like `atomic_write_text`. A write error of the safetensors library
    (it reports a full disk as its own error type) is raised as OSError naming the file. ``before_replace`` runs
    between writing the temporary file and renaming it (a test hook)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        try:
            save_file(dict(tensors), tmp, metadata=metadata)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors' SafetensorError wraps the I/O error
            raise OSError(f"cannot write {path}: {err}") from None
        if before_replace is not None:
            before_replace()
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
