"""`similar`: the cached images most similar to query images, by cosine similarity of their embeddings.

A query is a path stored in the cache (``train/Coast/img_1.jpg``), an image file
or a folder of them. Files inside the cache's dataset folder that the cache
holds use their cached row; other files are embedded exactly as the cache was
(backbone, weights, image size, preprocessing, stored dtype), refusing a cache
whose weights or preprocessing can no longer be reproduced, as `predict` does.
A query that is a cached image never returns itself.

The cache's features are read from the HDF5 file a block at a time (exact
search, up to EXACT_MAX_ROWS rows, memory bounded by the block), or searched
through the faiss index saved beside it (`index="faiss"`, or above EXACT_MAX_ROWS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from tlfeat.analysis.common import dataset_root, open_cache, output_folder
from tlfeat.analysis.contact_sheet import Tile, draw_sheet, shorten
from tlfeat.analysis.search import Neighbours, exact_top_k, index_top_k, open_index, rescore
from tlfeat.cache import CacheData, CacheReader, open_rows
from tlfeat.errors import TlfeatError, integer, parameter_error, some_of
from tlfeat.fileio import path_list, path_value
from tlfeat.reports import write_csv
from tlfeat.runtime import check_batch_size

EXACT_MAX_ROWS = 4_000_000  # 1,000 queries over 4M x 1280 rows: ~4 min of matrix products on 2 cores
INDEXES = ("auto", "exact", "faiss")
SHEET_QUERIES = 12  # rows of the contact sheet; the CSV has every query


@dataclass
class Match:
    rank: int
    row: int
    path: str
    split: str
    label: str
    similarity: float


@dataclass
class QueryMatches:
    query: str  # as given (a cached path or a file)
    row: int | None  # the query's own cached row, if it has one
    image: Path  # the query's image file, for pictures
    matches: list[Match] = field(default_factory=list)


@dataclass
class SimilarResult:
    """The cached images nearest each query (`queries[i].matches`, nearest first), queries that
    could not be embedded (`skipped`), the search used, notes on it and the files written (similar.csv, .png)."""

    cache: Path
    queries: list[QueryMatches]
    skipped: list[tuple[str, str]]  # (file, why it could not be embedded)
    search: str  # "exact", or the faiss index used
    root: Path | None  # the dataset folder the cached paths are relative to
    index_built: bool = False  # a faiss index was built by this call (and saved, unless `notes` say otherwise)
    files: list[Path] = field(default_factory=list)  # similar.csv and similar.png
    notes: list[str] = field(default_factory=list)  # one line each: what the user should know about the search

    def __repr__(self) -> str:  # every match of every query runs to pages: a notebook cell shows this
        top = max((len(q.matches) for q in self.queries), default=0)
        return (f"SimilarResult(cache={str(self.cache)!r}, {len(self.queries)} queries x top {top} (.queries), "
                f"{len(self.skipped)} skipped, search={self.search!r}, files={len(self.files)}, "
                f"{len(self.notes)} notes)")


def _not_a_query(cache: Path, query: str) -> TlfeatError:
    """The error for a query that is neither a cached path nor a file: the cache's reason when it skipped the
    file at extraction (a user who names it wants to know why it is missing)."""
    with CacheReader(cache) as reader:
        paths, reasons, _, _ = reader.skipped()
    if query in paths:
        return TlfeatError(f"{query}: {cache} holds no features for it: extraction skipped it "
                           f"({reasons[paths.index(query)]})")
    return TlfeatError(f"{query}: neither an image path stored in the cache nor an existing file or folder")


def _resolve(
    queries: Sequence[str | Path], data: CacheData, cache: Path
) -> tuple[list[tuple[str, int | None, int | None]], list[Path]]:
    """The queries, in their order, as (query, cached row, None) or (file, None, its index in the files to embed),
    and the files to embed."""
    from tlfeat.apps.predict import collect_images

    row_of = {str(p): r for r, p in enumerate(data.paths)}
    root = dataset_root(data)
    root = root.resolve() if root is not None else None
    items: list[tuple[str, int | None, int | None]] = []
    files: list[Path] = []
    for query in queries:
        text = str(query)
        if text in row_of and not Path(text).is_absolute():
            if Path(text).exists() and _cached_path(Path(text), root) != text:
                raise TlfeatError(
                    f"{text}: both an image path stored in the cache and another file here; "
                    f"give ./{text} for the file here, or {root / text if root else 'the stored image'}'s full path"
                )
            items.append((text, row_of[text], None))
            continue
        if not Path(text).exists():
            raise _not_a_query(cache, text)
        found, _ = collect_images([Path(text)])  # a query folder's pipes and broken links are no queries
        if not found:
            raise TlfeatError(f"{text}: no image files in this folder")
        for path in found:
            rel = _cached_path(path, root)
            if rel in row_of:
                items.append((str(path), row_of[rel], None))
            else:
                items.append((str(path), None, len(files)))
                files.append(path)
    return items, files


def _cached_path(path: Path, root: Path | None) -> str | None:
    """`path` relative to the dataset root as the cache stores it (None: outside the dataset). The scan
    keeps a symlink's own path, so the path is tried as given before its target."""
    if root is None:
        return None
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        if candidate.is_relative_to(root):
            return candidate.relative_to(root).as_posix()
    return None


def _embed(cache: Path, data: CacheData, files: list[Path], batch_size: int | None, progress: bool):
    """(features, indices of `files` embedded, failures) with the cache's own backbone and settings."""
    from tlfeat.apps.predict import embed_for_head
    from tlfeat.heads.folder import source_record

    dim = int(data.features.shape[1])  # `features` is empty here, but has the cache's width
    meta = {"sources": [source_record(cache, data.attrs, len(data), dim)], "feature_dim": dim}
    return embed_for_head(cache, meta, files, batch_size, progress)


def similar(
    cache: str | Path, queries: str | Path | Sequence[str | Path], top: int = 10, index: str = "auto", nprobe: int = 16,
    batch_size: int | None = None, progress: bool = True, out: str | Path | None = None,
) -> SimilarResult:
    """The `top` most similar cached images for each query (see the module docstring for what a query is).

    queries: paths stored in the cache, image files or folders of them (embedded with the cache's
    backbone and settings). index: "exact", "faiss" (approximate; the index is built once and saved as
    ``<cache>.faiss``) or "auto" (exact up to EXACT_MAX_ROWS rows); nprobe: the faiss cells searched.
    batch_size, progress: of embedding queries that are not in the cache. Writes similar.csv (every query) and similar.png (a
    contact sheet) to `out`, by default ``<cache folder>/similar/<cache stem>/``; `files` lists them.
    """
    cache = path_value("cache", cache)
    out = None if out is None else path_value("out", out)
    if index not in INDEXES:
        raise parameter_error("index", index, f"use one of {', '.join(INDEXES)}")
    top = integer("top", top, 1)
    nprobe = integer("nprobe", nprobe, 1)  # faiss fails with a C++ assertion (0) or an overflow (negative), far down
    queries = path_list(queries, "queries", "paths stored in the cache, image files or folders")
    batch_size = check_batch_size(batch_size)
    folder = similar_output(cache, out)  # checked before any work
    with open_cache(cache, min_rows=1) as (data, features):
        items, files = _resolve(queries, data, cache)
        root = dataset_root(data)
        rows = [row for _, row, _ in items if row is not None]
        cached = iter(features.rows(np.array(rows)) if rows else ())
        embedded, skipped = {}, []
        if files:
            computed, ok, skipped = _embed(cache, data, files, batch_size, progress)
            embedded = dict(zip(ok, computed))
        vectors, owners = [], []  # in the queries' order; a file that could not be embedded is in `skipped`
        for query, row, file in items:
            if row is not None:
                vectors.append(next(cached))
                owners.append((query, row, root / data.paths[row] if root else Path(query)))
            elif file in embedded:
                vectors.append(embedded[file])
                owners.append((query, None, files[file]))
        if not vectors:
            first, reason = skipped[0]
            others = f" (nor could the {len(skipped) - 1} other query files)" if len(skipped) > 1 else ""
            raise TlfeatError(f"{first}: {reason}; no query image to search with{others}")
        queries_matrix = np.stack(vectors)
        exclude = np.array([-1 if row is None else row for _, row, _ in owners], dtype=np.int64)
        k = min(top, len(data))
        built, notes = False, []
        if index == "exact" or (index == "auto" and len(data) <= EXACT_MAX_ROWS):
            found: Neighbours = exact_top_k(queries_matrix, features, k, exclude=exclude)
            search = "exact"
        else:
            faiss_index, built, unsaved = open_index(cache, features)
            notes += [unsaved] if unsaved else []
            # The index's similarities are approximate: rank twice the candidates by their exact ones.
            candidates = index_top_k(faiss_index, queries_matrix, min(2 * k, len(data)), exclude=exclude,
                                     nprobe=nprobe)
            found = rescore(queries_matrix, candidates, features, k)
            search = f"faiss IVF-SQ8, nprobe {nprobe} (approximate)"
    results = []
    for q, (query, row, image) in enumerate(owners):
        matches = [
            Match(rank, int(r), str(data.paths[r]), str(data.split[r]), data.class_names[data.labels[r]],
                  min(1.0, float(s)))  # float32 rounding put an image's copy at 1.0000001
            for rank, (r, s) in enumerate(zip(found.indices[q], found.similarities[q]), start=1) if r >= 0
        ]
        results.append(QueryMatches(query, row, image, matches))
    unmatched = [q.query for q in results if not q.matches]
    if unmatched:  # else an empty table, unexplained
        why = ("the cache's only image is the query itself" if len(data) == 1
               else f"no other cached image in the index cells searched (`nprobe={nprobe}`)")
        notes.append(f"no similar image for {some_of(unmatched)}: {why}")
    result = SimilarResult(cache, results, skipped, search, root, built, notes=notes)
    result.files = write_similar(result, folder)
    return result


def write_similar(result: SimilarResult, out: Path) -> list[Path]:
    """similar.csv (every query) and similar.png (the first SHEET_QUERIES queries) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [[q.query, m.rank, m.path, m.split, m.label, round(m.similarity, 6)] for q in result.queries
            for m in q.matches]
    write_csv(out / "similar.csv", ["query", "rank", "path", "split", "label", "similarity"], rows)
    shown = result.queries[:SHEET_QUERIES]
    columns = 1 + max((len(q.matches) for q in shown), default=0)
    tiles = []
    for q in shown:
        tiles.append(Tile(q.image, f"query\n{shorten(q.query)}", "royalblue"))
        tiles += [Tile(result.root / m.path if result.root else None,
                       f"#{m.rank} sim {m.similarity:.3f}\n{m.split}: {shorten(m.path)}") for m in q.matches]
        tiles += [None] * (columns - 1 - len(q.matches))
    draw_sheet(tiles, columns, f"{result.cache.name}: most similar images ({result.search})", out / "similar.png")
    return [out / "similar.csv", out / "similar.png"]


def similar_output(cache: str | Path, out: str | Path | None) -> Path:
    """The folder `similar` writes to (default ``<cache folder>/similar/<cache stem>/``), never the dataset's."""
    with open_rows(cache) as (data, _):
        return output_folder(cache, out, "similar", data)
