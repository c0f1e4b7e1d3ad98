"""Heads as scikit-learn estimators: accuracy, reproducibility, pickling, persistence checks.

Shared helpers (`gaussian_blobs`, `write_synthetic_cache`) live in conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

from conftest import gaussian_blobs, live_train_graphs, training_accuracy_under_jax
from tlfeat.backbones import build_model, get_backbone
from tlfeat.errors import TlfeatError
from tlfeat.heads.keras_head import KerasReportHead
from tlfeat.heads.registry import HEAD_NAMES, get_head
from tlfeat.heads.store import load_head, save_head


@pytest.fixture(scope="module")
def blobs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train / val / test draws of the same four overlapping-but-separable classes."""
    rng_seeds = {"train": 1, "val": 2, "test": 3}
    data = {}
    for split, offset in rng_seeds.items():
        X, y = gaussian_blobs(n_per_class=30, n_classes=4, dim=24, seed=0, spread=1.0)
        noise = np.random.default_rng(offset).normal(0, 1.0, X.shape).astype(np.float32)
        data[split] = (X + noise, y)
    return data


@pytest.fixture(scope="module")
def fitted(blobs: dict) -> dict:
    X, y = blobs["train"]
    models = {}
    for name in HEAD_NAMES:
        estimator = get_head(name).build(0)
        if name == "report":
            estimator.fit(X, y, validation_data=blobs["val"])
        else:
            estimator.fit(X, y)
        models[name] = estimator
    return models


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.slow
def test_every_head_is_accurate_on_separable_data(name: str, fitted: dict, blobs: dict) -> None:
    estimator = fitted[name]
    X_test, y_test = blobs["test"]
    assert estimator.score(X_test, y_test) > 0.9
    proba = estimator.predict_proba(X_test)
    assert proba.shape == (len(y_test), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(estimator.predict(X_test), estimator.classes_[proba.argmax(axis=1)])


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_file_round_trip_predicts_identically(name: str, fitted: dict, blobs: dict, tmp_path: Path) -> None:
    X_test, _ = blobs["test"]
    save_head(fitted[name], tmp_path / "head.skops", {"head": name, "classes": list("abcd"), "feature_dim": 24}, {})
    loaded, _ = load_head(tmp_path / "head.skops")
    np.testing.assert_array_equal(loaded.predict(X_test), fitted[name].predict(X_test))
    np.testing.assert_allclose(loaded.predict_proba(X_test), fitted[name].predict_proba(X_test), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_heads_clone_with_their_search_parameter(name: str) -> None:
    spec = get_head(name)
    estimator = clone(spec.build(3)).set_params(**{spec.param: spec.grid[0]})
    assert estimator.get_params()[spec.param] == spec.grid[0]


@pytest.mark.slow
def test_report_head_reproduces_itself_with_the_same_seed(blobs: dict) -> None:
    X, y = blobs["train"]
    X_test, _ = blobs["test"]
    runs = [KerasReportHead(seed=7, epochs=8).fit(X, y, validation_data=blobs["val"]) for _ in range(2)]
    np.testing.assert_allclose(runs[0].predict_proba(X_test), runs[1].predict_proba(X_test), rtol=0, atol=1e-6)
    assert runs[0].history_ == runs[1].history_
    other = KerasReportHead(seed=8, epochs=8).fit(X, y, validation_data=blobs["val"])
    assert not np.allclose(other.predict_proba(X_test), runs[0].predict_proba(X_test))


def test_fitting_the_report_head_leaves_the_callers_random_streams_alone(blobs: dict) -> None:
    # Before: fit reseeded Python's `random` and np.random globally (keras.utils.set_random_seed), so a notebook's
    # own draws after it repeated the head's seed's sequence.
    import random

    import keras  # noqa: F401  (importing TensorFlow itself draws from np.random)

    X, y = blobs["train"]
    random.seed(11)
    np.random.seed(11)
    expected = (random.Random(11).random(), np.random.RandomState(11).rand())
    KerasReportHead(seed=0, epochs=1).fit(X, y, validation_data=blobs["val"])
    build_model(get_backbone("vgg16"), "none", 32)  # random weights are seeded the same way
    assert (random.random(), np.random.rand()) == expected


@pytest.mark.slow
def test_report_head_learns_unscaled_features_under_jax_as_under_tensorflow() -> None:
    # Before: the loss was taken from the softmax's probabilities, which JAX's (and torch's) Keras clips at
    # 1e-7 where TensorFlow's recovers the logits: features of a large scale put a class below the clip at
    # the start, it got no gradient, and the head stayed at 0.6 training accuracy on these separable blobs.
    accuracy = training_accuracy_under_jax(
        "from tlfeat.heads.keras_head import KerasReportHead\n"
        "predicted = KerasReportHead(seed=0, epochs=5).fit(30 * X, y).predict(30 * X)"
    )
    assert accuracy >= 0.95


def test_report_head_fits_leave_no_train_graph_behind(blobs: dict) -> None:
    # Before: every fit left its two traced train steps (full and last, partial batch) alive in TensorFlow's
    # process-wide gradient registry, so each head fitted in a grid search or cross-validation grew the process.
    X, y = blobs["train"]
    KerasReportHead(epochs=1).fit(X, y, validation_data=blobs["val"])  # graphs traced once per process
    before = live_train_graphs()
    for seed in range(3):
        KerasReportHead(seed=seed, epochs=1).fit(X, y, validation_data=blobs["val"])
    assert live_train_graphs() <= before


def test_report_head_trains_the_same_inside_a_distribution_strategy(blobs: dict) -> None:
    # Without a strategy the head's optimizer skips Keras' sum of gradients over replicas; inside one it keeps it.
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute is TensorFlow's")
    import tensorflow as tf

    X, y = blobs["train"]
    plain = KerasReportHead(seed=4, epochs=2).fit(X, y, validation_data=blobs["val"])
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        distributed = KerasReportHead(seed=4, epochs=2).fit(X, y, validation_data=blobs["val"])
    np.testing.assert_allclose(distributed.history_["loss"], plain.history_["loss"], rtol=1e-6)


def test_report_head_early_stopping_keeps_the_best_epoch(blobs: dict) -> None:
    X, y = blobs["train"]
    head = KerasReportHead(epochs=60, patience=3).fit(X, y, validation_data=blobs["val"])
    val_loss = head.history_["val_loss"]
    assert head.epochs_run_ == len(val_loss) and head.epochs_run_ < 60
    assert head.best_epoch_ == int(np.argmin(val_loss)) + 1
    # The restored weights are the best epoch's: their val loss is the minimum recorded.
    X_val, y_val = blobs["val"]
    proba = head.predict_proba(X_val)
    loss = -np.mean(np.log(proba[np.arange(len(y_val)), np.searchsorted(head.classes_, y_val)]))
    assert loss == pytest.approx(min(val_loss), rel=1e-3)


def test_report_head_carves_its_own_validation_rows(blobs: dict) -> None:
    X, y = blobs["train"]
    head = KerasReportHead(epochs=4, validation_fraction=0.25).fit(X, y)
    assert "val_loss" in head.history_
    assert head.score(*blobs["test"]) > 0.9


def test_report_head_keeps_string_labels(blobs: dict) -> None:
    X, y = blobs["train"]
    names = np.array(["ant", "bee", "cat", "dog"])[y]
    head = KerasReportHead(epochs=3).fit(X, names)
    assert set(head.predict(blobs["test"][0])) <= set(names)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"epochs": 0}, r"'epochs' parameter of KerasReportHead must be an int in the range \[1, inf\)"),
        ({"batch_size": -1}, r"'batch_size' parameter"),
        ({"hidden_units": 0}, r"'hidden_units' parameter"),
        ({"dropout": 1.0}, r"'dropout' parameter of KerasReportHead must be a float in the range \[0.0, 1.0\)"),
        ({"learning_rate": -1}, r"'learning_rate' parameter"),
        ({"validation_fraction": 2.0}, r"'validation_fraction' parameter"),
        ({"seed": -1}, r"'seed' parameter"),
        ({"epochs": "3"}, r"'epochs' parameter of KerasReportHead must be an int"),
        ({"verbose": "loud"}, r"'verbose' parameter .* or a str among \{'auto'\}"),  # Keras' fit takes "auto"
    ],
)
def test_report_head_refuses_bad_parameters_when_fitted(params: dict, message: str, blobs: dict) -> None:
    # Before any work, in scikit-learn's words: these failed deep inside Keras (epochs=0 as KeyError 'val_loss')
    # or, validation_fraction=2.0, were accepted.
    with pytest.raises(ValueError, match=message):
        KerasReportHead(**params).fit(*blobs["train"])


def test_report_head_refuses_validation_rows_of_other_features(blobs: dict) -> None:
    X, y = blobs["train"]
    X_val, y_val = blobs["val"]
    with pytest.raises(ValueError, match="X has 23 features, but KerasReportHead is expecting 24"):
        KerasReportHead(epochs=1).fit(X, y, validation_data=(X_val[:, :-1], y_val))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        KerasReportHead(epochs=1).fit(X, y, validation_data=(X_val, y_val[:-1]))


def test_report_head_that_fails_to_refit_is_not_fitted(blobs: dict) -> None:
    from sklearn.exceptions import NotFittedError

    X, y = blobs["train"]
    head = KerasReportHead(epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        head.fit(X, np.zeros_like(y))
    # Not the first fit's 4-way model read through the failed fit's one class (an IndexError, or wrong labels).
    with pytest.raises(NotFittedError):
        head.predict(X)
    assert set(head.fit(X, y).predict(X)) <= set(y)  # and a refit on good data fits again


def test_report_head_takes_numpy_numbers_as_parameters(blobs: dict) -> None:
    # What GridSearchCV hands over from a grid of np.arange or np.float32 values. Before: Keras refused
    # hidden_units=np.int64(64) ("expected a positive integer"), np.float32 learning rates and np.uint32 seeds.
    X, y = blobs["train"]
    head = KerasReportHead(hidden_units=np.int64(16), learning_rate=np.float32(1e-3), seed=np.uint32(5),
                           dropout=np.float32(0.2), batch_size=np.int64(16), epochs=np.int64(1), patience=np.int32(1))
    assert set(head.fit(X, y, validation_data=blobs["val"]).predict(X)) <= set(y)
    assert len(head.history_["loss"]) == 1


def test_save_and_load_head_checks_the_model_against_its_metadata(fitted: dict, blobs: dict, tmp_path: Path) -> None:
    model = tmp_path / "logreg.skops"
    save_head(fitted["logreg"], model, {"head": "logreg", "classes": ["a", "b", "c", "d"], "feature_dim": 24}, {})
    loaded, loaded_meta = load_head(model)
    assert loaded_meta["classes"] == ["a", "b", "c", "d"] and loaded_meta["format_version"] == 2
    np.testing.assert_array_equal(loaded.predict(blobs["test"][0]), fitted["logreg"].predict(blobs["test"][0]))

    save_head(fitted["knn"], model, {"head": "knn", "classes": ["a", "b", "c"], "feature_dim": 24}, {})
    with pytest.raises(TlfeatError, match=r"model \(4 classes, 24 features\) does not match its metadata \(3 classes"):
        load_head(model)


def test_unknown_head_is_a_user_error() -> None:
    with pytest.raises(TlfeatError, match="unknown head 'svm'"):
        get_head("svm")


@pytest.mark.slow
def test_report_head_passes_scikit_learn_estimator_checks() -> None:
    from sklearn.utils.estimator_checks import check_estimator

    # Skipped inside: the pandas and array-API checks, when those packages are missing.
    check_estimator(KerasReportHead(epochs=1))
