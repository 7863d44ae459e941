"""Packed token shards: the hand-off between the data pipeline and the trainer.

Layout of a shard folder::

    out/
      shard-00000.bin    rows of ``seq_len`` token ids, little-endian uint16 or uint32, no header
      shard-00000.json   {"file", "rows", "tokens", "bytes", "sha256", "dtype", "seq_len"}
      ...
      manifest.json      {"format", "version", "dtype", "seq_len", "vocab_size", "eos_id",
                          "rows", "tokens", "shards": [shard records]}

A shard is *complete* when its ``.json`` record exists and the ``.bin`` has the recorded size. Both
are written to a temporary name and renamed, the ``.bin`` first, so a crash never leaves a
record for a half-written file, and a re-run can skip complete shards (:func:`shard_complete`,
which with ``verify=True`` also checks the sha256, as the pipeline's re-run does).

Packing follows the GPT-2/litgpt convention: each document's ids are followed by EOS, the stream
is concatenated and cut into rows of ``seq_len`` tokens; the remainder shorter than a row is
dropped. The trainer reads row ``i`` with random access (:class:`PackedDataset`) and uses
``row[:-1]`` as input and ``row[1:]`` as labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepwhale.atomic import atomic_write, write_json

FORMAT = "deepwhale-packed-tokens"
VERSION = 1
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard or manifest is missing, truncated, corrupt or inconsistent (message names the file)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below ``vocab_size``: uint16 or uint32.

    Raises:
        ValueError: ``vocab_size`` is not in [1, 2**32].
    """
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(index: int) -> str:
    """File stem of shard ``index``: ``shard-00000``."""
    return f"shard-{index:05d}"


def pack(docs: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``, and cut into full rows.

    Args:
        docs: token id lists, one per document, in the order they should be packed.
        seq_len: tokens per row (the trainer uses ``seq_len - 1`` inputs per row).
        eos_id: separator appended after every document.

    Returns:
        ``(rows, seq_len)`` int64 array; the tail shorter than a row is dropped.

    Raises:
        ValueError: ``seq_len`` < 2.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    parts = []
    for doc in docs:
        parts.append(np.asarray(doc, dtype=np.int64))
        parts.append(np.asarray([eos_id], dtype=np.int64))
    if not parts:
        return np.zeros((0, seq_len), dtype=np.int64)
    stream = np.concatenate(parts)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len)  # (rows, seq_len)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(out_dir: str | Path, index: int, rows: np.ndarray, vocab_size: int) -> dict:
    """Write one shard atomically (``.bin`` then its ``.json`` record) and return the record.

    Args:
        out_dir: shard folder (created).
        index: shard number; names the files.
        rows: ``(n, seq_len)`` integer token ids, each in ``[0, vocab_size)``.
        vocab_size: picks uint16 or uint32 storage.

    Raises:
        ValueError: ``rows`` is not 2-D or holds an id outside ``[0, vocab_size)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"rows must be (n, seq_len), got shape {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= vocab_size):
        raise ValueError(f"token id outside [0, {vocab_size}) in shard {index}")
    dtype = token_dtype(vocab_size)
    data = np.ascontiguousarray(rows.astype(dtype)).tobytes()
    stem = shard_name(index)
    atomic_write(out / f"{stem}.bin", lambda p: p.write_bytes(data))
    record = {
        "file": f"{stem}.bin",
        "rows": int(rows.shape[0]),
        "tokens": int(rows.size),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "dtype": dtype.name,
        "seq_len": int(rows.shape[1]),
    }
    write_json(out / f"{stem}.json", record)
    return record


def shard_complete(out_dir: str | Path, index: int, verify: bool = False) -> dict | None:
    """The record of shard ``index`` if it was written completely, else ``None``.

    Complete means: the ``.json`` record parses and the ``.bin`` has exactly the recorded size,
    and, with ``verify``, the ``.bin``'s sha256 matches the record (a flipped byte makes the
    shard incomplete, so a re-run rewrites it). Without ``verify`` the check is cheap; the hash
    is then checked on read (:class:`PackedDataset`).
    """
    out = Path(out_dir)
    stem = shard_name(index)
    try:
        record = json.loads((out / f"{stem}.json").read_text())
        path = out / record["file"]
        size = path.stat().st_size
        if size != record.get("bytes"):
            return None
        if verify and _sha256(path) != record.get("sha256"):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def write_manifest(
    out_dir: str | Path,
    records: list[dict],
    *,
    seq_len: int,
    vocab_size: int,
    eos_id: int,
    extra: dict | None = None,
) -> dict:
    """Write ``manifest.json`` listing ``records`` (in shard order) with totals; returns it."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": token_dtype(vocab_size).name,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "rows": sum(r["rows"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "shards": records,
        **(extra or {}),
    }
    write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


@dataclass
class _Shard:
    path: Path
    rows: int
    sha256: str
    data: np.memmap | None = None


class PackedDataset:
    """Random access to the packed rows of a shard folder.

    ``ds[i]`` is row ``i`` as an ``(seq_len,)`` int64 array, counting across shards in manifest
    order. Files are memory-mapped, so opening is cheap and memory stays flat.

    Args:
        folder: a folder written by :func:`write_shard` + :func:`write_manifest`.
        verify: check each shard's sha256 when it is first touched (default ``True``).

    Raises:
        ShardError: the manifest is missing or malformed, a shard file is missing, has the wrong
            size (truncated) or, with ``verify``, the wrong sha256. The message names the file.
    """

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            m = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardError(f"{path}: no manifest; is this a deepwhale shard folder?") from None
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ShardError(f"{path}: not a {FORMAT} manifest")
        try:
            self.seq_len = int(m["seq_len"])
            self.vocab_size = int(m["vocab_size"])
            self.eos_id = int(m["eos_id"])
            self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
            records = list(m["shards"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{path}: malformed manifest ({e})") from None
        self.manifest = m
        self.verify = verify
        self._shards: list[_Shard] = []
        for r in records:
            f = self.folder / r["file"]
            want = int(r["rows"]) * self.seq_len * self.dtype.itemsize
            try:
                size = f.stat().st_size
            except OSError:
                raise ShardError(f"{f}: shard listed in the manifest is missing") from None
            if size != want:
                raise ShardError(
                    f"{f}: truncated or corrupt shard ({size} bytes, manifest says {want})"
                )
            self._shards.append(_Shard(f, int(r["rows"]), str(r["sha256"])))
        self._starts = np.cumsum([0] + [s.rows for s in self._shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def tokens(self) -> int:
        """Total tokens stored (rows × ``seq_len``)."""
        return len(self) * self.seq_len

    def _open(self, shard: _Shard) -> np.memmap:
        if shard.data is None:
            if self.verify and _sha256(shard.path) != shard.sha256:
                raise ShardError(f"{shard.path}: sha256 does not match the manifest (corrupt)")
            shard.data = np.memmap(shard.path, dtype=self.dtype, mode="r").reshape(
                shard.rows, self.seq_len
            )
        return shard.data

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        row = self._open(self._shards[k])[i - self._starts[k]]
        return row.astype(np.int64)  # (seq_len,)

    def verify_all(self) -> None:
        """Hash every shard now (rather than on first touch).

        Raises:
            ShardError: a shard's sha256 differs from its record.
        """
        for s in self._shards:
            if _sha256(s.path) != s.sha256:
                raise ShardError(f"{s.path}: sha256 does not match the manifest (corrupt)")
