"""``deepwhale data run`` through typer's CliRunner: clear errors for bad input, Beam options
passed through (multi-processing workers), and a re-run that skips complete shards."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deepwhale.data.cli import data_app
from deepwhale.data.shards import PackedDataset

runner = CliRunner()


def _run(*args):
    return runner.invoke(data_app, ["run", *args])


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("input: [a\nstages: {", "malformed YAML at line"),
        ("input: x.txt\nstages: [frobnicate]", "unknown stage 'frobnicate'"),
        (
            "input: x.txt\nstages: [{quality: {min_charz: 3}}]",
            "quality: unknown parameter 'min_charz'",
        ),
        ("input: x.txt\nstages: [{quality: {min_chars: many}}]", "quality.min_chars: expected int"),
        ("input: x.txt\nbogus: 1", "unknown key 'bogus'"),
        ("input: {path: x.txt, format: docx}", "unknown format 'docx'"),
        ("input: x.txt\nstages: [tokenize, clean]", "'tokenize' must be the last stage"),
        (
            "input: x.txt\nmode: streaming\nstages: [{perplexity: {keep_percentile: 90}}]",
            "cannot run in streaming",
        ),
        ("- just\n- a list", "expected a YAML mapping"),
        ("input: /nonexistent/*.txt", "no file matches"),
        (
            "input: x.txt\nstages: [{minhash_dedup: {threshold: 1.5}}]",
            "threshold must be in (0, 1)",
        ),
        ("input: x.txt\nstages: [{langid: {languages: [zh, xx]}}]", "unknown ISO 639-1 code 'xx'"),
        (
            "input: x.txt\nstages: [{augment: {strategies: [{name: nope}]}}]",
            "unknown strategy 'nope'",
        ),
        ("input: x.txt\nstages: [{perplexity: {model: /no/such}}]", "no such folder"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, yaml_text, message):
    (tmp_path / "x.txt").write_text("hello world\n")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text.replace("x.txt", str(tmp_path / "x.txt")))
    r = _run("--config", str(cfg), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_flag_errors(tmp_path):
    r = _run("--config", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "cannot read config" in r.output
    r = _run("-o", str(tmp_path))
    assert r.exit_code == 2 and "--input" in r.output
    (tmp_path / "x.txt").write_text("a\n")
    r = _run("-i", str(tmp_path / "x.txt"), "--stages", "clean", "--set", "quality.min_chars=3")
    assert r.exit_code == 2 and "stage 'quality' is not in the pipeline" in r.output
    r = _run("-i", str(tmp_path / "x.txt"), "--set", "novalue")
    assert r.exit_code == 2 and "expected KEY=VALUE" in r.output


def test_multiprocessing_run_then_rerun_skips_complete_shards(tmp_path, corpus):
    def args(out):
        return [
            "-i",
            str(corpus / "en/tinystories/tinystories_sample.txt"),
            "--format",
            "text",
            "--split",
            "line",  # ~20 docs: ids hold the input path, so 2 docs could share one shard
            "--stages",
            "clean,quality,tokenize",
            "--set",
            "quality.min_chars=20",
            "--set",
            "tokenize.seq_len=32",
            "--set",
            "tokenize.num_shards=2",
            "-o",
            str(out),
        ]

    multi = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    out = tmp_path / "out"
    r = _run(*args(out), *multi)
    assert r.exit_code == 0, r.output
    assert "tokenize" in r.output and "shards: 2 files" in r.output
    report = json.loads((out / "report.json").read_text())
    assert "--direct_running_mode=multi_processing" in report["beam_args"]
    assert report["stages"]["shards"]["kept"] == 2
    ds = PackedDataset(out / "shards")
    first = [ds[i].tolist() for i in range(len(ds))]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.bin")}

    # in-process into a fresh folder: the same bytes as two worker processes wrote
    r = _run(*args(tmp_path / "single"), "--quiet")
    assert r.exit_code == 0 and r.output == ""
    shas = [
        [s["sha256"] for s in json.loads((o / "shards/manifest.json").read_text())["shards"]]
        for o in (out, tmp_path / "single")
    ]
    assert shas[0] == shas[1]

    r = _run(*args(out), "--quiet")  # re-run into the first folder: nothing rewritten
    assert r.exit_code == 0 and r.output == ""
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["shards"]["dropped"]["already_complete"] == 2
    assert "kept" not in report["stages"]["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.bin")} == stamps
    ds = PackedDataset(out / "shards")
    assert [ds[i].tolist() for i in range(len(ds))] == first


def test_error_inside_a_worker_is_one_line(tmp_path):
    bad = tmp_path / "poems.json"
    bad.write_text("not json", encoding="utf-8")
    r = _run("-i", str(bad), "--format", "poetry", "-o", str(tmp_path / "out"), "-q")
    assert r.exit_code == 2
    assert f"error: {bad}: not valid JSON" in r.output and "Traceback" not in r.output


def test_rerun_with_another_config_is_refused(tmp_path, corpus):
    args = ["-i", str(corpus / "en/tinystories/tinystories_sample.txt"), "--split", "block"]
    out = ["-o", str(tmp_path / "out"), "-q", "--stages", "tokenize"]
    assert _run(*args, *out, "--set", "tokenize.seq_len=16").exit_code == 0
    r = _run(*args, *out, "--set", "tokenize.seq_len=32")
    assert r.exit_code == 2 and "different config" in r.output
    (tmp_path / "out/shards/pipeline.json").unlink()
    r = _run(*args, *out, "--set", "tokenize.seq_len=32")
    assert r.exit_code == 2 and "unknown origin" in r.output


def test_relative_input_paths_give_the_same_shards_anywhere(tmp_path, corpus, monkeypatch):
    """Ids are ``path#index`` with the path as written, so a relative input yields identical
    shards from two different working directories (the README's advice)."""
    text = (corpus / "en/tinystories/tinystories_sample.txt").read_bytes()
    shas = []
    for where in (tmp_path / "a", tmp_path / "b/deeper"):
        (where / "data").mkdir(parents=True)
        (where / "data/x.txt").write_bytes(text)
        monkeypatch.chdir(where)
        r = _run(
            "-i",
            "data/x.txt",
            "--split",
            "line",
            "--stages",
            "clean,tokenize",
            "--quiet",
            "--set",
            "tokenize.seq_len=32",
            "--set",
            "tokenize.num_shards=3",
            "-o",
            "out",
        )
        assert r.exit_code == 0, r.output
        manifest = json.loads((where / "out/shards/manifest.json").read_text())
        shas.append([s["sha256"] for s in manifest["shards"]])
    assert len(shas[0]) == 3 and shas[0] == shas[1]
