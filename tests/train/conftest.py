"""Fixtures for the training tests: small slices of the shared real corpora."""

from __future__ import annotations

import json

import pytest

from tests.helpers import shared_data


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The first ~40 KB of tiny shakespeare as a .txt file."""
    src = shared_data("corpus", "en", "tinyshakespeare", "input.txt")
    out = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    out.write_text(src.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def gsm8k(tmp_path_factory):
    """The first 64 GSM8K training records ({question, answer} JSONL)."""
    src = shared_data("bench", "gsm8k", "train.jsonl")
    lines = src.read_text(encoding="utf-8").splitlines()[:64]
    out = tmp_path_factory.mktemp("chat") / "gsm8k.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """A few multi-turn {"messages": [...]} records of different lengths."""
    out = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    recs = []
    for i in range(12):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        msgs += [
            {"role": "user", "content": "Tell me a story " + "please " * i},
            {"role": "assistant", "content": "Once upon a time " + "there was a cat. " * (i + 1)},
        ]
        if i % 2:
            msgs += [
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "The end."},
            ]
        recs.append({"messages": msgs})
    out.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    return out


def base_overrides(out_dir, data, **extra) -> list[str]:
    """Overrides for a quiet, fast, log-free run."""
    items = {
        "out_dir": str(out_dir),
        "data.path": str(data),
        "log.quiet": "true",
        "log.tensorboard": "false",
        "checkpoint.save_final": "false",
        "train.device": "cpu",
    }
    items.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in items.items()]
