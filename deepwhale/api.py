"""The public facade, ``from deepwhale.api import DeepSeekModel, generate_text, apply_lora``.

It re-exports :mod:`deepwhale.inference.deepseek`, where :class:`DeepSeekModel` and
:func:`generate_text` live (on top of the checkpoint loader, the engine and LoRA), so the
inference package never imports this module above it. ``from deepwhale.inference import
DeepSeekModel, generate_text`` (the import DeepSeek's examples use) gives the same objects.
"""

from __future__ import annotations

from deepwhale.inference.deepseek import (  # noqa: F401  (public API)
    DEFAULT_MODEL,
    DeepSeekModel,
    apply_lora,
    generate_text,
    merge_lora,
    save_adapter,
)
