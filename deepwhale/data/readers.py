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

from deepwhale.data.config import InputSpec, PipelineConfigError
from deepwhale.data.metrics import CountingDoFn, counter

log = logging.getLogger(__name__)
NS = "deepwhale.data.read"

# A chapter heading of a classical novel: 第一回 / 第120回 / 第三章 at a line start, followed by
# whitespace and a title. Body lines that merely mention 第…回 do not match (no title gap).
_CHAPTER = re.compile(r"^[ \t\u3000]*第[一二三四五六七八九十百千零〇两0-9０-９]+[回章][ \t\u3000]")
_BLANK_BLOCK = re.compile(r"\n[ \t\u3000]*\n")


# Lone surrogates U+DC80..U+DCFF: what ``errors="surrogateescape"`` makes of undecodable bytes.
# Valid UTF-8 never decodes to a surrogate, so a document holding one came from bad bytes.
_ESCAPED = re.compile("[\udc80-\udcff]")


def decode(data: bytes, errors: str = "replace") -> str:
    """UTF-8 text with a leading BOM removed and CRLF / CR line ends turned into LF.

    Args:
        data: the file's bytes.
        errors: Python codec error handler for invalid UTF-8: ``replace`` (U+FFFD) or
            ``surrogateescape`` (lone surrogates, which :func:`undecodable` detects; what
            :class:`ParseFile` uses so that such documents are counted and dropped).
    """
    text = data.decode("utf-8-sig", errors=errors)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def undecodable(text: str) -> bool:
    """True if ``text`` holds bytes that were not valid UTF-8 (decoded with
    ``errors="surrogateescape"``, e.g. a GBK or Latin-1 file read as UTF-8)."""
    return _ESCAPED.search(text) is not None


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


def parse_pairs(
    text: str, pairs_per_doc: int = 1, report_malformed: bool = False
) -> Iterator[tuple[int, str] | str]:
    """Tab-separated parallel sentences (Tatoeba ``cmn.txt``: ``en<TAB>zh<TAB>attribution``).

    Each pair becomes ``"en\\nzh"``; ``pairs_per_doc`` consecutive pairs are joined by a blank
    line into one document. Blank lines are skipped, and so is a malformed line (no tab, or an
    empty first column).

    Yields:
        ``(index, text)`` per document and, with ``report_malformed``, the string
        ``"malformed_pair"`` for each malformed line (the caller counts it).
    """
    group: list[str] = []
    i = 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip():
            if report_malformed:
                yield "malformed_pair"
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


class ParseFile(CountingDoFn):
    """``ReadableFile`` -> documents, in the format of one :class:`InputSpec`.

    Counters (namespace ``deepwhale.data.read``): ``files``, ``docs``, ``corrupt_lines``,
    ``missing_field``, ``malformed_pair`` (a ``pairs`` line without a tab) and
    ``decode_error``: documents (lines, blocks, chapters, JSONL records...) holding bytes that
    are not valid UTF-8, e.g. a GBK or Latin-1 file. They are dropped, not passed on as U+FFFD
    garbage, and the file is named in a warning; re-encode such a file to UTF-8
    (``iconv -f gbk -t utf-8``) to keep its text.
    """

    def __init__(self, spec: InputSpec):
        self.spec = spec
        self.files = counter(NS, "files")
        self.docs = counter(NS, "docs")
        self.corrupt = counter(NS, "corrupt_lines")
        self.missing = counter(NS, "missing_field")
        self.malformed = counter(NS, "malformed_pair")
        self.bad_bytes = counter(NS, "decode_error")

    def process(self, readable) -> Iterator[dict]:
        path = readable.metadata.path
        text = decode(readable.read(), errors="surrogateescape")
        self.files.inc()
        fmt = self.spec.format
        if fmt == "novel":
            items = parse_novel(text)
        elif fmt == "poetry":
            items = parse_poetry(text, path)
        elif fmt == "pairs":
            items = parse_pairs(text, self.spec.pairs_per_doc, report_malformed=True)
        elif fmt == "jsonl":
            items = parse_jsonl(text, self.spec.field, path)
        else:
            items = parse_text(text, self.spec.split, self.spec.separator)
        bad = 0
        for item in items:
            if item == "corrupt":
                self.corrupt.inc()
            elif item == "missing_field":
                self.missing.inc()
            elif item == "malformed_pair":
                self.malformed.inc()
            elif undecodable(item[1]):
                bad += 1
            else:
                self.docs.inc()
                yield make_doc(path, *item)
        if bad:
            self.bad_bytes.inc(bad)
            log.warning("%s: %d document(s) with invalid UTF-8 dropped (decode_error)", path, bad)


def file_pattern(path: str) -> str:
    """A glob for ``path``: a folder becomes ``folder/*``; files and globs pass through."""
    return os.path.join(path, "*") if os.path.isdir(path) else path


class _ParquetRows(CountingDoFn):
    def __init__(self, field: str):
        self.field = field
        self.docs = counter(NS, "docs")
        self.missing = counter(NS, "missing_field")

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


def _check_parquet(path: str) -> None:
    """Raise :class:`PipelineConfigError` naming ``path`` unless it starts with ``PAR1``."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PipelineConfigError(f"input {path}: cannot read ({e.strerror or e})") from None
    if magic != b"PAR1":
        raise PipelineConfigError(
            f"input {path}: not a Parquet file (no PAR1 magic bytes); check --format"
        )


class ReadDocuments(beam.PTransform):
    """Beam source for one :class:`InputSpec`: a PCollection of document dicts.

    Raises (at construction):
        PipelineConfigError: the pattern matches no file, or (``parquet``) a matched file does
            not start with the Parquet magic bytes (the file is named).
    """

    def __init__(self, spec: InputSpec, check_exists: bool = True):
        super().__init__()
        self.spec = spec
        if check_exists:
            import glob

            files = glob.glob(file_pattern(spec.path))
            if not files:
                raise PipelineConfigError(f"input {spec.path!r}: no file matches")
            if spec.format == "parquet":
                for f in sorted(files):
                    _check_parquet(f)

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
