"""``deepwhale serve``: an OpenAI-compatible HTTP server, a thin layer over
:class:`deepwhale.api.DeepSeekModel` and its continuous-batching engine.

    from deepwhale.serve import create_app
    app = create_app(DeepSeekModel.from_pretrained(), model_name="stories260K")

Needs the ``serve`` extra (``pip install "deepwhale[serve]"``).
"""

from deepwhale.serve.app import create_app

__all__ = ["create_app"]
