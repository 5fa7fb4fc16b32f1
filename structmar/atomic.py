"""Writes that are never half-done: a temp file beside the target, fsync, rename, fsync the directory.

A reader (a resumed run, another rank, the next stage) sees the previous complete file or the new
complete file, never a torn one, also when the writer is killed mid-write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO


class SaveError(OSError):
    """A save of several files (a checkpoint) failed part-way; the message says what is intact."""


def write_path(path: str, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` with a temp path in `path`'s directory, then move the file to `path` atomically.

    For libraries that write to a path themselves (safetensors' save_file, PIL)."""
    remove_stale_temps(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def remove_stale_temps(path: str) -> None:
    """Remove the temp files of `path` that writers killed before their rename left (one writer per path at a
    time: nothing else reads or names them)."""
    directory, name = os.path.split(path)
    prefix = f"{name}.tmp-"
    for entry in os.listdir(directory or "."):
        if entry.startswith(prefix):
            os.remove(os.path.join(directory, entry))


def write_with(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a temp file in `path`'s directory, then move it to `path` atomically."""

    def to(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    write_path(path, to)


def write_bytes(path: str, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def torch_save(obj, path: str) -> None:
    import torch

    write_with(path, lambda f: torch.save(obj, f))


def save_image(image, path: str) -> None:
    """Save a PIL image; the format comes from `path`'s extension, as PIL would infer it."""
    from PIL import Image

    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"{path}: no image format has this extension (use .png or .jpg)")
    write_with(path, lambda f: image.save(f, format=fmt))


def fsync_dir(path: str) -> None:
    """Persist a directory entry (a rename) itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
