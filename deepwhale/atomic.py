"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Imports only the standard library, so light commands (``deepwhale audit verify``, the data
pipeline's workers) do not pay for torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A reader never sees a half-written ``path``: either the old file or the complete new one.
    The temporary file is removed if ``write`` raises.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON atomically."""
    atomic_write(
        path, lambda p: p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    )
