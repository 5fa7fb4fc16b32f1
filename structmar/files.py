"""The files a user hands structmar, opened with checks: a truncated, empty, foreign-format or code-carrying
file is a one-line ValueError naming the path and what is wrong, never a library's traceback. And the
sha256 digests a stage export records of the tokenizer and text encoder it was trained with.
"""

from __future__ import annotations

import hashlib
import os

# The weight files of a model directory (a transformers CLIP directory holds one of these).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_sha256(path: str) -> str:
    """sha256 of a weights file, or of a directory's weight files (each name and content, in name order): what
    identifies a tokenizer or text encoder whichever directory it was copied to."""
    if not os.path.isdir(path):
        return file_sha256(path)
    names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    if not names:
        raise ValueError(f"{path} holds no weight file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{file_sha256(os.path.join(path, name))}\n".encode())
    return h.hexdigest()
