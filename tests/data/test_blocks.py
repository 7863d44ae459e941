"""The pure building blocks (no pipeline): readers, cleaning, quality heuristics, dedup
helpers, config parsing, perplexity scoring and the report."""

from __future__ import annotations

import math

import pytest

from deepwhale.data import config as C
from deepwhale.data.clean import clean_text
from deepwhale.data.cli import _set_value
from deepwhale.data.dedup import (
    _bucket_edges,
    connected_components,
    lsh_bands,
    normalize_for_dedup,
    shingles,
    text_key,
)
from deepwhale.data.lm import ScorePerplexity, _KeepFluent, _percentile
from deepwhale.data.pack import shard_of, tokenizer_folder, tokenizer_info
from deepwhale.data.pipeline import beam_args, seed_for
from deepwhale.data.quality import cjk_fraction, quality_reason, words_of
from deepwhale.data.readers import (
    decode,
    file_pattern,
    make_doc,
    parse_jsonl,
    parse_novel,
    parse_pairs,
    parse_poetry,
    parse_text,
    undecodable,
)
from deepwhale.data.report import plot_histogram, ppl_summary

# ----------------------------------------------------------------------------------- readers


def test_decode_strips_bom_and_crlf():
    assert decode("\ufeffa\r\nb\rc".encode()) == "a\nb\nc"
    assert decode(b"\xff ok") == "\ufffd ok"
    escaped = decode("\ufeff中\r\n".encode() + "é".encode("latin-1"), errors="surrogateescape")
    assert escaped.startswith("中\n") and undecodable(escaped)
    assert not undecodable(decode("中文 \ufffd ok".encode(), errors="surrogateescape"))


def test_parse_text_modes():
    text = "one\n\n two \n\nthree\nfour\n"
    assert [t for _, t in parse_text(text, "line")] == ["one", " two ", "three", "four"]
    assert [t for _, t in parse_text(text, "block")] == ["one", " two ", "three\nfour"]
    assert [i for i, _ in parse_text(text, "document")] == [0]
    assert [t for _, t in parse_text("a\n<|e|>\nb\n<|e|>", separator="<|e|>")] == ["a", "b"]


def test_parse_novel_chapters_and_fallback(corpus):
    text = decode((corpus / "zh/novels/sanguoyanyi.txt").read_bytes())
    chapters = list(parse_novel(text))
    assert len(chapters) == 121  # preamble + 120 chapters
    assert chapters[1][1].startswith("第一回")
    assert chapters[120][1].lstrip().startswith("第一百二十回")
    assert [t for _, t in parse_novel("a\n\nb")] == ["a", "b"]


def test_parse_poetry_and_errors(corpus):
    poems = list(parse_poetry((corpus / "zh/poetry/tangshi300.json").read_text()))
    assert len(poems) == 366 and poems[0][1].split("\n")[:2] == ["在嶽詠蟬", "駱賓王"]
    lunyu = list(parse_poetry((corpus / "zh/poetry/lunyu.json").read_text()))
    assert lunyu[0][1].startswith("学而篇")
    with pytest.raises(ValueError, match="x.json: not valid JSON"):
        list(parse_poetry("[", "x.json"))
    with pytest.raises(ValueError, match="expected a JSON list"):
        list(parse_poetry("{}", "x.json"))
    with pytest.raises(ValueError, match="item 0 has no 'paragraphs'"):
        list(parse_poetry('[{"title": 1}]', "x.json"))


def test_parse_pairs_groups(corpus):
    text = decode((corpus / "mixed/cmn-eng/cmn.txt").read_bytes()[:2000])
    one = list(parse_pairs(text))
    assert one[0] == (0, "Hi.\n嗨。")
    grouped = list(parse_pairs(text, 3))
    assert grouped[0][1].count("\n\n") == 2 and len(grouped) == math.ceil(len(one) / 3)
    assert list(parse_pairs("no tab here\n\n\tzh\n")) == []
    bad = list(parse_pairs("no tab here\n\n\tzh\na\tb\n", report_malformed=True))
    assert bad == ["malformed_pair", "malformed_pair", (0, "a\nb")]


def test_parse_jsonl_reports_bad_lines():
    items = list(parse_jsonl('{"t": "a"}\n\nnot json\n{"u": 1}\n[1]\n{"t": "b"}', "t", "f"))
    assert items == [(0, "a"), "corrupt", "missing_field", "missing_field", (5, "b")]


def test_doc_ids_sort_by_file_then_position(tmp_path):
    ids = [make_doc("a.txt", i, "x")["id"] for i in (2, 10)] + [make_doc("b.txt", 0, "")["id"]]
    assert ids == sorted(ids)
    assert file_pattern(str(tmp_path)).endswith("/*") and file_pattern("x/*.txt") == "x/*.txt"


# ----------------------------------------------------------------------------------- cleaning


def test_clean_text():
    raw = "\ufeff第一回　甄士隐\r\n\r\n    \t\t\r\n\r\n\r\n此开卷．\x07ｆｕｌｌ\u200b  \r\nschÃ¶n"
    assert clean_text(raw) == "第一回 甄士隐\n\n此开卷.full\nschön"
    assert clean_text("ｆｕｌｌ", fix_unicode=False) == "full"
    assert clean_text("ｆｕｌｌ", fix_unicode=False, nfkc=False) == "ｆｕｌｌ"


# ------------------------------------------------------------------------------------ quality

P = C.QualityParams(min_chars=20, min_words=5)
ZH = "子曰学而时习之不亦说乎有朋自远方来不亦乐乎人不知而不愠不亦君子乎其为人也孝弟而好犯上者鲜矣。"
EN = "The quick brown fox jumps over the lazy dog while the farmer watches from the barn door."


@pytest.mark.parametrize(
    "text, reason",
    [
        ("short", "too_short"),
        ("x" * 30, "too_few_words"),
        ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.", "lorem_ipsum"),
        ("$$$ €€€ ★★★ ♥♥♥ click here now ☆☆☆ ©©© ®®®", "symbol_ratio"),
        ("call 1234567890 or 0987654321 or 5555555555 now", "digit_ratio"),
        ("same line here\n" * 5 + EN, "dup_lines"),
        ("wait...\nand then...\nnothing...\n" + EN, "ellipsis_lines"),
        ("a b c d e f g h i j k l m n o p", "mean_word_len"),
        ("abc! def? ghi; !!!! ???? .... ,,,, ---- ;;;;", "alpha_words"),
        ("buy now " * 10, "top_2gram"),
        (EN + " " + EN, "dup_5gram"),
        (EN, None),
        (ZH, None),
    ],
)
def test_quality_reasons(text, reason):
    assert quality_reason(text, P) == reason


def test_quality_bounds_and_cjk_words():
    assert quality_reason(EN, C.QualityParams(max_chars=10, min_chars=1)) == "too_long"
    assert (
        quality_reason(EN, C.QualityParams(min_chars=1, min_words=1, max_words=3))
        == "too_many_words"
    )
    assert quality_reason("   \n\t  " * 10, C.QualityParams(min_chars=1)) == "too_short"
    text = "\n".join([ZH, ZH, "第一行", "第二行", "第三行", "第四行"])
    assert quality_reason(text, C.QualityParams(min_chars=1, min_words=1)) == "dup_line_chars"
    assert cjk_fraction(ZH) > 0.9 and cjk_fraction(EN) == 0 and cjk_fraction("") == 0
    words = words_of("我们今天去北京,好吗?", cjk=True)
    assert "北京" in words and "," not in words


# -------------------------------------------------------------------------------------- dedup


def test_dedup_keys_and_shingles():
    assert normalize_for_dedup("Hello,  World!") == "helloworld"
    assert text_key("Hello, World") == text_key("hello world!")
    assert text_key("a b", normalize=False) != text_key("ab", normalize=False)
    zh = shingles("今天天气很好", 3, 2)
    assert b"\xe4\xbb\x8a\xe5\xa4\xa9\xe5\xa4\xa9" in zh and len(zh) == 4  # 今天天, ...
    en = shingles("The cat sat on the mat", 5, 2)
    assert b"the cat" in en and len(en) == 5
    assert shingles("hi", 5, 3) == [b"hi"]
    b, r = lsh_bands(0.8, 128)
    assert b * r <= 128 and b > 1


def test_bucket_edges_verify_and_star():
    import numpy as np

    a = np.arange(8, dtype=np.uint64)
    near = a.copy()
    near[0] = 99  # 7/8 equal slots
    far = a + 100
    members = [("b", near.tobytes()), ("a", a.tobytes()), ("c", far.tobytes())]
    assert list(_bucket_edges(("k", members), 0.8, 64)) == [("a", "b")]
    big = [(f"d{i:02d}", a.tobytes()) for i in range(5)]
    assert list(_bucket_edges(("k", big), 0.8, 2)) == [("d00", f"d0{i}") for i in range(1, 5)]
    assert list(_bucket_edges(("k", big[:1] * 2), 0.8, 64)) == []


def test_connected_components_smallest_id_survives():
    assert connected_components([("d", "c"), ("c", "b"), ("e", "a")]) == {
        "c": "b",
        "d": "b",
        "e": "a",
    }
    # a chain joined from both ends still has exactly one root
    drops = connected_components([("x3", "x4"), ("x1", "x2"), ("x2", "x3")])
    assert drops == {"x2": "x1", "x3": "x1", "x4": "x1"}
    assert connected_components([]) == {}


# ------------------------------------------------------------------------------------- config


def test_config_defaults_and_types():
    cfg = C.parse_config({"input": "a.txt", "stages": ["clean", {"quality": None}]})
    assert cfg.inputs[0].path == "a.txt" and cfg.runner == "FnApiRunner"
    assert cfg.stage("quality").params == C.QualityParams()
    assert cfg.stage("tokenize") is None
    q = C.build_params(C.QualityParams, {"max_symbol_ratio": 1}, "quality")
    assert isinstance(q.max_symbol_ratio, float)


@pytest.mark.parametrize(
    "raw, message",
    [
        ([], "expected a mapping"),
        ({}, "'input' is required"),
        ({"input": 3}, "'input' must be a path"),
        ({"input": "a", "mode": "live"}, "mode must be one of"),
        ({"input": "a", "options": [1]}, "'options' must be a mapping"),
        ({"input": "a", "output": 3}, "'output' must be a folder"),
        ({"input": "a", "stages": "clean"}, "stages must be a list"),
        ({"input": "a", "stages": [{"a": 1, "b": 2}]}, "one-key mapping"),
        ({"input": "a", "stages": [{"clean": [1]}]}, "parameters must be a mapping"),
        ({"input": "a", "stages": [{"clean": {"t2s": "yes"}}]}, "expected bool"),
        ({"input": "a", "stages": [{"perplexity": {"backend": "gpt"}}]}, "backend must be"),
        ({"input": "a", "stages": [{"perplexity": {"backend": "kenlm"}}]}, "needs perplexity"),
        ({"input": "a", "stages": [{"perplexity": {"keep_percentile": 0}}]}, "(0, 100]"),
        ({"input": "a", "stages": [{"perplexity": {"max_tokens": 1}}]}, "max_tokens must"),
        ({"input": "a", "stages": [{"augment": {"strategies": [3]}}]}, "must be a mapping"),
        ({"input": "a", "stages": [{"tokenize": {"seq_len": 1}}]}, "seq_len must be >= 2"),
        ({"input": "a", "stages": [{"minhash_dedup": {"num_perm": 1}}]}, "num_perm >= 2"),
        ({"input": {"path": "a", "split": "page"}}, "unknown split"),
        ({"input": {"path": "a", "pairs_per_doc": 0}}, "pairs_per_doc must be"),
        ({"input": {"format": "text"}}, "missing 1 required"),
        ({"input": "a", "write_docs": "y"}, "expected bool"),
        ({"input": "a", "stages": [{"quality": {"min_chars": -3}}]}, "quality.min_chars must"),
        (
            {"input": "a", "stages": [{"quality": {"max_symbol_ratio": 5}}]},
            "quality.max_symbol_ratio must be in [0, 1], got 5.0",
        ),
        (
            {"input": "a", "stages": [{"quality": {"min_words": 9, "max_words": 3}}]},
            "quality.min_words (9) must not exceed quality.max_words (3)",
        ),
        ({"input": "a", "stages": [{"clean": {"min_chars": -1}}]}, "clean.min_chars must"),
        ({"input": "a", "stages": [{"langid": {"max_chars": 0}}]}, "langid.max_chars must"),
        ({"input": "a", "stages": [{"perplexity": {"max_ppl": -1}}]}, "max_ppl must be > 0"),
        ({"input": "a", "streaming": {"window_s": 0}}, "streaming.window_s must be > 0"),
    ],
)
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(C.PipelineConfigError, match=None) as e:
        C.parse_config(raw)
    assert message in str(e.value)


def test_set_value_and_beam_args():
    raw = {"input": "a", "stages": ["quality", {"clean": None}]}
    _set_value(raw, "quality.min_chars=7")
    _set_value(raw, "clean.t2s=true")
    _set_value(raw, "streaming.window_s=2")
    _set_value(raw, "options.direct_num_workers=2")
    _set_value(raw, "output=o")
    cfg = C.parse_config(raw)
    assert cfg.stage("quality").params.min_chars == 7 and cfg.stage("clean").params.t2s
    assert cfg.streaming.window_s == 2.0 and cfg.output == "o"
    cfg.options["save_main_session"] = True
    cfg.options["pickle_library"] = False
    args = beam_args(cfg, ["--runner=DirectRunner"])
    assert args == [
        "--runner=FnApiRunner",
        "--direct_num_workers=2",
        "--save_main_session",
        "--runner=DirectRunner",
    ]
    assert seed_for(0, "a", "x") == seed_for(0, "a", "x") != seed_for(1, "a", "x")


def test_load_yaml_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("")
    with pytest.raises(C.PipelineConfigError, match="'input' is required"):
        C.load_config(f)


# ------------------------------------------------------------------------- perplexity, report


def test_score_perplexity_with_bundled_model():
    fn = ScorePerplexity(C.PerplexityParams(max_tokens=64))
    fn.setup()
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    good, bad = fn.score(story), fn.score("zq xv kj qq zz wx vq jj kk xx qz")
    assert 1 < good < bad
    assert fn.score("") == math.inf
    assert next(fn.process({"id": "x", "text": story}))["ppl"] == good
    assert _percentile([1.0, 2.0, math.inf, 3.0], 50) == 2.0 and _percentile([math.inf], 5) is None


def test_kenlm_backend_without_package_is_a_clear_error():
    pytest.importorskip("apache_beam")
    try:
        import kenlm  # noqa: F401

        pytest.skip("kenlm is installed")
    except ImportError:
        pass
    fn = ScorePerplexity(C.PerplexityParams(backend="kenlm", kenlm_model="m.arpa"))
    with pytest.raises(C.PipelineConfigError, match="pip install kenlm"):
        fn.setup()


def test_report_summary_and_png(tmp_path):
    s = ppl_summary([1.0, 10.0, 100.0, math.inf])
    assert s["count"] == 4 and s["finite"] == 3 and s["p50"] == 10.0
    assert ppl_summary([])["finite"] == 0
    png = plot_histogram([1.0, 10.0, 100.0], tmp_path / "h.png", cutoff=50.0)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_pack_helpers(tmp_path):
    assert shard_of("a#0000001", 4) == shard_of("a#0000001", 4) < 4
    assert len({shard_of(f"d{i}", 4) for i in range(64)}) == 4
    vocab, eos = tokenizer_info(None)
    assert vocab == 512 and eos == 2
    with pytest.raises(C.PipelineConfigError, match="no tokenizer.json"):
        tokenizer_folder(str(tmp_path))


def test_keep_fluent_threshold_and_percentile():
    keep = _KeepFluent(max_ppl=100.0, stage="perplexity")
    docs = [{"id": str(i), "ppl": p} for i, p in enumerate([5.0, 50.0, 500.0, math.inf])]
    assert [d["id"] for d in docs for _ in keep.process(d)] == ["0", "1"]
    assert [d["id"] for d in docs for _ in keep.process(d, cutoff=10.0)] == ["0"]


def test_bundled_model_names_work_for_tokenize_and_perplexity():
    from deepwhale.checkpoint.hub import BUNDLED
    from deepwhale.data.pack import tokenizer_folder, tokenizer_info

    assert tokenizer_folder("deepwhale-demo") == BUNDLED / "deepwhale-demo"
    assert tokenizer_info("deepwhale-demo") == (8192, 1)
