"""The stage registry (deepwhale.data.stages): a third-party stage, registered in code or
declared by an installed package's entry point, runs from a pipeline YAML in a real Beam
pipeline on the in-process runner, like the built-in ones."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import apache_beam as beam
import pytest

from deepwhale.data import config as C
from deepwhale.data import stages
from deepwhale.data.metrics import StageCounters
from deepwhale.data.pipeline import run

STORY = "Once upon a time a little cat sat in the sun and was happy all day long."


@dataclass
class UpperParams:
    """Parameters of the test's ``upper`` stage.

    Attributes:
        suffix: appended to every document's text.
    """

    suffix: str = ""


class _Upper(beam.DoFn):
    """Uppercase each document's text and append the suffix; counts under ``upper``."""

    def __init__(self, params: UpperParams):
        self.params = params
        self.counters = StageCounters("upper")

    def process(self, doc):
        self.counters.seen.inc()
        self.counters.kept.inc()
        yield {**doc, "text": doc["text"].upper() + self.params.suffix}


def _check_upper(params: UpperParams, where: str) -> None:
    if "\n" in params.suffix:
        raise C.PipelineConfigError(f"{where}.suffix must be one line")


@pytest.fixture
def registry(monkeypatch):
    """The stage registry; the stages a test adds (registered in code, or loaded from an entry
    point) are unregistered after it, so nothing leaks. It asks for ``monkeypatch`` so that it
    tears down while a test's plugin folder is still on ``sys.path``."""
    before = set(stages.names())
    yield stages.REGISTRY
    for name in set(stages.names()) - before:
        stages.REGISTRY.unregister(name)


def _write_inputs(tmp_path, n=5):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(f"{STORY} Story number {i}." for i in range(n)) + "\n")
    return src


def _docs(out):
    files = sorted((out / "docs").glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text("utf-8").splitlines()]


def test_builtin_stages_are_registered_in_pipeline_order():
    assert list(C.STAGES) == [
        "clean",
        "langid",
        "normalize_terms",
        "exact_dedup",
        "minhash_dedup",
        "quality",
        "perplexity",
        "augment",
        "tokenize",
    ]
    assert C.STAGES["quality"] is C.QualityParams
    # minhash_dedup and tokenize have streaming forms; no built-in stage is batch-only
    assert C.GLOBAL_STAGES == ()
    with pytest.raises(
        C.PipelineConfigError, match=r"^stages\[1\]: unknown stage 'upper'; valid: clean, langid"
    ):
        C.parse_stages(["clean", "upper"])


def test_stage_registered_in_code_runs_from_yaml(tmp_path, registry):
    @stages.register("upper", params=UpperParams, check=_check_upper)
    def upper(docs, params, ctx):
        return docs | ctx.label >> beam.ParDo(_Upper(params))

    assert "upper" in C.STAGES and C.STAGES["upper"] is UpperParams
    assert "upper" not in C.GLOBAL_STAGES and stages.names()[-1] == "upper"
    src = _write_inputs(tmp_path)
    out = tmp_path / "out"
    yaml_path = tmp_path / "pipeline.yaml"
    yaml_path.write_text(
        f"input: {src}\noutput: {out}\nstages:\n  - clean: {{}}\n  - upper: {{suffix: '!'}}\n"
    )
    cfg = C.load_config(yaml_path)
    assert [s.name for s in cfg.stages] == ["clean", "upper"]
    report = run(cfg)
    docs = _docs(out)
    assert len(docs) == 5 == report["docs_out"]
    assert all(d["text"] == d["text"].upper() and d["text"].endswith("!") for d in docs)
    assert report["stages"]["upper"]["kept"] == 5 and report["stage_order"] == ["clean", "upper"]

    with pytest.raises(C.PipelineConfigError, match="upper: unknown parameter 'sufix'"):
        C.parse_stages([{"upper": {"sufix": "!"}}])
    bad = C.parse_config(
        {
            "input": str(src),
            "output": str(tmp_path / "bad"),
            "stages": [{"upper": {"suffix": "a\nb"}}],
        }
    )
    with pytest.raises(C.PipelineConfigError, match="upper.suffix must be one line"):
        run(bad)  # the stage's check runs while the pipeline is built, before anything runs


SHOUT_MODULE = """
from dataclasses import dataclass

import apache_beam as beam

from deepwhale.data.stages import StageSpec


@dataclass
class ShoutParams:
    times: int = 1


def _shout(doc, times):
    return {**doc, "text": doc["text"].upper() + "!" * times}


def apply(docs, params, ctx):
    shouted = docs | ctx.label >> beam.Map(_shout, params.times)
    return shouted, {"shouted": shouted}


SHOUT = StageSpec(params=ShoutParams, apply=apply, is_global=True)
"""


def test_stage_from_an_entry_point_runs_from_yaml(tmp_path, registry, monkeypatch):
    plugins = tmp_path / "site"
    info = plugins / "shout_stage-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout_stage\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{stages.ENTRY_POINT_GROUP}]\nshout = shout_stage:SHOUT\n"
    )
    (plugins / "shout_stage.py").write_text(SHOUT_MODULE)
    monkeypatch.syspath_prepend(str(plugins))
    importlib.invalidate_caches()

    assert "shout" in C.STAGES and "shout" in C.GLOBAL_STAGES
    src = _write_inputs(tmp_path, n=3)
    out = tmp_path / "out"
    yaml_path = tmp_path / "pipeline.yaml"
    yaml_path.write_text(f"input: {src}\noutput: {out}\nstages: [{{shout: {{times: 2}}}}]\n")
    report = run(C.load_config(yaml_path))
    docs = _docs(out)
    assert len(docs) == 3 == report["docs_out"]
    assert all(d["text"].endswith("!!") and d["text"] == d["text"].upper() for d in docs)

    with pytest.raises(C.PipelineConfigError, match="cannot run in streaming mode"):
        C.parse_config({"input": str(src), "mode": "streaming", "stages": ["shout"]})


@dataclass
class LengthsParams:
    """Parameters of the test's ``lengths`` stage (none)."""


def _report_lengths(params: LengthsParams, out_dir) -> dict:
    values = json.loads((out_dir / "lengths.json").read_text())
    return {"lengths": {"count": len(values), "total": sum(values)}}


def test_stage_declares_its_sink_lists_and_report(tmp_path, registry):
    """The pipeline dispatches on what a stage declares, not on its name: a ``sink`` is counted
    as the output before it, replaces docs/*.jsonl (unless write_docs) and has its folder
    claimed; a ``lists`` output is written as a JSON list; ``report`` adds report fields."""

    @stages.register(
        "lengths",
        params=LengthsParams,
        last=True,
        sink="lengths",
        lists={"lengths": "lengths.json"},
        report=_report_lengths,
    )
    def lengths(docs, params, ctx):
        import apache_beam as beam

        return docs, {"lengths": docs | ctx.label >> beam.Map(lambda d: len(d["text"]))}

    assert stages.get("lengths").sink == "lengths"
    src = _write_inputs(tmp_path, n=4)
    out = tmp_path / "out"
    cfg = C.parse_config({"input": str(src), "output": str(out), "stages": ["clean", "lengths"]})
    report = run(cfg)
    values = json.loads((out / "lengths.json").read_text())
    assert len(values) == 4 == report["docs_out"] == report["stages"]["output"]["kept"]
    assert report["lengths"] == {"count": 4, "total": sum(values)}
    assert not (out / "docs").exists()  # the sink's product replaces the documents
    stamp = json.loads((out / "lengths" / "pipeline.json").read_text())
    assert len(stamp["fingerprint"]) == 40  # the sink's folder is claimed

    cfg = C.parse_config(
        {
            "input": str(src),
            "output": str(tmp_path / "both"),
            "stages": ["lengths"],
            "write_docs": True,
        }
    )
    assert run(cfg)["docs_out"] == 4 == len(_docs(tmp_path / "both"))
