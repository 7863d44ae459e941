"""The HTTP routes, thin: each parses its body (pydantic, :mod:`deepwhale.serve.schemas`) and
hands it to the serving layer (:mod:`deepwhale.serve.serving` and its endpoint modules).

* :mod:`.admin`: ``/health``, ``/metrics``, ``/dashboard``, ``/dashboard/stats``;
* :mod:`.admin_api`: the admin API, ``/admin/keys``, ``/admin/usage``, ``/admin/audit/*``
  (through :mod:`deepwhale.serve.serving_admin`, in ``app.state.admin``);
* :mod:`.openai`: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/responses``, ``/v1/embeddings``;
* :mod:`.tokenizer`: vLLM's ``/tokenizer_info``, ``/tokenize``, ``/detokenize``;
* :mod:`.generate`: ``/generate`` (DeepSeek's FastAPI example).

Routes find the app's :class:`~deepwhale.serve.serving.Serving` in ``app.state.serving``
(:func:`serving_of`); they import the serving layer and the schemas, never the middleware.
"""

from __future__ import annotations

from fastapi import Request

from deepwhale.serve.serving import Serving


def serving_of(request: Request) -> Serving:
    """The :class:`Serving` that :func:`~deepwhale.serve.app.create_app` put on the app."""
    return request.app.state.serving
