"""Build and run the Beam pipeline described by a :class:`~deepwhale.data.config.PipelineConfig`.

Batch::

    ReadDocuments(input 1) ┐
    ReadDocuments(input 2) ┴ Flatten -> stage 1 -> ... -> stage n -> TokenizeAndPack | WriteDocs

Streaming: each input pattern is watched with ``fileio.MatchContinuously`` (polls every
``interval_s`` until ``duration_s`` has passed), every new file is read once (a stateful DoFn
keyed by path remembers the files it has seen), the per-document stages run as in batch, and
the documents are cut into fixed event-time windows of ``window_s`` and written per bundle
into ``windows/window-<start>-<end>/part-<hash>.jsonl`` as soon as they are processed.

Streaming notes: exact dedup works per window (a windowed GroupByKey, so its output waits for
the window to close; on the in-process runners that is the end of the run); the global stages
(``minhash_dedup``, ``tokenize``) are batch-only. ``MatchContinuously``'s own deduplication,
built on ``Watch`` in Beam 2.77, spends its whole poll budget at once on the in-process runner,
so its match-every-poll mode plus our own seen-state is used instead.

The runner defaults to ``FnApiRunner`` (in-process, never reaches for the network); any Beam
runner and option can be passed through (``--runner=FlinkRunner --flink_master=...``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from deepwhale.atomic import atomic_write, write_json
from deepwhale.data import stages
from deepwhale.data.augment import Augment, seed_for  # noqa: F401 (re-export)
from deepwhale.data.config import PipelineConfig, PipelineConfigError
from deepwhale.data.metrics import CountingDoFn, StageCounters, collect, set_sink

log = logging.getLogger(__name__)


DASK_RUNNER = "deepwhale.data.dask_runner.DaskRunner"
_BEAM_DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def runner_name(runner: str) -> str:
    """The ``--runner`` value Beam takes for ``runner``: ``DaskRunner`` (which Beam 2.78 knows
    only by its full name) and Beam's own class become :data:`DASK_RUNNER`
    (:mod:`deepwhale.data.dask_runner`, Beam's runner computing every branch), whose module is
    imported so that its flags (``--dask_client_address``...) are known; other names pass
    through.

    Raises:
        PipelineConfigError: the Dask runner without ``dask`` and ``distributed`` installed.
    """
    if runner in ("DaskRunner", DASK_RUNNER, _BEAM_DASK_RUNNER):
        try:
            import apache_beam.runners.dask.dask_runner  # noqa: F401 (registers DaskOptions)
        except ImportError as e:
            raise PipelineConfigError(
                f"runner DaskRunner needs dask and distributed ({e}); "
                "install them with: pip install 'deepwhale[dask]'"
            ) from None
        return DASK_RUNNER
    return runner


def _counters_note(cfg: PipelineConfig, args: Sequence[str]) -> str | None:
    """Why the counters of this run may exceed the documents, or None where they are exact.

    Beam 2.78's Dask runner computes a side input (``minhash_dedup``'s dropped ids,
    ``perplexity``'s ``keep_percentile`` cutoff) in a nested ``compute`` that runs the stages
    before it again and feeds their GroupByKeys the documents more than once. The output is
    the same (the stages before a side input are exact or near-duplicate removal, which drop
    the copies), but the ``in`` / ``kept`` / ``dropped`` counters of those stages count the
    extra passes.
    """
    if f"--runner={DASK_RUNNER}" not in args:
        return None
    side = [
        s.name
        for s in cfg.stages
        if s.name == "minhash_dedup"
        or (s.name == "perplexity" and s.params.keep_percentile is not None)
    ]
    if not side:
        return None
    return (
        f"DaskRunner: the counters of the stages before {', '.join(side)} (a side input) "
        "count documents re-read by Beam's Dask runner; shards and documents are exact"
    )


def beam_args(cfg: PipelineConfig, extra_args: Sequence[str] = ()) -> list[str]:
    """Beam command-line flags: ``--runner`` and ``options`` from the config, then
    ``extra_args`` (which win, as Beam takes the last occurrence of a flag)."""
    args = [f"--runner={runner_name(cfg.runner)}"]
    for key, value in cfg.options.items():
        if isinstance(value, bool):
            if value:
                args.append(f"--{key}")
        else:
            args.append(f"--{key}={value}")
    extra = [
        f"--runner={runner_name(a.split('=', 1)[1])}" if a.startswith("--runner=") else a
        for a in extra_args
    ]
    return args + extra


def _doc_shard(doc_id: str, n: int) -> int:
    return zlib.crc32(doc_id.encode("utf-8")) % n


class _WriteDocsShard(CountingDoFn):
    """``(shard, docs)`` -> ``docs/docs-<shard>.jsonl`` (sorted by id, written atomically)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def process(self, item) -> Iterator[str]:
        k, docs = item
        path = Path(self.out_dir) / f"docs-{k:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(d, ensure_ascii=False) for d in sorted(docs, key=lambda d: d["id"])]
        atomic_write(path, lambda p: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
        yield str(path)


class WriteDocs(beam.PTransform):
    """Write documents as JSONL, ``num_shards`` files ``docs-NNNNN.jsonl`` in ``out_dir``;
    documents go to file ``crc32(id) % num_shards`` in id order (deterministic)."""

    def __init__(self, out_dir: str, num_shards: int = 1):
        super().__init__()
        self.out_dir, self.num_shards = out_dir, num_shards

    def expand(self, docs):
        n = self.num_shards
        return (
            docs
            | "KeyByFile" >> beam.Map(lambda d: (_doc_shard(d["id"], n), d))
            | "GroupByFile" >> beam.GroupByKey()
            | "WriteFiles" >> beam.ParDo(_WriteDocsShard(self.out_dir))
        )


class _WriteWindowParts(CountingDoFn):
    """Streaming sink: buffer the documents of a bundle by window, and at the end of the bundle
    write each window's documents as ``window-<start>-<end>/part-<hash>.jsonl`` (atomically;
    epoch seconds; the hash is of the sorted ids, so a retried bundle rewrites the same file).

    No GroupByKey stands before it, so a file's documents are written as soon as the bundle
    that read the file finishes, not when the watermark closes the window (the in-process
    runners fire windowed GroupByKeys only at the end of input).
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.counters = StageCounters("windows")
        self._buf: dict = {}

    def start_bundle(self):
        super().start_bundle()
        self._buf = {}

    # no ``-> None``: Beam 2.78 reads a process return hint as the output type, and None is
    # not iterable (it then refuses the DoFn); this DoFn only buffers, and emits nothing
    def process(self, doc: dict, window=beam.DoFn.WindowParam):
        self._buf.setdefault(window, []).append(doc)

    def finish_bundle(self) -> None:
        import hashlib

        for window, docs in self._buf.items():
            docs.sort(key=lambda d: d["id"])
            folder = Path(self.out_dir) / f"window-{int(window.start):012d}-{int(window.end):012d}"
            folder.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha1("\n".join(d["id"] for d in docs).encode()).hexdigest()[:16]
            lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            atomic_write(
                folder / f"part-{digest}.jsonl", lambda p, t=lines: p.write_text(t, "utf-8")
            )
            self.counters.count("parts")
        self._buf = {}
        super().finish_bundle()


class CountOutput(CountingDoFn):
    """Pass every document on, counting it as the pipeline's output (``output``: ``in`` and
    ``kept``, the report's ``docs_out``)."""

    def __init__(self):
        self.counters = StageCounters("output")

    def process(self, doc):
        self.counters.seen.inc()
        self.counters.kept.inc()
        yield doc


def _write_json_list(values: list, path: str) -> int:
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(values)))
    return len(values)


def apply_stages(docs, cfg: PipelineConfig, out_dir: Path) -> tuple:
    """Chain the configured stages onto ``docs``, each through its registered ``apply``
    (:mod:`deepwhale.data.stages`), after its ``check``; the documents are counted as the
    pipeline's output (``output``) before the first ``sink`` stage, else after the last stage.

    Returns:
        ``(docs, outputs, sunk)``: the documents after the last stage, the stages' extra
        outputs by name (``ppls`` of ``perplexity``, ``manifest`` of ``tokenize``, any a plugin
        stage adds), and whether a sink stage wrote the pipeline's product.
    """
    outputs: dict = {}
    sunk = False
    for i, stage in enumerate(cfg.stages):
        spec = stages.get(stage.name)
        spec.check(stage.params, stage.name)
        if spec.sink is not None and not sunk:
            docs = docs | "Output" >> beam.ParDo(CountOutput())
            sunk = True
        ctx = stages.StageContext(stage.name, f"S{i:02d}_{stage.name}", out_dir, cfg)
        result = spec.apply(docs, stage.params, ctx)
        docs, extra = result if isinstance(result, tuple) else (result, {})
        outputs.update(extra)
    if not sunk:
        docs = docs | "Output" >> beam.ParDo(CountOutput())
    return docs, outputs, sunk


def _read_streaming(p, cfg: PipelineConfig):
    from apache_beam.io import fileio
    from apache_beam.utils.timestamp import Timestamp

    from deepwhale.data.readers import ParseFile, file_pattern

    s = cfg.streaming
    start = Timestamp.now()
    stop = start + s.duration_s if s.duration_s is not None else None
    streams = []
    for i, spec in enumerate(cfg.inputs):
        if spec.format == "parquet":
            raise PipelineConfigError("streaming mode reads text formats only, not parquet")
        kwargs = {"stop_timestamp": stop} if stop is not None else {}
        streams.append(
            p
            | f"Watch{i}"
            >> fileio.MatchContinuously(
                file_pattern(spec.path),
                interval=s.interval_s,
                has_deduplication=False,
                start_timestamp=start,
                **kwargs,
            )
            | f"KeyByPath{i}"
            >> beam.Map(lambda m: (m.path, m)).with_output_types(
                beam.typehints.KV[str, beam.typehints.Any]
            )
            | f"NewFiles{i}" >> beam.ParDo(_FirstSighting())
            | f"Open{i}" >> fileio.ReadMatches()
            | f"Parse{i}" >> beam.ParDo(ParseFile(spec))
        )
    return streams


class _FirstSighting(CountingDoFn):
    """Stateful DoFn keyed by file path: pass a file's metadata on the first poll that sees it."""

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())

    def __init__(self):
        self.counters = StageCounters("watch")

    def process(self, item, seen=beam.DoFn.StateParam(SEEN)):
        if seen.read():
            return
        seen.write(True)
        self.counters.count("new_files")
        yield item[1]


def build(p, cfg: PipelineConfig, out_dir: Path) -> dict:
    """Add the whole pipeline for ``cfg`` to Beam pipeline ``p``; returns the terminal
    PCollections by name: the stages' extra outputs (``manifest`` of ``tokenize``...; those a
    stage declares in ``lists`` are written to their file in batch mode and left out in
    streaming mode) and ``docs_files``.

    Raises:
        PipelineConfigError: an input matches no file, or a stage check fails.
    """
    from deepwhale.data.readers import ReadDocuments

    if cfg.mode == "streaming":
        from apache_beam.transforms import window

        streams = _read_streaming(p, cfg)
    else:
        streams = [p | f"Read{i}" >> ReadDocuments(spec) for i, spec in enumerate(cfg.inputs)]
    docs = streams[0] if len(streams) == 1 else tuple(streams) | "Inputs" >> beam.Flatten()
    if cfg.mode == "streaming":
        docs = docs | "Window" >> beam.WindowInto(window.FixedWindows(cfg.streaming.window_s))
    docs, outputs, sunk = apply_stages(docs, cfg, out_dir)
    for stage in cfg.stages:
        for name, filename in stages.get(stage.name).lists.items():
            values = outputs.pop(name, None)
            if values is not None and cfg.mode == "batch":
                outputs[name] = (
                    values
                    | f"{name}List" >> beam.combiners.ToList()
                    | f"{name}Write" >> beam.Map(_write_json_list, str(out_dir / filename))
                )
    if not sunk or cfg.write_docs:
        if cfg.mode == "streaming":
            outputs["docs_files"] = docs | "WriteWindows" >> beam.ParDo(
                _WriteWindowParts(str(out_dir / "windows"))
            )
        else:
            outputs["docs_files"] = docs | "WriteDocs" >> WriteDocs(str(out_dir / "docs"))
    return outputs


def _start_monitor(cfg: PipelineConfig, sink: Path, out_dir: Path):
    """The live monitor of a streaming run (:mod:`deepwhale.data.monitor`), started."""
    from deepwhale.data.monitor import WindowMonitor

    s = cfg.streaming
    names = [st.name for st in cfg.stages]
    monitor = WindowMonitor(sink, out_dir, names, s.window_s, s.alerts, s.metrics_port)
    try:
        return monitor.start()
    except OSError as e:
        raise PipelineConfigError(
            f"streaming.metrics_port {s.metrics_port}: cannot serve metrics ({e})"
        ) from None


def fingerprint(cfg: PipelineConfig) -> str:
    """SHA-1 of what determines the shards' content: the inputs, the stages with their
    parameters and the content of the domain dictionaries they read (not the runner, its
    options or the output folder)."""
    import dataclasses
    import hashlib

    body = {
        "inputs": [dataclasses.asdict(s) for s in cfg.inputs],
        "stages": [[s.name, dataclasses.asdict(s.params)] for s in cfg.stages],
    }
    dictionaries = [cfg.dictionary] if cfg.dictionary else []
    dictionaries += [getattr(s.params, "dictionary", None) for s in cfg.stages]
    for path in filter(None, dictionaries):  # the dictionaries' content, not only their paths
        body.setdefault("dictionaries", {})[str(path)] = hashlib.sha1(
            Path(path).read_bytes()
        ).hexdigest()
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _claim_shard_folder(cfg: PipelineConfig, folder: Path) -> None:
    """Record the config fingerprint in ``folder/pipeline.json``, or refuse a folder that holds
    shards of a different config (a re-run would otherwise mix old and new shards).

    A fingerprint in a folder without any shard record (``shard-*.json``; a run that failed
    before writing a shard) guards nothing and is replaced.

    Raises:
        PipelineConfigError: the folder holds shards of another config, or shards without a
            fingerprint.
    """
    stamp = folder / "pipeline.json"
    want = fingerprint(cfg)
    has_shards = any(folder.glob("**/shard-*.json"))  # streaming: in window folders
    if stamp.exists() and has_shards:
        try:
            have = json.loads(stamp.read_text()).get("fingerprint")
        except (ValueError, AttributeError):
            have = None
        if have != want:
            raise PipelineConfigError(
                f"{folder} holds shards written with a different config (inputs or stages "
                "changed); choose a new output folder or delete it"
            )
        return
    if has_shards:
        raise PipelineConfigError(f"{folder} holds shards of unknown origin; delete them first")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": want})


def unknown_beam_flags(args: Sequence[str]) -> list[str]:
    """The option names in ``args`` that no registered Beam ``PipelineOptions`` class knows
    (``--direct_num_worker=2``, a typo, gives ``["direct_num_worker"]``).

    Runners may define flags of their own in modules not imported yet, so callers warn rather
    than fail.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # silence Beam's own "Discarding unparseable args"
    try:
        options = PipelineOptions(list(args))
        known = options.get_all_options()
        every = options.get_all_options(retain_unknown_options=True)
    finally:
        beam_log.setLevel(level)
    return sorted(k for k in every if k not in known)


def _materialize_fnapi_metrics() -> None:
    """Work around a recursion in Beam's in-process runner (seen on 2.77).

    ``FnApiRunner`` folds each bundle's metrics into the stage's running total with
    ``consolidate_monitoring_infos(itertools.chain(new, previous))``, a lazy generator, so
    after N bundles reading the total nests N generators; a streaming run polls (and so bundles)
    for its whole duration and ends in ``RecursionError`` past about 1,000 bundles. Making the
    consolidation return a list keeps every level flat; the values are the same.
    """
    from apache_beam.metrics import monitoring_infos
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    if getattr(fn_runner.consolidate_monitoring_infos, "_deepwhale_flat", False):
        return

    def flat(metrics, key=monitoring_infos.to_key):
        return list(monitoring_infos.consolidate(metrics, key))

    flat._deepwhale_flat = True
    fn_runner.consolidate_monitoring_infos = flat


def run(
    cfg: PipelineConfig,
    extra_args: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Run the pipeline to completion and write ``report.json`` (+ histogram) in the output.

    Args:
        cfg: the parsed config.
        extra_args: Beam flags passed through verbatim (``--direct_num_workers=2`` ...).
        progress: called with one-line status messages (None = silent).
        warn: called with warnings, e.g. Beam flags no options class recognises (a typo such
            as ``--direct_num_worker``; the run goes on); None = ``logging.warning``.

    Returns:
        The report dict (also in ``<output>/report.json``).

    Raises:
        PipelineConfigError: bad input or stage configuration (checked before the output
            folder is claimed, so a failed check leaves no ``pipeline.json`` behind), or an
            output folder holding shards of another config (all before anything runs).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    say = progress or (lambda _msg: None)
    out_dir = Path(cfg.output)
    args = beam_args(cfg, extra_args)
    if cfg.mode == "streaming" and f"--runner={DASK_RUNNER}" in args:
        # Beam's Dask runner runs DoFns without user state (user_state_context=None), which
        # the streaming reader's _FirstSighting needs; refuse rather than misbehave
        raise PipelineConfigError(
            "mode streaming is not supported on DaskRunner: the streaming reader "
            "(_FirstSighting) needs per-key DoFn state, which Beam's Dask runner lacks; "
            "use mode batch, or FnApiRunner / FlinkRunner for streaming"
        )
    unknown = unknown_beam_flags(args)
    if unknown:
        (warn or log.warning)(
            "Beam does not recognise flag(s) "
            + ", ".join(f"--{u}" for u in unknown)
            + "; they are passed on but may be typos"
        )
    options = PipelineOptions(args)
    t0 = time.perf_counter()
    _materialize_fnapi_metrics()
    # counter files for runners without metrics (DaskRunner); set before the DoFns are built
    sink = out_dir.resolve() / ".counters" / uuid.uuid4().hex
    set_sink(sink)
    try:
        p = beam.Pipeline(options=options)
        # Building validates inputs, stages and the tokenizer; only then is the folder claimed,
        # so a config error never leaves a fingerprint behind.
        build(p, cfg, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        specs = [(stage, stages.get(stage.name)) for stage in cfg.stages]
        for _, spec in specs:
            if spec.sink is not None:
                _claim_shard_folder(cfg, out_dir / spec.sink)
        say(f"running {len(cfg.stages)} stage(s) in {cfg.mode} mode with {' '.join(args)}")
        monitor = _start_monitor(cfg, sink, out_dir) if cfg.mode == "streaming" else None
        try:
            result = p.run()
            result.wait_until_finish()
        finally:
            if monitor is not None:
                monitor.stop()
        wall = time.perf_counter() - t0
        counters = collect(result, sink)
    finally:
        set_sink(None)
        shutil.rmtree(sink, ignore_errors=True)
        try:
            sink.parent.rmdir()  # .counters, unless another run is using it
        except OSError:
            pass
    extra = {
        "mode": cfg.mode,
        "beam_args": args,
        "unknown_beam_args": unknown,
        "inputs": [vars(s) for s in cfg.inputs],
        "stage_order": [s.name for s in cfg.stages],
        "wall_s": round(wall, 3),
        "docs_in": counters.get("read", {}).get("docs", 0),
        "docs_out": counters.get("output", {}).get("kept", 0),
    }
    note = _counters_note(cfg, args)
    if note:
        extra["counters_note"] = note
    for stage, spec in specs:
        if spec.report is not None:
            extra.update(spec.report(stage.params, out_dir))
    from deepwhale.data.report import write_report

    report = write_report(out_dir, counters, extra)
    say(f"done in {wall:.1f} s: {extra['docs_in']} docs in, {extra['docs_out']} out")
    return report
