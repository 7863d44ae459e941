"""Beam's Dask runner, computing every branch of the pipeline.

Beam 2.78's ``apache_beam.runners.dask.dask_runner.DaskRunner`` translates the pipeline into
Dask bags and then computes only the bag of the *last* transform visited, "which should be
connected to the full Bag Task Graph" (its own comment). A pipeline with several sinks
(shards, the documents' JSONL, ``ppls.json``...) has several leaves, and the others would then
never run. :class:`DaskRunner` here computes every leaf bag in one ``client.compute`` call, so
shared upstream partitions are computed once. Beam's runner has no metrics; the report's
counters come from :mod:`deepwhale.data.metrics`' counter files instead. A side input is
still computed in a nested ``compute`` that runs the stages before it again (Beam 2.78), so
those stages' counters can exceed the documents there; the shards are byte-identical to the
in-process runner's (tests/data/test_dask_runner.py).

Use it as ``--runner DaskRunner`` (:func:`deepwhale.data.pipeline.runner_name` maps the name)
with ``--dask_client_address tcp://HOST:8786``; without an address Dask starts a local
cluster. The workers import deepwhale, so they must run the same deepwhale version as the
client (restart them after an upgrade: a worker that imported an older one fails with Dask's
"Error during deserialization of the task graph").

Raises (at run time): ``ImportError`` without ``dask`` / ``distributed``.
"""

from __future__ import annotations

from apache_beam.runners.dask import dask_runner as beam_dask


class DaskRunnerResult(beam_dask.DaskRunnerResult):
    """Beam's result, closing its ``distributed.Client`` once the run has finished (Beam
    leaves it open, and it then retries a stopped scheduler for as long as the process lives)."""

    def wait_until_finish(self, duration=None) -> str:
        """Wait for every leaf (``duration`` in ms, None = no limit); returns the state.

        Raises:
            Exception: the first worker error, as Beam's result raises it.
        """
        try:
            return super().wait_until_finish(duration)
        finally:
            if self._state in (beam_dask.PipelineState.DONE, beam_dask.PipelineState.FAILED):
                self.client.close()


class DaskRunner(beam_dask.DaskRunner):
    """Beam's DaskRunner, computing all leaf bags (every sink) in one compute."""

    def run_pipeline(self, pipeline, options):
        """Translate ``pipeline`` into Dask bags and submit every leaf; returns Beam's
        ``DaskRunnerResult`` (``wait_until_finish`` gathers and raises worker errors)."""
        import dask.distributed as ddist

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        lazy_side_inputs = dask_options.pop("lazy_side_inputs", False)
        client = ddist.Client(**dask_options)
        pipeline.replace_all(beam_dask.dask_overrides())
        visitor = self.to_dask_bag_visitor(bag_kwargs, lazy_side_inputs)
        pipeline.visit(visitor)
        consumed = set()
        for node in visitor.bags:
            consumed.update(id(v) for v in node.inputs)
            consumed.update(id(si.pvalue) for si in node.side_inputs)
        leaves = [
            bag
            for node, bag in visitor.bags.items()
            if not any(id(out) in consumed for out in node.outputs.values())
        ]
        futures = client.compute(leaves)
        return DaskRunnerResult(client, futures)
