"""No score is inflated silently: rows a head was fitted on never count in its val or test score.

A re-split cache, a cache of another folder sharing some images, copies under other
names: evaluate leaves the head's training rows out and says how many; fit-head does
the same for copies inside one cache, and refuses a folder of heads fitted on other data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from cli import app
from conftest import assert_one_line_error, gaussian_blobs
from tlfeat.cache import CacheKey
from tlfeat.cache_writer import write_cache
from tlfeat.heads.fit import fit_heads

runner = CliRunner()
CLASSES = ["class_0", "class_1", "class_2"]


def write_rows(path: Path, features: np.ndarray, labels: np.ndarray, paths: list[str], split: list[str],
               root: str = "/data/blobs", seed: int = 0) -> Path:
    """A cache of exactly these rows (file sizes derived from the path, so equal paths mean equal files)."""
    write_cache(
        path, CacheKey(backbone="efficientnet_lite0", weights="none", input_size=32, preprocessing="synthetic"),
        features=features, labels=labels, paths=paths, split=split,
        file_size=[1000 + sum(map(ord, p)) for p in paths], file_mtime_ns=[0] * len(paths),
        class_names=CLASSES, skipped=[],
        extra_attrs={"weights_source": "none", "dataset_root": root, "seed": seed},
    )
    return path


def noisy_dataset(n_per_class: int = 40) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Overlapping classes: k-NN remembers its training rows (train accuracy 1.0) and scores far less on new ones."""
    features, labels = gaussian_blobs(n_per_class, 3, dim=8, seed=0, spread=3.0)
    paths = [f"{CLASSES[label]}/img_{i:04d}.png" for i, label in enumerate(labels)]
    return features, labels, paths


def split_of(labels: np.ndarray, seed: int) -> list[str]:
    """Half train, a quarter val, a quarter test per class, drawn with `seed`."""
    split = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = len(rows)
        split[rows[: n // 2]], split[rows[n // 2 : 3 * n // 4]], split[rows[3 * n // 4 :]] = "train", "val", "test"
    return list(split)


def scored_rows(output: str) -> dict[str, tuple[int, float]]:
    """split -> (images, accuracy) from evaluate's table."""
    cells = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ") and "split" not in line]
    return {c[0].strip(): (int(c[1]), float(c[2])) for c in cells}


def test_evaluate_on_a_re_split_cache_leaves_the_training_rows_out(tmp_path: Path) -> None:
    features, labels, paths = noisy_dataset()
    first_split = split_of(labels, seed=0)
    original = write_rows(tmp_path / "seed0.h5", features, labels, paths, first_split)
    resplit = write_rows(tmp_path / "seed5.h5", features, labels, paths, split_of(labels, seed=5), seed=5)
    head = fit_heads([original], head="knn", out=tmp_path / "heads")
    model = head.results[0].files["model"]
    honest_val = head.results[0].scores["val"]["accuracy"]
    assert head.results[0].scores["train"]["accuracy"] == 1.0 > honest_val + 0.1  # it remembers its rows

    result = runner.invoke(app, ["evaluate", str(model), str(resplit)])
    assert result.exit_code == 0, result.output
    trained = {p for p, s in zip(paths, first_split) if s == "train"}
    new_split = split_of(labels, seed=5)
    unseen = {s: sum(1 for p, t in zip(paths, new_split) if t == s and p not in trained) for s in ("val", "test")}
    scores = scored_rows(result.stdout)
    assert scores["val"][0] == unseen["val"] < new_split.count("val")
    assert scores["test"][0] == unseen["test"] < new_split.count("test")
    assert scores["train"][0] == new_split.count("train")  # the train score is a training score anyway
    left = new_split.count("val") - unseen["val"]
    assert f"note: val: {left} of {new_split.count('val')} rows are rows {model.name} was fitted on" in result.stderr
    assert scores["val"][1] < 0.9  # no longer inflated towards the remembered 1.0


def test_evaluate_finds_shared_images_by_path_and_renamed_copies_by_features(tmp_path: Path) -> None:
    features, labels, paths = noisy_dataset()
    split = split_of(labels, seed=0)
    original = write_rows(tmp_path / "blobs.h5", features, labels, paths, split)
    model = fit_heads([original], head="knn", out=tmp_path / "heads").results[0].files["model"]
    train_rows = [i for i, s in enumerate(split) if s == "train"]

    # Another folder ("a new labelled set") that shares 10 training images, plus 12 new ones, all in test.
    rng = np.random.default_rng(1)
    new_features, new_labels = gaussian_blobs(4, 3, dim=8, seed=9, spread=3.0)
    shared = train_rows[:10]
    subset = write_rows(
        tmp_path / "subset.h5", np.concatenate([features[shared], new_features]),
        np.concatenate([labels[shared], new_labels]),
        [paths[i] for i in shared] + [f"{CLASSES[c]}/new_{i}.png" for i, c in enumerate(new_labels)],
        ["test"] * 22, root="/data/new-set",
    )
    result = runner.invoke(app, ["evaluate", str(model), str(subset)])
    assert result.exit_code == 0, result.output
    assert scored_rows(result.stdout)["test"][0] == 12
    assert "test: 10 of 22 rows are rows" in result.stderr

    # The same 10 images renamed: found by their features.
    renamed = write_rows(
        tmp_path / "renamed.h5", np.concatenate([features[shared], new_features + rng.normal(0, 0.01, new_features.shape)]),
        np.concatenate([labels[shared], new_labels]),
        [f"renamed/{i}.png" for i in range(10)] + [f"{CLASSES[c]}/new_{i}.png" for i, c in enumerate(new_labels)],
        ["test"] * 22, root="/data/renamed",
    )
    result = runner.invoke(app, ["evaluate", str(model), str(renamed)])
    assert result.exit_code == 0, result.output
    assert scored_rows(result.stdout)["test"][0] == 12

    # Nothing unseen to score in the asked split: an error, not a score of the training rows.
    only_seen = write_rows(tmp_path / "only.h5", features[shared], labels[shared], [paths[i] for i in shared],
                           ["test"] * 10, root="/data/copy")
    assert_one_line_error(runner.invoke(app, ["evaluate", str(model), str(only_seen)]), "nothing left to score")


def test_fit_head_leaves_copies_of_training_rows_out_of_its_scores(tmp_path: Path) -> None:
    features, labels, paths = noisy_dataset()
    split = split_of(labels, seed=0)
    copied = [i for i, s in enumerate(split) if s == "train"][:6]
    cache = write_rows(
        tmp_path / "dupes.h5", np.concatenate([features, features[copied]]), np.concatenate([labels, labels[copied]]),
        paths + [f"{paths[i].split('/')[0]}/copy_{i}.png" for i in copied], split + ["test"] * len(copied),
    )
    result = runner.invoke(app, ["fit-head", str(cache), "--head", "knn", "--out", str(tmp_path / "heads")])
    assert result.exit_code == 0, result.output
    fitted = fit_heads([cache], head="knn", out=tmp_path / "again").results[0]
    assert fitted.scores["test"]["n"] == split.count("test")  # the 6 copies are not scored
    assert f"test: {len(copied)} rows left out of the score" in " ".join(fitted.notes)
    assert f"test: {len(copied)} rows left out of the score" in result.stdout
    # knn selects nothing on val: "fitted on" (before: "fitted or selected on"); a search selects on val
    assert fitted.notes[0].endswith("copies of rows this head was fitted on")
    searched = fit_heads([cache], head="knn", search=True, out=tmp_path / "searched").results[0]
    assert searched.notes[0].endswith("copies of rows this head was fitted or selected on")


def test_fit_head_refuses_a_folder_of_heads_fitted_on_another_split(tmp_path: Path) -> None:
    features, labels, paths = noisy_dataset()
    original = write_rows(tmp_path / "seed0.h5", features, labels, paths, split_of(labels, seed=0))
    resplit = write_rows(tmp_path / "seed5.h5", features, labels, paths, split_of(labels, seed=5), seed=5)
    out = tmp_path / "heads"
    assert runner.invoke(app, ["fit-head", str(original), "--head", "knn", "--out", str(out)]).exit_code == 0
    before = (out / "summary.md").read_text()
    result = runner.invoke(app, ["fit-head", str(resplit), "--head", "logreg", "--out", str(out)])
    assert_one_line_error(result, str(out), "fitted on other data", "val/test rows of seed5.h5", "another --out")
    assert (out / "summary.md").read_text() == before and not any(out.glob("logreg*"))
    # The same data again (a re-extraction gives the same rows): welcome.
    assert runner.invoke(app, ["fit-head", str(original), "--head", "logreg", "--out", str(out)]).exit_code == 0
