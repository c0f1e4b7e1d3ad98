"""fit-head: load one or more caches, fit heads on train, select on val, score, save.

Several caches over the same images (say ResNet101 and VGG16 features) are
fused column-wise, rows aligned by image path, in the order given; the fused
model records every cache so `predict` can rebuild the same feature vector.

Per head, the output folder receives ``<head>.skops`` (the fitted estimator, its
metadata and the identities of the rows it saw: `tlfeat.heads.store`), then
``<head>.metrics.json`` (per split: per-class precision/recall/F1 and the
confusion matrix) and ``<head>.confusion.png``; ``summary.md`` and
``summary.csv`` rank every head in the folder (`tlfeat.heads.folder`).

No score counts a row twice: val and test rows that are copies of training rows
(the same features under another name) are left out of every score and counted
in the head's notes (`tlfeat.heads.rows`).
"""

from __future__ import annotations

import functools
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
from sklearn.base import BaseEstimator, clone

from tlfeat.cache import CacheData, load
from tlfeat.data.scan import SPLITS
from tlfeat.errors import Interrupted, TlfeatError, integer, parameter_error, seed_value
from tlfeat.fileio import check_output_path, check_outside_dataset, path_list, path_value
from tlfeat.interrupts import deferred_interrupts, raise_if_requested
from tlfeat.heads.folder import (
    NON_FINITE_ADVICE, FitSummary, HeadResult, check_same_data, check_trainable, check_unique_paths, default_out,
    folder_key, head_metadata, left_out_note, locked_folder, save_fitted_head, source_record, write_summary,
)
from tlfeat.heads.registry import (
    DEFAULT_CHUNK_ROWS, DEFAULT_PASSES, HEAD_NAMES, STREAMABLE_HEADS, HeadSpec, fit_estimator, get_head, uses_validation,
)
from tlfeat.heads.rows import RowIds, rows_digest, seen_rows
from tlfeat.heads.streaming import fit_streaming
from tlfeat.reports import ImageOutcomes, split_metrics

__all__ = ["FitSummary", "HeadResult", "fit_heads", "load_features"]

@dataclass
class Features:
    """Rows of one cache, or of several fused column-wise, plus where each block of columns came from."""

    data: CacheData
    sources: list[dict]  # one per cache, in column order
    label: str  # the cache file name(s), for messages
    ids: RowIds  # each row's identities (image and features), to keep seen rows out of scores

    def select(self, split: str) -> CacheData:
        return self.data.select(split)

    def unseen(self, split: str, seen: dict[str, RowIds]) -> np.ndarray:
        """(N,) True for the rows of split `split` that are not among the rows `seen` in an earlier role."""
        in_split = self.data.split == split
        keep = in_split.copy()
        keep[in_split] = ~seen_rows(split, self.ids.take(in_split), seen)
        return keep

    def rows(self, split: str, seen: dict[str, RowIds]) -> tuple[CacheData, RowIds, int]:
        """Split `split` without the rows `seen` in an earlier role: (rows, their ids, how many were left out)."""
        keep = self.unseen(split, seen)
        in_split = self.data.split == split
        data = self.data
        kept = CacheData(data.features[keep], data.labels[keep], data.paths[keep], data.split[keep], data.class_names)
        return kept, self.ids.take(keep), int(in_split.sum() - keep.sum())

    @functools.cached_property
    def digest(self) -> str:
        """Which images sit in which split (`tlfeat.heads.rows.rows_digest`)."""
        return rows_digest(self.data.split, self.ids)

    def split_counts(self) -> dict[str, int]:
        return {s: int(np.sum(self.data.split == s)) for s in SPLITS if np.any(self.data.split == s)}

    def check_folder(self, out: Path, heads: Sequence[str]) -> None:
        """Refuse a head folder whose heads were fitted on other data (`check_same_data`); `heads`: those to fit."""
        check_same_data(out, folder_key(self.sources, self.digest), self.ids, self.data.split, self.label, heads)


def resolve_heads(head: str | Sequence[str]) -> list[str]:
    """'all' -> every head; a name or a list of names -> those, each once (checked); 'all' in a list -> every head."""
    names = [head] if isinstance(head, str) else list(head) if isinstance(head, (list, tuple)) else None
    if not names or not all(isinstance(name, str) for name in names):
        raise parameter_error("head", head, f"a head name or a list of them: {', '.join(HEAD_NAMES)} or all")
    if "all" in names:
        return list(HEAD_NAMES)
    return list(dict.fromkeys(get_head(name).name for name in names))


def _source(path: Path, data: CacheData) -> dict:
    return source_record(path, data.attrs, len(data), int(data.features.shape[1]))


def _check_rows(path: Path, data: CacheData) -> None:
    check_unique_paths(path, data.paths)
    bad = ~np.isfinite(data.features)
    if bad.any():
        raise TlfeatError(
            f"{path}: {int(bad.sum())} feature values are NaN or inf, in {int(bad.any(axis=1).sum())} "
            f"of {len(data)} rows; {NON_FINITE_ADVICE}"
        )


def _file_sizes(path: Path) -> np.ndarray:
    """Byte size of each row's image file when it was embedded: tells two datasets with the same file names apart."""
    with h5py.File(path, "r") as handle:
        return handle["file_size"][...]


def _align(first_path: Path, first: CacheData, path: Path, other: CacheData) -> np.ndarray:
    """Row order that puts `other`'s rows in `first`'s path order, after checking they describe the same images."""
    if other.class_names != first.class_names:
        raise TlfeatError(
            f"{path}: class list differs from {first_path.name}'s "
            f"({len(other.class_names)} vs {len(first.class_names)} classes); fuse only caches of one dataset"
        )
    index = {p: i for i, p in enumerate(other.paths)}
    mine = set(first.paths)
    only_first = [p for p in first.paths if p not in index]
    only_other = [p for p in other.paths if p not in mine]
    if only_first or only_other:
        example = (only_first or only_other)[0]
        raise TlfeatError(
            f"{path}: covers other images than {first_path.name} ({len(only_first)} only in "
            f"{first_path.name}, {len(only_other)} only in {path.name}, e.g. {example}); "
            "fuse only caches extracted from the same image set"
        )
    order = np.array([index[p] for p in first.paths], dtype=np.int64)
    other_files = _file_sizes(path)[order] != _file_sizes(first_path)
    if other_files.any():
        example = first.paths[np.flatnonzero(other_files)[0]]
        raise TlfeatError(
            f"{path}: same image paths as {first_path.name} but other files ({int(other_files.sum())} differ "
            f"in size, e.g. {example}); fuse only caches extracted from the same image set"
        )
    differs = (other.split[order] != first.split) | (other.labels[order] != first.labels)
    if differs.any():
        example = first.paths[np.flatnonzero(differs)[0]]
        raise TlfeatError(
            f"{path}: splits or labels differ from {first_path.name} for {int(differs.sum())} images "
            f"(e.g. {example}); extract both with the same `seed` and `ratios`"
        )
    return order


def load_features(caches: Sequence[Path]) -> Features:
    """Load and check the caches; several are fused column-wise in the order given."""
    if not caches:
        raise TlfeatError("fit-head needs at least one cache file")
    paths = [Path(c) for c in caches]
    if len({p.resolve() for p in paths}) != len(paths):
        raise TlfeatError("the same cache file is given twice; fuse different backbones' caches")
    first = load(paths[0])
    _check_rows(paths[0], first)
    blocks, sources = [first.features], [_source(paths[0], first)]
    for path in paths[1:]:
        other = load(path)
        _check_rows(path, other)
        order = _align(paths[0], first, path, other)
        blocks.append(other.features[order])
        sources.append(_source(path, other))
    fused = CacheData(
        features=np.concatenate(blocks, axis=1) if len(blocks) > 1 else first.features,
        labels=first.labels, paths=first.paths, split=first.split, class_names=first.class_names,
        attrs={},
    )
    ids = RowIds.of(first.paths, _file_sizes(paths[0]), fused.features)
    return Features(fused, sources, " + ".join(p.name for p in paths), ids)


def _check_trainable(features: Features, search: bool) -> None:
    check_trainable(features.label, features.data.labels, features.data.split, features.data.class_names)
    if search and "val" not in features.split_counts():
        raise TlfeatError(
            f"{features.label}: `search` chooses hyperparameters on the val split, and this cache has none "
            f"(splits: {', '.join(features.split_counts())})"
        )


@contextmanager
def _data_errors(label: str, head: str) -> Iterator[None]:
    """scikit-learn's complaints about the data (e.g. k > training rows) -> one-line user errors."""
    try:
        yield
    except ValueError as exc:
        raise TlfeatError(f"{label}: {head} head cannot be fitted: {str(exc).splitlines()[0]}") from None


def _fit_timed(estimator: BaseEstimator, train: CacheData, validation: tuple[np.ndarray, np.ndarray] | None) -> float:
    started = time.perf_counter()
    fit_estimator(estimator, train.features, train.labels, validation)
    return time.perf_counter() - started


def _search(
    spec: HeadSpec, seed: int, train: CacheData, val: CacheData
) -> tuple[BaseEstimator, dict, list[dict], float, float]:
    """Fit one model per grid value, keep the best on val (ties: the earlier value).

    A value this data cannot fit (k above the training rows) is a trial with its `error` and no
    accuracy; when no value fits, the first one's error is raised.
    Returns (kept model, {label: value}, trials, kept model's fit seconds, all fits' seconds).
    """
    base = spec.build(seed)
    validation = (val.features, val.labels)
    best, first_error = None, None
    trials, total = [], 0.0
    for value in spec.grid:
        estimator = clone(base).set_params(**{spec.param: value})
        try:
            seconds = _fit_timed(estimator, train, validation)
            accuracy = float(estimator.score(val.features, val.labels))
        except ValueError as exc:
            first_error = first_error or exc
            trials.append({spec.label: value, "val_accuracy": None, "error": str(exc).splitlines()[0]})
            continue
        total += seconds
        trials.append({spec.label: value, "val_accuracy": accuracy, "fit_seconds": seconds})
        if best is None or accuracy > best[0]:
            best = (accuracy, estimator, value, seconds)
    if best is None:
        raise first_error
    _, estimator, value, seconds = best
    return estimator, {spec.label: value}, trials, seconds, total


def _fit_head(name: str, features: Features, search: bool, seed: int, out: Path) -> HeadResult:
    spec = get_head(name)
    train, train_ids, _ = features.rows("train", {})
    seen = {"train": train_ids}
    val = None
    if "val" in features.split_counts():
        val, val_ids, _ = features.rows("val", seen)  # copies of training images never choose anything
        val = val if len(val) else None
    if search and val is None:
        raise TlfeatError(f"{features.label}: every val row is a copy of a training row; `search` has nothing to choose on")
    class_names = features.data.class_names
    with _data_errors(features.label, name), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if search:
            estimator, params, trials, fit_seconds, search_seconds = _search(spec, seed, train, val)
        else:
            estimator = spec.build(seed)
            validation = (val.features, val.labels) if val is not None else None
            fit_seconds = _fit_timed(estimator, train, validation)
            params, trials, search_seconds = {spec.label: estimator.get_params()[spec.param]}, None, None
        if val is not None and (search or uses_validation(estimator)):
            seen["val"] = val_ids
        metrics, notes, test = {}, [], None
        for split in features.split_counts():
            rows, ids, left_out = features.rows(split, seen)
            if left_out:
                notes.append(left_out_note(split, left_out, selected=split != "val" and "val" in seen))
            if len(rows):
                predicted = estimator.predict(rows.features)
                metrics[split] = split_metrics(rows.labels, predicted, class_names)
                if split == "test":
                    test = ImageOutcomes(ids.by_file, rows.labels, predicted)
    # UserWarnings (ConvergenceWarning among them) speak about this fit; deprecation chatter from libraries does not.
    notes += sorted(
        {f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught if issubclass(w.category, UserWarning)}
    )
    data = features.data
    meta = head_metadata(
        name, spec.description, estimator, data.class_names, int(data.features.shape[1]), features.sources,
        features.label, {"digest": features.digest, "counts": features.split_counts()},
        params, trials, seed, fit_seconds, search_seconds,
    )
    return save_fitted_head(out, estimator, meta, metrics, seen, notes, test)


def fit_heads(
    caches: str | Path | Sequence[str | Path],
    head: str | Sequence[str] = "logreg",  # as `tlfeat fit-head`; "all" fits every head and ranks them; or a list
    search: bool = False,
    out: str | Path | None = None,
    seed: int = 0,
    on_result: Callable[[HeadResult], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    streaming: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    passes: int = DEFAULT_PASSES,
) -> FitSummary:
    """Fit the named head (or "all", or a list of names) on the caches' train split; score every split present; save.

    With several heads, one that cannot be fitted on this data (say, linear-svm's 3-fold
    calibration on 2 images a class) is skipped with its reason and the others go on;
    if none can, that is an error. `on_result` / `on_skip` are called after each head,
    so a caller can report progress.

    caches: one cache, or several of the same images (their features are fused side by side). search:
    also try each head's hyperparameter grid on val. out: the head folder, default
    ``<cache folder>/heads/<cache stem>[+<stem>...]/`` (a folder of heads fitted on other data is refused). seed:
    of every head that draws random numbers.

    `streaming`, for a cache larger than memory: logreg or linear-svm by SGD, reading `chunk_rows`
    rows at a time, `passes` times over the train rows (one cache, no `search`;
    `tlfeat.heads.streaming`).
    """
    caches = [Path(c) for c in path_list(caches, "caches", "tlfeat caches")]
    out = None if out is None else path_value("out", out)
    seed = seed_value(seed)
    chunk_rows, passes = integer("chunk_rows", chunk_rows, 1), integer("passes", passes, 1)
    if not streaming and (chunk_rows, passes) != (DEFAULT_CHUNK_ROWS, DEFAULT_PASSES):
        given = [f"`{name}={value}`" for name, value, default in (
            ("chunk_rows", chunk_rows, DEFAULT_CHUNK_ROWS), ("passes", passes, DEFAULT_PASSES)) if value != default]
        raise TlfeatError(f"{' '.join(given)}: applies with `streaming` only")
    if streaming:  # fit_streaming makes the same checks of `out` as below
        if len(caches) != 1 or search:
            raise TlfeatError("`streaming` fits one cache, without `search`")
        names = [head] if isinstance(head, str) else resolve_heads(head)  # fit_streaming names what it cannot fit
        if len(names) != 1:
            raise TlfeatError(
                f"`streaming` fits one head at a time ({' or '.join(STREAMABLE_HEADS)}), not {', '.join(names)}"
            )
        summary = fit_streaming(caches[0], head=names[0], out=out, chunk_rows=chunk_rows, passes=passes, seed=seed)
        if on_result is not None:
            on_result(summary.results[0])
        return summary
    names = resolve_heads(head)
    out = Path(out) if out is not None else default_out(caches)
    check_output_path(out, folder=True)
    features = load_features(caches)
    for source in features.sources:
        check_outside_dataset(out, source.get("dataset_root"))
    _check_trainable(features, search)
    with locked_folder(out), deferred_interrupts():
        features.check_folder(out, names)
        results: list[HeadResult] = []
        skipped: list[tuple[str, str]] = []
        for position, name in enumerate(names):
            try:
                raise_if_requested()  # Ctrl-C during the last head: that head was kept, this one is not begun
                result = _fit_head(name, features, search, seed, out)
            except TlfeatError as exc:
                if len(names) == 1:
                    raise
                skipped.append((name, str(exc)))
                if on_skip is not None:
                    on_skip(name, str(exc))
                continue
            except KeyboardInterrupt:
                if not results:
                    raise Interrupted(f"interrupted; no head was fitted in {out}") from None
                # the heads already fitted keep their ranked table; the others are named in it
                left = [(other, "interrupted") for other in names[position:]]
                write_summary(out, results, features.sources, features.split_counts(), skipped + left)
                kept = ", ".join(result.head for result in results)
                raise Interrupted(f"interrupted; the heads fitted before ({kept}) are kept in {out}, "
                                  f"with summary.md naming those not fitted") from None
            results.append(result)
            if on_result is not None:
                on_result(result)
        if not results:
            raise TlfeatError(f"{features.label}: no head could be fitted ({'; '.join(r for _, r in skipped)})")
        return write_summary(out, results, features.sources, features.split_counts(), skipped)
