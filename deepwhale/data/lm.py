"""Perplexity filter: score every document with a reference language model, keep the fluent
ones by an absolute threshold or by percentile (in the spirit of CCNet, Wenzek et al. 2020,
which keeps documents by KenLM perplexity percentile).

Backends: any deepwhale checkpoint (default: the bundled stories260K) through
``deepwhale.eval.perplexity.perplexity``, or a KenLM model when the ``kenlm`` package is
installed. The model is loaded once per DoFn instance in ``setup`` (so once per worker thread).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import apache_beam as beam

from deepwhale.data.config import PerplexityParams, PipelineConfigError
from deepwhale.data.metrics import CountingDoFn, StageCounters


class ScorePerplexity(CountingDoFn):
    """Beam DoFn: add ``doc["ppl"]`` (perplexity of the first ``max_tokens`` tokens; ``inf`` if
    the document has fewer than two tokens).

    Raises (in ``setup``):
        PipelineConfigError: ``kenlm`` backend without the ``kenlm`` package.
        CheckpointError: the deepwhale model folder is missing or malformed.
    """

    def __init__(self, params: PerplexityParams):
        self.params = params
        self._model = None
        self._kenlm = None

    def setup(self):
        if self.params.backend == "kenlm":
            try:
                import kenlm
            except ImportError:
                raise PipelineConfigError(
                    "perplexity.backend 'kenlm' needs the kenlm package (pip install kenlm)"
                ) from None
            self._kenlm = kenlm.Model(self.params.kenlm_model)
            return
        import torch

        from deepwhale.api import DeepSeekModel

        torch.set_num_threads(1)  # one scorer per worker; keep the cores for the others
        self._model = DeepSeekModel.from_pretrained(self.params.model, device="cpu")
        if self._model.tokenizer is None:
            raise PipelineConfigError(f"perplexity.model {self.params.model!r} has no tokenizer")

    def score(self, text: str) -> float:
        """Perplexity of ``text`` (a float >= 1, lower is more fluent; ``inf`` if too short)."""
        if self._kenlm is not None:
            return float(self._kenlm.perplexity(" ".join(text.split())))
        from deepwhale.eval.perplexity import perplexity

        ids = self._model.tokenizer.encode(text)[: self.params.max_tokens]
        if len(ids) < 2:
            return math.inf
        return perplexity(self._model.module, [ids])

    def process(self, doc: dict) -> Iterator[dict]:
        yield {**doc, "ppl": self.score(doc["text"])}


class _KeepFluent(CountingDoFn):
    def __init__(self, max_ppl: float | None, stage: str, histogram: bool = False):
        self.max_ppl, self.histogram = max_ppl, histogram
        self.counters = StageCounters(stage)

    def process(self, doc: dict, cutoff: float | None = None) -> Iterator[dict]:
        self.counters.seen.inc()
        ppl = doc["ppl"]
        if not math.isfinite(ppl):
            self.counters.drop("too_few_tokens")
            return
        if self.histogram:  # the live monitor's buckets (deepwhale.data.monitor)
            from deepwhale.data.monitor import ppl_bucket

            self.counters.count(ppl_bucket(ppl))
        if self.max_ppl is not None and ppl > self.max_ppl:
            self.counters.drop("ppl_above_threshold")
            return
        if cutoff is not None and ppl > cutoff:
            self.counters.drop("ppl_above_percentile")
            return
        self.counters.kept.inc()
        yield doc


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, numpy's linear interpolation) of the finite values,
    or None if there are none (every document too short to score)."""
    import numpy as np

    finite = [v for v in values if math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else None


_percentile = percentile  # the former private name, kept for existing imports


class PerplexityFilter(beam.PTransform):
    """Score (:class:`ScorePerplexity`) then keep documents with ``ppl <= max_ppl`` and/or at or
    below the ``keep_percentile``-th percentile of all scores (a global side input).

    With ``histogram`` (streaming mode), each score is also counted into the live monitor's
    bucket counters (``ppl_le_<edge>``, :func:`deepwhale.data.monitor.ppl_bucket`).

    Returns:
        ``(kept docs, all perplexity values)``: the second PCollection feeds the report's
        histogram. Counters under ``deepwhale.data.<stage>``.
    """

    def __init__(
        self, params: PerplexityParams, stage: str = "perplexity", histogram: bool = False
    ):
        super().__init__()
        self.params = params
        self.stage = stage
        self.histogram = histogram

    def expand(self, docs):
        scored = docs | "Score" >> beam.ParDo(ScorePerplexity(self.params))
        ppls = scored | "Values" >> beam.Map(lambda d: d["ppl"])
        keep = _KeepFluent(self.params.max_ppl, self.stage, self.histogram)
        if self.params.keep_percentile is None:
            kept = scored | "Keep" >> beam.ParDo(keep)
        else:
            cutoff = (
                ppls
                | "AllValues" >> beam.combiners.ToList()
                | "Cutoff" >> beam.Map(percentile, self.params.keep_percentile)
            )
            kept = scored | "Keep" >> beam.ParDo(keep, cutoff=beam.pvalue.AsSingleton(cutoff))
        return kept, ppls
