"""Text <-> token ids for DeepSeek-family models, on top of Hugging Face ``tokenizers``.

A model folder in the Hugging Face layout holds ``tokenizer.json`` (the serialized
``tokenizers.Tokenizer``: normalizer, pre-tokenizer, model, decoder) and usually
``tokenizer_config.json`` (special tokens, ``add_bos_token``, the Jinja chat template, ...).
This module reads those files without ``transformers`` and offers:

* :class:`Tokenizer`: ``encode`` / ``decode`` / ``apply_chat_template``. BOS handling is done
  here and not by the ``tokenizers`` post-processor, so that a rendered chat template that
  already starts with BOS never gets a second one.
* :class:`IncrementalDetokenizer`: streaming text deltas for generated token ids, safe for
  multi-byte UTF-8 characters split over several byte-level or byte-fallback tokens.
* :class:`TokenizerError`: every problem with the files or the chat template.

References: the Hugging Face ``tokenizers`` library (the Rust implementation does all
tokenization and decoding), ``transformers``' chat-template rendering semantics (sandboxed
Jinja2 with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``), and the prefix/read-offset incremental detokenization used by Hugging Face
text-generation-inference and vLLM.

This module stays whole (about 900 lines): the chat template, BOS handling and the incremental
detokenizer all rest on the decoder facts :class:`Tokenizer` reads from ``tokenizer.json``
(byte-level or byte-fallback ids, which tokens contribute text), which the detokenizer reads
from the tokenizer directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# transformers writes int(1e30) as model_max_length when a model has no length limit.
_NO_LENGTH_LIMIT = 10**20
_REPLACEMENT_CHAR = "\ufffd"
# Texts longer than this are encoded with ``encode_batch``, which releases the GIL (``encode``
# holds it: seconds for a multi-megabyte text, stalling every other Python thread).
_LONG_TEXT_CHARS = 50_000
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer folder, file or chat template is missing, malformed or failed to render.

    Subclass of :class:`ValueError`; the message names the offending file where there is one.
    """


# --------------------------------------------------------------------------- file reading


def _read_json_object(path: Path) -> dict[str, Any]:
    """Parse ``path`` as a UTF-8 JSON object; raise :class:`TokenizerError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"malformed JSON in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _token_content(value: Any, key: str, source: Path) -> str | None:
    """A special-token entry: a string, an AddedToken-style dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(
        f"{source}: {key!r} must be a string, an object with a string 'content', or null; "
        f"got {value!r}"
    )


def _optional_bool(config: Mapping[str, Any], key: str, source: Path) -> bool | None:
    value = config.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise TokenizerError(f"{source}: {key!r} must be true, false or null; got {value!r}")


def _parse_chat_templates(value: Any, source: Path) -> dict[str, str]:
    """``chat_template`` from tokenizer_config.json: a string or a list of {name, template}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        templates: dict[str, str] = {}
        for item in value:
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise TokenizerError(
                    f"{source}: every entry of 'chat_template' must be an object with string "
                    f"'name' and 'template'; got {item!r}"
                )
            templates[item["name"]] = item["template"]
        return templates
    raise TokenizerError(
        f"{source}: 'chat_template' must be a string or a list of {{name, template}} objects"
    )


def _parse_eos_ids(value: Any, source: Path) -> list[int]:
    """``eos_token_id`` from generation_config.json: an int, a list of ints, or null."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise TokenizerError(
                f"{source}: 'eos_token_id' must be a non-negative int or a list of them; "
                f"got {value!r}"
            )
    return list(items)


def _parse_max_length(value: Any, source: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TokenizerError(f"{source}: 'model_max_length' must be a positive number")
    if value >= _NO_LENGTH_LIMIT:
        return None
    return int(value)


# --------------------------------------------------------------------------- chat templates


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` and render the body unchanged.

    transformers uses this tag to build assistant-token masks; we only need the text.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: Any) -> None:
    raise TokenizerError(f"chat template raised an exception: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson escapes HTML characters; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"invalid chat template (line {exc.lineno}): {exc.message}") from exc


def _plain(value: Any, what: str) -> Any:
    """Copy ``value`` into plain JSON-like Python data (dict, list, str, int, float, bool, None).

    The template only ever sees these types, so untrusted templates cannot reach methods of
    arbitrary caller objects through the data.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, what): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    raise TokenizerError(
        f"{what} may only contain dicts, lists, strings, numbers, booleans and None; "
        f"got {type(value).__name__}"
    )


# --------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A Hugging Face ``tokenizers`` tokenizer plus the settings of ``tokenizer_config.json``.

    Usually built with :meth:`from_pretrained`. Token ids are plain Python ``int``; texts are
    ``str``. Encoding always runs the backend with ``add_special_tokens=False`` and adds BOS/EOS
    here (see :meth:`encode`), so whatever the ``tokenizer.json`` post-processor would add is
    never added twice.

    Args:
        backend: the ``tokenizers.Tokenizer``. Padding and truncation configured in it are
            switched off (this object always returns the full, unpadded id list).
        bos_token, eos_token, pad_token, unk_token: special-token strings or ``None``. A token
            that is not in the vocabulary gets id ``None``.
        add_bos_token / add_eos_token: whether :meth:`encode` adds BOS / EOS by default.
        chat_template: a Jinja template string, or a mapping name -> template (the one named
            ``"default"`` is the default), or ``None``.
        model_max_length: the model's context length in tokens, ``None`` if unknown/unlimited.
        extra_eos_token_ids: more ids that end generation (e.g. from generation_config.json).

    Raises:
        TokenizerError: ``add_bos_token``/``add_eos_token`` is set but that token has no id.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | Mapping[str, str] | None = None,
        model_max_length: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._tokens = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        self._ids = {
            key: (backend.token_to_id(tok) if tok is not None else None)
            for key, tok in self._tokens.items()
        }
        extra = [int(i) for i in extra_eos_token_ids]
        if self._ids["eos_token"] is None and extra:
            self._ids["eos_token"] = extra[0]
        if add_bos_token and self._ids["bos_token"] is None:
            raise TokenizerError(f"add_bos_token is set but BOS {bos_token!r} is not in the vocab")
        if add_eos_token and self._ids["eos_token"] is None:
            raise TokenizerError(f"add_eos_token is set but EOS {eos_token!r} is not in the vocab")
        self._add_bos_token = bool(add_bos_token)
        self._add_eos_token = bool(add_eos_token)
        eos_ids = set(extra)
        if self._ids["eos_token"] is not None:
            eos_ids.add(self._ids["eos_token"])
        self._eos_token_ids = frozenset(eos_ids)
        if chat_template is None:
            self._chat_templates: dict[str, str] = {}
        elif isinstance(chat_template, str):
            self._chat_templates = {"default": chat_template}
        else:
            self._chat_templates = dict(chat_template)
        self._model_max_length = model_max_length
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._byte_fallback_ids = _byte_fallback_ids(backend)
        self._byte_level = _decoder_has(backend, "ByteLevel")
        self._added_ids = frozenset(added)
        self._anchor: list[int] | None = None
        self._token_texts: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer from a Hugging Face style model folder.

        Reads ``tokenizer.json`` (required, via ``tokenizers.Tokenizer.from_file``) and, when
        present, ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
        ``unk_token`` as strings, ``{"content": ...}`` dicts or null; ``add_bos_token``,
        ``add_eos_token``, ``chat_template``, ``model_max_length``), ``special_tokens_map.json``
        (special tokens the config does not name), ``chat_template.jinja`` (overrides the
        config's default template, as in recent transformers) and ``generation_config.json``
        (``eos_token_id``: int or list, added to :attr:`eos_token_ids`).

        If ``add_bos_token`` is absent from the config, BOS is added when the
        ``tokenizer.json`` post-processor would add it (e.g. a Llama ``TemplateProcessing``);
        the post-processor itself is never run. ``add_eos_token`` defaults to ``False``.

        Args:
            path: the folder.

        Returns:
            The :class:`Tokenizer`.

        Raises:
            TokenizerError: ``tokenizer.json`` is missing or cannot be loaded, or one of the
                JSON files is malformed; the message names the file.
        """
        folder = Path(path)
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} not found: a tokenizer folder needs one")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise TokenizerError(f"cannot load {tokenizer_file}: {exc}") from exc

        config_file = folder / TOKENIZER_CONFIG_FILE
        config = _read_json_object(config_file) if config_file.is_file() else {}
        map_file = folder / SPECIAL_TOKENS_MAP_FILE
        special_map = _read_json_object(map_file) if map_file.is_file() else {}

        tokens: dict[str, str | None] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = _token_content(config.get(key), key, config_file)
            if value is None:
                value = _token_content(special_map.get(key), key, map_file)
            tokens[key] = value

        add_bos = _optional_bool(config, "add_bos_token", config_file)
        if add_bos is None:
            bos_id = backend.token_to_id(tokens["bos_token"]) if tokens["bos_token"] else None
            add_bos = _post_processor_adds_bos(backend, bos_id)
        add_eos = bool(_optional_bool(config, "add_eos_token", config_file))

        templates = _parse_chat_templates(config.get("chat_template"), config_file)
        template_file = folder / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            try:
                templates["default"] = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"cannot read {template_file}: {exc}") from exc

        generation_file = folder / GENERATION_CONFIG_FILE
        extra_eos: list[int] = []
        if generation_file.is_file():
            generation = _read_json_object(generation_file)
            extra_eos = _parse_eos_ids(generation.get("eos_token_id"), generation_file)

        return cls(
            backend,
            **tokens,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=templates,
            model_max_length=_parse_max_length(config.get("model_max_length"), config_file),
            extra_eos_token_ids=extra_eos,
        )

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (may be below the model's embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token(self) -> str | None:
        """The BOS string, e.g. ``"<｜begin▁of▁sentence｜>"``, or ``None``."""
        return self._tokens["bos_token"]

    @property
    def eos_token(self) -> str | None:
        """The EOS string, or ``None``."""
        return self._tokens["eos_token"]

    @property
    def pad_token(self) -> str | None:
        """The padding string, or ``None``."""
        return self._tokens["pad_token"]

    @property
    def unk_token(self) -> str | None:
        """The unknown-token string, or ``None``."""
        return self._tokens["unk_token"]

    @property
    def bos_token_id(self) -> int | None:
        """Id of :attr:`bos_token`, ``None`` if unset or not in the vocabulary."""
        return self._ids["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        """Id of :attr:`eos_token`; if that is unset, the first extra EOS id; else ``None``."""
        return self._ids["eos_token"]

    @property
    def pad_token_id(self) -> int | None:
        """Id of :attr:`pad_token`, ``None`` if unset or not in the vocabulary."""
        return self._ids["pad_token"]

    @property
    def unk_token_id(self) -> int | None:
        """Id of :attr:`unk_token`, ``None`` if unset or not in the vocabulary."""
        return self._ids["unk_token"]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """All ids that end generation: :attr:`eos_token_id` plus generation_config's."""
        return self._eos_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (what ``skip_special_tokens`` drops)."""
        return self._special_ids

    @property
    def add_bos_token(self) -> bool:
        """Whether :meth:`encode` prepends BOS when ``add_special_tokens`` is true."""
        return self._add_bos_token

    @property
    def add_eos_token(self) -> bool:
        """Whether :meth:`encode` appends EOS when ``add_special_tokens`` is true."""
        return self._add_eos_token

    @property
    def chat_template(self) -> str | None:
        """The default chat template (Jinja source), or ``None`` if the model has none."""
        return self._chat_templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """All named chat templates (a copy), e.g. ``{"default": ..., "tool_use": ...}``."""
        return dict(self._chat_templates)

    @property
    def model_max_length(self) -> int | None:
        """Context length in tokens from tokenizer_config.json, ``None`` if unknown/unlimited."""
        return self._model_max_length

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary or added token), ``None`` if there is none."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id (raw, e.g. ``"Ġworld"`` for byte-level BPE), or ``None``."""
        return self._backend.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, add_bos_token={self._add_bos_token}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.

        Special-token strings that occur in ``text`` (e.g. ``"<｜User｜>"``) are matched as
        their single ids, as in ``tokenizers`` and transformers. Texts over 50,000 characters
        are encoded without holding the GIL (``encode_batch``), so other threads keep running.

        Args:
            text: the text.
            add_special_tokens: if true, prepend BOS when :attr:`add_bos_token` is set and the
                text does not already start with it (so a rendered chat template that begins
                with BOS keeps exactly one), and append EOS when :attr:`add_eos_token` is set
                and the ids do not already end with it.

        Returns:
            A new list of ids.

        Raises:
            TypeError: ``text`` is not a ``str``.
            TokenizerError: ``text`` is not valid Unicode (a lone surrogate, e.g. from bytes
                that were not UTF-8).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        try:
            if len(text) > _LONG_TEXT_CHARS:  # encode_batch releases the GIL while it runs
                ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
            else:
                ids = self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise TokenizerError(
                    f"text is not valid Unicode: {e.reason} at position {e.start} "
                    "(was the input UTF-8?)"
                ) from e
            raise
        if add_special_tokens:
            bos = self._ids["bos_token"]
            if self._add_bos_token and bos is not None:
                starts_with_bos = ids[:1] == [bos] or text.startswith(self._tokens["bos_token"])
                if not starts_with_bos:
                    ids.insert(0, bos)
            eos = self._ids["eos_token"]
            if self._add_eos_token and eos is not None and ids[-1:] != [eos]:
                ids.append(eos)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids, exactly as the ``tokenizers`` decoder produces it.

        No transformers-style ``clean_up_tokenization_spaces`` is applied, so
        ``decode(encode(text, add_special_tokens=False)) == text`` for lossless tokenizers.
        Ids without a token (e.g. padding rows of a larger embedding) produce no text.

        Args:
            ids: token ids (any iterable of ints, e.g. a list or a 1-D tensor).
            skip_special_tokens: drop the added tokens marked special (BOS, EOS, pad, ...).

        Returns:
            The text. Invalid UTF-8 byte sequences come out as U+FFFD.

        Raises:
            OverflowError / TypeError: from ``tokenizers`` for negative or non-integer ids.
        """
        return self._backend.decode(
            [int(i) for i in ids], skip_special_tokens=bool(skip_special_tokens)
        )

    def token_text(self, token_id: int) -> str:
        """The text one token adds in the middle of a sequence (cached per id).

        Computed as ``decode([anchor, id])`` minus ``decode([anchor])`` with an ordinary
        letter token as the anchor, so SentencePiece-style decoders (Metaspace, or ``Replace``
        + ``Strip``) keep the token's leading space, which they drop for a first token
        (``" there"``, not ``"there"``). A byte-fallback ``<0xNN>`` token or a byte-level token
        holding part of a multi-byte character decodes to U+FFFD here; :meth:`token_bytes`
        has its real bytes. Special tokens come out as their content.
        """
        token_id = int(token_id)
        text = self._token_texts.get(token_id)
        if text is None:
            anchor = self._anchor_ids()
            head = self._backend.decode(anchor, skip_special_tokens=False)
            both = self._backend.decode([*anchor, token_id], skip_special_tokens=False)
            text = both[len(head) :] if both.startswith(head) else self.decode([token_id])
            self._token_texts[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token adds mid-sequence (cached per id): a byte-fallback
        ``<0xNN>`` token is that one byte, a byte-level BPE token (GPT-2 / DeepSeek alphabet) its
        raw bytes, even when they are only part of a character; anything else is
        ``token_text(id).encode()``."""
        token_id = int(token_id)
        raw = self._token_bytes.get(token_id)
        if raw is None:
            token = self._backend.id_to_token(token_id)
            if token is not None and token_id in self._byte_fallback_ids:
                raw = bytes([int(token[3:5], 16)])
            elif token is not None and self._byte_level and token_id not in self._added_ids:
                table = _unicode_to_byte()
                if all(c in table for c in token):
                    raw = bytes(table[c] for c in token)
            if raw is None:
                raw = self.token_text(token_id).encode("utf-8", "replace")
            self._token_bytes[token_id] = raw
        return raw

    def _anchor_ids(self) -> list[int]:
        """Ids of a plain letter ("a"), decoding context for :meth:`token_text`."""
        if self._anchor is None:
            ids = self._backend.encode("a", add_special_tokens=False).ids
            self._anchor = list(ids[-1:])
        return self._anchor

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the model's Jinja chat template.

        Follows transformers' ``apply_chat_template`` rendering (note the different default:
        ``add_generation_prompt`` is true here, false in transformers): an
        ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
        ``loopcontrols`` extension, a ``tojson`` filter that keeps non-ASCII characters, and
        the ``raise_exception`` and ``strftime_now`` globals. The template sees ``messages``,
        ``tools``, ``documents``, ``add_generation_prompt``, the special-token strings that are
        set (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``) and ``kwargs`` (which
        override them). Unlike transformers 5, message keys whose value is ``None`` are kept,
        so templates that test ``message['content'] is none`` (DeepSeek-R1 tool calls) work.

        Args:
            messages: dicts with at least "role" and usually "content"; only JSON-like data
                (dicts, lists, strings, numbers, booleans, None) is accepted.
            add_generation_prompt: end with the header that starts an assistant turn.
            tokenize: return token ids (via ``encode(text, add_special_tokens=True)``, which
                adds BOS only if the rendered text does not already start with it) instead of
                the text. transformers encodes with ``add_special_tokens=False``; the ids agree
                whenever the template emits BOS itself, as DeepSeek's does.
            chat_template: the name of one of :attr:`chat_templates`, or a template source.
                By default the "tool_use" template when ``tools`` is given and the model has
                one, else the "default" template.
            tools: JSON schemas of callable tools, passed to the template as ``tools``.
            documents: retrieval documents, passed to the template as ``documents``.
            **kwargs: extra template variables (e.g. ``enable_thinking``, ``date_string``).

        Returns:
            The rendered text, or its token ids if ``tokenize`` is true.

        Raises:
            TokenizerError: there is no chat template, it is invalid, it calls
                ``raise_exception``, or rendering fails (e.g. an undefined key is used or the
                sandbox blocks an operation); also for an empty conversation or non JSON-like
                input.
        """
        template = self._select_template(chat_template, tools)
        compiled = _compile_template(template)
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TokenizerError("messages must be a list of dicts")
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty conversation")
        chat = _plain(list(messages), "messages")
        for message in chat:
            if not isinstance(message, dict):
                raise TokenizerError(f"every message must be a dict, got {message!r}")
        variables: dict[str, Any] = {k: v for k, v in self._tokens.items() if v is not None}
        variables.update(_plain(kwargs, "template keyword arguments"))
        variables.update(
            messages=chat,
            tools=_plain(tools, "tools"),
            documents=_plain(documents, "documents"),
            add_generation_prompt=bool(add_generation_prompt),
        )
        try:
            text = compiled.render(**variables)
        except TokenizerError:
            raise
        except Exception as exc:  # TemplateError, SecurityError, or e.g. ZeroDivisionError
            raise TokenizerError(
                f"chat template failed to render: {type(exc).__name__}: {exc}"
            ) from exc
        if tokenize:
            return self.encode(text, add_special_tokens=True)
        return text

    def chat_template_source(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The Jinja source :meth:`apply_chat_template` would render with these arguments
        (the "tool_use" template when ``tools`` is given and the model has one).

        Raises:
            TokenizerError: no chat template, or several and none named "default".
        """
        return self._select_template(chat_template, tools)

    def chat_template_variables(
        self, chat_template: str | None = None, tools: Any = None
    ) -> frozenset[str]:
        """Names the selected chat template reads from its context but does not set itself
        (``jinja2.meta.find_undeclared_variables``), e.g. ``{"messages", "bos_token",
        "add_generation_prompt", "tools"}``; a template without ``"tools"`` here ignores the
        tool definitions passed to it.

        Raises:
            TokenizerError: as :meth:`chat_template_source`, or a template syntax error.
        """
        source = self._select_template(chat_template, tools)
        try:
            return frozenset(jinja2.meta.find_undeclared_variables(_jinja_env().parse(source)))
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(
                f"invalid chat template (line {exc.lineno}): {exc.message}"
            ) from exc

    def _select_template(self, chat_template: str | None, tools: Any) -> str:
        if chat_template is not None:
            return self._chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        if self._chat_templates:
            names = ", ".join(sorted(self._chat_templates))
            raise TokenizerError(
                f"this tokenizer has several chat templates ({names}) and none is named "
                "'default'; pass chat_template=<name>"
            )
        raise TokenizerError(
            "this tokenizer has no chat template: tokenizer_config.json has no 'chat_template' "
            "and there is no chat_template.jinja; pass chat_template=<Jinja source>"
        )

    # ------------------------------------------------------------------ streaming

    def detokenizer(
        self, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = False
    ) -> IncrementalDetokenizer:
        """A new :class:`IncrementalDetokenizer` for one generated sequence.

        Args:
            prompt_ids: the prompt's ids; its last few tokens are decoding context only.
            skip_special_tokens: as in :meth:`decode`.
        """
        return IncrementalDetokenizer(
            self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens
        )

    def _is_byte_token(self, token_id: int) -> bool:
        return token_id in self._byte_fallback_ids

    def _contributes(self, token_id: int, skip_special_tokens: bool) -> bool:
        """Whether the decoder sees this id (it is not skipped and has a token)."""
        if skip_special_tokens and token_id in self._special_ids:
            return False
        return self._backend.id_to_token(token_id) is not None


def _post_processor_adds_bos(backend: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """Whether ``backend.encode(..., add_special_tokens=True)`` puts ``bos_id`` first."""
    if bos_id is None or backend.post_processor is None:
        return False
    try:
        with_special = backend.encode("a", add_special_tokens=True).ids
        without = backend.encode("a", add_special_tokens=False).ids
    except Exception:
        return False
    return with_special[:1] == [bos_id] and without[:1] != [bos_id]


def _decoder_has(backend: tokenizers.Tokenizer, step: str) -> bool:
    """Whether the backend's decoder (or one step of a ``Sequence`` decoder) is ``step``."""
    decoder = backend.decoder
    if decoder is None:
        return False
    try:
        state = decoder.__getstate__()
    except Exception:
        state = repr(decoder)
    if isinstance(state, bytes):
        state = state.decode("utf-8", errors="replace")
    return f'"{step}"' in str(state) or f"{step}(" in str(state)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` table used by byte-level BPE: each byte is
    one printable character (printable Latin-1 bytes map to themselves, the others to
    U+0100 onwards)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of the ``<0xNN>`` tokens when the decoder has a ``ByteFallback`` step, else empty."""
    if not _decoder_has(backend, "ByteFallback"):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


# --------------------------------------------------------------------------- streaming


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Technique (as in Hugging Face text-generation-inference and vLLM): keep a *prefix* window
    (the tokens whose text was emitted last) and the tokens after it; on each new token decode
    the prefix window and the whole window and emit the difference. Decoding with context
    matters for SentencePiece-style decoders, where a token's leading space is dropped when the
    token comes first. Text is held back while the decoded window ends with U+FFFD (an
    incomplete multi-byte UTF-8 character split over byte-level tokens), and, for
    byte-fallback decoders, while the last token is a ``<0xNN>`` byte token: HF's
    ``ByteFallback`` decoder decides per whole run of byte tokens whether it is valid UTF-8, so
    text from an unfinished run could still turn into U+FFFD. Cost per token is O(window),
    independent of the sequence length.

    Guarantee: with ``prompt_ids=None``, ``"".join(deltas) + flush()`` equals
    ``tokenizer.decode(generated_ids, skip_special_tokens)`` for any ids, and for valid UTF-8
    output no delta contains a U+FFFD that the final text does not have.

    With ``prompt_ids``, the last few prompt tokens are decoding context: the deltas are the
    text the generated tokens add after the prompt. For byte-level BPE (DeepSeek, GPT-2) that
    is again ``decode(generated_ids)``; for SentencePiece-style decoders it differs only in
    keeping the first generated token's leading space (``" Hello"`` rather than ``"Hello"``).

    Build it with :meth:`Tokenizer.detokenizer`.
    """

    #: How many prompt tokens are used as decoding context.
    PROMPT_CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = False,
    ) -> None:
        """Start a stream.

        Args:
            tokenizer: the :class:`Tokenizer` whose ``decode`` is used.
            prompt_ids: prompt token ids; only the last :attr:`PROMPT_CONTEXT_TOKENS` are used,
                as context. Ignored if the prompt ends inside a character or a byte run.
            skip_special_tokens: as in :meth:`Tokenizer.decode`.
        """
        self._tok = tokenizer
        self._skip = bool(skip_special_tokens)
        self._num_tokens = 0
        self._in_byte_run = False
        context = [int(i) for i in prompt_ids[-self.PROMPT_CONTEXT_TOKENS :]] if prompt_ids else []
        context_text = self._decode(context)
        last = [i for i in context if tokenizer._contributes(i, self._skip)][-1:]
        if context_text.endswith(_REPLACEMENT_CHAR) or (last and tokenizer._is_byte_token(last[0])):
            # The prompt ends inside a character or a byte run: context would misalign.
            context, context_text = [], ""
        # _ids holds the prefix window (_ids[:_read_offset], text _prefix_text, all emitted)
        # followed by the tokens whose text is still held back.
        self._ids: list[int] = context
        self._read_offset = len(context)
        self._prefix_text = context_text

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    @property
    def num_tokens(self) -> int:
        """How many generated tokens were added so far."""
        return self._num_tokens

    def add(self, token_id: int) -> str:
        """Add one generated token id.

        Args:
            token_id: the id.

        Returns:
            The new text (possibly ``""`` while a character or byte run is incomplete).
        """
        token_id = int(token_id)
        self._ids.append(token_id)
        self._num_tokens += 1
        if self._tok._byte_fallback_ids and self._tok._contributes(token_id, self._skip):
            self._in_byte_run = self._tok._is_byte_token(token_id)
        if self._in_byte_run:
            return ""
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return the held-back text (call once generation has ended).

        The text may end with U+FFFD if the generated bytes really are incomplete UTF-8, exactly
        as :meth:`Tokenizer.decode` shows them. Returns ``""`` if nothing is held back.
        """
        if self._read_offset == len(self._ids):
            return ""
        self._in_byte_run = False
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text):
            self._ids = self._ids[self._read_offset :]
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids)
            return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        # The tokens just emitted become the next prefix window.
        self._ids = self._ids[self._read_offset :]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta
