"""rjieba and jieba give the same words (so the quality filter decides the same), and both keep
user words whole."""

from __future__ import annotations

import pytest

from deepwhale.data.config import QualityParams
from deepwhale.data.quality import quality_reason
from deepwhale.data.readers import decode, parse_novel
from deepwhale.data.segment import Segmenter

pytest.importorskip("rjieba")


def test_rjieba_matches_jieba_on_a_real_novel(corpus):
    text = decode((corpus / "zh/novels/hongloumeng.txt").read_bytes()[:200_000])
    chapters = [t for _, t in parse_novel(text)][:6]
    fast, slow = Segmenter(backend="rjieba"), Segmenter(backend="jieba")
    assert fast.backend == "rjieba" and slow.backend == "jieba"
    params = QualityParams()
    for ch in chapters:
        assert fast.lcut(ch) == slow.lcut(ch)
        assert quality_reason(ch, params, fast) == quality_reason(ch, params, slow)


@pytest.mark.parametrize("backend", ["rjieba", "jieba"])
def test_user_words_stay_whole(backend):
    text = "央行研究量化宽松政策与信用违约互换的风险"
    plain = Segmenter(backend=backend).lcut(text)
    assert "量化宽松政策" not in plain
    seg = Segmenter(["量化宽松政策", "信用违约互换", "has space"], backend=backend)
    words = seg.lcut(text)
    assert "量化宽松政策" in words and "信用违约互换" in words
    assert "".join(words) == text


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown segmenter backend"):
        Segmenter(backend="thulac")
