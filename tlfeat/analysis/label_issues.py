"""Likely label errors and the classes the embedding confuses, from out-of-fold predictions.

Every labelled row of the cache, whatever its split (a label error in the test
split distorts every score measured on it), gets predicted probabilities from a
linear head (tlfeat's `logreg` head: standardised features, multinomial logistic
regression) fitted on the other folds of a stratified k-fold split. cleanlab's
confident learning then flags the rows whose given label is unlikely
(`cleanlab.filter.find_label_issues`) and scores every row by self-confidence,
the out-of-fold probability of its given label (`cleanlab.rank`): low is suspicious.

Cost stays bounded on large caches: each fold's head is fitted on about
`max_train_rows` rows at most (see `out_of_fold_probabilities`); every row is
still predicted, reading the cache a block at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from tlfeat.analysis.common import StoredFeatures, optional_import
from tlfeat.cache import CacheData
from tlfeat.errors import TlfeatError, integer, parameter_error
from tlfeat.heads import get_head
from tlfeat.reports import write_csv

FOLDS = 5
MAX_TRAIN_ROWS = 50_000


@dataclass
class LabelIssue:
    row: int
    path: str
    split: str
    given_label: str
    suggested_label: str  # the class the out-of-fold head finds most probable
    score: float  # out-of-fold probability of the given label (cleanlab self-confidence): low = suspicious


@dataclass
class LabelReview:
    """Out-of-fold predictions over the whole cache, and cleanlab's verdict on each row."""

    probabilities: np.ndarray  # (N, C) out-of-fold, columns = the cache's class_names
    scores: np.ndarray  # (N,) label quality, low = suspicious
    order: np.ndarray  # (N,) rows, most suspicious first
    flagged: np.ndarray  # rows cleanlab flags as label issues, most suspicious first
    confusion: np.ndarray  # (C, C) given label x out-of-fold prediction
    accuracy: float  # out-of-fold accuracy
    folds: int
    notes: list[str] = field(default_factory=list)

    def issues(self, data: CacheData, rows: np.ndarray) -> list[LabelIssue]:
        """LabelIssue records for `rows` (e.g. review.flagged, or review.order[:20])."""
        suggested = self.probabilities.argmax(axis=1)
        return [
            LabelIssue(int(r), str(data.paths[r]), str(data.split[r]), data.class_names[data.labels[r]],
                       data.class_names[suggested[r]], float(self.scores[r]))
            for r in rows
        ]


def can_review(data: CacheData) -> str | None:
    """Why labels cannot be reviewed (one line), or None: it needs two classes with at least two images each."""
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    reviewable = int(np.sum(counts >= 2))
    if reviewable < 2:
        return f"label issues need at least 2 classes with 2+ images each (this cache has {reviewable})"
    return None


def out_of_fold_probabilities(
    features: StoredFeatures, labels: np.ndarray, n_classes: int, folds: int = FOLDS, seed: int = 0,
    max_train_rows: int = MAX_TRAIN_ROWS,
) -> tuple[np.ndarray, int, list[str]]:
    """(N, n_classes) probabilities, each row from the head of the fold that did not see it; folds used; notes.

    The heads train on a pool of rows held in memory: every row, or above
    max_train_rows x folds / (folds - 1) rows a random pool of that size, so that
    each fold's head sees about `max_train_rows`; then one pass over the cache
    predicts every row with its fold's head. Classes with fewer rows than folds
    are allowed: a row of a class seen only in its own fold gets probability 0
    for that class (and is flagged).
    """
    from sklearn.exceptions import ConvergenceWarning  # here, not above: the CLI imports this package for --help
    from sklearn.model_selection import StratifiedKFold

    folds = integer("folds", folds, 2)
    n = len(labels)
    asked, folds = folds, int(min(folds, np.bincount(labels, minlength=n_classes).max()))
    fold_of = np.empty(n, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pool_size = max_train_rows * folds // (folds - 1)
    pool = np.arange(n) if n <= pool_size else np.sort(np.random.default_rng(seed).choice(n, pool_size, replace=False))
    probabilities = np.zeros((n, n_classes), dtype=np.float32)
    # One BLAS thread: L-BFGS on a D x C problem makes many small BLAS calls, between which OpenBLAS's
    # threads spin; on a busy machine that made these fits 13x slower (Scene15, 2 shared cores: 90 s vs 7 s).
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class")  # allowed, see above
        for fold, (_, held) in enumerate(splitter.split(np.zeros(n), labels)):
            fold_of[held] = fold
        pooled = features.rows(pool)
        heads = []
        for fold in range(folds):
            trained = fold_of[pool] != fold
            if len(np.unique(labels[pool][trained])) < 2:
                raise parameter_error("max_train_rows", max_train_rows,
                                      f"a pool of {len(pool)} rows leaves a fold's head one class to learn")
            heads.append(get_head("logreg").build(seed).fit(pooled[trained], labels[pool][trained]))
        # A pool of every row is all the features already: predict from it instead of reading them again.
        for start, block in [(0, pooled)] if len(pool) == n else features.blocks():
            rows = np.arange(start, start + len(block))
            for fold, head in enumerate(heads):
                mine = fold_of[rows] == fold
                if mine.any():
                    probabilities[np.ix_(rows[mine], head.classes_.astype(np.int64))] = head.predict_proba(block[mine])
    notes = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught})
    if folds < asked:
        notes.append(f"{folds} folds instead of {asked}: no class has more than {folds} images")
    if len(pool) < n:
        notes.append(f"the heads trained on a random {len(pool)} of the {n} images, each fold's on those outside it")
    return probabilities, folds, notes


def review_labels(
    data: CacheData, features: StoredFeatures, folds: int = FOLDS, seed: int = 0, max_train_rows: int = MAX_TRAIN_ROWS
) -> LabelReview:
    """Out-of-fold probabilities for every row, cleanlab's flagged label issues, the confusion matrix.

    `data` and `features` as `tlfeat.analysis.common.open_cache` gives them.

    Raises TlfeatError where `can_review` gives a reason.
    """
    from sklearn.metrics import confusion_matrix

    reason = can_review(data)
    if reason is not None:
        raise TlfeatError(reason)
    cleanlab_filter = optional_import("cleanlab.filter", "cleanlab")
    cleanlab_rank = optional_import("cleanlab.rank", "cleanlab")
    n_classes = len(data.class_names)
    probabilities, folds, notes = out_of_fold_probabilities(
        features, data.labels, n_classes, folds, seed, max_train_rows
    )
    # cleanlab wants every class column to occur as a label: drop the columns of absent classes.
    present = np.flatnonzero(np.bincount(data.labels, minlength=n_classes))
    compact = np.searchsorted(present, data.labels)
    kept = probabilities[:, present]
    kept = kept / np.maximum(kept.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    scores = cleanlab_rank.get_label_quality_scores(compact, kept, method="self_confidence")
    flagged = cleanlab_filter.find_label_issues(
        compact, kept, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    predicted = probabilities.argmax(axis=1)
    return LabelReview(
        probabilities=probabilities,
        scores=np.asarray(scores, dtype=np.float64),
        order=np.argsort(scores, kind="stable"),
        flagged=np.asarray(flagged, dtype=np.int64),
        confusion=confusion_matrix(data.labels, predicted, labels=np.arange(n_classes)),
        accuracy=float(np.mean(predicted == data.labels)),
        folds=folds,
        notes=notes,
    )


def confused_pairs(confusion: np.ndarray, class_names: list[str], top: int = 10) -> list[dict]:
    """The class pairs mixed up most often (both directions summed), as rows for a table."""
    support = confusion.sum(axis=1)
    rows = []
    for i in range(len(class_names)):
        for j in range(i + 1, len(class_names)):
            mixed = int(confusion[i, j] + confusion[j, i])
            if mixed:
                rows.append({
                    "class_a": class_names[i], "class_b": class_names[j], "a_as_b": int(confusion[i, j]),
                    "b_as_a": int(confusion[j, i]), "share": mixed / max(1, int(support[i] + support[j])),
                })
    rows.sort(key=lambda r: (-(r["a_as_b"] + r["b_as_a"]), r["class_a"], r["class_b"]))
    return rows[:top]


LABEL_COLUMNS = ["path", "split", "given_label", "suggested_label", "score"]


def write_label_issues_csv(path: Path, issues: list[LabelIssue]) -> None:
    write_csv(path, LABEL_COLUMNS, [[i.path, i.split, i.given_label, i.suggested_label, round(i.score, 6)]
                                    for i in issues])
