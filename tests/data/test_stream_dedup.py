"""The persistent LSH index of streaming near-duplicate removal, on real SQLite files."""

from __future__ import annotations

import threading

import pytest

from deepwhale.data.config import MinHashParams, PipelineConfigError
from deepwhale.data.dedup import MinHasher
from deepwhale.data.stream_dedup import IndexMismatchError, LSHIndex

BASE = (
    "Lily went to the park with her mom. She saw a big red ball under a tree and ran to get it. "
    "The ball was soft and round. Lily threw it high in the sky and laughed."
)
NEAR = BASE.replace("laughed.", "laughed a lot.")
OTHER = "Tom had a small boat. Every morning he sailed across the quiet lake to see the ducks."


@pytest.fixture
def params():
    return MinHashParams(threshold=0.7)


def test_near_duplicate_found_and_first_seen_wins(tmp_path, params):
    h = MinHasher(params)
    index = LSHIndex(tmp_path / "i.sqlite", params)
    assert index.check_and_add("a", h(BASE), "r1") is None
    assert index.check_and_add("b", h(OTHER), "r1") is None
    assert index.check_and_add("c", h(NEAR), "r1") == "a"
    assert len(index) == 2  # the duplicate is not indexed
    # the same id again in the same run (a retried bundle): the same answer, kept
    assert index.check_and_add("a", h(BASE), "r1") is None
    index.close()


def test_index_survives_a_restart(tmp_path, params):
    h = MinHasher(params)
    first = LSHIndex(tmp_path / "i.sqlite", params)
    first.check_and_add("a", h(BASE), "run-1")
    first.close()
    again = LSHIndex(tmp_path / "i.sqlite", params)
    assert again.check_and_add("late", h(NEAR), "run-2") == "a"
    assert again.check_and_add("a", h(BASE), "run-2") == "a"  # re-read after the restart
    again.close()


def test_concurrent_writers_keep_exactly_one_of_a_pair(tmp_path, params):
    h = MinHasher(params)
    path = tmp_path / "i.sqlite"
    LSHIndex(path, params).close()
    sig_a, sig_b = h(BASE), h(NEAR)
    for round_ in range(5):
        results = {}

        def check(name, sig, round_=round_, results=results):
            idx = LSHIndex(path, params)
            results[name] = idx.check_and_add(f"{round_}-{name}", sig, "r")
            idx.close()

        threads = [threading.Thread(target=check, args=a) for a in (("a", sig_a), ("b", sig_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kept = [n for n, r in results.items() if r is None]
        if round_ == 0:
            assert len(kept) == 1  # one of the pair kept, the other its duplicate
        else:
            assert not kept  # both are near-duplicates of round 0's survivor


def test_other_parameters_are_refused(tmp_path, params):
    LSHIndex(tmp_path / "i.sqlite", params).close()
    with pytest.raises(IndexMismatchError, match="num_perm"):
        LSHIndex(tmp_path / "i.sqlite", MinHashParams(threshold=0.7, num_perm=64))
    # max_bucket does not change the signatures: accepted
    LSHIndex(tmp_path / "i.sqlite", MinHashParams(threshold=0.7, max_bucket=8)).close()


def test_a_corrupt_index_is_a_clear_error(tmp_path, params):
    bad = tmp_path / "i.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(PipelineConfigError, match="not a usable LSH index"):
        LSHIndex(bad, params)
    assert bad.read_bytes().startswith(b"not a database")
