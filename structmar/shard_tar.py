"""A shard's bytes: plain ustar tars of .npy and .json members, written and read back.

`write_shard` writes a shard with WebDataset's TarWriter as plain ustar (fixed owner and integer mtime,
so the same samples give the same bytes and sha256), fsynced and renamed into place. `iter_shard` reads
it back with a small header parser, several times faster than Python's tarfile, falling back to
WebDataset's tar iterator for tars with extended headers. `npy_bytes` / `load_npy` encode and parse the
.npy payloads without pickles. What the samples must hold (the schema) is structmar.shards'.
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
import os
import tarfile
import zlib

import numpy as np
import webdataset as wds

from structmar import atomic


class ShardError(ValueError):
    """Bad shard data; `.reason` is one of structmar.shards.SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---- .npy payloads ------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes (C order, no pickles): the inverse of load_npy."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes without pickles; headers are cached because a split repeats a few shapes."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    major = data[6]
    hlen_size = 2 if major == 1 else 4
    hlen = int.from_bytes(data[8:8 + hlen_size], "little")
    start = 8 + hlen_size
    header = data[start:start + hlen]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        d = ast.literal_eval(header.decode("latin1"))
        if d["fortran_order"]:
            raise ValueError("fortran-order .npy payloads are not supported")
        dtype = np.dtype(d["descr"])
        if dtype.hasobject:
            raise ValueError("object .npy payloads are not allowed")
        parsed = (dtype, tuple(d["shape"]), start + hlen)
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[header] = parsed
    dtype, shape, offset = parsed
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"truncated .npy payload ({len(data) - offset} bytes for shape {shape})")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


# ---- tars ---------------------------------------------------------------------------------------


def sha256(path: str) -> str:
    """The hex sha256 of a file (what the sidecars and the manifest record of each shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: str, samples: list[dict]) -> tuple[str, int]:
    """Samples (dicts of payload bytes and __key__) as the tar `path`, atomically; returns (sha256, bytes)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        # Fixed mtime/owner: rebuilding a shard from the same inputs gives the same bytes and sha256.
        # An integer mtime keeps the members plain ustar (a float adds a pax header to each).
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="structmar", group="structmar")
        for s in samples:
            writer.write(s)
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    atomic.fsync_dir(os.path.dirname(path) or ".")
    return sha256(path), os.path.getsize(path)


def _read(f, n: int) -> bytes:
    """n bytes from unbuffered file `f` (fewer only at end of file): one read call in the usual case."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts, have = [data], len(data)
    while have < n and (more := f.read(n - have)):
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def _byte_sum(block: bytes) -> int:
    """Sum of the bytes of a 512-byte block, exactly: Adler-32's low half is 1 + the byte sum modulo
    65521, and a 256-byte half sums to at most 65280, so no reduction happens (4x faster than sum())."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _tar_members(f):
    """(member name, payload bytes) of a plain ustar stream read unbuffered, checksums verified.

    Python's tarfile costs ~100 us a member; shards are plain ustar files (what TarWriter writes with
    an integer mtime), so this reads the fixed 512-byte headers directly (~8 us a member): each
    payload is read straight into its own bytes object, then its padding and the next header in one
    more read. Archives using pax or GNU long-name headers are read with tarfile instead.
    """
    header, member = _read(f, 512), None
    while True:
        if len(header) < 512:
            after = f" after member {member.decode(errors='replace')}" if member else ""
            raise ShardError("corrupt", f"ends without its end-of-archive marker{after}" if not header
                             else f"tar header{after} cut short")
        if header[0] == 0 and header.count(0) == 512:  # a member header starts with its name
            return  # end-of-archive marker
        try:
            size = int(header[124:136].rstrip(b"\0 ").strip() or b"0", 8)
            checksum = int(header[148:156].rstrip(b"\0 ").strip(), 8)
        except ValueError:
            raise ShardError("corrupt", "unreadable tar header") from None
        if checksum != _byte_sum(header) - sum(header[148:156]) + 256:  # the field counts as 8 spaces
            raise ShardError("corrupt", "tar header checksum mismatch")
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise _NotPlainUstar
        member = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            member = header[345:500].split(b"\0", 1)[0] + b"/" + member
        data = _read(f, size)
        if len(data) < size:
            raise ShardError("corrupt", f"member {member.decode(errors='replace')} cut short")
        pad = -size % 512
        header = _read(f, pad + 512)[pad:]
        if kind in (b"0", b"\0"):
            yield member.decode("utf-8"), data


class _NotPlainUstar(Exception):
    pass


def _tarfile_members(f):
    for member in wds.tariterators.tar_file_iterator(f):
        yield member["fname"], member["data"]


def iter_shard(path: str, expected: int | None = None):
    """Raw samples (dicts of payload bytes + __key__ + __shard__) of one tar; a bad tar raises ShardError.

    The samples before a fault are whole and are yielded; the fault raises naming the member it cut
    (a tar cut at a member boundary lacks its end-of-archive marker: the next header is cut short),
    and the sample count must equal `expected`.
    """
    name = os.path.basename(path)
    current, last_key, count = None, None, 0
    try:
        with open(path, "rb", buffering=0) as f:
            for attempt in range(2):
                f.seek(0)
                current, last_key, count = None, None, 0
                try:
                    for fname, data in (_tar_members(f) if attempt == 0 else _tarfile_members(f)):
                        key, dot, ext = fname.partition(".")
                        if not dot:
                            continue
                        if current is not None and key != current["__key__"]:
                            last_key = current["__key__"]
                            count += 1
                            yield current
                            current = None
                        if current is None:
                            current = {"__key__": key, "__shard__": name}
                        if ext in current:
                            raise ShardError("corrupt", f"sample {key} has a duplicate {ext}")
                        current[ext] = data
                    break
                except _NotPlainUstar:
                    if count:
                        raise ShardError("corrupt", "mixes plain and extended tar headers") from None
    except (ShardError, tarfile.TarError, OSError, EOFError) as e:
        if last_key is None and os.path.isfile(path):
            from structmar.files import TAR, sniff

            kind = sniff(path)  # a file that is no tar at all: say what it is instead
            if kind == "empty":
                raise ShardError("corrupt", f"shard {path} is empty (0 bytes)") from None
            if kind != TAR:
                raise ShardError("corrupt", f"shard {path} is {kind}, not a tar") from None
        where = f"after sample {last_key}" if last_key else "at its start"
        raise ShardError("corrupt", f"shard {name}: corrupt or truncated tar {where} ({e})") from None
    if current is not None:
        count += 1
        yield current
    if expected is not None and count != expected:
        last = current["__key__"] if current else None
        raise ShardError("corrupt", f"shard {name}: corrupt or truncated tar after sample {last} "
                         f"({count} samples, the manifest lists {expected})")
