"""``--resume``: a run interrupted after some batches, resumed, gives bitwise the results of an
uninterrupted run and scores only the missing requests; a foreign or corrupt cache is refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from deepwhale.api import DeepSeekModel
from deepwhale.cli import app
from deepwhale.eval.cache import FILENAME, CacheError, ScoreCache, model_identity
from deepwhale.eval.runner import evaluate
from tests.helpers import shared_data


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def stories():
    torch.set_num_threads(1)
    return DeepSeekModel.from_pretrained(device="cpu")


def test_interrupted_run_resumes_bitwise(stories, tmp_path):
    bench = shared_data("bench")
    kw = dict(data_dir=bench, limit=6, batch_size=2)
    full = evaluate(stories, ["arc_easy", "hellaswag"], **kw)
    ident = model_identity(stories)
    cache = ScoreCache(tmp_path / FILENAME, ident, fresh=True)

    def stop_after_k(done, total):
        if done >= total // 2:
            raise _Interrupt  # an interruption part way, after some batches were stored

    with pytest.raises(_Interrupt):
        evaluate(stories, ["arc_easy", "hellaswag"], progress=stop_after_k, cache=cache, **kw)
    first = cache.stored
    cache.close()
    resumed = ScoreCache(tmp_path / FILENAME, ident)
    again = evaluate(stories, ["arc_easy", "hellaswag"], cache=resumed, **kw)
    assert 0 < first and resumed.hits == first and resumed.stored > 0
    assert again["results"] == full["results"]  # bitwise: floats compared exactly
    # a third run scores nothing
    third = ScoreCache(tmp_path / FILENAME, ident)
    assert evaluate(stories, ["arc_easy", "hellaswag"], cache=third, **kw) == again
    assert third.stored == 0 and third.hits == first + resumed.stored


def test_foreign_and_corrupt_cache_are_refused(stories, tmp_path):
    path = tmp_path / FILENAME
    ScoreCache(path, model_identity(stories)).close()
    with pytest.raises(CacheError, match="another model"):
        ScoreCache(path, model_identity(stories, quantize="int8"))
    path.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(CacheError, match="not a deepwhale eval cache"):
        ScoreCache(path, model_identity(stories))
    bench = shared_data("bench")
    args = ["eval", "-t", "arc_easy", "--limit", "2", "--data-dir", str(bench), "--quiet"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path), "--resume"])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {path}: not a deepwhale")
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 2 and "--resume needs --out" in res.stderr


def test_cli_resume_reuses_every_score(tmp_path):
    bench = shared_data("bench")
    args = ["eval", "-t", "arc_easy", "--limit", "3", "--data-dir", str(bench), "--quiet"]
    out = tmp_path / "out"
    assert CliRunner().invoke(app, [*args, "--out", str(out)]).exit_code == 0
    first = json.loads((out / "results.json").read_text())
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--resume"])
    assert res.exit_code == 0 and "resumed: 12 requests from cache, 0 scored" in res.stderr
    again = json.loads((out / "results.json").read_text())
    assert again["results"] == first["results"] and again["config"]["cache"]["scored"] == 0


def test_generative_task_resumes_from_cached_responses(stories, tmp_path):
    """gsm8k killed after its first batch: the resumed run generates only the rest, and the
    responses and scores equal an uninterrupted run's; a changed budget misses the cache."""
    bench = shared_data("bench")
    kw = dict(data_dir=bench, limit=4, batch_size=2, max_gen_toks=12, log_samples=True)
    full = evaluate(stories, ["gsm8k"], **kw)
    ident = model_identity(stories)
    cache = ScoreCache(tmp_path / FILENAME, ident, fresh=True)

    def stop_after_first_batch(done, total):
        if done >= 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        evaluate(stories, ["gsm8k"], progress=stop_after_first_batch, cache=cache, **kw)
    assert cache.stored == 2
    cache.close()
    resumed = ScoreCache(tmp_path / FILENAME, ident)
    again = evaluate(stories, ["gsm8k"], cache=resumed, **kw)
    assert resumed.hits == 2 and resumed.stored == 2
    assert again["results"] == full["results"] and again["samples"] == full["samples"]
    longer = ScoreCache(tmp_path / FILENAME, ident)
    evaluate(stories, ["gsm8k"], cache=longer, **{**kw, "max_gen_toks": 13})
    assert longer.hits == 0 and longer.stored == 4
