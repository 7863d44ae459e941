"""Streaming mode: the pipeline watches a folder; a file added while it runs is processed and
lands in a windowed output file. The watch is bounded by ``duration_s`` so the test ends."""

from __future__ import annotations

import json
import os
import threading
import time

from deepwhale.data.config import parse_config
from deepwhale.data.pipeline import run


def test_file_added_while_running_is_processed(tmp_path, corpus):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    stories = (corpus / "en/tinystories/tinystories_sample.txt").read_text().split("<|endoftext|>")
    (inbox / "first.txt").write_text(stories[0].strip() + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cfg = parse_config(
        {
            "input": {"path": str(inbox), "format": "text", "split": "document"},
            "output": str(out),
            "mode": "streaming",
            "streaming": {"interval_s": 0.5, "duration_s": 8.0, "window_s": 1.0},
            "stages": ["clean", {"quality": {"min_chars": 20, "min_words": 5}}],
        }
    )

    def add_file():
        # Wait until the running pipeline has written the first window (so it has seen
        # first.txt and moved on), then drop the second file into the watched folder.
        deadline = time.monotonic() + 30
        while not list((out / "windows").glob("window-*/part-*.jsonl")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        tmp = tmp_path / "second.tmp"
        tmp.write_text(stories[1].strip() + "\n" + "\n", encoding="utf-8")
        os.replace(tmp, inbox / "second.txt")  # atomic: the watcher never sees half a file

    t = threading.Thread(target=add_file)
    t.start()
    report = run(cfg)
    t.join()
    where = {}  # source file -> (window folder name, part file)
    for part in sorted((out / "windows").glob("window-*/part-*.jsonl")):
        for line in part.read_text().splitlines():
            where[os.path.basename(json.loads(line)["source"])] = (part.parent.name, part)
    assert set(where) == {"first.txt", "second.txt"}
    assert report["stages"]["watch"]["new_files"] == 2
    assert report["stages"]["output"]["kept"] == 2
    # the second file was written out on its own, after the first, in the same or a later window
    assert where["first.txt"][1] != where["second.txt"][1]
    assert where["first.txt"][0] <= where["second.txt"][0]


def test_fnapi_metrics_stay_flat_over_many_bundles():
    """Beam's in-process runner nests one metrics generator per bundle; after the workaround a
    stage's running total stays a flat list however many bundles fold into it."""
    import itertools

    from apache_beam.metrics import monitoring_infos
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from deepwhale.data.pipeline import _materialize_fnapi_metrics

    _materialize_fnapi_metrics()
    _materialize_fnapi_metrics()  # idempotent
    one = monitoring_infos.int64_user_counter("ns", "kept", 1, ptransform="t")
    total = [one]
    for _ in range(5000):  # far past the default recursion limit
        total = fn_runner.consolidate_monitoring_infos(itertools.chain([one], total))
    (merged,) = list(total)
    assert monitoring_infos.extract_counter_value(merged) == 5001


def _drop_in(inbox, name: str, text: str) -> None:
    tmp = inbox.parent / f"{name}.tmp"
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, inbox / name)  # atomic: the watcher never sees half a file


def _streaming_cfg(inbox, out, duration_s: float = 6.0):
    return parse_config(
        {
            "input": {"path": str(inbox), "format": "text", "split": "document"},
            "output": str(out),
            "mode": "streaming",
            "streaming": {"interval_s": 0.5, "duration_s": duration_s, "window_s": 1.0},
            "stages": [
                "clean",
                {"minhash_dedup": {"threshold": 0.7}},
                {"tokenize": {"seq_len": 32}},
            ],
        }
    )


def _after_first_shard(out, then) -> threading.Thread:
    """Run ``then()`` in a thread once the running pipeline has written a window manifest."""

    def wait_then():
        deadline = time.monotonic() + 30
        while not list((out / "shards").glob("window-*/manifest.json")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        then()

    t = threading.Thread(target=wait_then)
    t.start()
    return t


def test_near_duplicate_arriving_later_is_dropped_and_windows_are_packed(tmp_path, corpus):
    """The whole job in streaming mode: MinHash against the signatures seen so far (a
    persistent index, so also across a restart) and tokenize+pack into per-window shard
    folders whose manifests PackedDataset reads."""
    from deepwhale.data.shards import PackedDataset

    stories = (corpus / "en/tinystories/tinystories_sample.txt").read_text().split("<|endoftext|>")
    original, other = stories[0].strip(), stories[1].strip()
    near = original.replace(".", "!", 1)  # one character differs: a near-duplicate
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    _drop_in(inbox, "a-original.txt", original)

    def later():
        _drop_in(inbox, "b-near.txt", near)
        _drop_in(inbox, "c-other.txt", other)

    t = _after_first_shard(out, later)
    report = run(_streaming_cfg(inbox, out))
    t.join()
    dedup = report["stages"]["minhash_dedup"]
    assert report["stages"]["watch"]["new_files"] == 3
    assert dedup["in"] == 3 and dedup["kept"] == 2
    assert dedup["dropped"] == {"near_duplicate": 1}
    manifests = sorted((out / "shards").glob("window-*/manifest.json"))
    datasets = [PackedDataset(m.parent) for m in manifests]
    assert sum(d.manifest["docs"] for d in datasets) == 2
    assert report["shards"]["docs"] == 2 and report["shards"]["windows"] == len(manifests)
    assert sum(len(d) for d in datasets) == report["shards"]["rows"] > 0
    for d in datasets:
        assert d[0].shape == (32,)
        assert set(d.manifest) >= {"format", "seq_len", "vocab_size", "eos_id", "shards", "window"}

    # restart on the same output: the watched files are read again (dropped as seen before),
    # and a near-duplicate of a document from before the restart is still dropped
    t = _after_first_shard(out, lambda: None)
    _drop_in(inbox, "d-near-again.txt", original.replace(".", "?", 1))
    report = run(_streaming_cfg(inbox, out, duration_s=3.0))
    t.join()
    dedup = report["stages"]["minhash_dedup"]
    assert dedup.get("kept", 0) == 0
    # a and c were written before; b (dropped before) and d are near-duplicates of a
    assert dedup["dropped"] == {"seen_in_earlier_run": 2, "near_duplicate": 2}, dedup
