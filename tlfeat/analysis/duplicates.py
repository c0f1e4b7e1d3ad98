"""Near-duplicate images by embedding similarity, and byte-identical files by sha256, across and within splits.

Every row's nearest neighbours (exact search, or a faiss index above
EXACT_MAX_ROWS rows) give the distribution of nearest-neighbour similarities;
near-duplicates are the pairs above a threshold chosen from that distribution
(`choose_threshold`) unless one is given. Pairs across splits come first: an
image whose copy sits in the test split inflates every test score.

Each row's neighbours are searched NEIGHBOURS at a time; a row whose last
neighbour still reaches the threshold (a large group of copies, a low
threshold) is searched again with twice as many, until its list ends below the
threshold or holds every other row, so no pair is dropped for want of room.

Memory: the neighbour lists (N x NEIGHBOURS), one re-search round's lists (at
most RESEARCH_BUDGET neighbours; beyond it the audit stops widening and says
so in its notes), the pairs found, plus, for faiss, the index (a quarter of the
float32 features); the features are read a block at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tlfeat.analysis.common import BLOCK_ROWS, StoredFeatures, dataset_root
from tlfeat.analysis.search import Neighbours, exact_top_k, index_top_k, open_index
from tlfeat.cache import CacheData
from tlfeat.data.scan import SPLITS
from tlfeat.errors import number, parameter_error
from tlfeat.fileio import sha256_file
from tlfeat.reports import write_csv

EXACT_MAX_ROWS = 20_000  # an exact self-join costs N^2 x D: 1e12 multiply-adds at 20,000 x 1280
NEIGHBOURS = 10  # per row in the first search; rows with more neighbours above the threshold are searched again
RESEARCH_BUDGET = 2_000_000  # neighbours per re-search round (rows x k): 24 MB of indices and similarities
DUPLICATE_NPROBE = 4  # IVF cells scanned per row: near-duplicates almost always share a cell
RESCORE_MARGIN = 0.01  # candidates this far below the threshold by the index's estimate are checked exactly
EXACT_MARGIN = 1e-5  # the exact search's float32 similarities: those just below the threshold are checked too
PAIR_CHUNK = 8192  # candidate pairs scored at a time: two float64 blocks of 1280-d rows, 168 MB
INDEXES = ("auto", "exact", "faiss")
# Threshold rule: nearest-neighbour distances (1 - similarity) are roughly log-normal over the bulk of a
# dataset; copies sit far below it. Scene15 / EfficientNet-Lite0: bulk median 0.77, threshold 0.940.
ROBUST_SDS = 4.0
THRESHOLD_RANGE = (0.90, 0.995)


@dataclass
class DuplicatePair:
    a: int  # row of the cache; a's split comes first in (train, val, test), then path order
    b: int
    path_a: str
    path_b: str
    split_a: str
    split_b: str
    similarity: float  # cosine similarity of the two embeddings
    same_bytes: bool  # the two files have the same sha256 (False too where they were not checked: see Duplicates)

    @property
    def kind(self) -> str:
        """'test leak' (one image in test, one not), 'cross-split' (train vs val) or 'within split'."""
        if (self.split_a == "test") != (self.split_b == "test"):
            return "test leak"
        return "cross-split" if self.split_a != self.split_b else "within split"


KIND_ORDER = ("test leak", "cross-split", "within split")


@dataclass
class Duplicates:
    pairs: list[DuplicatePair]  # test leaks, then other cross-split pairs, then within-split; by similarity
    threshold: float
    threshold_rule: str  # how the threshold was chosen, one line
    nearest: np.ndarray  # (N,) each row's nearest-neighbour similarity (the index's estimate with faiss)
    search: str  # "exact" or the faiss index and nprobe used
    notes: list[str] = field(default_factory=list)
    bytes_checked: bool = True  # False: no dataset folder to hash the files of, every same_bytes is False

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.pairs)


def choose_threshold(nearest: np.ndarray) -> tuple[float, str]:
    """A similarity threshold from the nearest-neighbour similarities, and the rule as one line.

    On a log scale the distances 1 - s of the bulk are close to normal: the
    threshold sits ROBUST_SDS robust standard deviations (1.4826 x MAD) below
    their median, clipped to THRESHOLD_RANGE.
    """
    log_d = np.log10(np.maximum(1.0 - np.asarray(nearest, dtype=np.float64), 1e-7))
    median = float(np.median(log_d))
    sd = 1.4826 * float(np.median(np.abs(log_d - median)))
    raw = 1.0 - 10 ** (median - ROBUST_SDS * sd)
    low, high = THRESHOLD_RANGE
    threshold = float(np.clip(raw, low, high))
    rule = (
        f"median nearest-neighbour similarity {float(np.median(nearest)):.3f}; threshold {threshold:.3f} = "
        f"{ROBUST_SDS:g} robust SDs of log(1 - similarity) below its median, clipped to [{low}, {high}]"
    )
    return threshold, rule


def _sha256_groups(data: CacheData, root: Path | None) -> tuple[dict[int, str] | None, list[str]]:
    """row -> sha256 for rows whose file size is shared with another row (only those can be identical);
    None when there is no dataset folder to read."""
    if root is None or not root.is_dir():
        where = "the cache records no dataset folder" if root is None else f"dataset folder {root} not found"
        return None, [f"byte-identical files not checked: {where}"]
    sizes: dict[int, list[int]] = {}
    missing = 0
    for row, rel in enumerate(data.paths):
        try:
            sizes.setdefault(os.stat(root / rel).st_size, []).append(row)
        except OSError:
            missing += 1
    digests: dict[int, str] = {}
    for rows in sizes.values():
        if len(rows) > 1:
            for row in rows:
                try:
                    digests[row] = sha256_file(root / data.paths[row])
                except OSError:
                    missing += 1
    notes = [f"{missing} image files not found under {root}: not checked for byte-identical copies"] if missing else []
    return digests, notes


def _cosines(features: StoredFeatures, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows a[i] and b[i], in float64 (a float32 dot product of 1280-d rows is off by
    about 1e-7: a pair at the threshold must not fall below it by rounding), PAIR_CHUNK pairs at a time."""
    sims = np.empty(len(a))
    for start in range(0, len(a), PAIR_CHUNK):
        x, y = (features.rows(side[start : start + PAIR_CHUNK]).astype(np.float64) for side in (a, b))
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        sims[start : start + PAIR_CHUNK] = np.einsum("ij,ij->i", x, y) / np.maximum(norms, np.finfo(np.float64).tiny)
    return sims


def _pairs(data: CacheData, features: StoredFeatures, candidates: set[tuple[int, int]], threshold: float,
           digests: dict[int, str]) -> list[DuplicatePair]:
    """The candidate pairs whose exact cosine reaches `threshold` or whose files are identical, oriented."""
    order = {name: n for n, name in enumerate(SPLITS)}
    ordered = [sorted(pair, key=lambda r: (order.get(data.split[r], len(SPLITS)), data.paths[r])) for pair in candidates]
    a, b = (np.array([pair[side] for pair in ordered], dtype=np.int64) for side in (0, 1))
    sims = _cosines(features, a, b)
    pairs = []
    for i, j, sim in zip(a.tolist(), b.tolist(), sims):
        same = i in digests and digests.get(j) == digests[i]
        if sim >= threshold or same:
            pairs.append(DuplicatePair(i, j, str(data.paths[i]), str(data.paths[j]), str(data.split[i]),
                                       str(data.split[j]), float(np.clip(sim, -1.0, 1.0)), same))
    return pairs


# (features of some rows, their row numbers, k) -> each one's k nearest other rows
Search = Callable[[np.ndarray, np.ndarray, int], Neighbours]


def _searcher(features: StoredFeatures, cache: Path, index: str, nprobe: int) -> tuple[Search, str, list[str]]:
    """The nearest-neighbour search `index` asks for (a faiss index opened once), how it searches, and a
    note if the index could not be saved."""
    if index == "exact" or (index == "auto" and features.shape[0] <= EXACT_MAX_ROWS):
        return (lambda queries, own, k: exact_top_k(queries, features, k, exclude=own)), "exact", []
    faiss_index, _, unsaved = open_index(cache, features)
    return ((lambda queries, own, k: index_top_k(faiss_index, queries, k, exclude=own, nprobe=nprobe)),
            f"faiss IVF-SQ8, nprobe {nprobe} (approximate)", [unsaved] if unsaved else [])


def _neighbours(features: StoredFeatures, search: Search, k: int) -> Neighbours:
    """Every row's k nearest other rows."""
    n = features.shape[0]
    found = Neighbours(np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32))
    for start, block in features.blocks():
        part = search(block, np.arange(start, start + len(block)), k)
        found.indices[start : start + len(block)], found.similarities[start : start + len(block)] = (
            part.indices, part.similarities)
    return found


def _close(rows: np.ndarray, found: Neighbours, floor: float) -> set[tuple[int, int]]:
    """(low row, high row) for every neighbour of `rows` (found[i] lists row rows[i]'s) at `floor` or above."""
    at, column = np.nonzero(found.similarities >= floor)
    return {(min(i, j), max(i, j)) for i, j in zip(rows[at].tolist(), found.indices[at, column].tolist())}


def _saturated(features: StoredFeatures, search: Search, found: Neighbours,
               floor: float) -> tuple[set[tuple[int, int]], list[str]]:
    """The pairs at `floor` or above beyond the k neighbours `found` lists, and a note if some are left out.

    A row whose k-th neighbour reaches `floor` may have more: it is searched
    again with k doubled, until no row is saturated, k = N - 1, or a round would
    list more than RESEARCH_BUDGET neighbours (the note says how many rows stopped where).
    """
    n, k = features.shape[0], found.indices.shape[1]
    rows = np.flatnonzero(found.similarities[:, -1] >= floor)
    pairs: set[tuple[int, int]] = set()
    while len(rows) and k < n - 1:
        if len(rows) * min(2 * k, n - 1) > RESEARCH_BUDGET:
            return pairs, [f"{len(rows)} images have {k} or more neighbours at or above the threshold; "
                           f"pairs beyond each one's {k} nearest are not listed"]
        k = min(2 * k, n - 1)
        still = []
        for start in range(0, len(rows), BLOCK_ROWS):
            chunk = rows[start : start + BLOCK_ROWS]
            part = search(features.rows(chunk), chunk, k)
            pairs |= _close(chunk, part, floor)
            still.append(chunk[part.similarities[:, -1] >= floor])
        rows = np.concatenate(still)
    return pairs, []


def checked_threshold(threshold: float | None) -> float | None:
    """The duplicate threshold (`dup_threshold`) as a float, None for the default rule; one error if it is no
    cosine similarity."""
    return None if threshold is None else number("dup_threshold", threshold, -1.0, 1.0, "a cosine similarity")


def find_duplicates(
    data: CacheData, features: StoredFeatures, cache: str | Path, threshold: float | None = None,
    index: str = "auto", neighbours: int = NEIGHBOURS, nprobe: int = DUPLICATE_NPROBE,
) -> Duplicates:
    """Near-duplicate pairs (embedding cosine >= threshold) and byte-identical files, ordered for review.

    `data` and `features` as `tlfeat.analysis.common.open_cache` gives them.
    index: "exact" (blocked matrix products, O(N^2 D)), "faiss" (the IVF index
    saved beside `cache`; approximate: a pair in cells `nprobe` does not reach
    is missed) or "auto" (exact up to EXACT_MAX_ROWS rows). Reported
    similarities are exact whichever search found the pair; with faiss, the
    default threshold comes from the index's approximate nearest similarities.
    """
    if index not in INDEXES:
        raise parameter_error("index", index, f"use one of {', '.join(INDEXES)}")
    threshold = checked_threshold(threshold)
    search, how, notes = _searcher(features, Path(cache), index, nprobe)
    found = _neighbours(features, search, min(neighbours, len(data) - 1))
    nearest = found.similarities[:, 0]
    rule = "given"
    if threshold is None:
        threshold, rule = choose_threshold(nearest)
        # Exact nearest similarities would read each row's neighbours at random, N x k reads: too slow for the
        # caches faiss is for. The rule says what it saw.
        if how != "exact":
            rule += "; from the index's approximate similarities"
    floor = threshold - (EXACT_MARGIN if how == "exact" else RESCORE_MARGIN)
    near = _close(np.arange(len(data)), found, floor)
    more, saturated_notes = _saturated(features, search, found, floor)
    near |= more
    checked, sha_notes = _sha256_groups(data, dataset_root(data))
    notes += saturated_notes + sha_notes
    digests = checked or {}
    by_digest: dict[str, list[int]] = {}
    for row, digest in digests.items():
        by_digest.setdefault(digest, []).append(row)
    for group in by_digest.values():
        near.update((i, j) for x, i in enumerate(sorted(group)) for j in sorted(group)[x + 1 :])
    pairs = _pairs(data, features, near, threshold, digests)
    pairs.sort(key=lambda p: (KIND_ORDER.index(p.kind), -p.similarity, p.path_a, p.path_b))
    return Duplicates(pairs, float(threshold), rule, nearest, how, notes, bytes_checked=checked is not None)


DUPLICATE_COLUMNS = ["path_a", "path_b", "split_a", "split_b", "similarity", "same_bytes", "kind"]


def write_duplicates_csv(path: Path, pairs: Sequence[DuplicatePair]) -> None:
    write_csv(path, DUPLICATE_COLUMNS, [
        [p.path_a, p.path_b, p.split_a, p.split_b, round(p.similarity, 6), p.same_bytes, p.kind] for p in pairs
    ])
