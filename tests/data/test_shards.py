import json

import numpy as np
import pytest

from deepwhale.data.shards import (
    PackedDataset,
    ShardError,
    pack,
    shard_complete,
    token_dtype,
    write_manifest,
    write_shard,
)


def _write(tmp_path, vocab=1000):
    docs = [list(range(1, 8)), [9, 10, 11], list(range(20, 40))]
    rows = pack(docs, seq_len=8, eos_id=0)
    recs = [write_shard(tmp_path, 0, rows[:2], vocab), write_shard(tmp_path, 1, rows[2:], vocab)]
    write_manifest(tmp_path, recs, seq_len=8, vocab_size=vocab, eos_id=0)
    return rows


def test_pack_appends_eos_and_drops_tail():
    rows = pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3], [0, 4, 5]]  # last EOS dropped with the tail
    assert pack([], 4, 0).shape == (0, 4)
    with pytest.raises(ValueError):
        pack([[1]], 1, 0)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_round_trip_random_access(tmp_path):
    rows = _write(tmp_path)
    ds = PackedDataset(tmp_path)
    assert len(ds) == len(rows) == 4 and ds.tokens == 32
    for i in range(len(rows)):
        assert ds[i].tolist() == rows[i].tolist()
    assert ds[-1].tolist() == rows[-1].tolist()
    with pytest.raises(IndexError):
        ds[4]
    assert shard_complete(tmp_path, 0)["rows"] == 2
    assert shard_complete(tmp_path, 7) is None


def test_large_vocab_uses_uint32(tmp_path):
    write_shard(tmp_path, 0, np.array([[70000, 1]]), 100000)
    assert (tmp_path / "shard-00000.bin").stat().st_size == 8
    with pytest.raises(ValueError, match="outside"):
        write_shard(tmp_path, 1, np.array([[100000, 1]]), 100000)


def test_truncated_shard_is_named(tmp_path):
    _write(tmp_path)
    f = tmp_path / "shard-00001.bin"
    f.write_bytes(f.read_bytes()[:-3])
    assert shard_complete(tmp_path, 1) is None
    with pytest.raises(ShardError, match="shard-00001.bin.*truncated"):
        PackedDataset(tmp_path)


def test_corrupt_shard_is_named(tmp_path):
    _write(tmp_path)
    f = tmp_path / "shard-00000.bin"
    b = bytearray(f.read_bytes())
    b[0] ^= 0xFF
    f.write_bytes(bytes(b))
    ds = PackedDataset(tmp_path)
    with pytest.raises(ShardError, match="shard-00000.bin.*sha256"):
        ds[0]
    with pytest.raises(ShardError, match="shard-00000.bin"):
        ds.verify_all()
    assert PackedDataset(tmp_path, verify=False)[0].shape == (8,)


def test_bad_manifests(tmp_path):
    with pytest.raises(ShardError, match="no manifest"):
        PackedDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ShardError, match="unreadable"):
        PackedDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ShardError, match="not a"):
        PackedDataset(tmp_path)
    _write(tmp_path)
    (tmp_path / "shard-00001.bin").unlink()
    with pytest.raises(ShardError, match="missing"):
        PackedDataset(tmp_path)


def test_shard_complete_verify_checks_sha256(tmp_path):
    _write(tmp_path)
    assert shard_complete(tmp_path, 0, verify=True)["rows"] == 2
    f = tmp_path / "shard-00000.bin"
    b = bytearray(f.read_bytes())
    b[0] ^= 0xFF
    f.write_bytes(bytes(b))
    assert shard_complete(tmp_path, 0) is not None  # size only: still "complete"
    assert shard_complete(tmp_path, 0, verify=True) is None
