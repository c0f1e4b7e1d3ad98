"""`map`: a 2-D picture of the embeddings, coloured by class, with a head's wrong test predictions marked.

Methods: "tsne" (scikit-learn t-SNE on the first 50 principal components of the
L2-normalised features, the default), "pca" (scikit-learn, the first two
principal components) and "umap" (umap-learn, optional extra; cosine metric).
Above `max_points` rows a random sample of that many rows is drawn (seeded), as
t-SNE and UMAP take minutes per hundred thousand points.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlfeat.analysis.common import StoredFeatures, normalise, open_cache, optional_import, output_folder
from tlfeat.cache import CacheData
from tlfeat.errors import TlfeatError, integer, parameter_error, seed_value
from tlfeat.fileio import path_value
from tlfeat.reports import save_png, write_csv

METHODS = ("tsne", "pca", "umap")
LABELS = {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}
# Fewer points fail deep inside the library: t-SNE's perplexity has no room, UMAP's spectral start needs k < N.
MIN_POINTS = {"tsne": 4, "umap": 4, "pca": 2}
MAX_POINTS = 20_000
TSNE_PCA_DIMS = 50  # the usual reduction before t-SNE: faster, and drops noise dimensions


@dataclass
class EmbeddingMap:
    rows: np.ndarray = field(repr=False)  # (m,) cache rows shown, increasing
    coords: np.ndarray = field(repr=False)  # (m, 2)
    method: str
    predicted: np.ndarray | None = field(default=None, repr=False)  # (m,) the head's predicted label for test rows, -1 elsewhere
    notes: list[str] = field(default_factory=list)

    def wrong(self, labels: np.ndarray) -> np.ndarray:
        """(m,) True for the test rows the head gets wrong (all False without a head)."""
        if self.predicted is None:
            return np.zeros(len(self.rows), dtype=bool)
        return (self.predicted >= 0) & (self.predicted != labels[self.rows])


def project(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of the L2-normalised rows of `features` by `method`."""
    if method not in METHODS:
        raise parameter_error("method", method, f"use one of {', '.join(METHODS)}")
    from sklearn.decomposition import PCA

    unit = normalise(features)
    n = len(unit)
    if n < MIN_POINTS[method]:
        raise TlfeatError(f"{LABELS[method]} cannot map {n} images (it needs at least {MIN_POINTS[method]}); "
                          "use `method='pca'`")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(unit)
    if method == "umap":
        umap = optional_import("umap", "umap-learn")
        with warnings.catch_warnings():  # "n_jobs value 1 overridden to 1 by setting random_state": it is seeded
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine",
                             random_state=seed).fit_transform(unit)
    from sklearn.manifold import TSNE

    dims = min(TSNE_PCA_DIMS, n, unit.shape[1])
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(unit) if dims < unit.shape[1] else unit
    # Perplexity must stay below the number of points; 30 is scikit-learn's default.
    return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(reduced)


def compute_map(
    data: CacheData, features: StoredFeatures, method: str = "tsne", seed: int = 0, max_points: int = MAX_POINTS,
    predicted: np.ndarray | None = None,
) -> EmbeddingMap:
    """2-D coordinates of (a seeded sample of at most `max_points` of) the cache's rows.

    `data` and `features` as `tlfeat.analysis.common.open_cache` gives them; only
    the rows mapped are read. `predicted`: a head's predicted label per cache row
    (see `head_test_predictions`).
    """
    notes = []
    rows = np.arange(len(data))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(data), size=max_points, replace=False))
        notes.append(f"a random sample of {max_points} of the {len(data)} images is shown (`max_points`)")
    coords = np.asarray(project(features.rows(rows), method, seed), dtype=np.float64)
    return EmbeddingMap(rows, coords, method, None if predicted is None else predicted[rows], notes)


def head_test_predictions(
    model: Path, cache: Path, data: CacheData, trust: bool = False
) -> tuple[np.ndarray, str | None]:
    """A fit-head model's predicted label for each test row of the cache, -1 for other rows, and a note.

    The model is checked against the cache (backbone, weights, classes, ...) as `evaluate` checks it,
    which reads the whole cache into memory; `trust` as for `tlfeat.heads.store.load_head`. Test rows
    the head was fitted or selected on (copies of its training images) are left out, as `evaluate`
    leaves them out of its score, so the count of wrong images is the one evaluate gives.
    """
    from tlfeat.apps.evaluate import checked_head
    from tlfeat.heads.rows import RowIds
    from tlfeat.heads.store import read_fitted_rows

    loaded, estimator, _ = checked_head(model, [cache], split="test", trust=trust)
    if not np.array_equal(loaded.data.paths, data.paths):
        raise TlfeatError(f"{cache}: changed while it was being read; run again")
    recorded = read_fitted_rows(model)
    test = loaded.unseen("test", RowIds.from_arrays(recorded) if recorded is not None else {})
    predicted = np.full(len(data), -1, dtype=np.int64)
    predicted[test] = estimator.predict(loaded.data.features[test])
    left_out = int(np.sum(data.split == "test")) - int(test.sum())
    note = (f"test: {left_out} rows are rows {Path(model).name} was fitted or selected on: not marked, as "
            "evaluate leaves them out of its score") if left_out else None
    return predicted, note


def plot_map(data: CacheData, result: EmbeddingMap, title: str, out: Path) -> None:
    """Scatter of the map coloured by class (legend up to 20 classes), wrong test predictions as black crosses."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    labels = data.labels[result.rows]
    n_classes = len(data.class_names)
    if n_classes <= 20:  # tab20's ten dark hues first, then their light twins: neighbours never share a hue
        tab = colormaps["tab20"]
        palette = [tab(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    else:
        palette = [colormaps["turbo"](i / max(1, n_classes - 1)) for i in range(n_classes)]
    fig = Figure(figsize=(10, 7.5))
    ax = fig.add_subplot()
    size = float(np.clip(20_000 / max(1, len(labels)), 1, 12))
    for c in np.unique(labels):
        mask = labels == c
        ax.scatter(*result.coords[mask].T, s=size, color=palette[c], label=data.class_names[c],
                   linewidths=0, alpha=0.8)
    wrong = result.wrong(data.labels)
    if result.predicted is not None:
        tested = int(np.sum(result.predicted >= 0))
        ax.scatter(*result.coords[wrong].T, s=max(12.0, 2 * size), marker="x", color="black", linewidths=0.8,
                   label=f"test image the head gets wrong ({int(wrong.sum())} of {tested})")
    if n_classes <= 20 or result.predicted is not None:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=max(1.0, 6 / size))
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    save_png(fig, out, dpi=110)


def write_map_csv(path: Path, data: CacheData, result: EmbeddingMap) -> None:
    headers = ["path", "split", "label", "x", "y"]
    rows = [[data.paths[r], data.split[r], data.class_names[data.labels[r]], round(float(x), 5), round(float(y), 5)]
            for r, (x, y) in zip(result.rows, result.coords)]
    if result.predicted is not None:
        headers += ["predicted", "wrong"]
        wrong = result.wrong(data.labels)
        for row, p, w in zip(rows, result.predicted, wrong):
            row += [data.class_names[p] if p >= 0 else None, bool(w) if p >= 0 else None]
    write_csv(path, headers, rows)


@dataclass
class MapResult:
    """A 2-D map of a cache: `map` (coordinates per row), the rows it shows (`data`), and the
    picture (`png`) and coordinates (`csv`) written."""

    map: EmbeddingMap = field(repr=False)  # coordinates and the cache's rows: pages in a notebook
    data: CacheData = field(repr=False)
    png: Path
    csv: Path


def embedding_map(
    cache: str | Path, method: str = "tsne", out: str | Path | None = None, head: str | Path | None = None,
    seed: int = 0, max_points: int = MAX_POINTS, trust: bool = False,
) -> MapResult:
    """Map a cache in 2-D; write ``map-<method>.png`` and ``map-<method>.csv`` to `out`.

    method: "tsne", "umap" or "pca". seed: of the projection and of the sample. max_points: above it, a
    random sample of that many rows is drawn (said in `notes`). Default out: ``<cache folder>/map/<cache stem>/``. With `head` (a fit-head model
    fitted on this cache's features), the test images it gets wrong are marked;
    `trust` loads a head holding types tlfeat does not trust (`tlfeat.heads.store.load_head`).
    """
    cache = path_value("cache", cache)
    out = None if out is None else path_value("out", out)
    head = None if head is None else path_value("head", head)
    if method not in METHODS:
        raise parameter_error("method", method, f"use one of {', '.join(METHODS)}")
    max_points, seed = integer("max_points", max_points, 2), seed_value(seed)
    with open_cache(cache) as (data, features):
        folder = output_folder(cache, out, "map", data)
        predicted, note = head_test_predictions(head, cache, data, trust) if head is not None else (None, None)
        result = compute_map(data, features, method, seed, max_points, predicted)
        result.notes += [note] if note else []
    folder.mkdir(parents=True, exist_ok=True)
    png, csv = folder / f"map-{method}.png", folder / f"map-{method}.csv"
    title = f"{cache.name}: {LABELS[method]} of {len(result.rows)} images" + (f", head {Path(head).name}" if head else "")
    plot_map(data, result, title, png)
    write_map_csv(csv, data, result)
    return MapResult(result, data, png, csv)
