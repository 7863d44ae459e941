"""Resolve a local folder or a Hugging Face Hub repo id to a local checkpoint folder.

Downloads go through ``huggingface_hub.snapshot_download`` (its cache, its auth and its
``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` settings). Offline, a repo id that is not already cached
fails with a :class:`CheckpointError` that says how to point at a local folder instead.
"""

from __future__ import annotations

import re
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, downloaded or loaded; the message names file and key."""


#: models shipped inside the package (``deepwhale/assets/<name>``), usable by bare name; this
#: module is the one place that knows their paths
BUNDLED = Path(__file__).resolve().parents[1] / "assets"
#: the default model and tokenizer when none is given: llama2.c's stories260K, converted
DEFAULT_MODEL = BUNDLED / "stories260K"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.txt",
    "*.md",
]


def bundled(name: str) -> Path | None:
    """The folder of the bundled model ``name`` (``stories260K``, ``deepwhale-demo``), or None
    when ``name`` is a path (it holds a ``/``) or no bundled folder has that name."""
    folder = BUNDLED / name
    return folder if "/" not in name and folder.is_dir() else None


def resolve_checkpoint(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """Return a local folder for ``path_or_repo_id``.

    Args:
        path_or_repo_id: an existing folder, the name of a bundled model (``stories260K``,
            ``deepwhale-demo``: folders under ``deepwhale/assets``), or a Hub repo id such as
            ``deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B``.
        revision: Hub branch, tag or commit (repo ids only).

    Raises:
        CheckpointError: the folder does not exist and the name is not a repo id, or the
            download failed (offline, unknown repo, no access); the message says how to pass a
            local folder.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    folder = bundled(name)
    if folder is not None and (folder / "config.json").is_file():
        return folder
    if path.exists():
        raise CheckpointError(f"{name} is a file; pass the checkpoint folder that holds it")
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        known = sorted(p.name for p in BUNDLED.iterdir() if (p / "config.json").is_file())
        raise CheckpointError(
            f"no such checkpoint folder: {name} (bundled models: {', '.join(known)}; "
            "or a Hub repo id like deepseek-ai/DeepSeek-V3)"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # offline, 404, 401, connection refused, ...
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{_first_line(e)}). If you are offline, download the model elsewhere (for example "
            f"`huggingface-cli download {name} --local-dir ./model`), copy the folder here and "
            f"pass its path instead: DeepSeekModel.from_pretrained('./model') or "
            f"`deepwhale generate --model ./model`."
        ) from e
    return Path(local)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
