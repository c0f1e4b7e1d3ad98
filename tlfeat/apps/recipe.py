"""Recipes: a tested set of (backbone, input size, test-time augmentation) extractions, fused, one head.

`tlfeat recipe DATA` extracts each member into its own cache (the file `tlfeat
extract` would write for the same settings, so caches are shared with it and
reused or resumed as usual), fuses the members column-wise, picks the logistic
regression C by cross-validation over train+val, refits on train+val and scores
test. The head
is saved like fit-head's, so `tlfeat predict` and `evaluate` take it as is.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.model_selection import StratifiedKFold

from tlfeat.apps.recipe_book import DEFAULT_RECIPE, Member, Recipe, get_recipe
from tlfeat.data.scan import DEFAULT_RATIOS
from tlfeat.errors import TlfeatError, seed_value
from tlfeat.fileio import check_outside_dataset, check_output_path, path_value
from tlfeat.heads.fit import Features, HeadResult, load_features
from tlfeat.heads.folder import head_metadata, left_out_note, locked_folder, save_fitted_head
from tlfeat.heads.registry import get_head
from tlfeat.reports import ImageOutcomes, split_metrics

HEAD = "logreg"  # fit-head's: StandardScaler + multinomial logistic regression
CV_FOLDS = 5


@dataclass
class MemberRun:
    member: Member
    cache: Path
    computed: int  # images embedded by this run
    reused: int  # rows taken from an earlier run
    seconds: float  # the whole extraction call, scan and model build included
    images_per_s: float  # computed images per second of embedding (0 when nothing was computed)


@dataclass
class Fitted:
    """The outcome of choosing C by cross-validation over train+val and refitting on all of it."""

    estimator: BaseEstimator
    c: float
    folds: int  # cross-validation folds (0: nothing to choose, the grid's only C was used)
    trials: list[dict]  # {"C", "cv_accuracy", "fit_seconds"} per C tried
    metrics: dict[str, dict]  # "cv": out-of-fold predictions at the chosen C; "test": the refit, on test
    fit_seconds: float  # the refit
    search_seconds: float
    notes: list[str] = field(default_factory=list)
    test: ImageOutcomes | None = None  # the refit's outcome on each test image scored


def _logreg(c: float, seed: int) -> BaseEstimator:
    spec = get_head(HEAD)
    return spec.build(seed).set_params(**{spec.param: c})


def _copies_grouped(feature_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the same features (copies of one image) as one group: each row's group, numbered in order of
    first appearance, and each group's first row. Without copies: every row its own group, in row order."""
    _, firsts, inverse = np.unique(feature_ids, return_index=True, return_inverse=True)
    order = np.argsort(firsts)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], firsts[order]


def select_and_refit(features: Features, c_grid: Sequence[float], seed: int = 0, folds: int = CV_FOLDS) -> Fitted:
    """Standardized logistic regression on every labelled row outside test (train and val).

    C is the grid value with the best `folds`-fold cross-validated accuracy over those rows (ties: the
    earlier value); 1,500 held-out predictions on Scene15 instead of the 375 of the val carve-out alone.
    The kept C is refitted on all of them and scored on test.
    """
    data = features.data
    rows = data.split != "test"
    if not rows.any():
        raise TlfeatError(f"{features.label}: no train or val rows; nothing to fit on")
    x, y = data.features[rows], data.labels[rows]
    folds = min(folds, int(np.unique(y, return_counts=True)[1].min())) if len(c_grid) > 1 else 0
    folds = folds if folds >= 2 else 0
    trials: list[dict] = []
    metrics: dict[str, dict] = {}
    search_seconds = 0.0
    c = c_grid[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if folds:
            fold_of = np.empty(len(y), dtype=np.int64)
            for fold, (_, held_out) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)):
                fold_of[held_out] = fold
            # An image's copies (the same features) are held out with its first row, or the held-out accuracy,
            # and the C it chooses, would count copies of rows the fold's head was fitted on. Moving only the
            # copies keeps every other row's fold: a cache without copies is split as it always was.
            group_of, firsts = _copies_grouped(features.ids.by_features[rows])
            fold_of = fold_of[firsts][group_of]
            splits = [(np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)) for fold in range(folds)]
            best = None
            for value in c_grid:
                started = time.perf_counter()
                predicted = np.empty_like(y)
                for fit_part, held_out in splits:
                    predicted[held_out] = _logreg(value, seed).fit(x[fit_part], y[fit_part]).predict(x[held_out])
                seconds = time.perf_counter() - started
                search_seconds += seconds
                accuracy = float(np.mean(predicted == y))
                trials.append({"C": value, "cv_accuracy": accuracy, "fit_seconds": seconds})
                if best is None or accuracy > best[0]:
                    best = (accuracy, value, predicted)
            _, c, predicted = best
            metrics["cv"] = split_metrics(y, predicted, data.class_names)
        started = time.perf_counter()
        estimator = _logreg(c, seed).fit(x, y)
        fit_seconds = time.perf_counter() - started
    # Test rows that are copies of fitted rows (the same image, or the same features under another name) are
    # left out, as fit-head and evaluate leave them out: the score is on images the head has not seen.
    test, test_ids, left_out = features.rows("test", {"train": features.ids.take(rows)})
    outcomes = None
    if len(test):
        predicted = estimator.predict(test.features)
        metrics["test"] = split_metrics(test.labels, predicted, data.class_names)
        outcomes = ImageOutcomes(test_ids.by_file, test.labels, predicted)
    notes = [left_out_note("test", left_out)] if left_out else []
    if len(c_grid) > 1 and not folds:
        fewest = int(np.unique(y, return_counts=True)[1].min())
        notes.append(f"C={c:g} not cross-validated: a class has only {fewest} train+val image"
                     f"{'s' if fewest != 1 else ''} (2 needed), so the grid's first C is used")
    notes += sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught
                     if issubclass(w.category, UserWarning)})
    return Fitted(estimator, c, folds, trials, metrics, fit_seconds, search_seconds, notes, outcomes)


@dataclass
class RecipeResult:
    """A recipe run: the recipe, its member caches (`members`), the fitted logistic head
    (`fitted`: C, cross-validation, scores) and its head file (`head`, `out`)."""

    recipe: Recipe
    members: list[MemberRun]
    fitted: Fitted
    head: HeadResult
    out: Path

    def __repr__(self) -> str:  # every member's run and every metric would fill a notebook cell
        accuracy = self.fitted.metrics.get("test", {}).get("accuracy")
        scored = f"test accuracy {accuracy:.4f}" if accuracy is not None else "no test score"
        return (f"RecipeResult(recipe={self.recipe.name!r}, {len(self.members)} members, C={self.fitted.c:g}, "
                f"{scored}, out={str(self.out)!r})")


def member_cache(data: Path, cache_dir: Path | None, member: Member) -> Path:
    """Where `extract` keeps this member's features by default, in `cache_dir` when given."""
    from tlfeat.extraction.run import default_output

    path = default_output(data, member.backbone, member.image_size, member.tta)
    return Path(cache_dir) / path.name if cache_dir is not None else path


def run_recipe(
    data: str | Path,
    recipe: str = DEFAULT_RECIPE,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    progress: bool = True,
    on_member: Callable[[MemberRun], None] | None = None,
    overwrite: bool = False,
) -> RecipeResult:
    """Extract the recipe's members (reusing caches), fuse, fit logistic regression, save the head, report.

    data: the dataset folder, as `extract` takes it; seed, ratios: its split, as `extract`'s. recipe: "best"
    or "fast" (`tlfeat.apps.recipe_book.RECIPES`). cache_dir: where the member caches live (default: where
    `extract` puts them, ``cache/``). out: the head folder, default
    ``<cache dir>/heads/<dataset>-recipe-<name>/``. progress: a bar per member's extraction.
    `on_member` is called after each member's extraction, so a caller can report progress. `overwrite`: as
    `extract`'s, for the member caches.
    """
    from tlfeat.extraction.run import extract
    from tlfeat.extraction.shards import NEW_FILE

    path_value("data", data)
    out = None if out is None else path_value("out", out)
    cache_dir = None if cache_dir is None else path_value("cache_dir", cache_dir)
    spec = get_recipe(recipe)
    seed = seed_value(seed)
    first_cache = member_cache(data, cache_dir, spec.members[0])
    if out is None:  # one folder per dataset: a head folder holds heads fitted on one dataset's rows
        out = first_cache.parent / "heads" / f"{Path(data).resolve().name}-recipe-{spec.name}"
    out = Path(out)
    check_output_path(out, folder=True)  # before minutes of extraction, not after
    check_outside_dataset(out, data)
    if cache_dir is not None:
        check_outside_dataset(Path(cache_dir), data, "cache_dir")
    runs: list[MemberRun] = []
    for member in spec.members:
        cache = member_cache(data, cache_dir, member)
        try:
            summary = extract(
                data, out=cache, backbone=member.backbone, image_size=member.image_size, tta=member.tta,
                seed=seed, ratios=ratios, progress=progress, overwrite=overwrite,
            )
        except TlfeatError as exc:  # extract's advice names its `out`; a recipe's `out` is the head folder
            if NEW_FILE not in str(exc):
                raise
            raise TlfeatError(str(exc).replace(NEW_FILE, "`cache_dir` for new files")) from None
        run = MemberRun(member, cache, summary.n_computed, summary.n_reused, summary.seconds, summary.images_per_s)
        runs.append(run)
        if on_member is not None:
            on_member(run)
    caches = [run.cache for run in runs]
    features = load_features(caches)
    with locked_folder(out):
        # Checked before the fit: a folder of heads fitted on other data is refused, as fit-head refuses it.
        features.check_folder(out, [HEAD])
        fitted = select_and_refit(features, spec.c_grid, seed)
        if not fitted.metrics:
            raise TlfeatError(
                f"{data}: nothing to score the recipe on: no test split, and too few images to cross-validate")
        head = _save(out, spec, features, fitted, seed)
    return RecipeResult(spec, runs, fitted, head, out)


def _description(spec: Recipe, fitted: Fitted) -> str:
    """What the head file says it is: the folds actually used (fewer than CV_FOLDS for a small class, or none)."""
    chosen = (f"C by {fitted.folds}-fold cross-validation over train+val" if fitted.folds
              else f"C={fitted.c:g}, not cross-validated")
    return f"recipe {spec.name}: {spec.description}; StandardScaler + logistic regression, {chosen}, refitted on train+val"


def _save(out: Path, spec: Recipe, features: Features, fitted: Fitted, seed: int) -> HeadResult:
    refit_rows = features.data.split != "test"  # refitted on train+val: both are rows it has seen
    seen = {"train": features.ids.take(refit_rows)}
    counts = {name: int(n) for name, n in features.split_counts().items()}
    meta = head_metadata(
        HEAD, _description(spec, fitted), fitted.estimator, features.data.class_names, int(features.data.features.shape[1]), features.sources,
        features.label, {"digest": features.digest, "counts": counts}, {"C": fitted.c}, fitted.trials or None,
        seed, fitted.fit_seconds, fitted.search_seconds,
    )
    return save_fitted_head(out, fitted.estimator, meta, fitted.metrics, seen, fitted.notes, fitted.test)
