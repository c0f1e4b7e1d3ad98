"""evaluate: score a fitted head on labelled caches, refusing caches made with other settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sklearn.base import BaseEstimator

from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.errors import TlfeatError
from tlfeat.heads.fit import Features, load_features
from tlfeat.heads.store import load_head, read_metadata
from tlfeat.reports import split_metrics

FEATURE_KEY = ("backbone", "weights", "input_size", "preprocessing", "tta", "feature_dim")
# Heads fitted before a setting existed recorded nothing for it: they had its default.
FEATURE_DEFAULTS = {"tta": NO_TTA}


@dataclass
class Evaluation:
    model: Path
    meta: dict
    caches: list[Path]
    metrics: dict[str, dict]  # split -> tlfeat.reports.split_metrics


def _check_caches_fit_model(model: Path, meta: dict, caches: Sequence[Path], features: Features) -> None:
    """Refuse caches whose features or classes are not what the head was fitted on, naming the file and setting."""
    sources = meta["sources"]
    if len(caches) != len(sources):
        fitted = ", ".join(f"{s['file']} ({s['backbone']})" for s in sources)
        raise TlfeatError(
            f"{model}: fitted on {len(sources)} cache(s) ({fitted}); give as many caches, in that order, "
            f"not {len(caches)}"
        )
    for path, source, given in zip(caches, sources, features.sources):
        for name in FEATURE_KEY:
            fitted = source.get(name, FEATURE_DEFAULTS.get(name))
            if given.get(name) != fitted:
                raise TlfeatError(
                    f"{path}: {name} {given.get(name)!r}, but {model.name} was fitted on {name} "
                    f"{fitted!r} ({source['file']}); extract with the same settings"
                )
    mine, theirs = features.data.class_names, list(meta["classes"])
    if mine != theirs:
        extra = [c for c in mine if c not in theirs]
        missing = [c for c in theirs if c not in mine]
        detail = f"not in the model: {extra[:3]}" if extra else (
            f"missing here: {missing[:3]}" if missing else "same classes in another order"
        )
        raise TlfeatError(
            f"{caches[0]}: class list differs from {model.name}'s ({len(mine)} vs {len(theirs)} classes; {detail}); "
            "a head only scores data labelled with its own classes"
        )


def evaluate_on_caches(model: Path, caches: Sequence[Path], split: str | None = None) -> Evaluation:
    """Score a fit-head model on labelled caches: accuracy, macro-F1, per-class scores, confusion matrix per split.

    A fused head takes one cache per source, in its order (matched by image path).
    Everything is checked against the model's metadata before the model is unpickled.
    """
    model, caches = Path(model), [Path(c) for c in caches]
    features, estimator, meta = checked_head(model, caches, split)
    metrics = {}
    for name in [split] if split else list(features.split_counts()):
        rows = features.select(name)
        metrics[name] = split_metrics(rows.labels, estimator.predict(rows.features), meta["classes"])
    return Evaluation(model, meta, caches, metrics)


def checked_head(
    model: Path, caches: Sequence[Path], split: str | None = None
) -> tuple[Features, BaseEstimator, dict]:
    """The caches' rows and the fit-head model, loaded once every check has passed: (features, estimator, meta).

    The model is unpickled last, after its metadata was checked against the caches
    (and against `split`, which the caches must hold when given).
    """
    model, caches = Path(model), [Path(c) for c in caches]
    meta = read_metadata(model)
    features = load_features(caches)
    _check_caches_fit_model(model, meta, caches, features)
    present = list(features.split_counts())
    if split is not None and split not in present:
        raise TlfeatError(f"{caches[0]}: no {split!r} rows (splits here: {', '.join(present)})")
    estimator, meta = load_head(model)
    return features, estimator, meta
