"""`audit`: near-duplicates and cross-split leakage, likely label errors, confusion structure, in one folder.

Output folder (default ``<cache folder>/audit/<cache stem>/``, never inside the dataset):

    summary.md              what was found, the tables below in short (also printed by the CLI)
    duplicates.csv          path_a, path_b, split_a, split_b, similarity, same_bytes, kind; test leaks first
    duplicates.png          the top pairs side by side
    similarity.png          histogram of nearest-neighbour similarities with the threshold drawn
    label_issues.csv        path, split, given_label, suggested_label, score; most suspicious first
    label_issues.png        the top candidates with both labels written on each thumbnail
    confusion.csv / .png    class pairs mixed up most by the out-of-fold head; its confusion matrix

Caches with one class (or no class with two images) get no label review: the
summary says so and the duplicate search still runs. The features are never all
in memory (see duplicates.py and label_issues.py for what is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlfeat.analysis.common import dataset_root, open_cache, optional_import, output_folder
from tlfeat.analysis.contact_sheet import Tile, draw_sheet, shorten
from tlfeat.analysis.duplicates import (
    KIND_ORDER, Duplicates, checked_threshold, find_duplicates, write_duplicates_csv,
)
from tlfeat.analysis.label_issues import (
    FOLDS, MAX_TRAIN_ROWS, LabelReview, can_review, confused_pairs, review_labels, write_label_issues_csv,
)
from tlfeat.cache import CacheData
from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError, integer, seed_value, some_of
from tlfeat.fileio import atomic_write_bytes, path_value
from tlfeat.reports import markdown_table, plot_confusion, save_png, write_csv

SHEET_TILES = 24  # thumbnails per contact sheet: 12 duplicate pairs, 24 label-issue candidates
TABLE_ROWS = 10  # rows of each table in summary.md
KIND_COLOURS = {"test leak": "red", "cross-split": "darkorange", "within split": "black"}
# Every file an audit may write: those this one did not write are an earlier audit's, removed so none of
# them sits beside a summary that contradicts it.
AUDIT_FILES = ("summary.md", "duplicates.csv", "duplicates.png", "similarity.png", "label_issues.csv",
               "label_issues.png", "confusion.csv", "confusion.png")
HEADING = "# Audit of "  # summary.md's first line: how a folder is known to be an earlier audit's


def _check_audit_folder(folder: Path) -> None:
    """Refuse a folder holding files of audit's names that no audit wrote (a fine-tune run's confusion.png and
    summary.md, a project's own): this audit would overwrite them, or remove them as an earlier audit's."""
    taken = [name for name in AUDIT_FILES if (folder / name).exists()]
    if not taken:
        return
    try:
        with open(folder / "summary.md", encoding="utf-8") as handle:
            audited = handle.readline().startswith(HEADING)
    except (OSError, UnicodeDecodeError):
        audited = False
    if not audited:
        raise TlfeatError(f"{folder}: holds {some_of(taken)}, not written by an audit (no audit summary.md); "
                          "choose another `out` for the audit")


@dataclass
class AuditResult:
    """An audit of a cache: near-duplicate and leaking pairs (`duplicates`), likely label errors
    (`labels`, or None with `label_note` saying why), the most confused class pairs, `summary`
    in markdown and the files written to `out` (CSVs, contact sheets, summary.md)."""

    cache: Path
    out: Path
    data: CacheData  # the cache's rows without their features (`features` is empty)
    duplicates: Duplicates
    labels: LabelReview | None  # None when the cache cannot be reviewed (see label_note)
    label_note: str | None
    confused: list[dict]  # rows of confused_pairs
    summary: str  # markdown, as written to summary.md
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    def __repr__(self) -> str:  # the rows, pairs and probabilities run to pages: a notebook cell shows this
        pairs = ", ".join(f"{kind} {self.duplicates.count(kind)}" for kind in KIND_COLOURS)
        flagged = len(self.labels.flagged) if self.labels is not None else None
        return (f"AuditResult(cache={str(self.cache)!r}, out={str(self.out)!r}, duplicate pairs: {pairs}; "
                f"label issues flagged: {flagged}, files={len(self.files)})")


def _duplicate_sheet(data: CacheData, found: Duplicates, out: Path) -> None:
    root = dataset_root(data) or Path()
    tiles = []
    for n, pair in enumerate(found.pairs[: SHEET_TILES // 2], start=1):
        colour = KIND_COLOURS[pair.kind]
        same = ", same bytes" if pair.same_bytes else ""
        tiles.append(Tile(root / pair.path_a, f"#{n} {pair.kind}{same}\nsim {pair.similarity:.4f}\n"
                                              f"{pair.split_a}: {shorten(pair.path_a)}", colour))
        tiles.append(Tile(root / pair.path_b, f"#{n}\n\n{pair.split_b}: {shorten(pair.path_b)}", colour))
    title = (f"Top {len(tiles) // 2} of {len(found.pairs)} duplicate pairs (threshold {found.threshold:.3f}); "
             "red: test leak, orange: train vs val")
    draw_sheet(tiles, 4, title, out)


def _label_sheet(data: CacheData, review: LabelReview, out: Path) -> None:
    root = dataset_root(data) or Path()
    issues = review.issues(data, review.flagged[:SHEET_TILES])
    tiles = [
        Tile(root / issue.path, f"#{n} {issue.split}, score {issue.score:.3f}\ngiven: {issue.given_label}\n"
                                f"suggested: {issue.suggested_label}\n{shorten(issue.path)}",
             "red" if issue.split == "test" else "black")
        for n, issue in enumerate(issues, start=1)
    ]
    draw_sheet(tiles, 6, f"Top {len(tiles)} of {len(review.flagged)} likely label errors (cleanlab, "
                         f"out-of-fold over {review.folds} folds); red: test split", out)


def _similarity_histogram(found: Duplicates, out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    ax.hist(found.nearest, bins=100, color="steelblue", log=True)
    ax.axvline(found.threshold, color="red", linestyle="--", label=f"threshold {found.threshold:.3f}")
    ax.set_xlabel("cosine similarity to the nearest other image")
    ax.set_ylabel("images (log scale)")
    ax.legend()
    save_png(fig, out)


def _summary(cache: Path, data: CacheData, result: AuditResult) -> str:
    found, review = result.duplicates, result.labels
    splits = ", ".join(f"{s} {int(np.sum(data.split == s))}" for s in SPLITS if np.any(data.split == s))
    lines = [
        f"{HEADING}{cache.name}", "",
        f"{len(data)} images, {len(data.class_names)} classes ({splits}); {data.attrs.get('backbone')} features, "
        f"{data.features.shape[1]}-d.", "",
        "## Near-duplicates", "",
        f"Threshold {found.threshold:.3f} on cosine similarity: {found.threshold_rule}. Search: {found.search}.", "",
        "Pairs: " + ", ".join(f"{kind} {found.count(kind)}" for kind in KIND_ORDER)
        + "; byte-identical (same sha256) "
        + (f"{sum(p.same_bytes for p in found.pairs)}." if found.bytes_checked else "not checked (see the note)."), "",
    ]
    if found.pairs:
        lines.append(markdown_table(
            ["#", "kind", "similarity", "same bytes", "image a", "image b"],
            [[n, p.kind, round(p.similarity, 4), "yes" if p.same_bytes else "", f"{p.path_a} ({p.split_a})",
              f"{p.path_b} ({p.split_b})"] for n, p in enumerate(found.pairs[:TABLE_ROWS], start=1)],
        ))
    lines += [f"Note: {note}" for note in found.notes]
    lines += ["", "## Likely label errors", ""]
    if review is None:
        lines.append(f"Not reviewed: {result.label_note}.")
    else:
        flagged_splits = data.split[review.flagged]
        by_split = ", ".join(f"{s} {int(np.sum(flagged_splits == s))}" for s in SPLITS if np.any(data.split == s))
        lines += [
            f"Out-of-fold accuracy of the linear head ({review.folds} folds, every split): {review.accuracy:.4f}. "
            f"cleanlab flags {len(review.flagged)} of {len(data)} images ({by_split}).", "",
        ]
        if len(review.flagged):
            lines.append(markdown_table(
                ["#", "image", "split", "given", "suggested", "score"],
                [[n, i.path, i.split, i.given_label, i.suggested_label, round(i.score, 4)]
                 for n, i in enumerate(review.issues(data, review.flagged[:TABLE_ROWS]), start=1)],
            ))
        lines += [f"Note: {note}" for note in review.notes]
        lines += ["", "## Confusion structure (out-of-fold)", ""]
        lines.append(markdown_table(
            ["class a", "class b", "a as b", "b as a", "share of the two classes"],
            [[r["class_a"], r["class_b"], r["a_as_b"], r["b_as_a"], round(r["share"], 4)]
             for r in result.confused[:TABLE_ROWS]],
        ) if result.confused else "No confusions.")
    lines += ["", "Files: " + ", ".join(p.name for p in result.files)]
    return "\n".join(lines) + "\n"


def audit(
    cache: str | Path, out: str | Path | None = None, dup_threshold: float | None = None, index: str = "auto",
    folds: int = FOLDS, seed: int = 0, max_train_rows: int = MAX_TRAIN_ROWS, sheets: bool = True,
) -> AuditResult:
    """Audit a cache: duplicate pairs (test leaks first), likely label errors, confusions; files in `out`.

    out: the report folder, default ``<cache folder>/audit/<cache stem>/``. dup_threshold: the cosine
    similarity above which two images are a pair (default: chosen from the data, said in the summary).
    index: "exact", "faiss" or "auto" (as `similar`'s). folds, seed: the stratified folds of the
    out-of-fold logistic regression behind the label review, and their seed. max_train_rows: rows each
    fold's head trains on at most (a random pool above it). sheets: draw contact sheets of the pairs and
    flagged images (needs the dataset folder).

    Returns everything as data (pairs, out-of-fold probabilities, tables), plus the summary markdown.
    """
    cache = path_value("cache", cache)
    out = None if out is None else path_value("out", out)
    folds, seed = integer("folds", folds, 2), seed_value(seed)
    max_train_rows = integer("max_train_rows", max_train_rows, 1)
    dup_threshold = checked_threshold(dup_threshold)
    seconds: dict[str, float] = {}
    with open_cache(cache) as (data, features):
        folder = output_folder(cache, out, "audit", data)
        _check_audit_folder(folder)
        note = can_review(data)
        if note is None:  # a missing cleanlab is said before the duplicate search, not minutes after it
            optional_import("cleanlab.filter", "cleanlab")
        started = time.perf_counter()
        found = find_duplicates(data, features, cache, threshold=dup_threshold, index=index)
        seconds["duplicates"] = time.perf_counter() - started

        started = time.perf_counter()
        review = None if note else review_labels(data, features, folds=folds, seed=seed,
                                                 max_train_rows=max_train_rows)
        confused = confused_pairs(review.confusion, data.class_names, top=len(data.class_names) ** 2) if review else []
        seconds["labels"] = time.perf_counter() - started

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    result = AuditResult(cache, folder, data, found, review, note, confused, summary="", seconds=seconds)
    write_duplicates_csv(folder / "duplicates.csv", found.pairs)
    _similarity_histogram(found, folder / "similarity.png")
    result.files += [folder / "duplicates.csv", folder / "similarity.png"]
    root = dataset_root(data)
    draw = sheets and root is not None and root.is_dir()
    if draw and found.pairs:
        _duplicate_sheet(data, found, folder / "duplicates.png")
        result.files.append(folder / "duplicates.png")
    if review is not None:
        write_label_issues_csv(folder / "label_issues.csv", review.issues(data, review.flagged))
        write_csv(folder / "confusion.csv", ["class_a", "class_b", "a_as_b", "b_as_a", "share"],
                  [[r["class_a"], r["class_b"], r["a_as_b"], r["b_as_a"], round(r["share"], 6)] for r in confused])
        plot_confusion(review.confusion, data.class_names, f"{cache.name}: out-of-fold linear head",
                       folder / "confusion.png")
        result.files += [folder / "label_issues.csv", folder / "confusion.csv", folder / "confusion.png"]
        if draw and len(review.flagged):
            _label_sheet(data, review, folder / "label_issues.png")
            result.files.append(folder / "label_issues.png")
    if sheets and not draw:
        found.notes.append(f"no contact sheets: dataset folder {root} not found" if root else
                           "no contact sheets: the cache records no dataset folder")
    result.files.append(folder / "summary.md")
    result.summary = _summary(cache, data, result)
    atomic_write_bytes(folder / "summary.md", result.summary.encode())
    for name in set(AUDIT_FILES) - {path.name for path in result.files}:
        (folder / name).unlink(missing_ok=True)
    seconds["write"] = time.perf_counter() - started
    return result
