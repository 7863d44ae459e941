"""Inference: sampling, generation, the engine and the ``DeepSeekModel`` / ``generate_text`` facade.

``from deepwhale.inference import DeepSeekModel, generate_text`` is the import DeepSeek's
examples use; both live in :mod:`deepwhale.inference.deepseek` (also re-exported by
:mod:`deepwhale.api`) and are loaded on first access, so importing a submodule such as
``deepwhale.inference.sampling`` stays light.
"""

from __future__ import annotations

__all__ = ["DeepSeekModel", "generate_text"]


def __getattr__(name: str):
    if name in __all__:
        from deepwhale.inference import deepseek

        return getattr(deepseek, name)
    raise AttributeError(f"module 'deepwhale.inference' has no attribute {name!r}")
