"""The pipeline's stages: one registry, ``name -> StageSpec``.

A :class:`StageSpec` holds everything the pipeline needs to know about a stage:

* ``params``: the dataclass its YAML parameters are parsed into (``config.build_params``);
* ``check(params, where)``: validation that needs more than the dataclass (a model folder, a
  language code, a strategy name); it runs while the pipeline is built, before any worker
  starts, and raises :class:`~deepwhale.data.config.PipelineConfigError`;
* ``apply(docs, params, ctx)``: adds the stage's transforms to the document PCollection
  ``docs`` under the unique label ``ctx.label`` and returns the new documents, or
  ``(docs, {name: PCollection})`` when it has extra outputs (``perplexity`` gives ``ppls``,
  ``tokenize`` gives ``manifest``);
* ``is_global``: it needs the whole collection (not available in streaming mode);
* ``last``: it must be the last stage (``tokenize``);
* ``sink``: the subfolder of the output into which the stage writes the pipeline's product
  (``tokenize``: ``shards``). The pipeline counts the documents as its output before the stage,
  writes them as ``docs/*.jsonl`` only with ``write_docs``, and claims the folder with the
  config's fingerprint before the run;
* ``lists``: extra outputs that a batch run writes as one JSON list into a file of the output
  folder (``perplexity``: ``ppls`` -> ``perplexities.json``);
* ``report(params, out_dir)``: after the run, the stage's fields of ``report.json``, read from
  the files it wrote (``perplexity``: the cutoff and the summary; ``tokenize``: the shard totals).

``minhash_dedup`` and ``tokenize`` have a streaming form (:mod:`deepwhale.data.stream_dedup`,
:mod:`deepwhale.data.stream_pack`); a stage with ``is_global`` and none is refused in streaming.

The pipeline (:mod:`deepwhale.data.pipeline`) reads only these fields; it knows no stage by name.

The built-in stages register below with :func:`register`; a script adds one the same way::

    from deepwhale.data import stages

    @stages.register("upper", params=UpperParams)
    def upper(docs, params, ctx):
        return docs | ctx.label >> beam.Map(lambda d: {**d, "text": d["text"].upper()})

and an installed package through the entry-point group ``deepwhale.data.stages``, whose
value names a :class:`StageSpec`::

    [project.entry-points."deepwhale.data.stages"]
    upper = "my_plugin.stages:UPPER"

This module does not import Beam; the stages' ``apply`` functions import what they build.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepwhale.data.config import (
    AugmentParams,
    CleanParams,
    ExactDedupParams,
    LangIdParams,
    MinHashParams,
    NormalizeTermsParams,
    PerplexityParams,
    PipelineConfigError,
    QualityParams,
    TokenizeParams,
)
from deepwhale.plugins import PluginError, Registry

__all__ = ["ENTRY_POINT_GROUP", "REGISTRY", "StageContext", "StageSpec", "get", "names", "register"]

ENTRY_POINT_GROUP = "deepwhale.data.stages"


@dataclass(frozen=True)
class StageContext:
    """What a stage's ``apply`` gets besides the documents and its parameters.

    Attributes:
        name: the stage's name in the config (``quality``).
        label: the unique Beam label of this stage in the pipeline (``S04_quality``).
        out_dir: the run's output folder.
        cfg: the whole :class:`~deepwhale.data.config.PipelineConfig`.
    """

    name: str
    label: str
    out_dir: Path
    cfg: Any


def _no_check(params: Any, where: str) -> None:
    """The default ``check``: nothing beyond the parameter dataclass's own checks."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline (see the module docstring).

    Attributes:
        params: the parameter dataclass.
        apply: ``(docs, params, ctx: StageContext) -> docs | (docs, {name: PCollection})``.
        check: ``(params, where) -> None``; raises PipelineConfigError.
        is_global: needs the whole collection, so batch mode only.
        last: must be the last stage.
        sink: the output subfolder the stage writes the pipeline's product into, or None.
        lists: ``{extra output: file name}``: outputs a batch run writes as a JSON list there.
        report: ``(params, out_dir: Path) -> dict`` of ``report.json`` fields after the run,
            or None.
    """

    params: type
    apply: Callable[..., Any]
    check: Callable[[Any, str], None] = _no_check
    is_global: bool = False
    last: bool = False
    sink: str | None = None
    lists: Mapping[str, str] = field(default_factory=dict)
    report: Callable[[Any, Path], dict] | None = None


REGISTRY: Registry[StageSpec] = Registry(ENTRY_POINT_GROUP, "stage")


def register(
    name: str,
    *,
    params: type,
    check: Callable[[Any, str], None] = _no_check,
    is_global: bool = False,
    last: bool = False,
    sink: str | None = None,
    lists: Mapping[str, str] | None = None,
    report: Callable[[Any, Path], dict] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated ``apply`` function as stage ``name`` (returned
    unchanged); the other arguments are the :class:`StageSpec` fields.

    Raises:
        ValueError: ``name`` is empty.
        deepwhale.plugins.PluginError: ``name`` is already registered.
    """
    add = REGISTRY.register(name)

    def decorator(apply: Callable[..., Any]) -> Callable[..., Any]:
        add(StageSpec(params, apply, check, is_global, last, sink, dict(lists or {}), report))
        return apply

    return decorator


def names() -> list[str]:
    """The stage names: built-in ones in pipeline order, then the registered and entry-point
    ones."""
    return REGISTRY.names(sort=False)


def get(name: str, where: str | None = None) -> StageSpec:
    """The :class:`StageSpec` of stage ``name``.

    Args:
        name: the stage name.
        where: the config location for the error message (default: ``name``).

    Raises:
        PipelineConfigError: ``name`` is unknown (``<where>: unknown stage 'x'; valid: ...``),
            its entry point fails to load, or it does not name a StageSpec.
    """
    where = where or name
    if name not in REGISTRY:
        raise PipelineConfigError(f"{where}: unknown stage {name!r}; valid: {', '.join(names())}")
    try:
        spec = REGISTRY.get(name)
    except PluginError as e:
        raise PipelineConfigError(f"{where}: {e}") from None
    if not isinstance(spec, StageSpec):
        raise PipelineConfigError(
            f"{where}: stage {name!r} is a {type(spec).__name__}, not a StageSpec"
        )
    return spec


# --------------------------------------------------------------------------- checks


def _check_augment(params: AugmentParams, where: str) -> None:
    try:
        from deepwhale.data.augment import check_augment
    except ImportError as e:
        raise PipelineConfigError(
            f"{where}: the augmentation module is not available ({e})"
        ) from None
    check_augment(params, where)


def _check_langid(params: LangIdParams, where: str) -> None:
    from deepwhale.data.clean import build_detector

    build_detector(params.languages)  # validates the codes (cheap for a few)


def _check_perplexity(params: PerplexityParams, where: str) -> None:
    if params.backend == "kenlm":
        try:
            import kenlm  # noqa: F401
        except ImportError:
            raise PipelineConfigError(
                f"{where}.backend 'kenlm' needs the kenlm package (pip install kenlm)"
            ) from None
    elif params.model is not None:
        from deepwhale.checkpoint.hub import CheckpointError, resolve_checkpoint

        try:  # a folder or a bundled model's name; never a download here
            if not Path(params.model).is_dir() and "/" in params.model:
                raise CheckpointError(f"no such folder {params.model!r}")
            resolve_checkpoint(params.model)
        except CheckpointError as e:
            raise PipelineConfigError(f"{where}.model: {e}") from None


# --------------------------------------------------------------------------- built-in stages
# Registered in pipeline order (the order of ``names()`` and of the "valid: ..." list).


@register("clean", params=CleanParams)
def _clean(docs, params: CleanParams, ctx: StageContext):
    import apache_beam as beam

    from deepwhale.data.clean import Clean

    return docs | ctx.label >> beam.ParDo(Clean(params))


@register("langid", params=LangIdParams, check=_check_langid)
def _langid(docs, params: LangIdParams, ctx: StageContext):
    import apache_beam as beam

    from deepwhale.data.clean import LangId

    return docs | ctx.label >> beam.ParDo(LangId(params))


def _dictionary_of(params_path: str | None, ctx: StageContext) -> str | None:
    """The stage's own dictionary file, else the config's top-level ``dictionary``."""
    return params_path or getattr(ctx.cfg, "dictionary", None)


@register("normalize_terms", params=NormalizeTermsParams)
def _normalize_terms(docs, params: NormalizeTermsParams, ctx: StageContext):
    import apache_beam as beam

    from deepwhale.data.terms import NormalizeTerms

    path = _dictionary_of(params.dictionary, ctx)
    if path is None:
        raise PipelineConfigError(
            f"{ctx.name}: no dictionary: set normalize_terms.dictionary or the config's "
            "top-level 'dictionary'"
        )
    fn = NormalizeTerms(path, params.categories, params.ignore_case, stage=ctx.name)
    return docs | ctx.label >> beam.ParDo(fn)


@register("exact_dedup", params=ExactDedupParams)
def _exact_dedup(docs, params: ExactDedupParams, ctx: StageContext):
    from deepwhale.data.dedup import ExactDedup

    return docs | ctx.label >> ExactDedup(params)


@register("minhash_dedup", params=MinHashParams)
def _minhash_dedup(docs, params: MinHashParams, ctx: StageContext):
    """Batch: one survivor per cluster over the whole collection. Streaming: each document
    against the signatures seen before it, in a persistent LSH index in the output folder
    (:mod:`deepwhale.data.stream_dedup`)."""
    if ctx.cfg.mode == "streaming":
        from deepwhale.data.stream_dedup import INDEX_FILE, StreamingMinHashDedup

        index = str(ctx.out_dir / INDEX_FILE)
        return docs | ctx.label >> StreamingMinHashDedup(params, index, stage=ctx.name)
    from deepwhale.data.dedup import MinHashDedup

    return docs | ctx.label >> MinHashDedup(params)


@register("quality", params=QualityParams)
def _quality(docs, params: QualityParams, ctx: StageContext):
    import apache_beam as beam

    from deepwhale.data.quality import QualityFilter

    fn = QualityFilter(params, dictionary=_dictionary_of(None, ctx))
    return docs | ctx.label >> beam.ParDo(fn)


def _report_perplexity(params: PerplexityParams, out_dir: Path) -> dict:
    """``perplexity_cutoff`` (the ``keep_percentile`` of the written perplexities, else
    ``max_ppl``) and ``perplexity``, the summary of ``perplexities.json`` with its histogram
    (batch runs; :mod:`deepwhale.data.report`)."""
    from deepwhale.data.report import perplexity_summary

    out: dict = {}
    ppl_file = out_dir / PERPLEXITIES
    values = json.loads(ppl_file.read_text()) if ppl_file.exists() else None
    if values is not None and params.keep_percentile:
        from deepwhale.data.lm import percentile

        out["perplexity_cutoff"] = percentile(values, params.keep_percentile)
    elif params.max_ppl is not None:
        out["perplexity_cutoff"] = params.max_ppl
    if values is not None:
        out["perplexity"] = perplexity_summary(values, out_dir, out.get("perplexity_cutoff"))
    return out


def _report_tokenize(params: TokenizeParams, out_dir: Path) -> dict:
    """``shards``: the manifest's totals (``rows``, ``tokens``, ``docs``, ``seq_len``) and the
    number of shard files."""
    top = out_dir / "shards" / "manifest.json"
    if not top.exists():  # a streaming run: one manifest per window folder
        from deepwhale.data.stream_pack import streaming_shard_totals

        return {"shards": streaming_shard_totals(out_dir / "shards")}
    manifest = json.loads(top.read_text())
    shards = {k: manifest[k] for k in ("rows", "tokens", "docs", "seq_len")}
    shards["files"] = len(manifest["shards"])
    return {"shards": shards}


#: the file a batch run writes the ``perplexity`` stage's values into
PERPLEXITIES = "perplexities.json"


@register(
    "perplexity",
    params=PerplexityParams,
    check=_check_perplexity,
    lists={"ppls": PERPLEXITIES},
    report=_report_perplexity,
)
def _perplexity(docs, params: PerplexityParams, ctx: StageContext):
    """Score and filter by perplexity. ``keep_percentile`` needs every score (a global side
    input), so streaming mode refuses it: use ``max_ppl`` there."""
    from deepwhale.data.lm import PerplexityFilter

    if ctx.cfg.mode == "streaming" and params.keep_percentile is not None:
        raise PipelineConfigError(
            f"{ctx.name}.keep_percentile needs the whole collection and cannot run in "
            "streaming mode; set max_ppl instead"
        )

    streaming = ctx.cfg.mode == "streaming"
    docs, ppls = docs | ctx.label >> PerplexityFilter(params, histogram=streaming)
    return docs, {"ppls": ppls}


@register("augment", params=AugmentParams, check=_check_augment)
def _augment(docs, params: AugmentParams, ctx: StageContext):
    import apache_beam as beam

    from deepwhale.data.augment import Augment

    return docs | ctx.label >> beam.ParDo(Augment(params, dictionary=_dictionary_of(None, ctx)))


@register(
    "tokenize",
    params=TokenizeParams,
    last=True,
    sink="shards",
    report=_report_tokenize,
)
def _tokenize(docs, params: TokenizeParams, ctx: StageContext):
    """Batch: ``num_shards`` shards and one manifest. Streaming: shards per window folder,
    each with its manifest (:mod:`deepwhale.data.stream_pack`)."""
    if ctx.cfg.mode == "streaming":
        from deepwhale.data.stream_pack import StreamingTokenizeAndPack

        shard_dir = str(ctx.out_dir / "shards")
        docs | ctx.label >> StreamingTokenizeAndPack(params, shard_dir, stage=ctx.name)
        return docs
    from deepwhale.data.pack import TokenizeAndPack

    manifest = docs | ctx.label >> TokenizeAndPack(params, str(ctx.out_dir / "shards"))
    return docs, {"manifest": manifest}
