"""evaluate: score a fitted head on labelled caches, refusing caches made with other settings.

No score is inflated by rows the head has seen: rows of the scored caches that the
head was fitted on (or selected on, for test) are found by image and by features
(`tlfeat.heads.rows`), whatever the caches' split settings, left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sklearn.base import BaseEstimator

from tlfeat.backbones import random_weights_backend
from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError, parameter_error, some_of
from tlfeat.fileio import check_output_path, path_list, path_value
from tlfeat.heads.fit import Features, load_features
from tlfeat.heads.folder import FEATURE_DEFAULTS, FEATURE_KEY
from tlfeat.heads.rows import RowIds
from tlfeat.heads.store import load_head, read_fitted_rows, read_metadata
from tlfeat.reports import split_metrics, write_json


@dataclass
class Evaluation:
    """A head scored on caches: `metrics` per split (n, accuracy, macro-F1, per-class scores, confusion
    matrix) over rows the head never saw; `left_out` counts the others per split; `notes` say why."""

    model: Path
    meta: dict
    caches: list[Path]
    metrics: dict[str, dict]  # split -> tlfeat.reports.split_metrics, over the rows the head never saw
    left_out: dict[str, int] = field(default_factory=dict)  # split -> rows left out: the head saw them
    notes: list[str] = field(default_factory=list)  # one line each: what was left out, or could not be checked

    def __repr__(self) -> str:  # the metrics and the head's metadata run to pages: a notebook cell shows this
        accuracy = {split: round(m["accuracy"], 4) for split, m in self.metrics.items()}
        return (f"Evaluation(model={str(self.model)!r}, caches={[str(c) for c in self.caches]}, "
                f"accuracy by split (.metrics) {accuracy}, left_out={self.left_out}, {len(self.notes)} notes)")


def _check_caches_fit_model(model: Path, meta: dict, caches: Sequence[Path], features: Features) -> None:
    """Refuse caches whose features or classes are not what the head was fitted on, naming the file and setting."""
    sources = meta["sources"]
    if len(caches) != len(sources):
        fitted = ", ".join(f"{s['file']} ({s['backbone']})" for s in sources)
        raise TlfeatError(
            f"{model}: fitted on {len(sources)} cache(s) ({fitted}); give as many caches, in that order, "
            f"not {len(caches)}"
        )
    def differing(given: dict, source: dict) -> str | None:
        """The first feature setting in which a cache differs from a cache the head was fitted on."""
        return next((name for name in FEATURE_KEY if given.get(name) != source.get(name, FEATURE_DEFAULTS.get(name))),
                    None)

    for path, source, given in zip(caches, sources, features.sources):
        name = differing(given, source)
        if name is not None:
            fitted = source.get(name, FEATURE_DEFAULTS.get(name))
            if len(caches) > 1 and all(any(differing(g, s) is None for g in features.sources) for s in sources):
                order = ", ".join(s["file"] for s in sources)
                raise TlfeatError(f"{model}: give its caches in the order it was fitted on them ({order}); "
                                  f"{path} has {name} {given.get(name)!r} where {source['file']} had {fitted!r}")
            remedy, backend = "extract with the same settings", random_weights_backend(str(fitted))
            if name == "weights" and backend and random_weights_backend(str(given.get(name))):
                remedy = f"extract under KERAS_BACKEND={backend} (random weights differ by backend)"
            raise TlfeatError(
                f"{path}: {name} {given.get(name)!r}, but {model.name} was fitted on {name} "
                f"{fitted!r} ({source['file']}); {remedy}"
            )
    mine, theirs = features.data.class_names, list(meta["classes"])
    if mine != theirs:
        extra = [c for c in mine if c not in theirs]
        missing = [c for c in theirs if c not in mine]
        parts = ([f"not in the model: {some_of(extra)}"] if extra else []) + (
            [f"missing here: {some_of(missing)}"] if missing else [])
        detail = "; ".join(parts) or "same classes in another order"
        raise TlfeatError(
            f"{caches[0]}: class list differs from {model.name}'s ({len(mine)} vs {len(theirs)} classes; {detail}); "
            "a head only scores data labelled with its own classes"
        )


def evaluate_on_caches(
    model: str | Path, caches: str | Path | Sequence[str | Path], split: str | None = None, trust: bool = False,
    json: str | Path | None = None,
) -> Evaluation:
    """Score a fit-head model on labelled caches: accuracy, macro-F1, per-class scores, confusion matrix per split.

    A fused head takes one cache per source, in its order (matched by image path).
    Everything is checked against the model's metadata before the model is loaded;
    rows the head was fitted on are left out of val and test (and selection rows out
    of test), counted in `left_out`. A split left with no rows is not scored.
    `trust` loads a head holding types tlfeat does not trust (`tlfeat.heads.store.load_head`).
    json: also write the scores (per-class, confusion matrices) and what was left out to this file.
    """
    model, caches = path_value("model", model), [Path(c) for c in path_list(caches, "caches", "tlfeat caches")]
    if split is not None and split not in SPLITS:  # a typo, not a split these caches lack: said before loading
        raise parameter_error("split", split, f"use {', '.join(SPLITS[:-1])} or {SPLITS[-1]}")
    if json is not None:
        json = path_value("json", json)
        check_output_path(json, parameter="json", suffix=".json")
    features, estimator, meta = checked_head(model, caches, split, trust)
    recorded = read_fitted_rows(model)
    result = Evaluation(model, meta, caches, {})
    seen = RowIds.from_arrays(recorded) if recorded is not None else {}
    if recorded is None:
        result.notes.append(f"{model.name} does not record the rows it was fitted on (tlfeat 0.1); refit it to have "
                            "them left out of the scores")
    for name in [split] if split else list(features.split_counts()):
        rows, _, left_out = features.rows(name, seen)
        if left_out:
            result.left_out[name] = left_out
            result.notes.append(
                f"{name}: {left_out} of {left_out + len(rows)} rows are rows {model.name} was "
                f"{'fitted' if name == 'val' else 'fitted or selected'} on; "
                + (f"scored the other {len(rows)}" if len(rows) else "nothing left to score")
            )
        if len(rows):
            result.metrics[name] = split_metrics(rows.labels, estimator.predict(rows.features), meta["classes"])
    if not result.metrics:
        raise TlfeatError(f"{caches[0]}: {result.notes[-1]}; score {model.name} on images it has not seen")
    if json is not None:
        write_json(json, {"model": str(model), "caches": [str(c) for c in caches], "classes": meta["classes"],
                          "splits": result.metrics, "left_out": result.left_out})
    return result


def checked_head(
    model: Path, caches: Sequence[Path], split: str | None = None, trust: bool = False
) -> tuple[Features, BaseEstimator, dict]:
    """The caches' rows and the fit-head model, loaded once every check has passed: (features, estimator, meta).

    The model is loaded last, after its metadata was checked against the caches
    (and against `split`, which the caches must hold when given); `trust` as for `load_head`.
    """
    model, caches = Path(model), [Path(c) for c in caches]
    meta = read_metadata(model)
    features = load_features(caches)
    _check_caches_fit_model(model, meta, caches, features)
    present = list(features.split_counts())
    if split is not None and split not in present:
        raise TlfeatError(f"{caches[0]}: no {split!r} rows (splits here: {', '.join(present)})")
    estimator, meta = load_head(model, trust=trust)
    return features, estimator, meta
