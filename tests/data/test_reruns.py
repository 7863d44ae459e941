"""Re-runs and bad input, each through a real (small) Beam pipeline on the in-process runner:
a failed run leaves its output folder usable, a corrupted shard is rewritten, the manifest
names the tokenizer by absolute path, undecodable bytes and tab-less pairs are counted and
dropped, and unknown Beam flags are named in a warning."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from deepwhale.api import DEFAULT_MODEL
from deepwhale.data.cli import data_app
from deepwhale.data.config import parse_config
from deepwhale.data.pipeline import run, unknown_beam_flags
from deepwhale.data.shards import PackedDataset

runner = CliRunner()
STORY = "Once upon a time a little cat sat in the sun and was happy all day long."


def _cli(*args):
    return runner.invoke(data_app, ["run", *args])


def _stories(path, n=12):
    path.write_text("\n".join(f"{STORY} Story number {i}." for i in range(n)) + "\n")
    return path


def test_failed_run_leaves_folder_usable_and_unknown_flag_warned(tmp_path):
    src = _stories(tmp_path / "in.txt")
    out = tmp_path / "out"
    base = ["-i", str(src), "--stages", "tokenize", "-o", str(out), "-q"]
    r = _cli(*base, "--set", "tokenize.tokenizer=/bad")
    assert r.exit_code == 2 and "no tokenizer.json in /bad" in r.output
    assert not (out / "shards/pipeline.json").exists()  # validated before claiming

    # a stale fingerprint from a run that died before writing any shard does not block either
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "shards/pipeline.json").write_text(json.dumps({"fingerprint": "stale"}))
    r = _cli(*base, "--set", "tokenize.seq_len=16", "--direct_num_worker=2")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "--direct_num_worker" in r.output
    report = json.loads((out / "report.json").read_text())
    assert report["unknown_beam_args"] == ["direct_num_worker"]
    assert len(PackedDataset(out / "shards")) > 0


def test_unknown_beam_flags():
    assert unknown_beam_flags(["--runner=FnApiRunner", "--direct_num_workers=2"]) == []
    assert unknown_beam_flags(["--direct_num_worker=2", "--frobnicate"]) == [
        "direct_num_worker",
        "frobnicate",
    ]


def test_rerun_rewrites_corrupted_shard_and_manifest_tokenizer_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, tmp_path / "tok" / name)
    src = _stories(tmp_path / "in.txt", 24)
    cfg = parse_config(
        {
            "input": str(src),
            "output": "out",
            "stages": [{"tokenize": {"tokenizer": "tok", "seq_len": 16, "num_shards": 2}}],
        }
    )
    run(cfg)
    shards = tmp_path / "out/shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"] == str((tmp_path / "tok").resolve())
    good = (shards / "shard-00000.bin").read_bytes()
    bad = bytearray(good)
    bad[3] ^= 0xFF
    (shards / "shard-00000.bin").write_bytes(bytes(bad))

    report = run(cfg)
    s = report["stages"]["shards"]
    assert s["rewritten_corrupt"] == 1 and s["kept"] == 1
    assert s["dropped"]["already_complete"] == 1
    assert (shards / "shard-00000.bin").read_bytes() == good
    PackedDataset(shards).verify_all()


def test_undecodable_and_malformed_input_counted_and_dropped(tmp_path):
    text = tmp_path / "mixed.txt"
    text.write_bytes(
        b"good line\n"
        + "café au lait\n".encode("latin-1")
        + "红楼梦第一回\n".encode("gbk")
        + "另一行\n".encode()
    )
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(
        json.dumps({"text": "fine"}).encode()
        + b"\n"
        + json.dumps({"text": "naïve"}, ensure_ascii=False).encode("latin-1")
        + b"\n"
    )
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("Hi.\t你好。\tCC\nno tab here\n\n\tonly zh\nBye.\t再见。\n", encoding="utf-8")
    out = tmp_path / "out"
    cfg = parse_config(
        {
            "input": [
                {"path": str(text)},
                {"path": str(jsonl), "format": "jsonl"},
                {"path": str(pairs), "format": "pairs"},
            ],
            "output": str(out),
        }
    )
    report = run(cfg)
    read = report["stages"]["read"]
    assert read["decode_error"] == 3 and read["malformed_pair"] == 2
    assert read["docs"] == 5 == report["docs_out"]
    docs = [json.loads(line) for f in out.glob("docs/*.jsonl") for line in f.open()]
    texts = sorted(d["text"] for d in docs)
    assert texts == sorted(["good line", "另一行", "fine", "Hi.\n你好。", "Bye.\n再见。"])
    assert not any("\ufffd" in t for t in texts)


def test_config_without_input_and_non_parquet_file_are_named(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("stages: [clean]\n")
    r = _cli("--config", str(cfg), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and f"{cfg}: the config has no 'input'" in r.output
    txt = tmp_path / "notparquet.txt"
    txt.write_text("hello\n")
    r = _cli("-i", str(txt), "--format", "parquet", "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and str(txt) in r.output and "not a Parquet file" in r.output
