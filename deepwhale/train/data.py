"""Training data: packed shards, plain text / JSONL packed in memory, and chat data for SFT.

Every dataset yields ``(input_ids, labels)`` pairs of int64 arrays of equal length. Packed rows of
``seq_len`` tokens give ``row[:-1]`` and ``row[1:]`` (the shard contract of
:mod:`deepwhale.data.shards`); chat examples give the conversation shifted by one with prompt
positions set to ``-100`` (ignored by the loss). :class:`EpochSampler` fixes the sampling order from
a seed and exposes the exact position (epoch, offset) that checkpoints store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100

#: used when the tokenizer has no chat template (stories260K, base models)
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %}\n\n{% endif %}"
    "{% if m['role'] == 'user' %}User: {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}\n\nAssistant:{% endif %}"
)


class DataError(ValueError):
    """Training data that cannot be used: a missing file, a malformed line, no usable rows, a file
    that is not UTF-8 text."""


def _utf8_lines(path: Path):
    """The lines of ``path`` decoded as UTF-8 (``\r\n`` kept as read).

    Raises:
        DataError: bytes that are not UTF-8 (``FILE: not UTF-8 text (byte offset N)``).
    """
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not UTF-8 text (byte offset {offset + e.start})"
                ) from None
            offset += len(raw)


def _utf8_text(path: Path) -> str:
    """The whole of ``path`` as UTF-8 text.

    Raises:
        DataError: bytes that are not UTF-8 (``FILE: not UTF-8 text (byte offset N)``).
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None


def resolve_recorded_tokenizer(recorded: str | None, shard_dir: Path, manifest: dict) -> str | None:
    """The tokenizer folder a shard manifest records, found from where the trainer runs.

    An absolute path is taken as is. A relative one (the data pipeline writes it relative to the
    directory it ran in) is tried against the current directory, the manifest's ``cwd`` when
    recorded, then the shard folder and each of its parents. Returns the first candidate holding
    ``tokenizer.json``, else ``recorded`` unchanged (None when nothing is recorded).
    """
    if not recorded:
        return None
    rec = Path(recorded)
    if rec.is_absolute():
        return recorded
    bases = [Path.cwd()]
    if isinstance(manifest.get("cwd"), str):
        bases.append(Path(manifest["cwd"]))
    folder = shard_dir.resolve()
    bases += [folder, *folder.parents]
    for base in bases:
        if (base / rec / "tokenizer.json").exists():
            return str((base / rec).resolve())
    return recorded


# ---------------------------------------------------------------------- datasets


class RowDataset:
    """Next-token pairs from packed rows: sample ``i`` is ``(row[:-1], row[1:])``.

    Args:
        rows: anything with ``len`` and ``rows[i] -> (seq_len,)`` ints: a
            :class:`~deepwhale.data.shards.PackedDataset` or an ``(n, seq_len)`` array.
        indices: the row ids this dataset exposes (a train/validation split), default all.
    """

    def __init__(self, rows: Any, indices: Sequence[int] | None = None) -> None:
        self.rows = rows
        self.indices = list(range(len(rows))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = np.asarray(self.rows[self.indices[i]], dtype=np.int64)  # (seq_len,)
        return row[:-1], row[1:]


class ExampleDataset:
    """Pre-tokenized ``(input_ids, labels)`` examples (chat SFT), each already shifted."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.examples[i]


class EpochSampler:
    """Deterministic, resumable sampling order: a fresh permutation of ``range(n)`` per epoch.

    The permutation of epoch ``e`` comes from ``numpy.random.default_rng([seed, e])``, so the
    order depends only on ``(seed, epoch)``; the position ``(epoch, offset)`` is all a checkpoint
    needs to continue with exactly the same samples.

    Raises:
        DataError: ``n`` is 0.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n <= 0:
            raise DataError("the dataset has no samples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._perm: np.ndarray | None = None

    def _order(self) -> np.ndarray:
        if self._perm is None:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            else:
                self._perm = np.arange(self.n)
        return self._perm

    def take(self, k: int) -> list[int]:
        """The next ``k`` sample ids, crossing into the next epoch when needed."""
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            n = min(k - len(out), self.n - self.offset)
            out.extend(int(i) for i in order[self.offset : self.offset + n])
            self.offset += n
            if self.offset == self.n:
                self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        """``{"epoch", "offset", "seed", "n"}``: the exact data position."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        Raises:
            DataError: the dataset size changed since the checkpoint (the order would differ).
        """
        if int(state["n"]) != self.n:
            raise DataError(
                f"the dataset has {self.n} samples but the checkpoint was made with {state['n']}; "
                "resume needs the same data"
            )
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None


def collate(samples: list[tuple[np.ndarray, np.ndarray]], pad_id: int = 0) -> dict:
    """Right-pad a micro-batch.

    Returns:
        ``{"input_ids": (B, T) int64, "labels": (B, T) int64 (-100 on padding),
        "mask": (B, T) bool (True on real input tokens)}`` as torch tensors, ``T`` the longest
        sample.
    """
    import torch

    t = max(len(x) for x, _ in samples)
    b = len(samples)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    labels = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((b, t), dtype=bool)
    for i, (x, y) in enumerate(samples):
        ids[i, : len(x)] = x
        labels[i, : len(y)] = y
        mask[i, : len(x)] = True
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "mask": torch.from_numpy(mask),
    }


# ---------------------------------------------------------------------- readers


def detect_format(path: Path, fmt: str = "auto") -> str:
    """``shards`` for a folder, ``text`` for ``.txt``, ``chat`` or ``jsonl`` for JSON lines
    (chat when the first record has ``messages`` or ``question`` + ``answer``).

    Raises:
        DataError: the path does not exist, or its format cannot be told.
    """
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "shards"
    if path.suffix in (".jsonl", ".json"):
        for line in _utf8_lines(path):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:1: not JSON ({e})") from None
                chat = isinstance(rec, dict) and (
                    "messages" in rec or ("question" in rec and "answer" in rec)
                )
                return "chat" if chat else "jsonl"
        raise DataError(f"{path}: empty file")
    return "text"


def read_jsonl(path: Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """``(line_number, record)`` for each non-empty line, at most ``limit``.

    Raises:
        DataError: a line that is not a JSON object (names the file and line), or bytes that are
            not UTF-8.
    """
    out = []
    for n, line in enumerate(_utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        out.append((n, rec))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_documents(path: Path, fmt: str, text_key: str, limit: int | None) -> list[str]:
    """Documents of a text file (paragraphs split on blank lines) or a JSONL file (``text_key``).

    Raises:
        DataError: a JSONL line without a string ``text_key``, or a file that is not UTF-8.
    """
    if fmt == "text":
        text = _utf8_text(path).replace("\r\n", "\n")
        docs = [d.strip("\n") for d in text.split("\n\n")]
        docs = [d for d in docs if d.strip()]
        return docs[:limit] if limit else docs
    docs = []
    for n, rec in read_jsonl(path, limit):
        value = rec.get(text_key)
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{n}: no string {text_key!r} field (keys: {', '.join(rec)}); "
                "set data.text_key"
            )
        docs.append(value)
    return docs


def tokenize_and_pack(docs: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Encode each document (BOS as the tokenizer adds it), append EOS, pack into rows.

    Returns ``(rows, seq_len)`` int64 (see :func:`deepwhale.data.shards.pack`).

    Raises:
        DataError: the tokenizer has no EOS token, or the text fills less than one row.
    """
    from deepwhale.data.shards import pack

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; packing needs a document separator")
    rows = pack((tokenizer.encode(d) for d in docs), seq_len, eos)
    if len(rows) == 0:
        raise DataError(f"the text has fewer tokens than one row of data.seq_len={seq_len}")
    return rows


def to_messages(rec: dict, where: str) -> list[dict]:
    """Chat messages of a record: ``{"messages": [...]}`` or GSM8K ``{"question", "answer"}``.

    Raises:
        DataError: neither shape, or messages without an assistant turn.
    """
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs
        ):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    elif isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str):
        msgs = [
            {"role": "user", "content": rec["question"]},
            {"role": "assistant", "content": rec["answer"]},
        ]
    else:
        raise DataError(
            f"{where}: a chat record needs 'messages' or 'question' + 'answer' "
            f"(keys: {', '.join(rec)})"
        )
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message to learn from")
    return msgs


def chat_example(
    tokenizer, messages: list[dict], template: str | None, max_len: int, where: str = "example"
) -> tuple[np.ndarray, np.ndarray] | None:
    """Tokenize a conversation with its chat template and mask everything but assistant turns.

    Each assistant turn's text is the part of ``render(messages[:i+1])`` after
    ``render(messages[:i], add_generation_prompt=True)``; prompt text and completion text are
    tokenized separately, so the mask boundary is exact. When a template is not prefix-stable
    across turns (DeepSeek-R1 drops earlier turns' reasoning), only the last assistant turn is
    trained.

    Args:
        tokenizer: a :class:`~deepwhale.tokenizer.Tokenizer`.
        messages: the conversation.
        template: Jinja source overriding the tokenizer's template, or None.
        max_len: keep at most this many tokens (inputs are one fewer).
        where: names the record in errors.

    Returns:
        ``(input_ids, labels)`` shifted by one, or None when no trained token survives truncation.

    Raises:
        DataError: the template does not render the conversation as an extension of its prompt.
    """

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, add_generation_prompt=gen, chat_template=template
        )

    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    pieces: list[tuple[str, bool]] = []  # (text, trained)
    done = ""
    for i in turns:
        prompt, full = render(messages[:i], True) if i else "", render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            pieces = []
            break
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    if not pieces:  # not prefix-stable: train the last assistant turn only
        i = turns[-1]
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not full.startswith(prompt):
            raise DataError(
                f"{where}: the chat template does not render the conversation as its prompt "
                "followed by the answer; cannot tell prompt tokens from answer tokens"
            )
        pieces = [(prompt, False), (full[len(prompt) :], True)]
    ids: list[int] = []
    keep: list[bool] = []
    for k, (text, trained) in enumerate(pieces):
        if not text:
            continue
        part = tokenizer.encode(text, add_special_tokens=k == 0 or not ids)
        ids += part
        keep += [trained] * len(part)
    ids, keep = ids[:max_len], keep[:max_len]
    if len(ids) < 2 or not any(keep[1:]):
        return None
    x = np.asarray(ids[:-1], dtype=np.int64)
    y = np.where(np.asarray(keep[1:]), np.asarray(ids[1:], dtype=np.int64), IGNORE_INDEX)
    return x, y.astype(np.int64)


def load_chat(path: Path, tokenizer, template: str | None, max_len: int, limit: int | None):
    """All usable chat examples of a JSONL file; returns ``(examples, dropped)``.

    Raises:
        DataError: malformed lines (file and line named), a file without examples, or no usable
            example.
    """
    examples, dropped = [], 0
    records = read_jsonl(path, limit)
    if not records:
        raise DataError(f"{path}: the file has no examples (no non-empty lines)")
    for n, rec in records:
        where = f"{path}:{n}"
        ex = chat_example(tokenizer, to_messages(rec, where), template, max_len, where)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no usable chat example (every answer was cut by data.seq_len)")
    return examples, dropped


@dataclass
class Datasets:
    """What :func:`build_datasets` returns.

    Attributes:
        train: the training set (rows of ``row_len + 1`` token ids, or chat examples).
        val: the validation set, or None.
        format: ``shards``, ``text``, ``jsonl`` or ``chat``.
        vocab_size: the data's vocabulary (a shard manifest's), or None.
        pad_id: the id padding uses (the shards' EOS, else the tokenizer's pad id, else 0).
        dropped: chat examples dropped for being longer than ``data.seq_len``.
        tokenizer: the tokenizer folder a shard manifest names
            (:func:`resolve_recorded_tokenizer`), or None.
        row_len: tokens per row: the manifest's ``seq_len`` for shards, else ``data.seq_len``.
    """

    train: Any
    val: Any
    format: str
    vocab_size: int | None
    pad_id: int
    dropped: int
    tokenizer: Path | str | None
    row_len: int


def build_datasets(data_cfg, tokenizer_fn, vocab_size: int | None = None) -> Datasets:
    """The training and validation datasets of a :class:`~deepwhale.train.config.DataSection`.

    Args:
        data_cfg: the data section.
        tokenizer_fn: zero-argument callable returning the tokenizer (only called for text, JSONL
            and chat data).
        vocab_size: the model's vocabulary; every token id must be below it.

    Returns:
        A :class:`Datasets`.

    Raises:
        DataError: a missing path, malformed data, token ids outside the vocabulary, or too
            little data.
        ShardError: a missing, truncated or corrupt shard.
    """
    if not data_cfg.path:
        raise DataError("data.path is empty; point it at shards, a .txt or a .jsonl file")
    path = Path(data_cfg.path)
    fmt = detect_format(path, data_cfg.format)
    info: dict[str, Any] = {
        "format": fmt,
        "vocab_size": None,
        "pad_id": 0,
        "dropped": 0,
        "row_len": data_cfg.seq_len,
    }
    if fmt != "shards":
        info["tokenizer"] = None

    def load(p: Path):
        if fmt == "shards":
            from deepwhale.data.shards import PackedDataset

            ds = PackedDataset(p)
            info["vocab_size"] = ds.vocab_size
            info["pad_id"] = ds.eos_id
            if "tokenizer" not in info:  # the training set's manifest
                info["row_len"] = ds.seq_len
                info["tokenizer"] = resolve_recorded_tokenizer(
                    ds.manifest.get("tokenizer"), p, ds.manifest
                )
            return ds, "rows"
        tok = tokenizer_fn()
        info["pad_id"] = tok.pad_token_id if tok.pad_token_id is not None else 0
        if fmt == "chat":
            examples, dropped = load_chat(
                p,
                tok,
                data_cfg.chat_template or _template_or_none(tok),
                data_cfg.seq_len,
                data_cfg.limit,
            )
            info["dropped"] += dropped
            return examples, "examples"
        docs = read_documents(p, fmt, data_cfg.text_key, data_cfg.limit)
        return tokenize_and_pack(docs, tok, data_cfg.seq_len), "rows"

    def wrap(obj, kind, indices=None):
        if kind == "rows":
            return RowDataset(obj, indices)
        if indices is not None:
            obj = [obj[i] for i in indices]
        return ExampleDataset(obj)

    train_obj, kind = load(path)
    n = len(train_obj)
    if data_cfg.val_path:
        val_path = Path(data_cfg.val_path)
        detect_format(val_path, fmt)
        val_obj, vkind = load(val_path)
        train, val = wrap(train_obj, kind), wrap(val_obj, vkind)
    elif data_cfg.val_fraction > 0:
        n_val = max(1, int(round(n * data_cfg.val_fraction)))
        if n_val >= n:
            raise DataError(f"{path}: {n} samples are too few to hold out {n_val} for validation")
        train = wrap(train_obj, kind, range(n - n_val))
        val = wrap(train_obj, kind, range(n - n_val, n))
    else:
        train, val = wrap(train_obj, kind), None
    if vocab_size is not None:
        check_vocab(train, vocab_size, path)
    info.setdefault("tokenizer", None)
    return Datasets(train=train, val=val, **info)


def _template_or_none(tok) -> str | None:
    return None if tok.chat_template else PLAIN_CHAT_TEMPLATE


def check_vocab(ds, vocab_size: int, path: Path) -> None:
    """Raise :class:`DataError` when the data holds a token id ``>= vocab_size``."""
    if isinstance(ds, RowDataset) and hasattr(ds.rows, "vocab_size"):
        top = ds.rows.vocab_size - 1  # shards were validated against their vocab when written
    elif isinstance(ds, RowDataset):
        top = int(np.max(ds.rows)) if len(ds.rows) else 0
    else:
        top = max(int(x.max()) for x, _ in ds.examples)
    if top >= vocab_size:
        raise DataError(
            f"{path}: token ids go up to {top}, but the model's vocab_size is {vocab_size}; "
            "use a matching tokenizer or set model.vocab_size"
        )
