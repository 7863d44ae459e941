"""End to end: one real Beam pipeline (in-process FnApiRunner) over slices of the real corpora
plus planted documents, shared by the assertions below through a module-scoped fixture."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepwhale.data.clean import clean_text
from deepwhale.data.config import parse_config
from deepwhale.data.pipeline import run
from deepwhale.data.readers import decode, parse_novel
from deepwhale.data.shards import PackedDataset
from deepwhale.tokenizer import Tokenizer

from .conftest import head_lines

GARBAGE = (
    "Buy cheap watches now $$$ €€€ ★★★ ♥♥♥ click here ☆☆☆ best price ©©© ®®® ™™™ "
    "win big today ★★★ $$$ ♥♥♥ order now"
)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("e2e")
    novel = d / "a_hongloumeng.txt"
    novel.write_bytes(head_lines(corpus / "zh/novels/hongloumeng.txt", 60_000))
    pairs = d / "b_cmn.txt"
    pairs.write_bytes(head_lines(corpus / "mixed/cmn-eng/cmn.txt", 40_000))
    assert pairs.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in novel.read_bytes()
    chapters = [t for _, t in parse_novel(decode(novel.read_bytes()))]
    original = chapters[1]  # a full chapter (0 is the title preamble)
    near = original.replace("甄士隐", "甄氏隐", 3).replace("贾雨村", "贾羽村", 2) + "\n(完)"
    stories = [
        s.strip()
        for s in (corpus / "en/tinystories/tinystories_sample.txt")
        .read_text()
        .split("<|endoftext|>")
        if s.strip()
    ]
    planted = d / "z_planted.jsonl"
    planted.write_text(
        "\n".join(
            [
                json.dumps({"text": near}, ensure_ascii=False),  # line 1: near-duplicate
                json.dumps({"text": GARBAGE}),  # line 2: garbage
                "{this line is not json",  # line 3: corrupt
                json.dumps({"body": "no text field"}),  # line 4: missing field
                json.dumps({"text": "  " + stories[0].upper() + "  "}),  # line 5: exact dup
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    table = pa.table({"content": stories[:3]})
    pq.write_table(table, d / "c_stories.parquet")
    out = d / "out"
    cfg = parse_config(
        {
            "input": [
                {"path": str(novel), "format": "novel"},
                {"path": str(pairs), "format": "pairs", "pairs_per_doc": 10},
                {"path": str(corpus / "zh/poetry/tangshi300.json"), "format": "poetry"},
                {"path": str(d / "c_stories.parquet"), "format": "parquet", "field": "content"},
                {"path": str(planted), "format": "jsonl"},
            ],
            "output": str(out),
            "write_docs": True,
            "stages": [
                {"clean": {"t2s": True}},
                {"langid": {"keep": ["zh", "en"]}},
                {"exact_dedup": {}},
                {"minhash_dedup": {"threshold": 0.7}},
                {"quality": {"min_chars": 20, "min_words": 5}},
                {"perplexity": {"keep_percentile": 95, "max_tokens": 48}},
                {"augment": {"strategies": [{"name": "random_swap", "rate": 0.2}], "seed": 0}},
                {"tokenize": {"seq_len": 64, "num_shards": 3}},
            ],
        }
    )
    report = run(cfg)
    docs = {}
    for f in sorted((out / "docs").glob("docs-*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            docs[doc["id"]] = doc
    return {
        "dir": d,
        "out": out,
        "report": report,
        "docs": docs,
        "novel": str(novel),
        "planted": str(planted),
        "original": clean_text(original),
    }


def test_shards_readable_by_trainer_loader(e2e):
    ds = PackedDataset(e2e["out"] / "shards")
    tok = Tokenizer.from_pretrained(
        json.loads((e2e["out"] / "shards/manifest.json").read_text())["tokenizer"]
    )
    assert len(ds) > 100 and ds.seq_len == 64
    ds.verify_all()
    rows = [ds[i] for i in range(len(ds))]
    assert all(int(r.max()) < tok.vocab_size for r in rows)
    assert sum(int((r == tok.eos_token_id).sum()) for r in rows) > 100  # EOS-separated docs
    assert ds.manifest["docs"] == e2e["report"]["docs_out"] == len(e2e["docs"])
    assert e2e["report"]["shards"]["files"] == 3


def test_planted_near_duplicate_removed_original_kept(e2e):
    docs = e2e["docs"]
    assert f"{e2e['planted']}#0000000" not in docs
    original_id = f"{e2e['novel']}#0000001"
    assert original_id in docs and docs[original_id]["text"] == e2e["original"]
    stages = e2e["report"]["stages"]
    assert stages["minhash_dedup"]["dropped"]["near_duplicate"] >= 1


def test_planted_garbage_dropped_for_symbols(e2e):
    assert f"{e2e['planted']}#0000001" not in e2e["docs"]
    assert e2e["report"]["stages"]["quality"]["dropped"]["symbol_ratio"] == 1


def test_corrupt_jsonl_counted_not_fatal(e2e):
    read = e2e["report"]["stages"]["read"]
    assert (
        read["corrupt_lines"] == 1 and read["missing_field"] == 1 and read["files"] == 4
    )  # + parquet, read by parquetio


def test_exact_duplicate_keeps_smallest_id(e2e):
    stages = e2e["report"]["stages"]
    assert stages["exact_dedup"]["dropped"]["exact_duplicate"] >= 1
    assert f"{e2e['planted']}#0000004" not in e2e["docs"]
    parquet_ids = [i for i in e2e["docs"] if "c_stories.parquet#h" in i and "~" not in i]
    assert len(parquet_ids) >= 2  # the parquet copy (smaller id) survived


def test_counts_add_up_per_stage(e2e):
    for name, c in e2e["report"]["stages"].items():
        if "in" in c and name not in ("output", "tokenize", "exact_dedup"):
            assert c["in"] == c["kept"] + sum(c.get("dropped", {}).values()), name
    exact = e2e["report"]["stages"]["exact_dedup"]
    assert exact["in"] == sum(exact["dropped"].values()) + exact["kept"]


def test_clean_t2s_and_langid(e2e):
    texts = [d["text"] for d in e2e["docs"].values()]
    assert any("在岳咏蝉" in t for t in texts) and not any("在嶽詠蟬" in t for t in texts)
    assert {d["lang"] for d in e2e["docs"].values()} <= {"zh", "en"}
    assert not any("\r" in t or "\ufeff" in t for t in texts)


def test_augment_adds_one_copy_per_doc(e2e):
    aug = e2e["report"]["stages"]["augment"]
    assert aug["copies"] == aug["in"]
    copies = [d for d in e2e["docs"].values() if d.get("augmented") == "random_swap"]
    assert copies and all(d["id"].endswith("~random_swap") for d in copies)
    assert any(d["text"] != e2e["docs"][d["id"].split("~")[0]]["text"] for d in copies)


def test_perplexity_report_and_histogram(e2e):
    report = json.loads((e2e["out"] / "report.json").read_text())
    ppl = report["perplexity"]
    assert ppl["count"] == report["stages"]["perplexity"]["in"]
    assert ppl["p50"] <= report["perplexity_cutoff"] <= ppl["max"]
    assert report["stages"]["perplexity"]["dropped"]["ppl_above_percentile"] >= 1
    png = (e2e["out"] / "perplexity_hist.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert all(d["ppl"] <= report["perplexity_cutoff"] for d in e2e["docs"].values())


def test_trainer_trains_on_the_pipeline_shards(e2e, tmp_path):
    """The end-to-end hand-off: the pipeline's shards feed the trainer's loader and the loss
    goes down over a few steps on a debug V3 model."""
    from deepwhale.train import Trainer, load_config

    cfg = load_config(
        None,
        [
            f"out_dir={tmp_path / 'run'}",
            f"data.path={e2e['out'] / 'shards'}",
            "model.name=debug-v3",
            "train.steps=6",
            "train.micro_batch_size=4",
            "optim.lr=3e-3",
            "schedule.warmup_steps=0",
            "log.quiet=true",
            "log.tensorboard=false",
            "checkpoint.save_final=false",
            "eval.interval=0",
        ],
    )
    trainer = Trainer(cfg)
    assert trainer.data_format == "shards"
    hist = trainer.fit()
    assert len(hist) == 6 and all(h["tokens"] == 4 * 63 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
