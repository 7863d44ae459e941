"""Exact and near-duplicate removal as Beam transforms.

**Exact.** Key every document by the SHA-1 of its normalised text (casefolded, with whitespace,
punctuation and symbols removed), ``GroupByKey``, keep the smallest id of each group.

**Near (MinHash LSH).** Broder (1997) MinHash signatures (datasketch, ``num_perm``
permutations) over shingles that suit the script: character n-grams for CJK text (no spaces to
split on), word n-grams otherwise. The signature is cut into ``b`` bands of ``r`` rows, with
``(b, r)`` chosen by datasketch for the threshold (``MinHashLSH(threshold, num_perm).b/.r``).
Then, in Beam:

1. each document emits one ``(band index, hash of its band)`` key per band;
2. ``GroupByKey`` gathers the candidates that share a band (an LSH bucket);
3. within a bucket, pairs whose *estimated* Jaccard (share of equal signature slots) reaches the
   threshold become edges (all pairs in buckets up to ``max_bucket``, else each member against
   the smallest id), which removes most LSH false positives;
4. the edges go through one global pass (``CombineGlobally(ToList)``): union-find whose root is
   always the smallest id, so every connected component keeps exactly one survivor, its smallest
   id, whatever order the edges arrive in;
5. the ``{dropped id: survivor}`` map is a side input to a filter over the documents.

Why a global union-find: duplicates are sparse, so the edge list is small next to the corpus
(one entry per duplicate pair, not per document) and one pass is exact and deterministic. At web
scale the edge list would outgrow one worker; the distributed replacement is iterative
large-star/small-star connected components (Kiveris et al. 2014) as a loop of GroupByKeys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np

from deepwhale.data.config import ExactDedupParams, MinHashParams
from deepwhale.data.metrics import CountingDoFn, StageCounters
from deepwhale.data.quality import cjk_fraction

_NON_WORD = re.compile(r"[\W_]+")
_WORD = re.compile(r"\w+")


def normalize_for_dedup(text: str) -> str:
    """Casefolded ``text`` with whitespace, punctuation and symbols removed."""
    return _NON_WORD.sub("", text.casefold())


def text_key(text: str, normalize: bool = True) -> str:
    """Hex SHA-1 of the (normalised) text: the exact-dedup key."""
    body = normalize_for_dedup(text) if normalize else text
    return hashlib.sha1(body.encode("utf-8")).hexdigest()


class _KeepSmallest(CountingDoFn):
    def __init__(self, stage: str):
        self.counters = StageCounters(stage)

    def process(self, item) -> Iterator[dict]:
        _, docs = item
        docs = list(docs)
        self.counters.seen.inc(len(docs))
        self.counters.kept.inc()
        if len(docs) > 1:
            self.counters.drop("exact_duplicate", len(docs) - 1)
        yield min(docs, key=lambda d: d["id"])


class ExactDedup(beam.PTransform):
    """Keep one document (the smallest id) per normalised-text hash.

    Counters under ``deepwhale.data.<stage>``: ``in``, ``kept``, ``dropped.exact_duplicate``.
    Windows are respected (in streaming mode duplicates are removed within a window).
    """

    def __init__(self, params: ExactDedupParams, stage: str = "exact_dedup"):
        super().__init__()
        self.params = params
        self.stage = stage

    def expand(self, docs):
        normalize = self.params.normalize
        return (
            docs
            | "KeyByHash" >> beam.Map(lambda d: (text_key(d["text"], normalize), d))
            | "Group" >> beam.GroupByKey()
            | "KeepSmallest" >> beam.ParDo(_KeepSmallest(self.stage))
        )


def shingles(text: str, char_ngram: int, word_ngram: int) -> list[bytes]:
    """Shingles of ``text`` as UTF-8 bytes: character ``char_ngram``-grams of the normalised
    text when it is mostly CJK (> 30%), else lowercase word ``word_ngram``-grams. A text
    shorter than one shingle gives one shingle (the whole normalised text).
    """
    if cjk_fraction(text) > 0.3:
        s = normalize_for_dedup(text)
        grams = {s[i : i + char_ngram] for i in range(max(len(s) - char_ngram + 1, 1))}
    else:
        words = _WORD.findall(text.casefold())
        grams = {
            " ".join(words[i : i + word_ngram]) for i in range(max(len(words) - word_ngram + 1, 1))
        }
    return [g.encode("utf-8") for g in grams]


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` that datasketch picks for ``threshold`` (equal FP/FN weights)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class MinHasher:
    """MinHash signatures of texts, built once per worker (datasketch's permutations are the
    costly part).

    ``hasher(text)`` is the ``(num_perm,)`` uint64 signature of :func:`shingles` of ``text``.
    """

    def __init__(self, p: MinHashParams):
        from datasketch import MinHash

        self.p = p
        proto = MinHash(num_perm=p.num_perm, seed=p.seed)
        self._perms, self._scheme = proto.permutations, proto.scheme

    def __call__(self, text: str) -> np.ndarray:
        from datasketch import MinHash

        m = MinHash(
            num_perm=self.p.num_perm,
            seed=self.p.seed,
            permutations=self._perms,
            scheme=self._scheme,
        )
        m.update_batch(shingles(text, self.p.char_ngram, self.p.word_ngram))
        return m.hashvalues.astype(np.uint64)  # (num_perm,)


def band_keys(hv: np.ndarray, bands: int, rows: int) -> list[str]:
    """The LSH bucket key of each band of signature ``hv``: ``"<band>:<sha1 of its rows>"``."""
    return [
        f"{b}:{hashlib.sha1(hv[b * rows : (b + 1) * rows].tobytes()).hexdigest()[:16]}"
        for b in range(bands)
    ]


class _Signature(CountingDoFn):
    """doc -> ``(band key, (id, signature bytes))`` for each band."""

    def __init__(self, p: MinHashParams, bands: int, rows: int):
        self.p, self.bands, self.rows = p, bands, rows
        self._hasher = None

    def setup(self):
        self._hasher = MinHasher(self.p)

    def process(self, doc: dict):
        hv = self._hasher(doc["text"])
        sig = hv.tobytes()
        for key in band_keys(hv, self.bands, self.rows):
            yield key, (doc["id"], sig)


def _bucket_edges(item, threshold: float, max_bucket: int) -> Iterator[tuple[str, str]]:
    """Edges ``(smaller id, larger id)`` between verified near-duplicates of one LSH bucket."""
    _, members = item
    members = sorted(set(members))  # (id, sig bytes), by id; same doc twice is one member
    if len(members) < 2:
        return
    sigs = [np.frombuffer(s, dtype=np.uint64) for _, s in members]
    for i in range(len(members)):
        others = (
            range(i + 1, len(members))
            if len(members) <= max_bucket
            else (range(1, len(members)) if i == 0 else ())
        )
        for j in others:
            if float(np.mean(sigs[i] == sigs[j])) >= threshold:
                yield members[i][0], members[j][0]


def connected_components(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over ``edges``; returns ``{member: root}`` for every non-root member, where
    the root of each component is its smallest id (so the survivor does not depend on order).
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            parent[hi] = lo
    return {x: find(x) for x in list(parent) if find(x) != x}


class _DropMarked(CountingDoFn):
    def __init__(self, stage: str):
        self.counters = StageCounters(stage)

    def process(self, doc: dict, dropped: dict) -> Iterator[dict]:
        self.counters.seen.inc()
        if doc["id"] in dropped:
            self.counters.drop("near_duplicate")
            return
        self.counters.kept.inc()
        yield doc


class MinHashDedup(beam.PTransform):
    """Remove near-duplicates, exactly one survivor (smallest id) per cluster; see the module
    docstring for the algorithm. Counters: ``in``, ``kept``, ``dropped.near_duplicate``.
    """

    def __init__(self, params: MinHashParams, stage: str = "minhash_dedup"):
        super().__init__()
        self.params = params
        self.stage = stage

    def expand(self, docs):
        p = self.params
        bands, rows = lsh_bands(p.threshold, p.num_perm)
        edges = (
            docs
            | "Signatures" >> beam.ParDo(_Signature(p, bands, rows))
            | "Buckets" >> beam.GroupByKey()
            | "Edges" >> beam.FlatMap(_bucket_edges, p.threshold, p.max_bucket)
        )
        dropped = (
            edges
            | "AllEdges" >> beam.combiners.ToList()
            | "Components" >> beam.FlatMap(lambda es: connected_components(es).items())
        )
        return docs | "DropDuplicates" >> beam.ParDo(
            _DropMarked(self.stage), dropped=beam.pvalue.AsDict(dropped)
        )
