"""fit-head --streaming: SGD over chunks of a cache, close to the in-memory fit, memory bounded by the chunk."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.linear_model import SGDClassifier
from typer.testing import CliRunner

from cli import app
from conftest import assert_one_line_error, fitted_parameters, gaussian_blobs, plant_features, write_synthetic_cache
from tlfeat.cache import load
from tlfeat.errors import TlfeatError
from tlfeat.apps.compare import head_trainable_params
from tlfeat.heads.fit import fit_heads
from tlfeat.heads.store import load_head, read_metadata
from tlfeat.heads.streaming import fit_streaming

runner = CliRunner()


@pytest.mark.parametrize("head", ["logreg", "linear-svm"])
def test_streaming_fit_over_many_chunks_is_close_to_the_in_memory_fit(tmp_path: Path, head: str) -> None:
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=300, n_classes=4, dim=32, seed=3)
    in_memory = fit_heads([cache], head=head, out=tmp_path / "memory").results[0].scores
    streamed = fit_streaming(cache, head=head, out=tmp_path / "stream", chunk_rows=40, passes=5).results[0]
    assert streamed.head == f"{head}-streaming" and streamed.params["chunk_rows"] == 40
    assert streamed.scores["test"]["n"] == in_memory["test"]["n"] == 300
    assert streamed.scores["test"]["accuracy"] >= in_memory["test"]["accuracy"] - 0.03
    assert streamed.scores["test"]["accuracy"] > 0.9  # and both are well above chance (0.25)


def test_small_chunks_mix_the_classes_of_a_class_sorted_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a chunk was consecutive train rows, and a cache stores its rows class by class, so each SGD step
    # saw one class and the fit followed the last classes seen: 16-row chunks scored 0.56 here, one chunk 0.65.
    features, _ = gaussian_blobs(400, 4, 8, seed=1, spread=3.0)
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=400, n_classes=4, dim=8, seed=1, features=features)
    seen_classes = []
    partial_fit = SGDClassifier.partial_fit

    def recording(self: SGDClassifier, x: np.ndarray, y: np.ndarray, **kwargs: object) -> SGDClassifier:
        seen_classes.append(len(np.unique(y)))
        return partial_fit(self, x, y, **kwargs)

    monkeypatch.setattr(SGDClassifier, "partial_fit", recording)
    small = fit_streaming(cache, out=tmp_path / "small", chunk_rows=16, passes=5).results[0].scores["test"]
    assert np.median(seen_classes) == 4  # before: 1
    one_chunk = fit_streaming(cache, out=tmp_path / "one", chunk_rows=10_000, passes=5).results[0].scores["test"]
    assert abs(small["accuracy"] - one_chunk["accuracy"]) < 0.04


@pytest.mark.slow
def test_streaming_memory_stays_near_the_chunk_not_the_cache(tmp_path: Path) -> None:
    rows, dim = 16000, 512
    cache = write_synthetic_cache(tmp_path / "big.h5", n_per_class=rows // 4, n_classes=4, dim=dim)
    matrix_mb = rows * dim * 4 / 2**20  # 31 MB of float32 features

    tracemalloc.start()
    load(cache)
    whole = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    # One-time costs (imports of the plotting stack, font caches) are not memory that grows with the data.
    fit_streaming(write_synthetic_cache(tmp_path / "warm-up.h5"), out=tmp_path / "warm-up", chunk_rows=256)
    tracemalloc.start()
    fit_streaming(cache, out=tmp_path / "stream", chunk_rows=256, passes=2)
    streamed = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    assert whole >= matrix_mb  # control: loading the cache holds the whole matrix
    assert streamed < matrix_mb / 3, f"streaming peaked at {streamed:.1f} MB, the features are {matrix_mb:.1f} MB"


def test_streaming_head_is_saved_like_any_other_and_evaluate_agrees(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=60, n_classes=3, dim=16)
    out = tmp_path / "heads"
    result = runner.invoke(app, ["fit-head", str(cache), "--head", "linear-svm", "--streaming", "--chunk-rows", "16",
                                 "--passes", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "linear-svm-streaming" in result.stdout and (out / "summary.md").is_file()
    model = out / "linear-svm-streaming.skops"
    recorded = read_metadata(model)["scores"]
    scored = runner.invoke(app, ["evaluate", str(model), str(cache), "--json", str(tmp_path / "e.json")])
    assert scored.exit_code == 0, scored.output
    for split, metrics in json.loads((tmp_path / "e.json").read_text())["splits"].items():
        assert metrics["accuracy"] == pytest.approx(recorded[split]["accuracy"])
    estimator, _ = load_head(model)  # compare's parameter count is the fitted model's
    assert head_trainable_params("linear-svm-streaming", 16, 3) == fitted_parameters(estimator) == 16 * 3 + 3


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--head", "knn"], ["--streaming fits logreg or linear-svm", "'knn'"]),
        (["--search"], ["--streaming fits one cache, without --search"]),
        (["--chunk-rows", "0"], ["--chunk-rows 0", "at least 1"]),
    ],
)
def test_streaming_refuses_what_it_cannot_do(tmp_path: Path, extra: list[str], fragments: list[str]) -> None:
    cache = write_synthetic_cache(tmp_path / "c.h5")
    result = runner.invoke(app, ["fit-head", str(cache), "--streaming", "--out", str(tmp_path / "o"), *extra])
    assert_one_line_error(result, *fragments)


def test_streaming_refuses_two_caches_and_nan_features(tmp_path: Path) -> None:
    first = write_synthetic_cache(tmp_path / "a.h5")
    second = write_synthetic_cache(tmp_path / "b.h5", backbone="vgg16")
    assert_one_line_error(
        runner.invoke(app, ["fit-head", str(first), str(second), "--streaming"]), "--streaming fits one cache"
    )
    broken = plant_features(write_synthetic_cache(tmp_path / "nan.h5"), ((5, 3), np.nan))
    out = tmp_path / "heads"
    assert_one_line_error(runner.invoke(app, ["fit-head", str(broken), "--streaming", "--out", str(out)]), "nan.h5",
                          "NaN or inf")
    assert not out.exists()  # before: refused after creating an empty --out folder


@pytest.mark.parametrize("streaming", [False, True])
def test_streaming_checks_its_data_and_output_as_fit_head_does(tmp_path: Path, streaming: bool) -> None:
    # Before: --streaming wrote its head files inside the dataset folder, where the next scan takes them for a
    # class, and skipped fit-head's checks of duplicate paths and its advice on a class without train rows.
    dataset = tmp_path / "ds"
    dataset.mkdir()
    cache = write_synthetic_cache(tmp_path / "c.h5", dataset_root=str(dataset))
    with pytest.raises(TlfeatError, match="inside the dataset folder"):
        fit_heads(cache, out=dataset / "heads", streaming=streaming)
    assert list(dataset.iterdir()) == []
    no_train = write_synthetic_cache(tmp_path / "n.h5", splits=("val", "train", "test"), shares=(1.0, 0.0, 0.0))
    with pytest.raises(TlfeatError, match="no train split rows"):
        fit_heads(no_train, out=tmp_path / "o", streaming=streaming)
    twice = write_synthetic_cache(tmp_path / "t.h5")
    with h5py.File(twice, "r+") as handle:
        handle["paths"][1] = handle["paths"][0]
    with pytest.raises(TlfeatError, match="the same image path occurs in several rows"):
        fit_heads(twice, out=tmp_path / "o", streaming=streaming)
