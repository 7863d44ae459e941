"""Rolling windows: every token scored exactly once, with at least ``stride`` tokens of context,
checked exhaustively on small documents and against lm-eval's own window functions."""

from __future__ import annotations

import pytest

from deepwhale.eval.windows import rolling_windows

PREFIX = -1


def _check(tokens: list[int], max_len: int, stride: int) -> list:
    wins = rolling_windows(tokens, PREFIX, max_len, stride)
    assert [t for w in wins for t in w.targets] == tokens  # each token exactly once, in order
    full = [PREFIX, *tokens]
    for k, w in enumerate(wins):
        assert w.targets and len(w.context) + len(w.targets) - 1 <= max_len
        # the model input is the contiguous text right before the targets
        at = w.start + 1  # index of targets[0] in [PREFIX] + tokens
        assert full[at - len(w.context) : at] == w.context
        assert tokens[w.start : w.start + len(w.targets)] == w.targets
        if k == 0:
            assert w.context == [PREFIX] and w.start == 0
        else:  # every target of a later window sees >= stride document tokens
            assert len(w.context) >= stride and PREFIX not in w.context
    return wins


@pytest.mark.parametrize("max_len", [1, 2, 3, 4, 5, 8])
def test_every_length_and_stride(max_len):
    for n in range(0, 3 * max_len + 3):
        for stride in range(1, max_len + 1):
            _check(list(range(n)), max_len, stride)


def test_named_boundaries():
    L = 4
    assert rolling_windows([], PREFIX, L, 1) == []
    shorter = _check([0, 1], L, 1)  # doc shorter than the window: one window, prefix context
    assert len(shorter) == 1 and shorter[0].targets == [0, 1]
    exact = _check([0, 1, 2, 3], L, 2)  # exactly one window
    assert len(exact) == 1 and exact[0].context == [PREFIX]
    plus_one = _check([0, 1, 2, 3, 4], L, 1)  # window + 1: a second window for the last token
    assert [w.targets for w in plus_one] == [[0, 1, 2, 3], [4]]
    assert plus_one[1].context == [0, 1, 2, 3]  # full window of context for the leftover
    disjoint = _check(list(range(10)), L, 1)  # stride 1: lm-eval's disjoint windows
    assert [w.targets for w in disjoint] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(w.context) for w in disjoint] == [1, 1, 3]
    full = _check(list(range(7)), L, L)  # stride = window: one token per window, full context
    assert [w.targets for w in full] == [[0, 1, 2, 3], [4], [5], [6]]
    assert all(len(w.context) == L for w in full[1:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        rolling_windows([1, 2], PREFIX, 4, 0)
    with pytest.raises(ValueError, match="stride"):
        rolling_windows([1, 2], PREFIX, 4, 5)
    with pytest.raises(ValueError, match="max_len"):
        rolling_windows([1, 2], PREFIX, 0, 1)


def test_same_windows_as_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    for max_len in (1, 2, 3, 5, 8):
        for n in range(1, 3 * max_len + 3):
            for stride in range(1, max_len + 1):
                tokens = list(range(n))
                theirs = [
                    utils.make_disjoint_window(w)
                    for w in utils.get_rolling_token_windows(tokens, PREFIX, max_len, stride)
                ]
                ours = rolling_windows(tokens, PREFIX, max_len, stride)
                assert [(w.context, w.targets) for w in ours] == [
                    (list(a), list(b)) for a, b in theirs
                ]
