"""Structured output enforced during decoding: JSON schema, any JSON object, regex, choice, Lark.

Each guided sequence owns a :class:`GuidedMatcher`, an ``llguidance.LLMatcher`` (Microsoft's
llguidance: an Earley parser over a lazily built lexer, so a JSON schema needs no ahead-of-time
compile) for the tokenizer of the model. Before each token is sampled the matcher fills a bitmask
of the tokens the grammar allows next; the others get ``-inf`` logits (greedy and top-p alike),
and the sampled token is then consumed. The sequence finishes (``finish_reason`` ``stop``) when the
grammar is complete and allows nothing more, or when the model samples end-of-sequence in an
accepting state.

References: llguidance (https://github.com/guidance-ai/llguidance), its Python API
(``LLTokenizer``, ``LLMatcher``, ``llguidance.torch``); the OpenAI ``response_format`` and vLLM
``guided_*`` request fields that map onto :class:`GuidedDecoding`.
"""

from __future__ import annotations

import json as _json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

#: JSON compiler options: no free whitespace between tokens (keeps outputs short and canonical)
JSON_OPTIONS = {"whitespace_flexible": False}


class GuidedDecodingError(ValueError):
    """An invalid guided-decoding request (bad schema, regex or grammar); the message says why."""


@dataclass(frozen=True)
class GuidedDecoding:
    """One output constraint; exactly one field is set.

    Attributes:
        json: a JSON schema (dict); the output is a JSON value that validates against it.
        json_object: True: the output is any JSON object.
        regex: the output fully matches this regular expression (Rust ``regex`` syntax).
        choice: the output is exactly one of these strings.
        grammar: a Lark grammar (llguidance's dialect) whose ``start`` rule the output matches.

    Raises:
        GuidedDecodingError: none or several fields set, or a field of the wrong type.
    """

    json: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        set_fields = [
            name
            for name, value in (
                ("json", self.json),
                ("json_object", self.json_object or None),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
            )
            if value is not None
        ]
        if len(set_fields) != 1:
            raise GuidedDecodingError(
                "exactly one of json, json_object, regex, choice, grammar must be set, "
                f"got {set_fields or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise GuidedDecodingError(f"json must be a JSON schema object, got {self.json!r}")
        if not isinstance(self.json_object, bool):
            raise GuidedDecodingError(f"json_object must be a boolean, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise GuidedDecodingError(f"{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (
                not isinstance(self.choice, list | tuple)
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise GuidedDecodingError(
                    f"choice must be a non-empty list of non-empty strings, got {self.choice!r}"
                )
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """The constraint's field name: ``json``, ``json_object``, ``regex``, ``choice``,
        ``grammar``."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def to_grammar(self) -> str:
        """This constraint as an llguidance grammar (a JSON string).

        Raises:
            GuidedDecodingError: a schema that is not JSON-serialisable.
        """
        import llguidance

        m = llguidance.LLMatcher
        if self.json is not None or self.json_object:
            schema = self.json if self.json is not None else {"type": "object"}
            try:
                return m.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except (ValueError, TypeError) as e:
                raise GuidedDecodingError(f"invalid JSON schema: {e}") from e
        if self.regex is not None:
            return m.grammar_from_regex(self.regex)
        if self.choice is not None:
            # Lark string literals take JSON escapes
            alternatives = " | ".join(_json.dumps(c) for c in self.choice)
            return m.grammar_from_lark(f"start: {alternatives}\n")
        return m.grammar_from_lark(self.grammar)


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def llg_tokenizer(tokenizer, vocab_size: int):
    """The ``llguidance.LLTokenizer`` of a :class:`deepwhale.tokenizer.Tokenizer`, cached per
    tokenizer and ``vocab_size`` (building one takes ~1 s for a 128K vocabulary).

    Args:
        tokenizer: our tokenizer (its ``backend`` ``tokenizers.Tokenizer`` is serialised).
        vocab_size: the model's logit width (may exceed the tokenizer's; extra ids are never
            allowed).
    """
    import llguidance

    with _TOKENIZERS_LOCK:
        per = _TOKENIZERS.setdefault(tokenizer, {})
        if vocab_size not in per:
            eos = sorted(tokenizer.eos_token_ids) or None
            per[vocab_size] = llguidance.LLTokenizer(
                continuation_tokenizer_json(tokenizer.backend.to_str()),
                n_vocab=vocab_size,
                eos_token=eos,
            )
        return per[vocab_size]


def continuation_tokenizer_json(tokenizer_json: str) -> str:
    """The tokenizer as llguidance must see it: one that tokenizes text in the middle of a
    sequence, with no whitespace stripped or prepended.

    SentencePiece-style tokenizers (LLaMA 2, DeepSeek LLM: a normalizer that strips and collapses
    spaces and prepends ``▁``, or a ``Metaspace`` pre-tokenizer that prepends it) encode ``" 2"``
    as ``"2"``; llguidance tokenizes forced bytes with the tokenizer, so with the original one its
    mask drops the forced ``"▁"`` token and allows tokens the grammar then rejects. This copy keeps
    only the string replacements (``" "`` -> ``"▁"``) and never prepends. Byte-level BPE tokenizers
    (DeepSeek-V3, Qwen2) have no such steps and come back unchanged.

    Args:
        tokenizer_json: a ``tokenizers`` JSON (``Tokenizer.to_str()``).

    Returns the adjusted JSON string.
    """
    spec = _json.loads(tokenizer_json)

    def keep(step: dict) -> bool:
        kind = step.get("type")
        if kind == "Prepend" or kind == "Strip":
            return False
        return not (kind == "Replace" and "Regex" in (step.get("pattern") or {}))

    norm = spec.get("normalizer")
    if norm is not None:
        steps = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
        steps = [s for s in steps if keep(s)]
        spec["normalizer"] = {"type": "Sequence", "normalizers": steps} if steps else None

    def no_prepend(pre: dict | None) -> None:
        if pre is None:
            return
        if pre.get("type") == "Metaspace":
            pre["prepend_scheme"] = "never"
            pre.pop("add_prefix_space", None)
        for sub in pre.get("pretokenizers", []):
            no_prepend(sub)

    no_prepend(spec.get("pre_tokenizer"))
    return _json.dumps(spec)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack an llguidance bitmask ``(B, ceil(V/32))`` int32 (bit ``i % 32`` of word ``i // 32``
    is token ``i``) into a ``(B, V)`` bool tensor of allowed tokens."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (B, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class GuidedMatcher:
    """The grammar state of one sequence.

    Args:
        guided: the constraint.
        llg_tok: from :func:`llg_tokenizer`.

    Raises:
        GuidedDecodingError: the schema, regex or grammar is invalid (llguidance's reason).
    """

    def __init__(self, guided: GuidedDecoding, llg_tok) -> None:
        import llguidance

        self.guided = guided
        self.vocab_size = llg_tok.vocab_size
        self.matcher = llguidance.LLMatcher(llg_tok, guided.to_grammar(), log_level=0)
        if self.matcher.is_error():
            raise GuidedDecodingError(
                f"invalid guided {guided.kind}: {self.matcher.get_error().strip()}"
            )

    def copy(self) -> GuidedMatcher:
        """An independent copy in the same state (for the ``n`` samples of one request)."""
        other = object.__new__(GuidedMatcher)
        other.guided, other.vocab_size = self.guided, self.vocab_size
        other.matcher = self.matcher.deep_copy()
        return other

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of a CPU int32 bitmask ``(B, W)``
        (``llguidance.torch.allocate_token_bitmask``).

        Raises:
            GuidedDecodingError: the matcher is in an error state.
        """
        from llguidance.torch import fill_next_token_bitmask

        self._check()
        fill_next_token_bitmask(self.matcher, bitmask, row)

    def consume(self, token: int) -> bool:
        """Advance over the sampled ``token``; returns True when the grammar is done (nothing but
        end-of-sequence may follow).

        Raises:
            GuidedDecodingError: the grammar rejects ``token`` (it was not in the mask).
        """
        if not self.matcher.consume_token(token):
            raise GuidedDecodingError(
                f"token {token} violates the guided {self.guided.kind}: "
                f"{self.matcher.get_error().strip()}"
            )
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GuidedDecodingError(f"guided decoding failed: {self.matcher.get_error()}")


def mask_logits(
    matchers: list[GuidedMatcher], logits: list[torch.Tensor]
) -> list[torch.Tensor | GuidedDecodingError]:
    """Mask each ``(V,)`` row of ``logits`` with its matcher: disallowed tokens get ``-inf``.

    Args:
        matchers: one per row.
        logits: ``(V,)`` fp32 rows (any device); not modified.

    Returns per row a new ``(V,)`` tensor, or the :class:`GuidedDecodingError` of a matcher
    in an error state (that row's request fails; the others go on).
    """
    from llguidance.torch import allocate_token_bitmask

    vocab = logits[0].shape[-1]
    bitmask = allocate_token_bitmask(len(matchers), vocab)
    errors: dict[int, GuidedDecodingError] = {}
    for row, m in enumerate(matchers):
        try:
            m.fill_bitmask(bitmask, row)
        except GuidedDecodingError as e:
            errors[row] = e
    allowed = bitmask_to_bool(bitmask, vocab).to(logits[0].device)
    return [
        errors[i] if i in errors else row.masked_fill(~allowed[i], float("-inf"))
        for i, row in enumerate(logits)
    ]
