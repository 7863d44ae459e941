"""Deprecated location of the model configuration: use :mod:`deepwhale.model.config`.

``from deepwhale.config import ModelConfig`` keeps working (with a ``DeprecationWarning``); the
configuration now lives with the model it describes, so ``deepwhale.model`` imports nothing
from above it.
"""

from __future__ import annotations

import warnings

from deepwhale.model.config import *  # noqa: F403
from deepwhale.model.config import ConfigError, ModelConfig  # noqa: F401
from deepwhale.model.layers import yarn_get_mscale  # noqa: F401

warnings.warn(
    "deepwhale.config moved to deepwhale.model.config; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
