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


# ---- opening, with one-line errors ------------------------------------------------------------------

SAFETENSORS, TORCH_ZIP, PICKLE, TAR, JSON_TEXT = ("a safetensors file", "a torch.save zip archive", "a Python pickle",
                                                  "a tar archive", "JSON text")


def sniff(path: str) -> str:
    """What a file holds, told by its first bytes: one of the kinds above, "empty" or "of an unknown format"."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if head[:1] == b"\x80":  # pickle protocol 2+ (torch.save's legacy format too)
        return PICKLE
    if head[257:262] == b"ustar":
        return TAR
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return SAFETENSORS  # an 8-byte header length, then the JSON header
    if head.lstrip()[:1] in (b"{", b"["):
        return JSON_TEXT
    return "of an unknown format"


def first_line(error: BaseException) -> str:
    """An error's message in one line: the library's own words, up to its first full stop (torch appends
    paragraphs of advice)."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def _refuse(path: str, what: str, expected: str, error: BaseException) -> ValueError:
    """The one-line error of a file a library could not read: empty, another format, or truncated/corrupt."""
    kind = sniff(path)
    if kind == "empty":
        return ValueError(f"{what} {path} is empty (0 bytes)")
    if kind != expected and not (expected == TORCH_ZIP and kind == PICKLE):
        return ValueError(f"{what} {path} is {kind}, not {expected}")
    detail = "" if isinstance(error, OSError) else f" ({first_line(error)})"  # an OSError's errno tells nothing here
    return ValueError(f"{what} {path} is truncated or corrupt{detail}")


def _existing(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist" if not os.path.exists(path)
                                else f"{what} {path} is not a file")


def check_safetensors(path: str, what: str) -> None:
    """Refuse a file safetensors cannot open (the header and that it covers the whole file; no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    _existing(path, what)
    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as e:
        raise _refuse(path, what, SAFETENSORS, e) from None


def load_safetensors(path: str, what: str) -> tuple[dict, dict[str, str]]:
    """The tensors and metadata of a safetensors file; `what` names the file's role in the error."""
    from safetensors import SafetensorError, safe_open

    _existing(path, what)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open handle is not a dict
            return tensors, f.metadata() or {}
    except SafetensorError as e:
        raise _refuse(path, what, SAFETENSORS, e) from None


def load_torch_pickle(path: str, what: str, allowed: tuple = ()):
    """torch.load(weights_only=True) of a file: tensors and plain containers (and the `allowed` classes) only, so
    a pickle that would run code when loaded is refused, naming what it would call."""
    import pickle
    import re

    import torch
    from safetensors import SafetensorError

    _existing(path, what)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words the refusal "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y whose module ..."
        called = re.search(r"GLOBAL (\S+)", str(e))
        if "Weights only load failed" in str(e) and called:
            raise ValueError(f"{what} {path} holds a pickled {called.group(1)}, code that loading it would run; "
                             "refused (only tensors and plain containers load)") from None
        raise _refuse(path, what, TORCH_ZIP, e) from None
    except (RuntimeError, EOFError, ValueError, OSError, SafetensorError) as e:  # truncated, empty, another format
        raise _refuse(path, what, TORCH_ZIP, e) from None


def read_json(path: str, what: str):
    """A JSON file's value; an empty, binary or malformed file is a one-line error naming it."""
    import json

    _existing(path, what)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = sniff(path)
        if kind == "empty" or not data.strip():
            raise ValueError(f"{what} {path} is empty") from None
        if kind not in (JSON_TEXT, "of an unknown format") or isinstance(e, UnicodeDecodeError):
            raise ValueError(f"{what} {path} is {kind if kind != JSON_TEXT else 'binary'}, not JSON text") from None
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None


def check_model_directory(path: str, what: str) -> None:
    """A transformers model directory (CLIP, a detector) before transformers opens it: every JSON file parses and
    every safetensors weight file is whole, so a damaged file is named instead of failing deep in a loader."""
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(".json"):
            read_json(file, what)
        elif name.endswith(".safetensors"):
            check_safetensors(file, what)
