"""Heads on caches larger than memory: `fit-head --streaming`.

The cache's features are read a chunk of rows at a time and never held whole:
one pass computes the scaling statistics (`StandardScaler.partial_fit`), then
`SGDClassifier.partial_fit` makes several passes over the train rows, the order
of the chunks and of the rows inside each chunk shuffled per pass (seeded).
Scoring streams the same way. Memory is bounded by the chunk size plus the
per-row columns (labels, split, paths), which are small next to the features.

`logreg` becomes SGD on the logistic loss; `linear-svm` SGD on the modified
Huber loss, the hinge made smooth so that the head has probabilities
(`predict_proba`), as every tlfeat head does. The fitted head is an ordinary
scikit-learn pipeline saved like any other, so predict, evaluate and compare
take it as they are. Like fit-head, it holds the output folder's lock, records
the rows it saw and leaves copies of training rows out of the val/test scores.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import h5py
import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tlfeat.cache import open_rows
from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError, integer
from tlfeat.fileio import check_output_path, check_outside_dataset
from tlfeat.heads.folder import (
    NON_FINITE_ADVICE, FitSummary, check_same_data, check_trainable, check_unique_paths, default_out, folder_key,
    head_metadata, left_out_note, locked_folder, save_fitted_head, source_record, write_summary,
)
from tlfeat.heads.registry import HEADS, STREAMING_SUFFIX
from tlfeat.heads.rows import RowIds, rows_digest, seen_rows
from tlfeat.reports import split_metrics

DEFAULT_CHUNK_ROWS = 4096
DEFAULT_PASSES = 10
ALPHA = 1e-3  # L2 strength: best on Scene15 val of 1e-4..3e-2 for both losses (10 passes)


def _chunks(rows: np.ndarray, chunk_rows: int) -> list[np.ndarray]:
    return [rows[i : i + chunk_rows] for i in range(0, len(rows), chunk_rows)]


def _read(features: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted indices) of the features as float32; a contiguous run is read as one slice."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        return np.asarray(features[rows[0] : rows[-1] + 1], dtype=np.float32)
    return np.asarray(features[rows], dtype=np.float32)


def _row_ids(path: Path, index: object, features: h5py.Dataset, chunk_rows: int) -> RowIds:
    """Every row's identities (`tlfeat.heads.rows`), in one pass that also refuses NaN or inf values."""
    with h5py.File(path, "r") as handle:
        sizes = handle["file_size"][...]
    parts = []
    for chunk in _chunks(np.arange(len(index.labels)), chunk_rows):
        block = _read(features, chunk)
        if not np.isfinite(block).all():
            raise TlfeatError(f"{path}: NaN or inf feature values; {NON_FINITE_ADVICE}")
        parts.append(RowIds.of(index.paths[chunk], sizes[chunk], block))
    return RowIds.concat(parts)


def _fit_sgd(
    features: h5py.Dataset, train_rows: np.ndarray, labels: np.ndarray, n_classes: int, loss: str, chunk_rows: int,
    passes: int, seed: int,
) -> tuple[Pipeline, float]:
    """Scaling statistics in one pass, then `passes` shuffled passes of SGD; returns the pipeline and its seconds."""
    started = time.perf_counter()
    scaler = StandardScaler()
    train_chunks = _chunks(train_rows, chunk_rows)
    for chunk in train_chunks:
        scaler.partial_fit(_read(features, chunk))
    classifier = SGDClassifier(loss=loss, alpha=ALPHA, random_state=seed)
    rng = np.random.default_rng(seed)
    classes = np.arange(n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # overflow in exp on far-off rows
        for _ in range(passes):
            for chunk_index in rng.permutation(len(train_chunks)):
                chunk = train_chunks[chunk_index]
                order = rng.permutation(len(chunk))
                block = scaler.transform(_read(features, chunk))[order]
                classifier.partial_fit(block, labels[chunk][order], classes=classes)
    return Pipeline([("standardscaler", scaler), ("sgdclassifier", classifier)]), time.perf_counter() - started


def fit_streaming(
    cache: Path,
    head: str = "logreg",
    out: Path | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    passes: int = DEFAULT_PASSES,
    seed: int = 0,
) -> FitSummary:
    """Fit `head` (logreg or linear-svm) on a cache read in chunks of `chunk_rows`; score, save, report."""
    streamable = [name for name, spec in HEADS.items() if spec.streaming_loss]
    if head not in streamable:
        raise TlfeatError(f"`streaming` fits {' or '.join(streamable)}, not {head!r}")
    loss = HEADS[head].streaming_loss
    chunk_rows, passes = integer("chunk_rows", chunk_rows, 1), integer("passes", passes, 1)
    cache = Path(cache)
    out = Path(out) if out is not None else default_out([cache])
    check_output_path(out, folder=True)
    with open_rows(cache) as (index, features):
        attrs, labels, class_names, split = index.attrs, index.labels, index.class_names, index.split
        check_outside_dataset(out, attrs.get("dataset_root"))
        check_trainable(str(cache), labels, split, class_names)
        check_unique_paths(cache, index.paths)
        with locked_folder(out):
            rows = {s: np.flatnonzero(split == s) for s in SPLITS if np.any(split == s)}
            feature_dim = int(features.shape[1])
            sources = [source_record(cache, attrs, len(labels), feature_dim)]
            ids = _row_ids(cache, index, features, chunk_rows)
            digest = rows_digest(split, ids)
            check_same_data(out, folder_key(sources, digest), ids, split, cache.name)

            estimator, fit_seconds = _fit_sgd(features, rows["train"], labels, len(class_names), loss, chunk_rows,
                                              passes, seed)
            seen = {"train": ids.take(split == "train")}
            metrics, notes = {}, []
            for name, split_rows in rows.items():
                kept = split_rows[~seen_rows(name, ids.take(split == name), seen)]
                if len(kept) < len(split_rows):
                    notes.append(left_out_note(name, len(split_rows) - len(kept)))
                if len(kept):
                    predicted = np.concatenate([estimator.predict(_read(features, c)) for c in _chunks(kept, chunk_rows)])
                    metrics[name] = split_metrics(labels[kept], predicted, class_names)
            counts = {s: len(r) for s, r in rows.items()}
            meta = head_metadata(
                head + STREAMING_SUFFIX, f"streaming {head}: StandardScaler (one pass) + SGDClassifier({loss})",
                estimator, class_names, feature_dim, sources, cache.name, {"digest": digest, "counts": counts},
                {"alpha": ALPHA, "passes": passes, "chunk_rows": chunk_rows}, None, seed, fit_seconds, None,
            )
            result = save_fitted_head(out, estimator, meta, metrics, seen, notes)
            return write_summary(out, [result], sources, counts)
