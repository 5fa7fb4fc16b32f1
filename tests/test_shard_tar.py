import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from structmar.shard_tar import ShardError, iter_shard, load_npy, npy_bytes, sha256, write_shard

PER_SHARD = 8


@pytest.fixture
def shard(tmp_path):
    """A shard of PER_SHARD samples as the builder writes them: .npy and .json payloads under 12-digit keys."""
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{i:012d}", "moments.npy": npy_bytes(rng.normal(size=(2, 6, 4, 4)).astype(np.float16)),
                "layout.json": b'{"image_id": %d}' % i} for i in range(PER_SHARD)]
    path = str(tmp_path / "train2014-000000.tar")
    write_shard(path, samples)
    return path


def _rewrite(path, samples):
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        for s in samples:
            writer.write(s)
        writer.close()


def test_tars_with_pax_headers_read_the_same(shard, tmp_path):
    raws = list(iter_shard(shard, PER_SHARD))
    path = str(tmp_path / "pax.tar")
    _rewrite(path, [{k: v for k, v in r.items() if k != "__shard__"} for r in raws])  # float mtime: pax headers
    with tarfile.open(path) as tar:
        assert any(m.pax_headers for m in tar.getmembers())
    again = list(iter_shard(path, PER_SHARD))
    assert [{k: v for k, v in r.items() if k != "__shard__"} for r in again] == [
        {k: v for k, v in r.items() if k != "__shard__"} for r in raws]


def test_written_shard_reads_back_and_rewrites_to_the_same_bytes(shard, tmp_path):
    raws = list(iter_shard(shard, PER_SHARD))
    assert [r["__key__"] for r in raws] == [f"{i:012d}" for i in range(PER_SHARD)]
    assert all(r["__shard__"] == os.path.basename(shard) for r in raws)
    assert load_npy(raws[0]["moments.npy"]).shape == (2, 6, 4, 4)
    again = str(tmp_path / "again.tar")
    sha, size = write_shard(again, [{k: v for k, v in r.items() if k != "__shard__"} for r in raws])
    assert size == os.path.getsize(shard) and sha == sha256(shard)  # fixed owner and mtime: the same bytes
    with pytest.raises(ShardError, match="the manifest lists 9"):
        list(iter_shard(shard, PER_SHARD + 1))


def test_npy_payloads_refuse_pickles_and_truncation():
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert np.array_equal(load_npy(npy_bytes(a)), a)
    with pytest.raises(ValueError, match="truncated"):
        load_npy(npy_bytes(a)[:-2])
    with pytest.raises(ValueError, match="not a .npy payload"):
        load_npy(b"not numpy")
