"""Cleaning and language tagging: documents in, documents out.

``clean_text`` repairs and normalises one string; :class:`Clean` and :class:`LangId` are the
Beam DoFns (state such as the OpenCC converter and the lingua detector is built once per DoFn
instance in ``setup``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

from deepwhale.data.config import CleanParams, LangIdParams, PipelineConfigError
from deepwhale.data.metrics import CountingDoFn, StageCounters

# C0/C1 controls except \t and \n, plus BOM / zero-width space / word joiner / soft hyphen and
# bidi overrides (format characters that carry no text).
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff\u202a-\u202e\u2066-\u2069\ufffe]"
)
_TRAILING_WS = re.compile(r"[ \t\u3000]+\n")
_MANY_BLANKS = re.compile(r"\n{3,}")
_BLANK_LINES = re.compile(r"\n[ \t\u3000]+\n")


def clean_text(text: str, fix_unicode: bool = True, nfkc: bool = True, converter=None) -> str:
    """Repair and normalise ``text``.

    Steps: CRLF/CR -> LF; ftfy ``fix_text`` (mojibake, HTML entities left alone); NFKC;
    control and invisible format characters removed (``\\n`` and ``\\t`` kept); trailing
    whitespace on lines removed; whitespace-only lines emptied and runs of blank lines cut to
    one; optional ``converter.convert`` (OpenCC); leading/trailing whitespace stripped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if fix_unicode:
        import ftfy

        text = ftfy.fix_text(text, normalization="NFKC" if nfkc else "NFC", unescape_html=False)
    elif nfkc:
        text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    text = _TRAILING_WS.sub("\n", text)
    text = _MANY_BLANKS.sub("\n\n", text)
    if converter is not None:
        text = converter.convert(text)
    return text.strip()


class Clean(CountingDoFn):
    """Beam DoFn: :func:`clean_text` each document; drop the ones that end up shorter than
    ``min_chars`` (reason ``empty``). Counters under ``deepwhale.data.clean``.
    """

    def __init__(self, params: CleanParams, stage: str = "clean"):
        self.params = params
        self.counters = StageCounters(stage)
        self._cc = None

    def setup(self):
        if self.params.t2s:
            import opencc

            self._cc = opencc.OpenCC("t2s")

    def process(self, doc: dict) -> Iterator[dict]:
        self.counters.seen.inc()
        text = clean_text(doc["text"], self.params.ftfy, self.params.nfkc, self._cc)
        if len(text) < self.params.min_chars:
            self.counters.drop("empty")
            return
        self.counters.kept.inc()
        yield {**doc, "text": text}


def build_detector(codes: list[str]):
    """A lingua detector restricted to ISO 639-1 ``codes`` (models are in the wheel).

    Raises:
        PipelineConfigError: an unknown code (names it).
    """
    import lingua

    langs = []
    for code in codes:
        try:
            langs.append(getattr(lingua.IsoCode639_1, str(code).upper()))
        except AttributeError:
            raise PipelineConfigError(f"langid: unknown ISO 639-1 code {code!r}") from None
    if len(langs) < 2:
        raise PipelineConfigError("langid.languages needs at least two languages")
    return lingua.LanguageDetectorBuilder.from_iso_codes_639_1(*langs).build()


class LangId(CountingDoFn):
    """Beam DoFn: tag ``doc["lang"]`` (ISO 639-1, ``"unknown"`` when undecided) with lingua and,
    if ``keep`` is set, drop other languages (reason ``lang_<code>``).
    """

    def __init__(self, params: LangIdParams, stage: str = "langid"):
        self.params = params
        self.counters = StageCounters(stage)
        self._det = None

    def setup(self):
        self._det = build_detector(self.params.languages)

    def process(self, doc: dict) -> Iterator[dict]:
        self.counters.seen.inc()
        lang = self._det.detect_language_of(doc["text"][: self.params.max_chars])
        code = lang.iso_code_639_1.name.lower() if lang is not None else "unknown"
        self.counters.count(f"lang.{code}")  # the language mix (report, live monitor)
        if self.params.keep is not None and code not in self.params.keep:
            self.counters.drop(f"lang_{code}")
            return
        self.counters.kept.inc()
        yield {**doc, "lang": code}
