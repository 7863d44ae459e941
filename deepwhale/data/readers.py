"""Readers: files in, documents out.

A document is a plain dict ``{"id": str, "text": str, "source": str}`` (later stages add
``lang`` and ``ppl``). Ids are ``"<path>#<index:07d>"``, so sorting ids sorts by file, then by
position, and every run assigns the same ids (dedup keeps the smallest id of a cluster).

The parse functions are pure (bytes in, ``(index, text)`` out) and are wrapped by
:class:`ReadDocuments`, a Beam transform: ``MatchFiles -> ReadMatches -> ParDo(parse)``, or
``ReadAllFromParquet`` for Parquet. Each file is parsed whole (the corpora here are a few MB;
the formats that need it, JSON and chapter splitting, cannot be split mid-file anyway).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from deepwhale.data.config import InputSpec, PipelineConfigError

log = logging.getLogger(__name__)
NS = "deepwhale.data.read"

# A chapter heading of a classical novel: 第一回 / 第120回 / 第三章 at a line start, followed by
# whitespace and a title. Body lines that merely mention 第…回 do not match (no title gap).
_CHAPTER = re.compile(r"^[ \t\u3000]*第[一二三四五六七八九十百千零〇两0-9０-９]+[回章][ \t\u3000]")
_BLANK_BLOCK = re.compile(r"\n[ \t\u3000]*\n")


def decode(data: bytes) -> str:
    """UTF-8 text with a leading BOM removed and CRLF / CR line ends turned into LF.

    Invalid UTF-8 becomes U+FFFD (counted as garbage later rather than crashing a read).
    """
    text = data.decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_text(
    text: str, split: str = "line", separator: str | None = None
) -> Iterator[tuple[int, str]]:
    """Documents of a plain-text file: one per non-empty line, per blank-line block, per
    ``separator``-delimited part (when given, e.g. TinyStories' ``<|endoftext|>``), or the file.

    Yields:
        ``(index, text)`` with ``index`` counting the yielded documents.
    """
    if separator:
        parts = text.split(separator)
    elif split == "document":
        parts = [text]
    elif split == "block":
        parts = _BLANK_BLOCK.split(text)
    else:
        parts = text.split("\n")
    i = 0
    for part in parts:
        if part.strip():
            yield i, part.strip("\n")
            i += 1


def parse_novel(text: str) -> Iterator[tuple[int, str]]:
    """One document per chapter (heading ``第…回`` included); the preamble before the first
    chapter is its own document. A file without chapter headings falls back to blank-line
    blocks.
    """
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if len(line) < 80 and _CHAPTER.match(line)]
    if not starts:
        yield from parse_text(text, "block")
        return
    bounds = ([0] if starts[0] > 0 else []) + starts + [len(lines)]
    i = 0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = "\n".join(lines[a:b]).strip()
        if chunk:
            yield i, chunk
            i += 1


def parse_poetry(text: str, path: str = "") -> Iterator[tuple[int, str]]:
    """One document per item of a chinese-poetry JSON list: title, author (or chapter), then the
    ``paragraphs`` lines.

    Raises:
        ValueError: the file is not a JSON list of objects with ``paragraphs`` (names ``path``).
    """
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of poems")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("paragraphs"), list):
            raise ValueError(f"{path}: item {i} has no 'paragraphs' list")
        head = [str(item[k]) for k in ("title", "chapter", "rhythmic", "author") if item.get(k)]
        yield i, "\n".join(head + [str(p) for p in item["paragraphs"]])


def parse_pairs(text: str, pairs_per_doc: int = 1) -> Iterator[tuple[int, str]]:
    """Tab-separated parallel sentences (Tatoeba ``cmn.txt``: ``en<TAB>zh<TAB>attribution``).

    Each pair becomes ``"en\\nzh"``; ``pairs_per_doc`` consecutive pairs are joined by a blank
    line into one document. Lines with fewer than two columns are skipped.
    """
    group: list[str] = []
    i = 0
    for line in text.split("\n"):
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip():
            continue
        group.append(f"{cols[0].strip()}\n{cols[1].strip()}")
        if len(group) == pairs_per_doc:
            yield i, "\n\n".join(group)
            group, i = [], i + 1
    if group:
        yield i, "\n\n".join(group)


def parse_jsonl(text: str, field: str, path: str = "") -> Iterator[tuple[int, str] | str]:
    """Documents of a JSONL file: ``obj[field]`` of each line (index = line number - 1).

    Yields:
        ``(index, text)`` for good lines and a string ``"corrupt"`` / ``"missing_field"`` for a
        line that is not a JSON object or lacks a string ``field`` (the caller counts it).
    """
    for n, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: corrupt JSON line skipped", path, n + 1)
            yield "corrupt"
            continue
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            log.warning("%s:%d: no string field %r; line skipped", path, n + 1, field)
            yield "missing_field"
            continue
        yield n, value


def make_doc(path: str, index: int, text: str) -> dict:
    """The document dict with its deterministic id ``"<path>#<index:07d>"``."""
    return {"id": f"{path}#{index:07d}", "text": text, "source": path}


class ParseFile(beam.DoFn):
    """``ReadableFile`` -> documents, in the format of one :class:`InputSpec`.

    Counters (namespace ``deepwhale.data.read``): ``files``, ``docs``, ``corrupt_lines``,
    ``missing_field``.
    """

    def __init__(self, spec: InputSpec):
        self.spec = spec
        self.files = Metrics.counter(NS, "files")
        self.docs = Metrics.counter(NS, "docs")
        self.corrupt = Metrics.counter(NS, "corrupt_lines")
        self.missing = Metrics.counter(NS, "missing_field")

    def process(self, readable) -> Iterator[dict]:
        path = readable.metadata.path
        text = decode(readable.read())
        self.files.inc()
        fmt = self.spec.format
        if fmt == "novel":
            items = parse_novel(text)
        elif fmt == "poetry":
            items = parse_poetry(text, path)
        elif fmt == "pairs":
            items = parse_pairs(text, self.spec.pairs_per_doc)
        elif fmt == "jsonl":
            items = parse_jsonl(text, self.spec.field, path)
        else:
            items = parse_text(text, self.spec.split, self.spec.separator)
        for item in items:
            if item == "corrupt":
                self.corrupt.inc()
            elif item == "missing_field":
                self.missing.inc()
            else:
                self.docs.inc()
                yield make_doc(path, *item)


def file_pattern(path: str) -> str:
    """A glob for ``path``: a folder becomes ``folder/*``; files and globs pass through."""
    return os.path.join(path, "*") if os.path.isdir(path) else path


class _ParquetRows(beam.DoFn):
    def __init__(self, field: str):
        self.field = field
        self.docs = Metrics.counter(NS, "docs")
        self.missing = Metrics.counter(NS, "missing_field")

    def process(self, item) -> Iterator[dict]:
        import hashlib

        path, row = item
        text = row.get(self.field)
        if not isinstance(text, str):
            self.missing.inc()
            return
        self.docs.inc()
        # Row numbers are not known in a split read; a content hash keeps ids deterministic.
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
        yield {"id": f"{path}#h{digest}", "text": text, "source": path}


class ReadDocuments(beam.PTransform):
    """Beam source for one :class:`InputSpec`: a PCollection of document dicts.

    Raises (at construction):
        PipelineConfigError: the pattern matches no file.
    """

    def __init__(self, spec: InputSpec, check_exists: bool = True):
        super().__init__()
        self.spec = spec
        if check_exists:
            import glob

            if not glob.glob(file_pattern(spec.path)):
                raise PipelineConfigError(f"input {spec.path!r}: no file matches")

    def expand(self, pbegin):
        pattern = file_pattern(self.spec.path)
        if self.spec.format == "parquet":
            from apache_beam.io import parquetio

            return (
                pbegin
                | "Pattern" >> beam.Create([pattern])
                | "ReadParquet"
                >> parquetio.ReadAllFromParquet(columns=[self.spec.field], with_filename=True)
                | "ToDocs" >> beam.ParDo(_ParquetRows(self.spec.field))
            )
        from apache_beam.io import fileio

        return (
            pbegin
            | "Match" >> fileio.MatchFiles(pattern)
            | "Open" >> fileio.ReadMatches()
            | "Parse" >> beam.ParDo(ParseFile(self.spec))
        )
