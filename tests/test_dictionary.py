"""Domain dictionaries (deepwhale/dictionary.py) and `deepwhale dict check`: both formats, every
kind of problem with its line, the exit codes, and the shipped example dictionaries."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deepwhale.cli import app
from deepwhale.dictionary import (
    DictionaryError,
    check_dictionary,
    load_dictionary,
    parse_dictionary,
)
from tests.helpers import REPO

runner = CliRunner()

BAD_YAML = """\
entries:
  - {term: 市盈率, synonyms: [本益比, PE ratio], category: valuation}
  - {term: 市净率, synonyms: [P/B ratio], category: valuation}
  - {term: 市盈率, synonyms: [], category: valuation}
  - {term: 股息率, synonyms: [市净率], category: valuation}
  - {term: 息率, synonyms: [PE Ratio], category: valuation}
  - {term: 收益率, synonyms: [''], category: ''}
  - {term: 回报率, synonyms: [回报率], category: valuation}
"""


@pytest.mark.parametrize("name", ["finance.yaml", "medical.csv"])
def test_example_dictionaries_are_clean(name):
    d, problems = check_dictionary(REPO / "examples/dicts" / name)
    assert problems == []
    assert len(d.entries) >= 30
    forms = d.forms()
    assert any("\u4e00" <= c <= "\u9fff" for c in forms[0])  # Chinese terms
    assert any(f.isascii() for f in forms)  # and English ones
    assert all(e.translation for e in d.entries)


def test_every_problem_has_its_line():
    _, problems = parse_dictionary(BAD_YAML, "yaml", "bad.yaml")
    got = {(p.line, p.kind, p.level) for p in problems}
    assert (4, "duplicate", "error") in got  # 市盈率 again (first at line 2)
    assert (5, "conflict", "error") in got  # synonym 市净率 is line 3's term
    assert (6, "shared_synonym", "error") in got  # PE Ratio is also line 2's (casefolded)
    assert (7, "empty", "error") in got  # empty synonym and category
    assert (8, "redundant", "warning") in got  # synonym repeats its own term
    dup = next(p for p in problems if p.kind == "duplicate")
    assert "line 2" in dup.message and str(dup).startswith("bad.yaml:4: error:")


def test_csv_lines_and_defaults(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text(
        "term,synonyms,preferred,translation,category\n"
        "心肌梗死,心梗|MI,,myocardial infarction,cardiology\n"
        "\n"
        "冠心病,CHD|心梗,,coronary heart disease,cardiology\n"
        "房颤,AF,房颤\n",
        encoding="utf-8",
    )
    d, problems = check_dictionary(f)
    assert d.entries[0].preferred == "心肌梗死"  # empty preferred = the term
    assert d.rewrites()["MI"] == "心肌梗死"
    got = {(p.line, p.kind) for p in problems}
    assert got == {(4, "shared_synonym"), (5, "empty")}  # blank line 3 still counted
    with pytest.raises(DictionaryError) as e:
        load_dictionary(f)
    assert f"{f}:4: error:" in str(e.value) and len(e.value.problems) == 2


def test_unreadable_files(tmp_path):
    with pytest.raises(DictionaryError, match="yaml, .yml or .csv"):
        check_dictionary(tmp_path / "d.txt")
    bad = tmp_path / "d.yaml"
    bad.write_text("entries: [ {term: a\n", encoding="utf-8")
    with pytest.raises(DictionaryError, match="malformed YAML"):
        check_dictionary(bad)
    hdr = tmp_path / "d.csv"
    hdr.write_text("word,meaning\nx,y\n", encoding="utf-8")
    with pytest.raises(DictionaryError, match="CSV header"):
        check_dictionary(hdr)


def test_cli_exit_codes(tmp_path):
    ok = runner.invoke(app, ["dict", "check", str(REPO / "examples/dicts/finance.yaml")])
    assert ok.exit_code == 0 and "0 error(s)" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML, encoding="utf-8")
    res = runner.invoke(app, ["dict", "check", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}:5: error:" in res.output
    res = runner.invoke(app, ["dict", "check", "--json", str(bad)])
    report = json.loads(res.output)
    assert res.exit_code == 1 and report["errors"] >= 5 and report["warnings"] == 1
    missing = runner.invoke(app, ["dict", "check", str(tmp_path / "none.csv")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
