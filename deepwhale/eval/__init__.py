"""Evaluation: lm-eval-compatible log-likelihood tasks and perplexity on deepwhale models.

    from deepwhale.api import DeepSeekModel
    from deepwhale.eval import evaluate
    res = evaluate(DeepSeekModel.from_pretrained(), ["arc_easy"], limit=20)

Modules, one job each: ``tasks`` (task files), ``datasets`` (local readers), ``preprocess``
(named ``process_docs``), ``templates`` (``doc_to_*``), ``scoring`` (log-likelihoods),
``windows`` (rolling windows), ``metrics``, ``runner`` (the loop), ``report`` (files),
``lm_eval_model`` (``lm_eval --model deepwhale``).
"""

from deepwhale.eval.tasks import TaskConfig, TaskError, available_tasks, load_task

__all__ = ["TaskConfig", "TaskError", "available_tasks", "evaluate", "load_task"]


def __getattr__(name: str):
    """``evaluate`` loads on first use, so importing the package (the CLI) skips torch."""
    if name == "evaluate":
        from deepwhale.eval.runner import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
