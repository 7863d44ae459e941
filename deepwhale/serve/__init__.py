"""``deepwhale serve``: an OpenAI-compatible HTTP server, a thin layer over
:class:`deepwhale.api.DeepSeekModel` and its continuous-batching engine.

    from deepwhale.serve import create_app
    app = create_app(DeepSeekModel.from_pretrained(), model_name="stories260K")

Needs the ``serve`` extra (``pip install "deepwhale[serve]"``).
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # lazy, so `deepwhale keys` / `deepwhale audit` (auth.py, audit.py) start without torch
    if name == "create_app":
        from deepwhale.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'deepwhale.serve' has no attribute {name!r}")
