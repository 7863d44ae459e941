"""The same pipeline on Beam's Dask runner against a real ``dask.distributed`` cluster (a
scheduler and two worker processes on 127.0.0.1) gives the shards of the in-process runner,
byte for byte, and the same report counters where no side input re-reads a stage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from deepwhale.data.config import PipelineConfigError, parse_config  # noqa: E402
from deepwhale.data.dask_cluster import local_dask_cluster  # noqa: E402
from deepwhale.data.pipeline import DASK_RUNNER, beam_args, run, runner_name  # noqa: E402

from .conftest import head_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``dask scheduler`` + 2 ``dask worker`` processes (1 thread each) importing this checkout."""
    with local_dask_cluster(2, log_dir=tmp_path_factory.mktemp("dask"), pythonpath=ROOT) as addr:
        yield addr


def _config(tmp: Path, src: Path, stages: list, out: str, runner: str):
    return parse_config(
        {
            "input": [{"path": str(src), "format": "text", "separator": "<|endoftext|>"}],
            "output": str(tmp / out),
            "runner": runner,
            "stages": stages,
        }
    )


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def stories(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("stories")
    src = d / "stories.txt"
    text = head_lines(corpus / "en/tinystories/tinystories_sample.txt", 60_000)
    src.write_bytes(text + text[:20_000])  # some exact duplicates
    return src


STAGES = [
    {"clean": {}},
    {"exact_dedup": {}},
    {"quality": {"min_chars": 20, "min_words": 5}},
    {"tokenize": {"tokenizer": "deepwhale-demo", "seq_len": 128, "num_shards": 3}},
]


def test_dask_cluster_matches_in_process_runner(cluster, stories, tmp_path):
    ref = run(_config(tmp_path, stories, STAGES, "fn", "FnApiRunner"))
    got = run(
        _config(tmp_path, stories, STAGES, "dask", "DaskRunner"),
        [f"--dask_client_address={cluster}"],
    )
    assert got["beam_args"][0] == f"--runner={DASK_RUNNER}"
    assert _digests(tmp_path / "dask" / "shards") == _digests(tmp_path / "fn" / "shards")
    assert got["stages"] == ref["stages"]
    assert ref["stages"]["exact_dedup"]["dropped"]["exact_duplicate"] > 0
    assert got["docs_in"] == ref["docs_in"] > 0 and got["docs_out"] == ref["docs_out"]
    assert "counters_note" not in got
    assert not (tmp_path / "dask" / ".counters").exists()  # counter files cleaned up


def test_dask_side_input_stages_give_the_same_shards(cluster, stories, tmp_path):
    stages = STAGES[:2] + [{"minhash_dedup": {"threshold": 0.7}}] + STAGES[2:]
    ref = run(_config(tmp_path, stories, stages, "fn", "FnApiRunner"))
    got = run(
        _config(tmp_path, stories, stages, "dask", "DaskRunner"),
        [f"--dask_client_address={cluster}"],
    )
    assert _digests(tmp_path / "dask" / "shards") == _digests(tmp_path / "fn" / "shards")
    # the documents are the same; the note says why the counters before the side input
    # may count re-executions there
    assert got["stages"]["shards"] == ref["stages"]["shards"]
    assert "minhash_dedup" in got["counters_note"] and "counters_note" not in ref


def test_runner_names_and_streaming_refused(tmp_path, stories):
    assert runner_name("DaskRunner") == DASK_RUNNER
    assert runner_name("apache_beam.runners.dask.dask_runner.DaskRunner") == DASK_RUNNER
    assert runner_name("FnApiRunner") == "FnApiRunner"
    cfg = _config(tmp_path, stories, STAGES, "x", "FnApiRunner")
    assert beam_args(cfg, ["--runner=DaskRunner"])[-1] == f"--runner={DASK_RUNNER}"
    cfg = parse_config(
        {
            "input": [{"path": str(stories.parent), "format": "text"}],
            "output": str(tmp_path / "s"),
            "mode": "streaming",
            "runner": "DaskRunner",
            "streaming": {"interval_s": 0.1, "duration_s": 0.2, "window_s": 1.0},
            "stages": [{"clean": {}}],
        }
    )
    with pytest.raises(PipelineConfigError, match="streaming is not supported on DaskRunner"):
        run(cfg)
    assert not (tmp_path / "s").exists()


def test_cluster_that_cannot_start_says_so(tmp_path):
    # a scheduler cannot import dask and listen within 0.05 s of the call
    with pytest.raises(RuntimeError, match="dask scheduler did not start"):
        with local_dask_cluster(1, log_dir=tmp_path, timeout_s=0.05):
            pass
