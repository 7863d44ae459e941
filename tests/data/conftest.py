"""Shared fixtures for the data-pipeline tests: small slices of the real corpora in
``../shared/data/corpus`` copied into a temporary folder (CRLF, BOM and all)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CORPUS = Path(os.environ.get("DEEPWHALE_CORPUS", Path(__file__).parents[3] / "shared/data/corpus"))


def head_lines(path: Path, max_bytes: int) -> bytes:
    """The first ``max_bytes`` of a file, cut back to the last complete CRLF/LF line."""
    data = path.read_bytes()[:max_bytes]
    return data[: data.rfind(b"\n") + 1]


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "zh/novels/hongloumeng.txt").exists():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    return CORPUS
