"""Domain dictionaries in the data pipeline (deepwhale/data/terms.py): Aho-Corasick matching
with Latin word boundaries and longest match first, the normalize_terms stage, jieba user words
in the quality stage and the augmentation guard, end to end in a real in-process Beam pipeline."""

from __future__ import annotations

import json

import pytest

from deepwhale.data import augment as A
from deepwhale.data.config import PipelineConfigError, QualityParams, parse_config
from deepwhale.data.pipeline import run
from deepwhale.data.quality import QualityFilter, quality_reason, words_of
from deepwhale.data.terms import TermMatcher, guard, jieba_tokenizer, matcher_for
from deepwhale.dictionary import load_dictionary
from tests.helpers import REPO

FINANCE = REPO / "examples/dicts/finance.yaml"
MEDICAL = REPO / "examples/dicts/medical.csv"
LONG_TERMS = "息税折旧摊销前利润和净资产收益率以及总资产收益率，还有经营活动现金流与资产负债率。"


def test_matcher_boundaries_longest_first_and_case():
    m = matcher_for(load_dictionary(MEDICAL))
    text, n = m.rewrite("MIT students read about MI, 患者MI后出现房颤; Heart Attack risk.")
    assert text == "MIT students read about 心肌梗死, 患者心肌梗死后出现心房颤动; 心肌梗死 risk."
    assert n == 4
    # longest first: 急性心肌梗死 (a synonym) wins over 心肌梗死 inside it; 心肌梗死 itself stays
    assert m.rewrite("急性心肌梗死与心肌梗死") == ("心肌梗死与心肌梗死", 1)
    assert m.rewrite("nothing here") == ("nothing here", 0)
    exact = TermMatcher({"PE ratio": "市盈率"}, ignore_case=False)
    assert exact.rewrite("pe ratio, PE ratio") == ("pe ratio, 市盈率", 1)
    m = TermMatcher({"甲乙": "x", "甲乙丙": "y", "乙丙丁": "z"})
    assert [(x.start, x.end) for x in m.find("甲乙丙丁")] == [(0, 3)]  # leftmost, longest
    assert m.find("abc 甲乙") and not TermMatcher({"ab": "x"}).find("abc")  # Latin boundary


def test_jieba_user_words_keep_terms_whole_in_quality():
    forms = load_dictionary(FINANCE).forms()
    seg = jieba_tokenizer(forms)
    plain = words_of(LONG_TERMS, True)
    with_dict = words_of(LONG_TERMS, True, seg)
    assert "息税折旧摊销前利润" not in plain and "息税折旧摊销前利润" in with_dict
    assert {"净资产收益率", "经营活动现金流", "资产负债率"} <= set(with_dict)
    p = QualityParams(min_chars=10, min_words=3)
    # the terms are long words: with the dictionary the CJK mean word length bound is exceeded
    assert quality_reason(LONG_TERMS, p) is None
    assert quality_reason(LONG_TERMS, p, seg) == "mean_word_len"
    f = QualityFilter(p, dictionary=str(FINANCE))
    f.setup()
    assert list(f.process({"id": "a", "text": LONG_TERMS})) == []


def _synonyms(tmp_path):
    syn = tmp_path / "syn.txt"
    syn.write_text(
        "市盈率 估值倍数\n公司 企业\nratio proportion\nhigh elevated\n", encoding="utf-8"
    )
    return syn


def test_guard_keeps_terms_from_every_word_strategy(tmp_path):
    syn = str(_synonyms(tmp_path))
    text = "这家公司的市盈率很高，本益比也很高。The P/E ratio is high."
    m = matcher_for(load_dictionary(FINANCE), rewrite=False)
    sr = A.build("synonym_replacement", rate=1.0, synonyms=syn, builtin=False)
    assert "估值倍数" in sr(text, 0)  # unguarded, the term is replaced
    for name, params in [
        ("synonym_replacement", {"synonyms": syn, "builtin": False}),
        ("random_insertion", {"synonyms": syn, "builtin": False}),
        ("random_swap", {}),
        ("random_deletion", {}),
        ("char_noise", {}),
    ]:
        aug = guard(A.build(name, rate=1.0, **params), m)
        for seed in range(5):
            out = aug(text, seed)
            assert out.count("市盈率") == 1 and "本益比" in out and "P/E ratio" in out, (name, out)
            assert "估值倍数" not in out and "proportion" not in out and "\ue000" not in out
    out = guard(sr, m)(text, 0)
    assert "企业" in out and "elevated" in out  # other words still change


def test_pipeline_normalize_terms_quality_augment(tmp_path):
    from tests.data.conftest import CORPUS

    pairs = CORPUS / "mixed/cmn-eng/cmn.txt"
    if not pairs.exists():
        pytest.skip("shared corpus not found")
    rows = pairs.read_text(encoding="utf-8-sig").splitlines()[1000:1040]
    planted = ["这家公司的本益比很高，每股盈余却很低。", "The PE ratio and EPS fell; IPO soon."]
    docs = [r.split("\t")[1] for r in rows] + planted + [LONG_TERMS]
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    cfg = parse_config(
        {
            "input": {"path": str(src), "format": "jsonl"},
            "output": str(out),
            "dictionary": str(FINANCE),
            "stages": [
                {"normalize_terms": {}},
                {"quality": {"min_chars": 5, "min_words": 1, "min_alpha_word_frac": 0.0}},
                {
                    "augment": {
                        "strategies": [
                            {
                                "name": "synonym_replacement",
                                "rate": 1.0,
                                "synonyms": str(_synonyms(tmp_path)),
                                "builtin": False,
                            }
                        ]
                    }
                },
            ],
        }
    )
    report = run(cfg)
    norm = report["stages"]["normalize_terms"]
    assert norm["in"] == len(docs) and norm["rewrites"] == 5 and norm["docs_rewritten"] == 2
    assert report["stages"]["quality"]["dropped"].get("mean_word_len", 0) >= 1  # LONG_TERMS
    got = [
        json.loads(line)
        for f in sorted((out / "docs").glob("*.jsonl"))
        for line in f.read_text("utf-8").splitlines()
    ]
    texts = {d["text"] for d in got if "augmented" not in d}
    assert "这家公司的市盈率很高，每股收益却很低。" in texts
    assert "The 市盈率 and 每股收益 fell; 首次公开募股 soon." in texts
    copies = [d["text"] for d in got if d.get("augmented")]
    zh = next(t for t in copies if "每股收益却" in t)
    assert "市盈率" in zh and "估值倍数" not in zh and "企业" in zh


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("term,synonyms,category\n市盈率,本益比,valuation\n市盈率,,valuation\n")
    base = {"input": str(tmp_path / "x.txt"), "output": str(tmp_path / "o")}
    with pytest.raises(PipelineConfigError, match=r"(?s)config.dictionary: .*bad.csv:3: error"):
        parse_config({**base, "dictionary": str(bad)})
    with pytest.raises(PipelineConfigError, match="normalize_terms.dictionary"):
        parse_config({**base, "stages": [{"normalize_terms": {"dictionary": str(bad)}}]})
    (tmp_path / "x.txt").write_text("some text\n")
    cfg = parse_config({**base, "stages": ["normalize_terms"]})
    with pytest.raises(PipelineConfigError, match="normalize_terms: no dictionary"):
        run(cfg)


def test_data_run_dictionary_flag(tmp_path):
    from typer.testing import CliRunner

    from deepwhale.cli import app

    src = tmp_path / "in.txt"
    src.write_text("这家公司的本益比很高。PE ratio up.\n", encoding="utf-8")
    out = tmp_path / "o"
    res = CliRunner().invoke(
        app,
        [
            "data",
            "run",
            "-i",
            str(src),
            "-o",
            str(out),
            "--stages",
            "normalize_terms",
            "--dictionary",
            str(FINANCE),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["normalize_terms"]["rewrites"] == 2
    (doc,) = [
        json.loads(x)
        for f in (out / "docs").glob("*.jsonl")
        for x in f.read_text().split("\n")
        if x
    ]
    assert doc["text"] == "这家公司的市盈率很高。市盈率 up."


def test_benchmark_agrees_with_its_regex_baseline():
    """benchmarks/normalize_terms.py: ours and the regex alternation rewrite real lines the
    same way (the timings are the benchmark's to report, not asserted here)."""
    import subprocess
    import sys

    from tests.data.conftest import CORPUS

    if not (CORPUS / "zh/novels/hongloumeng.txt").exists():
        pytest.skip("shared corpus not found")
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/normalize_terms.py"),
            "--json",
            "--quiet",
            "--terms",
            "50",
            "500",
            "--docs",
            "3000",
            "--seconds",
            "0.5",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert [r["terms"] for r in result["rows"]] == [50, 500]
    assert all(r["agree"] and r["agree_docs"] > 0 and r["rewrites"] > 0 for r in result["rows"])
