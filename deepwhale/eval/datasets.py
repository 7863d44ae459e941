"""Read a task's documents from local files (no network, no ``datasets`` dependency).

Readers, by the task's ``dataset_path``:

* ``json``: a JSON array of objects, or JSON Lines (one object per line), as HF ``datasets``'
  ``json`` builder reads them; ``.gz`` / ``.bz2`` files are decompressed.
* ``hellaswag_text``: llama.cpp's HellaSwag text layout (6 lines per item: ``activity_label:
  ctx``, gold label, 4 endings; klosax/hellaswag_text_data). Each item becomes a document in
  the HF ``hellaswag`` schema (``activity_label``, ``ctx_a``, ``ctx_b`` = ``""``, ``ctx``,
  ``endings``, ``label`` as a string), so lm-eval's own ``process_docs`` applies to it.
* ``csv``: a CSV file with a header row (stdlib ``csv``, RFC 4180 quoting), every cell a
  string, a UTF-8 BOM dropped; an unnamed first column (CMMLU's row index) keeps the key ``""``.
  HF ``datasets``' ``csv`` builder goes through pandas, which would turn numeric-looking cells
  into numbers; here ``"0.50"`` stays ``"0.50"`` (as in the C-Eval / CMMLU Hub parquet files).
* ``text``: the whole file is one document ``{"text": ...}`` (for ``ppl:FILE``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from pathlib import Path


class DataError(ValueError):
    """A data file is missing or malformed (the message names the file)."""


def read_text(path: Path) -> str:
    """UTF-8 text of ``path``, decompressing ``.gz`` / ``.bz2``.

    Raises:
        DataError: the file is missing or not UTF-8.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text: {e}") from e


def read_json_docs(path: Path) -> list[dict]:
    """Documents of a JSON array or JSON Lines file.

    Raises:
        DataError: missing file, invalid JSON (names the line), or items that are not objects.
    """
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            docs = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e}") from e
    else:
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON line: {e}") from e
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: item {bad} is {type(docs[bad]).__name__}, not an object")
    return docs


def read_hellaswag_text(path: Path) -> list[dict]:
    """HellaSwag items from llama.cpp's 6-line text layout, in the HF ``hellaswag`` schema.

    Raises:
        DataError: missing file, a line count not divisible by 6, or a label not in 0-3.
    """
    lines = read_text(path).split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines, not a multiple of 6 (one item = 6 lines)")
    docs = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{i + 2}: label {label!r} is not 0-3")
        activity, sep, ctx = head.partition(": ")
        if not sep:
            activity, ctx = "", head
        docs.append(
            {
                "ind": i // 6,
                "activity_label": activity,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "label": label.strip(),
            }
        )
    return docs


def read_csv_docs(path: Path) -> list[dict]:
    """Documents of a CSV file with a header row, one per data row, every value a string.

    Raises:
        DataError: missing file, no header, or a row whose field count differs from the
            header's (names the line).
    """
    text = read_text(path).removeprefix("\ufeff")
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if not header:
        raise DataError(f"{path}: empty CSV file (a header row is needed)")
    docs = []
    for row in rows:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}:{rows.line_num}: {len(row)} fields, the header has {len(header)}"
            )
        docs.append(dict(zip(header, row, strict=True)))
    return docs


READERS = {
    "csv": read_csv_docs,
    "json": read_json_docs,
    "hellaswag_text": read_hellaswag_text,
    "text": lambda path: [{"text": read_text(path)}],
}
