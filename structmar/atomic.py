"""Writes that are never half-done: a temp file beside the target, fsync, rename, fsync the directory.

A reader (a resumed run, another rank, the next stage) sees the previous complete file or the new
complete file, never a torn one, also when the writer is killed mid-write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO


def write_with(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a temp file in `path`'s directory, then move it to `path` atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def write_bytes(path: str, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def torch_save(obj, path: str) -> None:
    import torch

    write_with(path, lambda f: torch.save(obj, f))


def fsync_dir(path: str) -> None:
    """Persist a directory entry (a rename) itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
