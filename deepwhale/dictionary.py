"""Domain dictionaries: one file format (YAML or CSV) of terms with synonyms, a preferred form,
a translation and a category, and the checks ``deepwhale dict check FILE`` runs on it.

YAML (a list of entries, or a mapping with an ``entries`` list)::

    entries:
      - term: 市盈率
        synonyms: [本益比, P/E ratio, PE ratio]
        preferred: 市盈率          # optional: defaults to the term
        translation: price-to-earnings ratio
        category: valuation

CSV (header row required; synonyms separated by ``|``)::

    term,synonyms,preferred,translation,category
    心肌梗死,心梗|心肌梗塞|MI,心肌梗死,myocardial infarction,cardiology

Fields: ``term`` and ``category`` must not be empty; ``preferred`` defaults to ``term``;
``translation`` is optional; an empty synonym is an error. A surface form is the term, its
preferred form or a synonym; forms are compared case-insensitively (``str.casefold``).

Problems found (each with ``file:line``), errors unless noted:

* ``empty``: an empty term, category or synonym, or a row with the wrong number of columns;
* ``duplicate``: two entries with the same term;
* ``conflict``: a synonym of one entry is the term or preferred form of another;
* ``shared_synonym``: one synonym listed under two entries;
* ``redundant`` (warning): a synonym equal to its own entry's term or preferred form, or listed
  twice in one entry.

Imports only the standard library (and PyYAML for ``.yaml`` files), so the data pipeline's
workers and ``deepwhale dict check`` stay light.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Dictionary",
    "DictionaryError",
    "Entry",
    "Problem",
    "check_dictionary",
    "load_dictionary",
    "parse_dictionary",
]

FIELDS = ("term", "synonyms", "preferred", "translation", "category")
CSV_SYNONYM_SEP = "|"


class DictionaryError(ValueError):
    """A dictionary file that cannot be read or has errors; ``problems`` lists them."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check_dictionary`.

    Attributes:
        file: the dictionary file.
        line: 1-based line of the entry (0 when the whole file is at fault).
        level: ``error`` or ``warning``.
        kind: ``empty``, ``duplicate``, ``conflict``, ``shared_synonym``, ``redundant``,
            ``format``.
        message: what is wrong, naming the other entry's line where there is one.
    """

    file: str
    line: int
    level: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.level}: {self.message} [{self.kind}]"


@dataclass(frozen=True)
class Entry:
    """One dictionary entry.

    Attributes:
        term: the headword.
        synonyms: other surface forms that mean the same.
        preferred: the form text should use (defaults to ``term``).
        translation: the term in the other language ('' when absent).
        category: the domain category (``valuation``, ``cardiology``...).
        line: 1-based line of the entry in its file.
    """

    term: str
    synonyms: tuple[str, ...]
    preferred: str
    translation: str
    category: str
    line: int = 0

    @property
    def forms(self) -> tuple[str, ...]:
        """Every surface form: the term, the preferred form, the synonyms (no repeats)."""
        return tuple(dict.fromkeys((self.term, self.preferred, *self.synonyms)))


@dataclass(frozen=True)
class Dictionary:
    """A checked dictionary: entries in file order.

    Attributes:
        entries: the entries.
        path: the file it came from ('' when parsed from a string).
    """

    entries: tuple[Entry, ...]
    path: str = ""

    def rewrites(self) -> dict[str, str]:
        """``{surface form: preferred form}`` for every form that differs from its preferred
        one (what the ``normalize_terms`` stage rewrites)."""
        return {f: e.preferred for e in self.entries for f in e.forms if f != e.preferred}

    def forms(self) -> list[str]:
        """Every surface form of every entry (terms, preferred forms, synonyms), in file
        order, without repeats: the words jieba must not split and augmentation must not
        replace."""
        return list(dict.fromkeys(f for e in self.entries for f in e.forms))

    def tokens(self) -> list[str]:
        """The terms and preferred forms, in file order, without repeats: what ``deepwhale
        tokenizer extend`` adds to a vocabulary."""
        return list(dict.fromkeys(f for e in self.entries for f in (e.term, e.preferred)))

    def categories(self) -> list[str]:
        """The categories, in file order, without repeats."""
        return list(dict.fromkeys(e.category for e in self.entries))


def _key(form: str) -> str:
    return form.strip().casefold()


# --------------------------------------------------------------------------- reading


def _yaml_entries(text: str, file: str) -> list[tuple[int, object]]:
    """``[(line, raw entry)]`` of a YAML dictionary (lines from the YAML node marks)."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise DictionaryError(
            f"{file}:{line}: malformed YAML: {getattr(e, 'problem', None) or e}",
            [Problem(file, line, "error", "format", "malformed YAML")],
        ) from None
    if root is None:
        return []
    loader = yaml.SafeLoader("")
    if isinstance(root, yaml.MappingNode):
        items = {loader.construct_object(k): v for k, v in root.value}
        if set(items) - {"entries", "name", "description"} or "entries" not in items:
            raise _format(file, root.start_mark.line + 1, "expected a list or {entries: [...]}")
        root = items["entries"]
    if not isinstance(root, yaml.SequenceNode):
        raise _format(file, root.start_mark.line + 1, "expected a list of entries")
    return [(n.start_mark.line + 1, loader.construct_object(n, deep=True)) for n in root.value]


def _format(file: str, line: int, message: str) -> DictionaryError:
    return DictionaryError(
        f"{file}:{line}: {message}", [Problem(file, line, "error", "format", message)]
    )


def _csv_entries(text: str, file: str) -> list[tuple[int, object]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return []
    header = [h.strip().lower() for h in header]
    if "term" not in header or set(header) - set(FIELDS):
        raise _format(file, 1, f"CSV header must name columns of {', '.join(FIELDS)}; got {header}")
    out: list[tuple[int, object]] = []
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        line = reader.line_num
        if len(row) != len(header):
            out.append((line, f"{len(row)} columns, the header has {len(header)}"))
            continue
        raw = dict(zip(header, row, strict=True))
        syn = raw.get("synonyms", "")
        raw["synonyms"] = [s for s in syn.split(CSV_SYNONYM_SEP)] if syn.strip() else []
        out.append((line, raw))
    return out


def _entry(raw: object, line: int, file: str, problems: list[Problem]) -> Entry | None:
    def bad(message: str) -> None:
        problems.append(Problem(file, line, "error", "empty", message))

    if isinstance(raw, str):
        bad(raw)
        return None
    if not isinstance(raw, dict):
        bad(f"an entry must be a mapping with {', '.join(FIELDS)}, got {raw!r}")
        return None
    unknown = set(raw) - set(FIELDS)
    if unknown:
        problems.append(
            Problem(
                file,
                line,
                "error",
                "format",
                f"unknown field(s) {sorted(unknown)}; valid: {FIELDS}",
            )
        )
    text = {k: "" if raw.get(k) is None else str(raw.get(k)).strip() for k in FIELDS}
    synonyms = raw.get("synonyms") or []
    if isinstance(synonyms, str):
        synonyms = [synonyms]
    if not isinstance(synonyms, list):
        bad(f"synonyms must be a list, got {synonyms!r}")
        synonyms = []
    syn = [("" if s is None else str(s)).strip() for s in synonyms]
    ok = True
    for name in ("term", "category"):
        if not text[name]:
            bad(f"empty {name}")
            ok = False
    if any(not s for s in syn):
        bad(f"empty synonym in {text['term'] or 'this entry'!r}")
        syn = [s for s in syn if s]
    if not ok:
        return None
    return Entry(
        text["term"],
        tuple(syn),
        text["preferred"] or text["term"],
        text["translation"],
        text["category"],
        line,
    )


def _cross_check(entries: list[Entry], file: str, problems: list[Problem]) -> None:
    heads: dict[str, Entry] = {}  # term / preferred form -> entry
    terms: dict[str, Entry] = {}
    for e in entries:
        first = terms.get(_key(e.term))
        if first is not None:
            problems.append(
                Problem(
                    file,
                    e.line,
                    "error",
                    "duplicate",
                    f"term {e.term!r} is already an entry at line {first.line}",
                )
            )
            continue
        terms[_key(e.term)] = e
        for head in (e.term, e.preferred):
            heads.setdefault(_key(head), e)
    owner: dict[str, Entry] = {}
    for e in entries:
        if terms.get(_key(e.term)) is not e:
            continue
        own = {_key(e.term), _key(e.preferred)}
        seen: set[str] = set()
        for s in e.synonyms:
            k = _key(s)
            if k in own or k in seen:
                problems.append(
                    Problem(
                        file,
                        e.line,
                        "warning",
                        "redundant",
                        f"synonym {s!r} of {e.term!r} repeats the entry's own form",
                    )
                )
                continue
            seen.add(k)
            other = heads.get(k)
            if other is not None and other is not e:
                problems.append(
                    Problem(
                        file,
                        e.line,
                        "error",
                        "conflict",
                        f"synonym {s!r} of {e.term!r} is the term or preferred form of "
                        f"{other.term!r} (line {other.line})",
                    )
                )
                continue
            prev = owner.get(k)
            if prev is not None:
                problems.append(
                    Problem(
                        file,
                        e.line,
                        "error",
                        "shared_synonym",
                        f"synonym {s!r} of {e.term!r} is also a synonym of {prev.term!r} "
                        f"(line {prev.line})",
                    )
                )
                continue
            owner[k] = e


def parse_dictionary(text: str, fmt: str, file: str = "<string>") -> tuple[Dictionary, list]:
    """Parse and check a dictionary's text.

    Args:
        text: the file's text.
        fmt: ``yaml`` or ``csv``.
        file: the name problems report.

    Returns:
        ``(dictionary of the well-formed entries, [Problem, ...] sorted by line)``.

    Raises:
        DictionaryError: malformed YAML/CSV header or an unknown ``fmt`` (the file is unusable).
    """
    if fmt == "yaml":
        raws = _yaml_entries(text, file)
    elif fmt == "csv":
        raws = _csv_entries(text, file)
    else:
        raise DictionaryError(f"{file}: unknown dictionary format {fmt!r}; use yaml or csv")
    problems: list[Problem] = []
    entries = [e for line, raw in raws if (e := _entry(raw, line, file, problems)) is not None]
    _cross_check(entries, file, problems)
    problems.sort(key=lambda p: (p.line, p.level != "error"))
    return Dictionary(tuple(entries), file), problems


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".csv":
        return "csv"
    raise DictionaryError(f"{path}: a dictionary is a .yaml, .yml or .csv file")


def check_dictionary(path: str | Path) -> tuple[Dictionary, list[Problem]]:
    """Read and check a dictionary file (format from the suffix: ``.yaml``/``.yml``/``.csv``).

    Returns ``(dictionary, problems)``; see the module docstring for the checks.

    Raises:
        DictionaryError: the file is missing, unreadable, not UTF-8, of an unknown suffix, or
            malformed YAML/CSV.
    """
    p = Path(path)
    fmt = _format_of(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DictionaryError(f"{p}: cannot read dictionary ({e})") from None
    return parse_dictionary(text, fmt, str(p))


def load_dictionary(path: str | Path) -> Dictionary:
    """Read a dictionary file and refuse it if :func:`check_dictionary` finds an error
    (warnings pass).

    Raises:
        DictionaryError: as :func:`check_dictionary`, or the file has errors (the message
            lists the first ones as ``file:line: error: ...``; ``problems`` holds them all).
    """
    d, problems = check_dictionary(path)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        shown = "\n".join(map(str, errors[:5]))
        more = f"\n... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DictionaryError(
            f"{path}: {len(errors)} error(s) in the dictionary:\n{shown}{more}", errors
        )
    return d
