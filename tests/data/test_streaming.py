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
