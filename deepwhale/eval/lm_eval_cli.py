"""lm-eval's own command line with the ``deepwhale`` model registered.

``python -m deepwhale.eval.lm_eval_cli --model deepwhale --model_args pretrained=DIR --tasks ...``
takes exactly ``lm_eval``'s arguments (``run``, ``ls``, ``validate`` or the legacy flags). lm-eval
0.4.13 finds models only in its in-process registry (``lm_eval/api/registry.py``
``register_model`` / ``get_model``; no entry points), so this imports
:mod:`deepwhale.eval.lm_eval_model`, which registers the name, and then calls lm-eval's console
entry ``lm_eval.__main__.cli_evaluate`` (``_cli/harness.py`` ``HarnessCLI``) on ``sys.argv``.
No ``.pth`` file or other import hook is installed. Needs the ``eval`` extra.
"""

from __future__ import annotations


def main() -> None:
    """Register ``deepwhale`` and run lm-eval's CLI on ``sys.argv`` (exits as lm-eval does)."""
    from lm_eval.__main__ import cli_evaluate

    import deepwhale.eval.lm_eval_model  # noqa: F401  (registers model="deepwhale")

    cli_evaluate()


if __name__ == "__main__":
    main()
