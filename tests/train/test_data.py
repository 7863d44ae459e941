"""Training data: sampling order and position, packing, chat masking, shards, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepwhale.data.shards import pack, write_manifest, write_shard
from deepwhale.tokenizer import Tokenizer
from deepwhale.train.config import DataSection
from deepwhale.train.data import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    DataError,
    EpochSampler,
    build_datasets,
    chat_example,
    collate,
    detect_format,
    to_messages,
)
from deepwhale.train.trainer import BUNDLED_TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(BUNDLED_TOKENIZER)


def test_sampler_is_seeded_and_resumable():
    a = EpochSampler(10, seed=3)
    first = a.take(7) + a.take(7)  # crosses into epoch 1
    assert sorted(first[:10]) == list(range(10)) and a.state_dict()["epoch"] == 1
    b = EpochSampler(10, seed=3)
    b.take(7)
    c = EpochSampler(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.take(7) == first[7:]
    assert EpochSampler(10, seed=4).take(10) != first[:10]
    with pytest.raises(DataError, match="checkpoint was made with 10"):
        EpochSampler(11, seed=3).load_state_dict(b.state_dict())
    with pytest.raises(DataError, match="no samples"):
        EpochSampler(0, seed=1)
    assert EpochSampler(3, 0, shuffle=False).take(4) == [0, 1, 2, 0]


def test_collate_pads_and_masks():
    b = collate([(np.array([5, 6, 7]), np.array([6, 7, 8])), (np.array([9]), np.array([-100]))], 0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 8], [-100, -100, -100]]
    assert b["mask"].tolist() == [[True, True, True], [True, False, False]]


def test_chat_masks_prompt_tokens(tok):
    msgs = to_messages({"question": "What is 2+2?", "answer": "It is 4.\n#### 4"}, "x")
    x, y = chat_example(tok, msgs, PLAIN_CHAT_TEMPLATE, 512)
    assert len(x) == len(y)
    trained = [int(t) for t in y if t != IGNORE_INDEX]
    text = tok.decode(trained)
    assert text.strip().startswith("It is 4.") and text.endswith("</s>")
    assert "What is" not in text and (y[:5] == IGNORE_INDEX).all()
    # multi-turn: both assistant turns trained, user turns masked
    multi = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    x, y = chat_example(tok, multi, PLAIN_CHAT_TEMPLATE, 512)
    text = tok.decode([int(t) for t in y if t != IGNORE_INDEX])
    assert "Hello there" in text and "Goodbye" in text and "Bye\n" not in text
    # truncated before the answer: no example
    assert chat_example(tok, msgs, PLAIN_CHAT_TEMPLATE, 4) is None


def test_chat_template_not_prefix_stable(tok):
    # a template that drops earlier assistant turns (like R1 dropping reasoning): last turn only
    tpl = (
        "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n"
        "{% elif loop.last %}A: {{ m['content'] }}{{ eos_token }}{% else %}A: ...\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second answer"},
    ]
    x, y = chat_example(tok, msgs, tpl, 512)
    text = tok.decode([int(t) for t in y if t != IGNORE_INDEX])
    assert "second answer" in text and "first" not in text
    broken = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}?{% endif %}"
    with pytest.raises(DataError, match="cannot tell prompt tokens"):
        chat_example(tok, msgs[:2], broken, 512)


def test_text_and_jsonl(tmp_path, tok, shakespeare):
    info = build_datasets(
        DataSection(path=str(shakespeare), seq_len=65, val_fraction=0.1, limit=200), lambda: tok
    )
    assert info.format == "text" and len(info.val) >= 1
    x, y = info.train[0]
    assert len(x) == 64 and (x[1:] == y[:-1]).all()
    j = tmp_path / "docs.jsonl"
    j.write_text("\n".join(json.dumps({"body": "Once upon a time " * 20}) for _ in range(8)))
    info = build_datasets(DataSection(path=str(j), text_key="body", seq_len=33), lambda: tok)
    assert info.format == "jsonl" and len(info.train) > 4
    with pytest.raises(DataError, match="no string 'text' field"):
        build_datasets(DataSection(path=str(j), seq_len=33), lambda: tok)


def test_shards(tmp_path, tok, shakespeare):
    docs = [tok.encode(p) for p in shakespeare.read_text().split("\n\n")[:300]]
    rows = pack(docs, 33, tok.eos_token_id)
    recs = [write_shard(tmp_path, i, part, 512) for i, part in enumerate(np.array_split(rows, 2))]
    write_manifest(tmp_path, recs, seq_len=33, vocab_size=512, eos_id=tok.eos_token_id)
    info = build_datasets(DataSection(path=str(tmp_path), val_fraction=0.1), lambda: None, 512)
    assert info.format == "shards" and info.vocab_size == 512
    assert info.tokenizer is None  # the manifest records none
    n = len(info.train) + len(info.val)
    assert n == len(rows)
    x, y = info.train[3]
    assert (x == rows[3][:-1]).all() and (y == rows[3][1:]).all()
    with pytest.raises(DataError, match="vocab_size is 256"):
        build_datasets(DataSection(path=str(tmp_path)), lambda: None, 256)


def test_chat_dataset_and_errors(tmp_path, tok, gsm8k):
    info = build_datasets(DataSection(path=str(gsm8k), seq_len=256, limit=10), lambda: tok)
    assert info.format == "chat" and len(info.train) + info.dropped == 10
    with pytest.raises(DataError, match="data path not found"):
        build_datasets(DataSection(path=str(tmp_path / "nope.txt")), lambda: tok)
    with pytest.raises(DataError, match="data.path is empty"):
        build_datasets(DataSection(), lambda: tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="no assistant message"):
        build_datasets(DataSection(path=str(bad)), lambda: tok)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        build_datasets(DataSection(path=str(bad), format="chat"), lambda: tok)
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="needs 'messages' or 'question'"):
        build_datasets(DataSection(path=str(bad), format="chat"), lambda: tok)
    bad.write_text("")
    with pytest.raises(DataError, match="empty file"):
        detect_format(bad)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    with pytest.raises(DataError, match="fewer tokens than one row"):
        build_datasets(DataSection(path=str(tiny), seq_len=64), lambda: tok)
    with pytest.raises(DataError, match="too few"):
        build_datasets(DataSection(path=str(gsm8k), limit=1, val_fraction=0.5), lambda: tok)


def test_not_utf8_and_empty_chat_files_are_named(tmp_path, tok):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Once upon a time in Mal\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte offset 23\)"):
        build_datasets(DataSection(path=str(latin)), lambda: tok)
    lines = tmp_path / "latin1.jsonl"
    lines.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text \(byte offset 28\)"):
        build_datasets(DataSection(path=str(lines), format="jsonl"), lambda: tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: the file has no examples"):
        build_datasets(DataSection(path=str(empty), format="chat"), lambda: tok)


def test_relative_manifest_tokenizer_is_found_from_another_directory(tmp_path, monkeypatch):
    from deepwhale.train.data import resolve_recorded_tokenizer

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    monkeypatch.chdir(shards)  # neither the pipeline's directory nor the shard folder's parent
    want = str(tmp_path / "tok")
    assert resolve_recorded_tokenizer("tok", shards, {}) == want  # found via a parent of shards
    assert resolve_recorded_tokenizer("../tok", shards, {"cwd": str(tmp_path / "data")}) == want
    assert resolve_recorded_tokenizer(want, shards, {}) == want  # absolute: as recorded
    assert resolve_recorded_tokenizer("nowhere", shards, {}) == "nowhere"
    assert resolve_recorded_tokenizer(None, shards, {}) is None
