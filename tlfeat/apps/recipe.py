"""Recipes: a tested set of (backbone, input size, test-time augmentation) extractions, fused, one head.

`tlfeat recipe DATA` extracts each member into its own cache (the file `tlfeat
extract` would write for the same settings, so caches are shared with it and
reused or resumed as usual), fuses the members column-wise, picks the logistic
regression C on the val split, refits on train+val and scores test. The head
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

from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.data.scan import DEFAULT_RATIOS
from tlfeat.errors import TlfeatError
from tlfeat.heads.fit import Features, HeadResult, head_metadata, load_features
from tlfeat.heads.folder import save_fitted_head
from tlfeat.heads.registry import get_head
from tlfeat.reports import split_metrics

HEAD = "logreg"  # fit-head's: StandardScaler + multinomial logistic regression
DEFAULT_RECIPE = "best"


@dataclass(frozen=True)
class Member:
    """One extraction of a recipe."""

    backbone: str
    image_size: int
    tta: str = NO_TTA

    @classmethod
    def parse(cls, text: str) -> "Member":
        """BACKBONE:SIZE[:TTA], e.g. efficientnet_lite1:300:flip."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit():
            raise TlfeatError(f"{text!r}: expected BACKBONE:SIZE or BACKBONE:SIZE:TTA, e.g. efficientnet_lite1:300:flip")
        return cls(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else NO_TTA)

    @property
    def label(self) -> str:
        return f"{self.backbone}@{self.image_size}" + ("" if self.tta == NO_TTA else f"+{self.tta}")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    members: tuple[Member, ...]
    c_grid: tuple[float, ...]  # logistic regression C values tried on val; ties go to the earlier one


def _lite(n: int, size: int, tta: str = NO_TTA) -> Member:
    return Member(f"efficientnet_lite{n}", size, tta)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "fast",
            "EfficientNet-Lite0 at 224 px: the cheapest offline features",
            (_lite(0, 224),),
            (0.03, 0.1, 0.3),
        ),
        Recipe(
            "best",
            "EfficientNet-Lite0/1/2, each at its native and a larger size, fused (offline weights)",
            (_lite(0, 224), _lite(1, 240), _lite(2, 260), _lite(0, 288), _lite(1, 300), _lite(2, 320)),
            (0.01, 0.03, 0.1),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise TlfeatError(f"`recipe={name!r}`: unknown; choose one of {', '.join(RECIPES)}") from None


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
    """The outcome of choosing C on val and refitting on train+val."""

    estimator: BaseEstimator
    c: float
    trials: list[dict]  # {"C", "val_accuracy", "fit_seconds"} per C tried (empty when the grid has one value)
    metrics: dict[str, dict]  # held-out splits only: test (after the refit), val (the chosen C, before it)
    fit_seconds: float  # the refit
    search_seconds: float
    notes: list[str] = field(default_factory=list)


def _logreg(c: float, seed: int) -> BaseEstimator:
    spec = get_head(HEAD)
    return spec.build(seed).set_params(**{spec.param: c})


def select_and_refit(features: Features, c_grid: Sequence[float], seed: int = 0) -> Fitted:
    """Standardized logistic regression: C by val accuracy (fit on train), then refit on train+val, score test.

    Without a val split (or with one C) nothing is chosen; without a test split only val is reported.
    """
    data = features.data
    train, val = data.split == "train", data.split == "val"
    if not train.any():
        raise TlfeatError(f"{features.label}: no train split rows; nothing to fit on")
    trials: list[dict] = []
    metrics: dict[str, dict] = {}
    search_seconds = 0.0
    c = c_grid[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if val.any() and len(c_grid) > 1:
            best = None
            for value in c_grid:
                started = time.perf_counter()
                model = _logreg(value, seed).fit(data.features[train], data.labels[train])
                seconds = time.perf_counter() - started
                search_seconds += seconds
                predicted = model.predict(data.features[val])
                accuracy = float(np.mean(predicted == data.labels[val]))
                trials.append({"C": value, "val_accuracy": accuracy, "fit_seconds": seconds})
                if best is None or accuracy > best[0]:
                    best = (accuracy, value, predicted)
            _, c, predicted = best
            metrics["val"] = split_metrics(data.labels[val], predicted, data.class_names)
        fit_rows = train | val
        started = time.perf_counter()
        estimator = _logreg(c, seed).fit(data.features[fit_rows], data.labels[fit_rows])
        fit_seconds = time.perf_counter() - started
    test = data.split == "test"
    if test.any():
        metrics["test"] = split_metrics(data.labels[test], estimator.predict(data.features[test]), data.class_names)
    notes = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught
                    if issubclass(w.category, UserWarning)})
    return Fitted(estimator, c, trials, metrics, fit_seconds, search_seconds, notes)


@dataclass
class RecipeResult:
    recipe: Recipe
    members: list[MemberRun]
    fitted: Fitted
    head: HeadResult
    out: Path


def member_cache(data: Path, cache_dir: Path | None, member: Member) -> Path:
    """Where `extract` keeps this member's features by default, in `cache_dir` when given."""
    from tlfeat.extraction.run import default_output

    path = default_output(data, member.backbone, member.image_size, member.tta)
    return Path(cache_dir) / path.name if cache_dir is not None else path


def run_recipe(
    data: Path,
    recipe: str = DEFAULT_RECIPE,
    cache_dir: Path | None = None,
    out: Path | None = None,
    seed: int = 0,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    progress: bool = True,
    on_member: Callable[[MemberRun], None] | None = None,
) -> RecipeResult:
    """Extract the recipe's members (reusing caches), fuse, fit logistic regression, save the head, report."""
    from tlfeat.extraction.run import extract

    spec = get_recipe(recipe)
    runs: list[MemberRun] = []
    for member in spec.members:
        cache = member_cache(data, cache_dir, member)
        summary = extract(
            data, out=cache, backbone=member.backbone, image_size=member.image_size, tta=member.tta,
            seed=seed, ratios=ratios, progress=progress,
        )
        run = MemberRun(member, cache, summary.n_computed, summary.n_reused, summary.seconds, summary.images_per_s)
        runs.append(run)
        if on_member is not None:
            on_member(run)
    caches = [run.cache for run in runs]
    features = load_features(caches)
    fitted = select_and_refit(features, spec.c_grid, seed)
    if not fitted.metrics:
        raise TlfeatError(f"{data}: no val or test images to score the recipe on (splits: only train)")
    out = Path(out) if out is not None else caches[0].parent / "heads" / f"recipe-{spec.name}"
    if out.exists() and not out.is_dir():
        raise TlfeatError(f"{out}: exists and is not a folder; `out` needs a folder")
    out.mkdir(parents=True, exist_ok=True)
    refit_rows = features.data.split != "test"  # refitted on train+val: both are rows it has seen
    seen = {"train": features.ids.take(refit_rows)}
    counts = {name: int(n) for name, n in features.split_counts().items()}
    meta = head_metadata(
        HEAD, f"recipe {spec.name}: {spec.description}; StandardScaler + logistic regression, "
        "C chosen on val, refitted on train+val",
        fitted.estimator, features.data.class_names, int(features.data.features.shape[1]), features.sources,
        features.label, {"digest": features.digest, "counts": counts}, {"C": fitted.c}, fitted.trials or None,
        seed, fitted.fit_seconds, fitted.search_seconds,
    )
    head = save_fitted_head(out, fitted.estimator, meta, fitted.metrics, seen, fitted.notes)
    return RecipeResult(spec, runs, fitted, head, out)
