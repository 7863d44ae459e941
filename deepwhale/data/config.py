"""The pipeline's configuration: a YAML file (or the same settings as CLI flags) parsed into
typed dataclasses, with an error that names the bad key for every mistake.

Schema (every key optional except ``input``; see ``examples/data/pipeline.yaml``)::

    input:                       # one source or a list of them
      - path: corpus/zh/novels/*.txt   # a file, a glob or a folder (all files in it)
        format: novel            # text | jsonl | parquet | novel | poetry | pairs
        split: line              # text only: line | block | document
        separator: null          # text only: split on this string instead (<|endoftext|>)
        field: text              # jsonl / parquet: the text field
        pairs_per_doc: 1         # pairs only: consecutive sentence pairs per document
    output: out/run1             # folder: shards/, docs/, report.json, perplexity_hist.png
    mode: batch                  # batch | streaming
    streaming: {interval_s: 1.0, duration_s: 60.0, window_s: 10.0}
    runner: FnApiRunner          # any Beam runner name; default is the in-process one
    options: {direct_num_workers: 2, direct_running_mode: multi_processing}
    write_docs: false            # also write the final documents as docs/*.jsonl with tokenize
    dictionary: examples/dicts/finance.yaml  # domain dictionary (deepwhale/dictionary.py): quality's
                                 # jieba user words, augment's protected terms, normalize_terms
    stages:                      # applied in order; each a one-key mapping {name: params}
      - clean: {t2s: true}
      - langid: {keep: [zh, en]}
      - normalize_terms: {}      # synonyms -> preferred form (the dictionary above)
      - exact_dedup: {}
      - minhash_dedup: {threshold: 0.8}
      - quality: {min_chars: 50}
      - perplexity: {keep_percentile: 95}
      - augment: {strategies: [{name: random_swap, rate: 0.1}], seed: 0}
      - tokenize: {seq_len: 256, num_shards: 4}

Stage parameters are the fields of the ``*Params`` dataclasses below; their docstrings are the
reference. The stages themselves (parameters, checks, Beam transforms) are registered in
:mod:`deepwhale.data.stages`, which plugins extend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepwhale.data.alerts import validate_alerts
from deepwhale.typed_config import ConfigError, Loader

FORMATS = ("text", "jsonl", "parquet", "novel", "poetry", "pairs")
TEXT_SPLITS = ("line", "block", "document")
MODES = ("batch", "streaming")
DEFAULT_RUNNER = "FnApiRunner"  # in-process: never downloads Prism (see PLATFORM.md)


class PipelineConfigError(ConfigError):
    """A malformed pipeline config: the message names the file, stage or key at fault."""


#: the typed loader of the pipeline's sections: YAML types are kept (``"yes"`` is no bool),
#: errors are :class:`PipelineConfigError`; stages' parameter dataclasses use its checks
LOADER = Loader(
    error=PipelineConfigError,
    strict=True,
    unknown_key="{where}: unknown parameter {name!r}; valid: {valid}",
    not_mapping="{where}: parameters must be a mapping, got {value!r}",
    none_is_empty=True,
)


@dataclass
class InputSpec:
    """One source of documents.

    Attributes:
        path: a file, a glob (``*.txt``) or a folder (every file directly in it).
        format: ``text`` (one doc per line / blank-line block / file), ``jsonl`` (one JSON object
            per line, text in ``field``), ``parquet`` (column ``field``), ``novel`` (CRLF/BOM
            plain-text novel, one document per chapter ``第…回``), ``poetry`` (chinese-poetry JSON
            list, one poem per doc), ``pairs`` (tab-separated ``en<TAB>zh<TAB>...`` lines).
        split: for ``text``: ``line``, ``block`` (blank-line separated) or ``document``.
        separator: for ``text``: split on this string instead (e.g. ``<|endoftext|>``).
        field: for ``jsonl`` and ``parquet``: the field holding the text.
        pairs_per_doc: for ``pairs``: how many consecutive pairs make one document.
    """

    path: str
    format: str = "text"
    split: str = "line"
    separator: str | None = None
    field: str = "text"
    pairs_per_doc: int = 1

    def __post_init__(self):
        if self.format not in FORMATS:
            raise PipelineConfigError(
                f"input {self.path!r}: unknown format {self.format!r}; use one of {FORMATS}"
            )
        if self.split not in TEXT_SPLITS:
            raise PipelineConfigError(
                f"input {self.path!r}: unknown split {self.split!r}; use one of {TEXT_SPLITS}"
            )
        if self.pairs_per_doc < 1:
            raise PipelineConfigError(f"input {self.path!r}: pairs_per_doc must be >= 1")


@dataclass
class CleanParams:
    """Unicode repair and normalisation (always: BOM removal, CRLF/CR -> LF, control characters
    other than ``\\n``/``\\t`` removed, trailing spaces and runs of blank lines collapsed).

    Attributes:
        ftfy: repair mojibake with ftfy (``fix_text``).
        nfkc: Unicode NFKC (full-width Latin/digits/punctuation become ASCII).
        t2s: Traditional -> Simplified Chinese with OpenCC (``t2s``).
        min_chars: drop documents shorter than this after cleaning (reason ``empty``).
    """

    ftfy: bool = True
    nfkc: bool = True
    t2s: bool = False
    min_chars: int = 1

    def __post_init__(self):
        LOADER.check_range("clean.min_chars", self.min_chars, 0)


@dataclass
class LangIdParams:
    """Language tagging with lingua (models ship in the wheel; nothing is downloaded).

    Attributes:
        languages: ISO 639-1 codes the detector chooses among (fewer = faster).
        keep: if set, drop documents whose language is not listed (reason ``lang_<code>``).
        max_chars: characters of each document looked at (a prefix; bounds the cost).
    """

    languages: list = field(default_factory=lambda: ["zh", "en", "ja", "ko", "fr", "de"])
    keep: list | None = None
    max_chars: int = 2000

    def __post_init__(self):
        LOADER.check_range("langid.max_chars", self.max_chars, 1)


@dataclass
class NormalizeTermsParams:
    """Rewrite a domain dictionary's synonyms to their preferred form
    (:mod:`deepwhale.data.terms`: Aho-Corasick, leftmost-longest, Latin word boundaries).
    Counts ``rewrites`` and ``docs_rewritten`` in the report.

    Attributes:
        dictionary: the dictionary file (default: the config's top-level ``dictionary``).
        categories: only rewrite entries of these categories (default: all).
        ignore_case: ASCII letters match case-insensitively (``pe ratio`` -> the preferred form).
    """

    dictionary: str | None = None
    categories: list | None = None
    ignore_case: bool = True

    def __post_init__(self):
        if self.dictionary is not None:
            check_dictionary_path(self.dictionary, "normalize_terms.dictionary")


def check_dictionary_path(path: Any, where: str) -> str:
    """Load the dictionary at ``path`` once to check it; returns the path as a string.

    Raises:
        PipelineConfigError: not a string, or the dictionary is unreadable or has errors (the
            message names ``where`` and the first ``file:line`` problems).
    """
    from deepwhale.dictionary import DictionaryError, load_dictionary

    if not isinstance(path, str | Path):
        raise PipelineConfigError(f"{where} must be a file path, got {path!r}")
    try:
        load_dictionary(path)
    except (DictionaryError, ImportError) as e:
        raise PipelineConfigError(f"{where}: {e}") from None
    return str(path)


@dataclass
class ExactDedupParams:
    """Exact deduplication on normalised text (casefolded, whitespace and punctuation removed).

    Attributes:
        normalize: if false, compare the raw text.
    """

    normalize: bool = True


@dataclass
class MinHashParams:
    """Near-duplicate removal with MinHash LSH (Broder 1997; bands/rows from datasketch).

    Attributes:
        threshold: estimated Jaccard similarity at or above which two documents are duplicates.
        num_perm: MinHash permutations (signature length).
        char_ngram: shingle size in characters for CJK text (more than 30% CJK characters).
        word_ngram: shingle size in words for other text.
        seed: MinHash seed (same seed, same signatures).
        max_bucket: buckets larger than this compare only against their smallest id.
    """

    threshold: float = 0.8
    num_perm: int = 128
    char_ngram: int = 5
    word_ngram: int = 3
    seed: int = 1
    max_bucket: int = 64

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise PipelineConfigError(
                f"minhash_dedup.threshold must be in (0, 1), got {self.threshold}"
            )
        if self.num_perm < 2 or self.char_ngram < 1 or self.word_ngram < 1:
            raise PipelineConfigError(
                "minhash_dedup: num_perm >= 2, char_ngram and word_ngram >= 1"
            )
        LOADER.check_range("minhash_dedup.max_bucket", self.max_bucket, 1)


@dataclass
class QualityParams:
    """Gopher (Rae et al. 2021, App. A, Table A1) and C4 (Raffel et al. 2020) heuristics, made to
    work on CJK: "words" come from jieba segmentation when the text is mostly CJK.

    Attributes:
        min_chars / max_chars: document length bounds in characters.
        min_words / max_words: bounds in words (Gopher: 50 .. 100,000 for English).
        min_mean_word_len / max_mean_word_len: Latin text, characters per word (Gopher: 3 .. 10).
        cjk_min_mean_word_len / cjk_max_mean_word_len: CJK text, characters per jieba word.
        max_symbol_ratio: share of characters that are symbols (Unicode S*, plus ``#`` and ``…``).
        max_digit_ratio: share of characters that are digits.
        min_alpha_word_frac: share of words with at least one letter (Gopher: 0.8).
        max_dup_line_frac: share of lines that repeat an earlier line (Gopher: 0.30).
        max_dup_line_char_frac: share of characters in repeated lines (Gopher: 0.20).
        max_top_ngram_frac: share of characters covered by the most frequent 2-gram (Gopher: 0.20).
        max_dup_ngram_frac: share of characters in repeated 5-grams (Gopher: 0.15).
        max_ellipsis_line_frac: share of lines ending in an ellipsis (Gopher: 0.30).
        max_lorem_ipsum: C4 drops pages containing "lorem ipsum"; 0 = any occurrence drops.
    """

    min_chars: int = 50
    max_chars: int = 1_000_000
    min_words: int = 10
    max_words: int = 200_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    cjk_min_mean_word_len: float = 1.0
    cjk_max_mean_word_len: float = 4.0
    max_symbol_ratio: float = 0.1
    max_digit_ratio: float = 0.3
    min_alpha_word_frac: float = 0.8
    max_dup_line_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_top_ngram_frac: float = 0.2
    max_dup_ngram_frac: float = 0.15
    max_ellipsis_line_frac: float = 0.3
    max_lorem_ipsum: int = 0

    def __post_init__(self):
        """Raises: PipelineConfigError naming the parameter: a count below 0, a ratio or
        fraction outside [0, 1], or a lower bound above its upper bound."""
        for name in ("min_chars", "max_chars", "min_words", "max_words", "max_lorem_ipsum"):
            LOADER.check_range(f"quality.{name}", getattr(self, name), 0)
        for name in (
            "min_mean_word_len",
            "max_mean_word_len",
            "cjk_min_mean_word_len",
            "cjk_max_mean_word_len",
        ):
            LOADER.check_range(f"quality.{name}", getattr(self, name), 0)
        for name in (
            "max_symbol_ratio",
            "max_digit_ratio",
            "min_alpha_word_frac",
            "max_dup_line_frac",
            "max_dup_line_char_frac",
            "max_top_ngram_frac",
            "max_dup_ngram_frac",
            "max_ellipsis_line_frac",
        ):
            LOADER.check_range(f"quality.{name}", getattr(self, name), 0, 1)
        for low, high in (
            ("min_chars", "max_chars"),
            ("min_words", "max_words"),
            ("min_mean_word_len", "max_mean_word_len"),
            ("cjk_min_mean_word_len", "cjk_max_mean_word_len"),
        ):
            LOADER.check_order("quality", low, high, self)


@dataclass
class PerplexityParams:
    """Score each document with a reference LM and keep the fluent ones.

    Attributes:
        model: deepwhale checkpoint folder (default: bundled stories260K), used when
            ``backend`` is ``deepwhale``.
        backend: ``deepwhale`` or ``kenlm`` (needs the ``kenlm`` package and ``kenlm_model``).
        kenlm_model: path of an ARPA/binary KenLM model.
        max_tokens: score at most this many leading tokens of each document (bounds the cost).
        max_ppl: keep documents with perplexity <= this (None = no absolute threshold).
        keep_percentile: keep documents at or below this percentile of perplexity (0..100).
    """

    model: str | None = None
    backend: str = "deepwhale"
    kenlm_model: str | None = None
    max_tokens: int = 256
    max_ppl: float | None = None
    keep_percentile: float | None = None

    def __post_init__(self):
        if self.backend not in ("deepwhale", "kenlm"):
            raise PipelineConfigError(
                f"perplexity.backend must be 'deepwhale' or 'kenlm', got {self.backend!r}"
            )
        if self.backend == "kenlm" and not self.kenlm_model:
            raise PipelineConfigError("perplexity.backend 'kenlm' needs perplexity.kenlm_model")
        if self.keep_percentile is not None and not 0 < self.keep_percentile <= 100:
            raise PipelineConfigError(
                f"perplexity.keep_percentile must be in (0, 100], got {self.keep_percentile}"
            )
        if self.max_tokens < 2:
            raise PipelineConfigError("perplexity.max_tokens must be >= 2")
        if self.max_ppl is not None and self.max_ppl <= 0:
            raise PipelineConfigError(f"perplexity.max_ppl must be > 0, got {self.max_ppl}")


@dataclass
class AugmentParams:
    """Emit each document plus one augmented copy per strategy (``deepwhale.data.augment``).

    Attributes:
        strategies: list of ``{name: ..., rate: ..., <other params>}``; names from
            ``deepwhale.data.augment.available()``.
        seed: base seed; each copy uses a seed derived from it, the doc id and the strategy.
    """

    strategies: list = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        for i, s in enumerate(self.strategies):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise PipelineConfigError(
                    f"augment.strategies[{i}] must be a mapping with a 'name', got {s!r}"
                )


@dataclass
class TokenizeParams:
    """Tokenize, EOS-separate, pack into rows and write shards (``deepwhale.data.shards``).

    Attributes:
        tokenizer: folder with ``tokenizer.json`` (default: bundled stories260K).
        seq_len: tokens per packed row.
        num_shards: documents go to shard ``sha1(doc id) mod num_shards`` (deterministic).
    """

    tokenizer: str | None = None
    seq_len: int = 512
    num_shards: int = 4

    def __post_init__(self):
        if self.seq_len < 2 or self.num_shards < 1:
            raise PipelineConfigError("tokenize: seq_len must be >= 2 and num_shards >= 1")


def __getattr__(name: str) -> Any:
    """``STAGES`` (stage name -> parameter dataclass, in pipeline order) and ``GLOBAL_STAGES``
    (the names of the stages that need the whole collection, so batch mode only), derived from
    the stage registry (:mod:`deepwhale.data.stages`) each time they are read, plugins included.
    """
    if name in ("STAGES", "GLOBAL_STAGES"):
        from deepwhale.data import stages

        specs = {n: stages.get(n) for n in stages.names()}
        if name == "STAGES":
            return {n: spec.params for n, spec in specs.items()}
        return tuple(n for n, spec in specs.items() if spec.is_global)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class StreamingParams:
    """Streaming mode: watch the input folders and process files as they land.

    Attributes:
        interval_s: seconds between polls of the input patterns.
        duration_s: stop watching after this many seconds (None = run until killed).
        window_s: window length in seconds; one output file and one monitor report per window.
        metrics_port: serve the live figures as Prometheus metrics on 127.0.0.1 (None: off).
        alerts: per-window band rules, ``{"ppl_median" | "drop_rate": [lo, hi]}`` (alerts.py).
    """

    interval_s: float = 1.0
    duration_s: float | None = 60.0
    window_s: float = 10.0
    metrics_port: int | None = None
    alerts: dict | None = None

    def __post_init__(self):
        for name in ("interval_s", "duration_s", "window_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PipelineConfigError(f"streaming.{name} must be > 0, got {value}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise PipelineConfigError(
                f"streaming.metrics_port must be in 0..65535, got {self.metrics_port}"
            )
        validate_alerts(self.alerts)


@dataclass
class Stage:
    """One configured stage: its name and typed parameters."""

    name: str
    params: Any


@dataclass
class PipelineConfig:
    """The whole pipeline. Build it with :func:`load_config` / :func:`parse_config`."""

    inputs: list[InputSpec]
    output: str
    stages: list[Stage] = field(default_factory=list)
    mode: str = "batch"
    streaming: StreamingParams = field(default_factory=StreamingParams)
    runner: str = DEFAULT_RUNNER
    options: dict = field(default_factory=dict)
    write_docs: bool = False
    dictionary: str | None = None

    def stage(self, name: str) -> Stage | None:
        """The first stage called ``name``, or None."""
        return next((s for s in self.stages if s.name == name), None)


def build_params(cls: type, params: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking names and types (``LOADER``).

    Args:
        cls: the parameter dataclass.
        params: the mapping (None = all defaults).
        where: the stage or section name the messages start with (``quality``, ``input[0]``).

    Raises:
        PipelineConfigError: ``params`` is not a mapping, names an unknown key (the message
            lists the valid ones), a value has the wrong type, a required field is missing, or
            the dataclass rejects a value.
    """
    return LOADER.build(cls, params, where)


def parse_stages(raw: Any) -> list[Stage]:
    """Parse the ``stages`` list: each item a one-key mapping ``{name: params}`` or a bare name
    of a stage in the registry (:mod:`deepwhale.data.stages`).

    Raises:
        PipelineConfigError: not a list, an unknown stage (valid ones listed), bad params, or a
            stage after one that must come last (``tokenize``).
    """
    from deepwhale.data.stages import get as stage_spec

    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PipelineConfigError(f"stages must be a list, got {type(raw).__name__}")
    stages = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, params = next(iter(item.items()))
        else:
            raise PipelineConfigError(
                f"stages[{i}]: expected a stage name or a one-key mapping {{name: params}}, "
                f"got {item!r}"
            )
        spec = stage_spec(name, f"stages[{i}]")
        stages.append(Stage(name, build_params(spec.params, params, name)))
    for stage in stages[:-1]:
        if stage_spec(stage.name).last:
            raise PipelineConfigError(f"stages: {stage.name!r} must be the last stage")
    return stages


_TOP_KEYS = (
    "input",
    "output",
    "stages",
    "mode",
    "streaming",
    "runner",
    "options",
    "write_docs",
    "dictionary",
)


def parse_config(raw: Any, source: str = "config") -> PipelineConfig:
    """Build a :class:`PipelineConfig` from a parsed YAML mapping.

    Raises:
        PipelineConfigError: any schema violation; the message names ``source`` and the key.
    """
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{source}: expected a mapping at the top level")
    for key in raw:
        if key not in _TOP_KEYS:
            raise PipelineConfigError(
                f"{source}: unknown key {key!r}; valid: {', '.join(_TOP_KEYS)}"
            )
    inputs_raw = raw.get("input")
    if inputs_raw is None:
        raise PipelineConfigError(f"{source}: 'input' is required")
    if isinstance(inputs_raw, str | dict):
        inputs_raw = [inputs_raw]
    if not isinstance(inputs_raw, list):
        raise PipelineConfigError(f"{source}: 'input' must be a path, a mapping or a list")
    inputs = []
    for i, item in enumerate(inputs_raw):
        item = {"path": item} if isinstance(item, str) else item
        inputs.append(build_params(InputSpec, item, f"input[{i}]"))
    mode = raw.get("mode", "batch")
    if mode not in MODES:
        raise PipelineConfigError(f"{source}: mode must be one of {MODES}, got {mode!r}")
    stages = parse_stages(raw.get("stages"))
    if mode == "streaming":
        from deepwhale.data.stages import get as stage_spec

        bad = [s.name for s in stages if stage_spec(s.name).is_global]
        if bad:
            raise PipelineConfigError(
                f"{source}: stage(s) {bad} need the whole collection and cannot run in "
                "streaming mode"
            )
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise PipelineConfigError(f"{source}: 'options' must be a mapping of Beam options")
    output = raw.get("output", "out")
    if not isinstance(output, str | Path):
        raise PipelineConfigError(f"{source}: 'output' must be a folder path")
    dictionary = raw.get("dictionary")
    if dictionary is not None:
        dictionary = check_dictionary_path(dictionary, f"{source}.dictionary")
    return PipelineConfig(
        inputs=inputs,
        output=str(output),
        stages=stages,
        mode=mode,
        streaming=build_params(StreamingParams, raw.get("streaming"), "streaming"),
        runner=str(raw.get("runner") or DEFAULT_RUNNER),
        options=dict(options),
        write_docs=LOADER.coerce(raw.get("write_docs", False), bool, f"{source}.write_docs"),
        dictionary=dictionary,
    )


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping.

    Raises:
        PipelineConfigError: the file is missing, not valid YAML (line and column named), or
            not a mapping.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PipelineConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PipelineConfigError(f"{p}: malformed YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{p}: expected a YAML mapping at the top level")
    return raw


def load_config(path: str | Path) -> PipelineConfig:
    """Parse a YAML pipeline config file (see the module docstring for the schema).

    Raises:
        PipelineConfigError: unreadable file, malformed YAML, or any schema violation.
    """
    return parse_config(load_yaml(path), source=str(path))
