"""fit-head: load one or more caches, fit heads on train, select on val, score, save.

Several caches over the same images (say ResNet101 and VGG16 features) are
fused column-wise, rows aligned by image path, in the order given; the fused
model records every cache so `predict` can rebuild the same feature vector.

Per head, the output folder receives ``<head>.joblib`` (the fitted estimator),
``<head>.json`` (classes, caches, hyperparameters, scores, the joblib's sha256),
``<head>.metrics.json`` (per split: per-class precision/recall/F1 and the
confusion matrix) and ``<head>.confusion.png``; every run also writes
``summary.md`` and ``summary.csv`` with one row per head fitted.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
import sklearn
from sklearn.base import BaseEstimator, clone

from tlfeat import __version__
from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.cache import CacheData, load
from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError
from tlfeat.heads.registry import HEAD_NAMES, HeadSpec, fit_estimator, get_head
from tlfeat.heads.store import save_head
from tlfeat.fileio import atomic_write_bytes
from tlfeat.reports import markdown_table, plot_confusion, split_metrics, write_csv, write_json

# What a model records about each cache it was fitted on: enough for predict to
# recompute the features, and to tell which cache (and which weights) it was.
SOURCE_ATTRS = (
    "backbone", "weights", "weights_source", "input_size", "preprocessing", "dtype", "compute", "decode", "tta",
    "feature_dim", "keras_backend", "created", "tlfeat_version", "dataset_root", "seed", "split_ratios",
)


@dataclass
class Features:
    """Rows of one cache, or of several fused column-wise, plus where each block of columns came from."""

    data: CacheData
    sources: list[dict]  # one per cache, in column order
    label: str  # the cache file name(s), for messages

    def select(self, split: str) -> CacheData:
        return self.data.select(split)

    def split_counts(self) -> dict[str, int]:
        return {s: int(np.sum(self.data.split == s)) for s in SPLITS if np.any(self.data.split == s)}


@dataclass
class HeadResult:
    head: str
    params: dict  # the tuned hyperparameter's label -> value used
    search: list[dict] | None  # [{label: value, "val_accuracy": a}, ...] when `search` ran
    scores: dict[str, dict]  # split -> {"n", "accuracy", "macro_f1"}
    fit_seconds: float  # fitting the kept model
    search_seconds: float | None  # all fits of the search, the kept one included
    notes: list[str]  # warnings raised while fitting (e.g. no convergence), one line each
    files: dict[str, Path]


@dataclass
class FitSummary:
    out: Path
    sources: list[dict]  # the caches fitted on, as recorded in each model's metadata
    split_counts: dict[str, int]
    results: list[HeadResult] = field(default_factory=list)
    table: str = ""  # markdown, sorted by val accuracy when there is a val split
    table_files: tuple[Path, Path] | None = None  # (summary.md, summary.csv)


def resolve_heads(head: str) -> list[str]:
    """'all' -> every head; otherwise the one named (checked)."""
    if head == "all":
        return list(HEAD_NAMES)
    return [get_head(head).name]


def default_out(caches: Sequence[Path]) -> Path:
    """``<folder of the first cache>/heads/<stem>[+<stem>...]/``, i.e. cache/heads/... for caches in cache/."""
    first = Path(caches[0])
    return first.parent / "heads" / "+".join(Path(c).stem for c in caches)


def source_record(path: Path, attrs: dict, n_rows: int, feature_dim: int) -> dict:
    """What a model records about one cache it was fitted on."""
    return {
        "path": str(Path(path).resolve()),
        "file": Path(path).name,
        "n_rows": n_rows,
        **{name: attrs.get(name) for name in SOURCE_ATTRS},
        "tta": attrs.get("tta", NO_TTA),
        "feature_dim": feature_dim,
    }


def _source(path: Path, data: CacheData) -> dict:
    return source_record(path, data.attrs, len(data), int(data.features.shape[1]))


def _check_rows(path: Path, data: CacheData) -> None:
    if len(set(data.paths)) != len(data.paths):
        raise TlfeatError(f"{path}: the same image path occurs in several rows; re-extract this cache")
    bad = ~np.isfinite(data.features)
    if bad.any():
        raise TlfeatError(
            f"{path}: {int(bad.sum())} feature values are NaN or inf, in {int(bad.any(axis=1).sum())} "
            f"of {len(data)} rows; re-extract this cache (extract `overwrite`)"
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
    return Features(fused, sources, " + ".join(p.name for p in paths))


def _check_trainable(features: Features, search: bool) -> None:
    train_labels = features.data.labels[features.data.split == "train"]
    if not len(train_labels):
        raise TlfeatError(f"{features.label}: no train split rows; nothing to fit on")
    present = np.bincount(train_labels, minlength=len(features.data.class_names))
    total = np.bincount(features.data.labels, minlength=len(features.data.class_names))
    for i, name in enumerate(features.data.class_names):
        if present[i] == 0:
            raise TlfeatError(
                f"{features.label}: class {name!r} has no images in the train split "
                f"({total[i]} in val/test); every class needs training images"
            )
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

    Returns (kept model, {label: value}, trials, kept model's fit seconds, all fits' seconds).
    """
    base = spec.build(seed)
    validation = (val.features, val.labels)
    best = None
    trials, total = [], 0.0
    for value in spec.grid:
        estimator = clone(base).set_params(**{spec.param: value})
        seconds = _fit_timed(estimator, train, validation)
        total += seconds
        accuracy = float(estimator.score(val.features, val.labels))
        trials.append({spec.label: value, "val_accuracy": accuracy, "fit_seconds": seconds})
        if best is None or accuracy > best[0]:
            best = (accuracy, estimator, value, seconds)
    _, estimator, value, seconds = best
    return estimator, {spec.label: value}, trials, seconds, total


def _fit_head(name: str, features: Features, search: bool, seed: int, out: Path) -> HeadResult:
    spec = get_head(name)
    train = features.select("train")
    val = features.select("val") if "val" in features.split_counts() else None
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
        metrics = {}
        for split in features.split_counts():
            rows = features.select(split)
            metrics[split] = split_metrics(rows.labels, estimator.predict(rows.features), class_names)
    # UserWarnings (ConvergenceWarning among them) speak about this fit; deprecation chatter from libraries does not.
    notes = sorted(
        {f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught if issubclass(w.category, UserWarning)}
    )
    return save_fitted_head(
        out, name, spec.description, estimator, metrics, class_names, features.label, features.sources,
        int(features.data.features.shape[1]), params, trials, seed, fit_seconds, search_seconds, notes,
    )


def save_fitted_head(
    out: Path, name: str, description: str, estimator: BaseEstimator, metrics: dict[str, dict],
    class_names: list[str], label: str, sources: list[dict], feature_dim: int, params: dict,
    trials: list[dict] | None, seed: int, fit_seconds: float, search_seconds: float | None, notes: list[str],
) -> HeadResult:
    """Write a fitted head's files: the model with its metadata, per-split metrics, a confusion-matrix PNG."""
    scores = {s: {k: m[k] for k in ("n", "accuracy", "macro_f1")} for s, m in metrics.items()}
    files = {
        "model": out / f"{name}.joblib",
        "metrics": out / f"{name}.metrics.json",
        "confusion": out / f"{name}.confusion.png",
    }
    shown = "test" if "test" in metrics else list(metrics)[-1]
    plot_confusion(
        np.array(metrics[shown]["confusion_matrix"]), class_names,
        f"{name} on {label}: {shown} accuracy {metrics[shown]['accuracy']:.3f}", files["confusion"],
    )
    write_json(files["metrics"], {"head": name, "classes": class_names, "splits": metrics})
    save_head(estimator, files["model"], {
        "head": name,
        "description": description,
        "estimator": repr(estimator),
        "classes": class_names,
        "feature_dim": feature_dim,
        "sources": sources,
        "params": params,
        "search": trials,
        "seed": seed,
        "scores": scores,
        "fit_seconds": fit_seconds,
        "search_seconds": search_seconds,
        "notes": notes,
        "tlfeat_version": __version__,
        "sklearn_version": sklearn.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    files["metadata"] = out / f"{name}.json"
    return HeadResult(name, params, trials, scores, fit_seconds, search_seconds, notes, files)


def results_table(results: Sequence[HeadResult], splits: Sequence[str]) -> tuple[list[str], list[list]]:
    """Headers and rows (one per head): hyperparameters, accuracy and macro-F1 per split, fit seconds."""
    headers = ["head", "params"]
    for split in splits:
        headers += [f"{split} acc", f"{split} macro-F1"]
    headers.append("fit s")
    rows = []
    for r in results:
        row = [r.head, ", ".join(f"{k}={v}" for k, v in r.params.items())]
        for split in splits:
            row += [r.scores[split]["accuracy"], r.scores[split]["macro_f1"]]
        rows.append(row + [f"{r.fit_seconds:.2f}"])
    return headers, rows


def fit_heads(
    caches: Sequence[Path],
    head: str = "all",
    search: bool = False,
    out: Path | None = None,
    seed: int = 0,
    on_result: Callable[[HeadResult], None] | None = None,
) -> FitSummary:
    """Fit the named head (or all) on the caches' train split; score every split present; save.

    `on_result` is called after each head, so a caller can report progress.
    """
    names = resolve_heads(head)
    features = load_features(caches)
    _check_trainable(features, search)
    out = Path(out) if out is not None else default_out(caches)
    if out.exists() and not out.is_dir():
        raise TlfeatError(f"{out}: exists and is not a folder; `out` needs a folder")
    out.mkdir(parents=True, exist_ok=True)

    results = []
    for name in names:
        result = _fit_head(name, features, search, seed, out)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return write_summary(out, results, features.sources, features.split_counts(), seed, search)


def write_summary(
    out: Path, results: list[HeadResult], sources: list[dict], split_counts: dict[str, int], seed: int, search: bool
) -> FitSummary:
    """The run's comparison table (sorted by val accuracy when there is val) as summary.md and summary.csv."""
    summary = FitSummary(out, sources, split_counts, results)
    splits = list(split_counts)
    ranked = sorted(results, key=lambda r: -r.scores["val"]["accuracy"]) if "val" in splits else results
    headers, rows = results_table(ranked, splits)
    summary.table = markdown_table(headers, rows)
    summary.table_files = (out / "summary.md", out / "summary.csv")
    described = ", ".join(f"{s['file']} ({s['backbone']}, {s['feature_dim']}-d)" for s in sources)
    counts = ", ".join(f"{k} {v}" for k, v in split_counts.items())
    searched = ", hyperparameters searched on val" if search else ""
    heading = f"# Heads on {described}\n\nRows: {counts}. Seed {seed}{searched}.\n\n"
    atomic_write_bytes(summary.table_files[0], (heading + summary.table).encode())
    write_csv(summary.table_files[1], headers, rows)
    return summary
