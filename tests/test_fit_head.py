"""fit-head end to end through the CLI: outputs, search, fusion, and one-line refusals of bad input."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import assert_one_line_error, plant_features, summary_rows, write_synthetic_cache
from tlfeat.errors import Interrupted, TlfeatError
from tlfeat.heads.fit import fit_heads, load_features, resolve_heads
from tlfeat.heads.registry import HEAD_NAMES, HEADS, fit_estimator, get_head
from tlfeat.heads.store import read_metadata

runner = CliRunner()


def fit_head_cli(*args: str | Path) -> object:
    return runner.invoke(app, ["fit-head", *map(str, args)])






@pytest.mark.parametrize("heads", [["--head", "logreg", "--head", "knn"], ["--head", "logreg,knn"]])
def test_several_heads_by_repeating_or_commas_are_all_fitted(tmp_path: Path, heads: list[str]) -> None:
    # Before: a repeated --head kept only the last one, and fitted knn alone without a word.
    cache = write_synthetic_cache(tmp_path / "c.h5")
    result = fit_head_cli(cache, *heads, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert set(summary_rows(tmp_path / "o")) == {"logreg", "knn"}
    assert resolve_heads(["knn", "logreg", "knn"]) == ["knn", "logreg"] and resolve_heads(["knn", "all"]) == list(HEAD_NAMES)
    streaming = fit_head_cli(cache, *heads, "--streaming", "--out", tmp_path / "s")
    assert_one_line_error(streaming, "--streaming fits one head at a time (logreg or linear-svm), not logreg, knn")


def test_a_seed_beyond_32_bits_is_one_error_before_any_work(tmp_path: Path) -> None:
    # Before: every seeded head was "skipped" with scikit-learn's random_state message, and the run exited 0.
    cache = write_synthetic_cache(tmp_path / "c.h5")
    for streaming in ([], ["--streaming"]):
        result = fit_head_cli(cache, "--head", "all", "--seed", 2**32, "--out", tmp_path / "o", *streaming)
        assert_one_line_error(result, "--seed 4294967296", "between 0 and 4294967295")
        assert not (tmp_path / "o").exists()
    assert fit_heads(cache, seed=2**32 - 1, out=tmp_path / "top").results[0].head == "logreg"  # the largest is fine


@pytest.mark.parametrize("name", ["extract", "fit_heads", "finetune", "recipe", "audit", "embedding_map"])
def test_every_seeded_api_function_refuses_a_seed_out_of_range_first(tmp_path: Path, name: str) -> None:
    import tlfeat

    for seed in (-1, 2**32):  # the path does not exist: the seed is checked before anything is read
        with pytest.raises(TlfeatError, match="`seed=.*`: must be between 0 and 4294967295"):
            getattr(tlfeat, name)(tmp_path / "nowhere", seed=seed)


@pytest.mark.slow
def test_fit_all_heads_writes_models_reports_and_a_ranked_table(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "blobs.h5", n_per_class=40, n_classes=3)
    out = tmp_path / "heads"
    result = fit_head_cli(cache, "--head", "all", "--out", out)
    assert result.exit_code == 0, result.output

    rows = summary_rows(out)
    assert list(rows) == sorted(rows, key=lambda h: -float(rows[h]["val acc"]))  # ranked by val accuracy
    assert set(rows) == set(HEAD_NAMES)
    for name, row in rows.items():
        assert float(row["test acc"]) > 0.9, (name, row)
        assert float(row["train macro-F1"]) > 0.9
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| head | params | train acc") and len(table) == 1 + len(HEAD_NAMES)

    for name in HEAD_NAMES:
        meta = read_metadata(out / f"{name}.skops")
        assert meta["classes"] == ["class_0", "class_1", "class_2"]
        source = meta["sources"][0]
        assert source["path"] == str(cache.resolve()) and source["backbone"] == "efficientnet_lite0"
        assert source["weights_source"] == "none" and source["feature_dim"] == 16
        assert meta["params"] == {get_head(name).label: get_head(name).build(0).get_params()[get_head(name).param]}
        assert meta["scores"]["test"]["accuracy"] == pytest.approx(float(rows[name]["test acc"]))
        metrics = json.loads((out / f"{name}.metrics.json").read_text())
        test = metrics["splits"]["test"]
        assert np.array(test["confusion_matrix"]).sum() == test["n"] == 30
        assert set(test["per_class"]["class_1"]) == {"precision", "recall", "f1", "support"}
        assert (out / f"{name}.confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_output_folder_sits_beside_the_cache(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "cache" / "blobs.h5")
    result = fit_head_cli(cache, "--head", "knn")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "heads" / "blobs" / "knn.skops").is_file()


def test_search_picks_the_best_value_on_val_and_records_it(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "blobs.h5", n_per_class=40, n_classes=4, seed=3)
    for name in ("logreg", "knn"):
        result = fit_head_cli(cache, "--head", name, "--search", "--out", tmp_path / "out")
        assert result.exit_code == 0, result.output
        spec = get_head(name)
        meta = read_metadata(tmp_path / "out" / f"{name}.skops")
        trials = meta["search"]
        assert [t[spec.label] for t in trials] == list(spec.grid)
        best = max(t["val_accuracy"] for t in trials)
        first_best = next(t[spec.label] for t in trials if t["val_accuracy"] == best)
        assert meta["params"] == {spec.label: first_best}
        assert meta["scores"]["val"]["accuracy"] == pytest.approx(best)
        assert f"val accuracy by {spec.label}" in result.stdout


@pytest.mark.slow
def test_report_head_reruns_give_the_same_scores(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "blobs.h5")
    runs = [fit_heads([cache], head="report", out=tmp_path / f"run{i}", seed=5) for i in range(2)]
    assert runs[0].results[0].scores == runs[1].results[0].scores
    assert runs[0].results[0].scores["test"]["accuracy"] > 0.9


def _fusion_caches(tmp_path: Path) -> tuple[Path, Path]:
    """Two 'backbones' over the same images: A only tells class 0 apart, B only class 2; rows in different orders."""
    n_per_class, rng = 100, np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n_per_class)
    a = rng.normal(0, 1, (len(labels), 8)) + 4.0 * (labels == 0)[:, None]
    b = rng.normal(0, 1, (len(labels), 6)) + 4.0 * (labels == 2)[:, None]
    first = write_synthetic_cache(tmp_path / "a.h5", n_per_class, features=a.astype(np.float32), backbone="resnet101")
    second = write_synthetic_cache(tmp_path / "b.h5", n_per_class, features=b.astype(np.float32), backbone="vgg16")
    # Rewrite B with its rows reversed: fusion must align by path, not by position.
    with h5py.File(second, "a") as handle:
        for name in ("features", "labels", "paths", "split"):
            handle[name][...] = handle[name][...][::-1]
    return first, second


def test_fusion_aligns_rows_by_path_and_beats_each_cache_alone(tmp_path: Path) -> None:
    a, b = _fusion_caches(tmp_path)
    fused = load_features([a, b])
    assert fused.data.features.shape == (300, 14)
    single = {p.stem: fit_heads([p], head="logreg", out=tmp_path / p.stem).results[0] for p in (a, b)}
    both = fit_heads([a, b], head="logreg", out=tmp_path / "fused").results[0]
    assert max(r.scores["test"]["accuracy"] for r in single.values()) < 0.8
    assert both.scores["test"]["accuracy"] > 0.9
    meta = read_metadata(tmp_path / "fused" / "logreg.skops")
    assert [s["backbone"] for s in meta["sources"]] == ["resnet101", "vgg16"]
    assert meta["feature_dim"] == 14


def test_fusion_refuses_caches_over_other_images_or_classes(tmp_path: Path) -> None:
    base = write_synthetic_cache(tmp_path / "base.h5")
    other_images = write_synthetic_cache(tmp_path / "moved.h5", path_prefix="elsewhere/")
    other_classes = write_synthetic_cache(tmp_path / "classes.h5", class_names=["x", "y", "z"])
    other_split = write_synthetic_cache(tmp_path / "split.h5", shares=(0.25, 0.5, 0.25))
    assert_one_line_error(fit_head_cli(base, other_images), "moved.h5", "other images", "120 only in base.h5")
    assert_one_line_error(fit_head_cli(base, other_classes), "classes.h5", "class list differs")
    assert_one_line_error(fit_head_cli(base, other_split), "split.h5", "splits or labels differ", "--seed")
    assert_one_line_error(fit_head_cli(base, base), "same cache file is given twice")
    other_files = write_synthetic_cache(tmp_path / "lookalike.h5")
    with h5py.File(other_files, "a") as handle:
        handle["file_size"][5] = 4321
    assert_one_line_error(fit_head_cli(base, other_files), "lookalike.h5", "other files (1 differ in size")


def test_class_missing_from_train_is_refused(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "blobs.h5")
    with h5py.File(cache, "a") as handle:
        labels = handle["labels"][...]
        split = handle["split"].asstr()[...]
        split[(labels == 1) & (split == "train")] = "test"
        handle["split"][...] = split
    assert_one_line_error(fit_head_cli(cache), "blobs.h5", "class 'class_1' has no images in the train split")


def test_a_class_without_train_images_is_told_what_to_do_about_it(tmp_path: Path) -> None:
    # Before: "extract with another seed" for a class whose every file was unreadable (no seed helps), and for
    # 35 of 200 classes of 2 images each (no seed gives them all a training image).
    unreadable = write_synthetic_cache(tmp_path / "u.h5", class_names=["a", "b", "c", "broken"])
    assert_one_line_error(fit_head_cli(unreadable), "u.h5", "class 'broken' has no images in this cache",
                          "skipped as unreadable")
    tiny = write_synthetic_cache(tmp_path / "t.h5", n_per_class=2, n_classes=40, shares=(0.5, 0.5, 0.0))
    with h5py.File(tiny, "a") as handle:  # 7 classes drew no training image
        split = handle["split"].asstr()[...]
        split[(handle["labels"][...] < 7) & (split == "train")] = "val"
        handle["split"][...] = split
    result = fit_head_cli(tiny)
    assert_one_line_error(result, "t.h5", "7 classes have no images in the train split", "and 2 more",
                          "give train a larger share")


def test_nan_or_inf_features_are_refused_with_file_and_count(tmp_path: Path) -> None:
    cache = plant_features(write_synthetic_cache(tmp_path / "broken.h5"), ((3, 2), np.nan), ((7, slice(0, 2)), np.inf))
    assert_one_line_error(fit_head_cli(cache), "broken.h5", "3 feature values are NaN or inf, in 2 of 120 rows")


def test_search_without_val_split_is_refused(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "noval.h5", splits=("train", "test"), shares=(0.75, 0.25))
    assert_one_line_error(fit_head_cli(cache, "--search"), "noval.h5", "--search", "val split", "train, test")


@pytest.mark.slow
def test_missing_val_and_test_splits_report_what_exists(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "trainonly.h5", splits=("train",), shares=(1.0,))
    result = fit_head_cli(cache, "--head", "all", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = summary_rows(tmp_path / "out")
    assert set(rows) == set(HEAD_NAMES)
    assert set(next(iter(rows.values()))) == {"head", "params", "train acc", "train macro-F1", "fit s"}
    assert float(rows["logreg"]["train acc"]) > 0.9


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not a readable HDF5 cache"), (b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "not a readable HDF5 cache")],
)
def test_unreadable_cache_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    cache = tmp_path / "garbage.h5"
    cache.write_bytes(content)
    assert_one_line_error(fit_head_cli(cache), "garbage.h5", message)


def test_a_truncated_cache_is_refused_with_hdf5s_reason(tmp_path: Path) -> None:
    # Before: "not a readable HDF5 cache (OSError)", h5py's reason (here: truncated file) dropped.
    cache = write_synthetic_cache(tmp_path / "cut.h5")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    assert_one_line_error(fit_head_cli(cache), "cut.h5", "not a readable HDF5 cache (OSError: ", "truncated file")


def test_a_folder_given_as_a_cache_is_named_as_a_folder(tmp_path: Path) -> None:
    # Before: `fit-head cache/` (the folder, not a file in it) said "cache: not a readable HDF5 cache
    # (IsADirectoryError: [Errno 21] Unable to synchronously open file (file read failed: time = <a date>)",
    # h5py's first line; every cache reader (evaluate, audit, similar, map, export, tlfeat.load) alike.
    import tlfeat

    folder = tmp_path / "cache"
    write_synthetic_cache(folder / "c.h5")
    assert_one_line_error(fit_head_cli(folder), "cache: is a folder, not a cache file")
    with pytest.raises(TlfeatError, match=r"cache: is a folder, not a cache file \(a \.h5 written by extract\)$"):
        tlfeat.load(folder)


def test_search_skips_grid_values_this_data_cannot_fit(tmp_path: Path) -> None:
    # Before: on 12 train rows, `--head knn --search` stopped at the grid's first k (20 > 12 rows) and the
    # whole head was refused ("knn head cannot be fitted: Expected n_neighbors <= n_samples_fit"), though
    # k = 10, 5, 3 and 1 fit; with --head all, knn was listed as skipped.
    cache = write_synthetic_cache(tmp_path / "small.h5", n_per_class=12, n_classes=2, shares=(0.5, 0.25, 0.25))
    result = fit_head_cli(cache, "--head", "knn", "--search", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "val accuracy by k: 20: cannot be fitted, 10: " in result.output
    (knn,) = fit_heads(cache, head="knn", search=True, out=tmp_path / "out").results
    assert knn.params["k"] in (10, 5, 3, 1)
    assert knn.search[0]["val_accuracy"] is None and "n_neighbors" in knn.search[0]["error"]


def test_evaluate_names_the_valid_splits_for_an_unknown_one(tmp_path: Path) -> None:
    # Before: "no 'bogus' rows (splits here: ...)", as if the cache merely lacked a split of that name.
    cache = write_synthetic_cache(tmp_path / "c.h5")
    fit_heads(cache, out=tmp_path / "o")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "o" / "logreg.skops"), str(cache), "--split", "bogus"])
    assert_one_line_error(result, "--split bogus: use train, val or test")


def test_foreign_hdf5_and_missing_cache_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = np.zeros(3)
    assert_one_line_error(fit_head_cli(foreign), "foreign.h5", "not a tlfeat cache")
    assert_one_line_error(fit_head_cli(tmp_path / "absent.h5"), "absent.h5", "not found")


def test_unknown_head_is_refused(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "small.h5")
    assert_one_line_error(fit_head_cli(cache, "--head", "forest"), "unknown head 'forest'")


def test_data_too_small_for_a_head_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_synthetic_cache(tmp_path / "small.h5", n_per_class=8)  # 12 training rows in all
    spec = HEADS["knn"]
    monkeypatch.setitem(
        HEADS, "knn", replace(spec, build=lambda seed: spec.build(seed).set_params(**{spec.param: 20}))
    )
    with pytest.raises(TlfeatError, match="small.h5: knn head cannot be fitted: Expected n_neighbors <= n_samples"):
        fit_heads([cache], head="knn", out=tmp_path / "out")


@pytest.mark.slow
def test_a_head_that_cannot_fit_is_skipped_and_the_others_are_summarised(tmp_path: Path) -> None:
    # 12 classes of 2 training images: linear-svm's 3-fold calibration needs 3 a class.
    cache = write_synthetic_cache(tmp_path / "pairs.h5", n_per_class=4, n_classes=12, dim=8)
    out = tmp_path / "heads"
    result = fit_head_cli(cache, "--head", "all", "--out", out)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stdout.splitlines() if line.startswith("linear-svm") and "skipped" in line]
    assert len(skipped) == 1 and "3-fold cross-validation" in skipped[0]
    assert set(summary_rows(out)) == set(HEAD_NAMES) - {"linear-svm"}
    assert "linear-svm: not fitted:" in (out / "summary.md").read_text()
    assert_one_line_error(fit_head_cli(cache, "--head", "linear-svm", "--out", out), "linear-svm head cannot be fitted")


@pytest.mark.slow
def test_the_report_heads_search_changes_the_model() -> None:
    """Each value a search tries must give another model: the report head's early stopping restored the same
    best epoch whatever the epoch budget, so searching the epoch count chose between identical models."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    noisy = rng.normal(size=(120, 256)).astype(np.float32) + 0.3 * np.tile(labels, 2)[:, None]
    X, y, X_val, y_val = noisy[:60], labels, noisy[60:], labels  # the report head's val loss bottoms out by epoch 3
    spec = HEADS["report"]
    probabilities = []
    for value in spec.grid:
        estimator = spec.build(0).set_params(**{spec.param: value})
        fit_estimator(estimator, X, y, (X_val, y_val))
        probabilities.append(estimator.predict_proba(X_val))
    same = [(a, b) for i, a in enumerate(spec.grid) for j, b in enumerate(spec.grid)
            if i < j and np.allclose(probabilities[i], probabilities[j])]
    assert not same, f"{spec.label} values {same} give the same model"


def test_an_interrupted_fit_of_all_heads_keeps_a_summary_of_those_fitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: Ctrl-C after the first heads kept their files but wrote no summary.md (no ranked table).
    import tlfeat.heads.fit as heads_fit

    cache = write_synthetic_cache(tmp_path / "blobs.h5", n_per_class=10, n_classes=3, dim=8)
    fitted = []
    real_fit = heads_fit._fit_head

    def fit_then_interrupt(name: str, *args: object) -> object:
        if len(fitted) == 2:
            raise KeyboardInterrupt
        fitted.append(name)
        return real_fit(name, *args)

    monkeypatch.setattr(heads_fit, "_fit_head", fit_then_interrupt)
    out = tmp_path / "heads"
    # Before: a bare KeyboardInterrupt from Python; now it says what was kept, as extract and finetune do.
    kept = f"interrupted; the heads fitted before ({', '.join(HEAD_NAMES[:2])}) are kept in {out}, with summary.md"
    with pytest.raises(Interrupted, match=f"^{re.escape(kept)}"):
        fit_heads([cache], head="all", out=out)
    assert set(summary_rows(out)) == set(fitted) == set(HEAD_NAMES[:2])
    text = (out / "summary.md").read_text()
    assert all(f"{name}: not fitted: interrupted" in text for name in HEAD_NAMES[2:])


def test_a_folder_of_heads_on_the_same_images_with_other_features_says_so(tmp_path: Path) -> None:
    # Before: "holds heads fitted on other data ...; 0 val/test rows of b.h5 are rows it was fitted on",
    # when the images were the same and only the features' settings differed.
    a = write_synthetic_cache(tmp_path / "a.h5", n_per_class=10, dim=8)
    b = write_synthetic_cache(tmp_path / "b.h5", n_per_class=10, dim=8, backbone="vgg16")
    fit_heads([a], head="logreg", out=tmp_path / "heads")
    with pytest.raises(TlfeatError, match="holds heads fitted on the same images with other features"):
        fit_heads([b], head="logreg", out=tmp_path / "heads")
    other = write_synthetic_cache(tmp_path / "c.h5", n_per_class=12, dim=8)
    with pytest.raises(TlfeatError, match="holds heads fitted on other data"):
        fit_heads([other], head="logreg", out=tmp_path / "heads")


def test_streaming_options_without_streaming_are_refused(tmp_path: Path) -> None:
    # Before: --chunk-rows and --passes without --streaming were ignored without a word.
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=10, dim=8)
    assert_one_line_error(fit_head_cli(cache, "--chunk-rows", "10", "--out", tmp_path / "h"),
                          "error: --chunk-rows 10: applies with --streaming only")  # before: named --passes too
    with pytest.raises(TlfeatError, match="^`passes=3`: applies with `streaming` only$"):
        fit_heads(cache, passes=3, out=tmp_path / "h")


def test_ctrl_c_in_the_keras_head_stops_it_after_a_batch_and_keeps_the_heads_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a KeyboardInterrupt raised wherever Python was: inside TensorFlow's graph tracing it became an
    # AssertionError traceback, inside a JAX garbage-collection callback it was ignored and the run went on.
    import os
    import signal

    from tlfeat.heads import keras_head

    stopper = type(keras_head.stop_when_asked_callback())
    batches: list[int] = []

    class CtrlCAtTheSecondBatch(stopper):  # type: ignore[misc, valid-type]
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            batches.append(batch)
            if len(batches) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            super().on_train_batch_end(batch, logs)

    monkeypatch.setattr(keras_head, "stop_when_asked_callback", CtrlCAtTheSecondBatch)
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=60)
    with pytest.raises(KeyboardInterrupt):
        fit_heads([cache], head=["logreg", "report", "knn"], out=tmp_path / "heads")
    assert len(batches) == 2  # stopped after the batch it was pressed in, not at the end of training
    assert (tmp_path / "heads" / "logreg.skops").is_file() and not (tmp_path / "heads" / "report.skops").exists()
    summary = (tmp_path / "heads" / "summary.md").read_text()
    assert "report" in summary and "knn" in summary and "interrupted" in summary
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back


def test_class_names_the_font_lacks_draw_without_warnings(tmp_path: Path) -> None:
    # Before: each head's confusion plot of CJK or 200-character class names printed three matplotlib
    # UserWarning blocks (glyph missing, tight layout not applied); plot_confusion bypassed save_png's filter.
    import warnings

    from tlfeat.reports import plot_confusion

    names = ["日本", "café", "x" * 200]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_confusion(np.array([[2, 1, 0], [0, 3, 0], [1, 0, 2]]), names, "title", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
