"""Live quality monitoring of a streaming run: per-window reports with drop reasons, the
perplexity histogram and language mix, band alerts, Prometheus metrics scraped over HTTP while
the pipeline runs, and ``deepwhale data monitor``."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from deepwhale.data.cli import data_app
from deepwhale.data.config import PipelineConfigError, parse_config
from deepwhale.data.monitor import check_alerts, histogram_median, ppl_bucket, summarize
from deepwhale.data.pipeline import run


def test_buckets_median_and_alerts():
    assert [ppl_bucket(v) for v in (1.0, 2.0, 2.5, 700.0, 5000.0)] == [
        "ppl_le_2",
        "ppl_le_2",
        "ppl_le_4",
        "ppl_le_1024",
        "ppl_le_inf",
    ]
    assert histogram_median({}) is None
    assert histogram_median({"ppl_le_4": 2}) == pytest.approx(3.0)  # middle of (2, 4]
    assert histogram_median({"ppl_le_2": 1, "ppl_le_8": 3}) == pytest.approx(4 + 4 * 1 / 3)
    assert histogram_median({"ppl_le_inf": 5}) == 1024.0
    counters = {
        "read": {"docs": 10},
        "clean": {"in": 10, "kept": 9, "dropped": {"empty": 1}},
        "langid": {"in": 9, "kept": 9, "lang.en": 7, "lang.zh": 2},
        "perplexity": {"in": 9, "kept": 4, "dropped": {"ppl_above_threshold": 5}, "ppl_le_8": 9},
        "output": {"kept": 4},
    }
    s = summarize(counters, ["clean", "langid", "perplexity"])
    assert s["drop_rate"] == 0.6 and s["languages"] == {"en": 7, "zh": 2}
    assert s["dropped"] == {"clean.empty": 1, "perplexity.ppl_above_threshold": 5}
    assert check_alerts(s, {"drop_rate": [0, 0.5]}) == ["drop_rate 0.6 outside [0, 0.5]"]
    assert check_alerts(s, {"drop_rate": [0, 0.7], "ppl_median": [1, 100]}) == []
    assert math.isclose(s["perplexity"]["median"], 6.0)


@pytest.mark.parametrize(
    "streaming, message",
    [
        ({"metrics_port": "x"}, "metrics_port: expected int"),
        ({"metrics_port": 70000}, "0..65535"),
        ({"alerts": {"ppl_mean": [0, 1]}}, "unknown rule 'ppl_mean'"),
        ({"alerts": {"drop_rate": [0.5, 0.1]}}, "lo <= hi"),
        ({"alerts": [1]}, "streaming.alerts"),
    ],
)
def test_bad_monitor_settings_are_clear_errors(tmp_path, streaming, message):
    with pytest.raises(PipelineConfigError, match=message):
        parse_config({"input": str(tmp_path), "mode": "streaming", "streaming": streaming})


def _drop_in(inbox, name, text):
    tmp = inbox.parent / f"{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, inbox / name)


def _metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def test_live_windows_metrics_alerts_and_the_monitor_command(tmp_path, corpus):
    stories = (corpus / "en/tinystories/tinystories_sample.txt").read_text().split("<|endoftext|>")
    good = [s.strip() for s in stories if s.strip()]
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    _drop_in(inbox, "a.txt", "\n\n".join(good[:2]) + "\n")
    cfg = parse_config(
        {
            "input": {"path": str(inbox), "format": "text", "split": "block"},
            "output": str(out),
            "mode": "streaming",
            "streaming": {
                "interval_s": 0.5,
                "duration_s": 7.0,
                "window_s": 1.0,
                "metrics_port": 0,
                "alerts": {"drop_rate": [0.0, 0.5], "ppl_median": [1.0, 500.0]},
            },
            "write_docs": True,
            "stages": [
                "clean",
                {"langid": {"languages": ["en", "zh"]}},
                {"quality": {"min_chars": 20, "min_words": 5}},
                {"perplexity": {"max_ppl": 1000.0, "max_tokens": 48}},
            ],
        }
    )
    scraped = {}

    def feed_and_scrape():
        deadline = time.monotonic() + 30
        endpoint, live = out / "monitor" / "endpoint.json", out / "monitor" / "live.json"

        def first_file_counted():
            try:
                return json.loads(live.read_text())["totals"]["docs_out"] >= 2
            except (OSError, ValueError, KeyError):
                return False

        while not (endpoint.exists() and first_file_counted()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        url = json.loads(endpoint.read_text())["metrics"]
        scraped["text"] = httpx.get(url, timeout=10).text
        # a later file of junk: short lines the quality filter drops, in a window of its own
        _drop_in(inbox, "b.txt", "\n\n".join(["!!! ??? ..."] * 6) + "\n")

    t = threading.Thread(target=feed_and_scrape)
    t.start()
    report = run(cfg)
    t.join()

    text = scraped["text"]  # scraped from the running pipeline
    assert _metric(text, "deepwhale_data_documents_total", stage="clean", outcome="in") >= 2
    assert _metric(text, "deepwhale_data_language_documents_total", lang="en") >= 2
    assert _metric(text, "deepwhale_data_perplexity_bucket", le="+Inf") >= 2

    windows = [json.loads(p.read_text()) for p in sorted((out / "monitor").glob("window-*.json"))]
    assert sum(w["docs_in"] for w in windows) == report["docs_in"] == 8
    assert sum(w["docs_out"] for w in windows) == report["docs_out"] == 2
    first = next(w for w in windows if w["docs_out"])
    assert first["alerts"] == [] and first["languages"] == {"en": 2}
    assert sum(first["perplexity"]["histogram"].values()) == 2
    assert 1 < first["perplexity"]["median"] < 500
    junk = next(w for w in windows if w["docs_in"] and not w["docs_out"])
    assert junk["drop_rate"] == 1.0 and junk["alerts"] == ["drop_rate 1 outside [0, 0.5]"]
    assert sum(n for k, n in junk["dropped"].items() if k.startswith("quality.")) == 6

    cli = CliRunner()
    shown = cli.invoke(data_app, ["monitor", str(out), "--once"])
    assert shown.exit_code == 0, shown.output
    assert "drop reasons" in shown.output and "drop_rate 1 outside" in shown.output
    assert cli.invoke(data_app, ["monitor", str(out), "--once", "--fail-on-alert"]).exit_code == 1
    missing = cli.invoke(data_app, ["monitor", str(tmp_path / "nope"), "--once"])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    (out / "monitor" / "live.json").write_text("{not json")
    broken = cli.invoke(data_app, ["monitor", str(out), "--once"])
    assert broken.exit_code == 2 and "not a live-monitor file" in broken.output
