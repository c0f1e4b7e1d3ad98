"""Classification heads on cached embeddings, and how a fitted head is stored.

Every head is a scikit-learn estimator (fit / predict / predict_proba / score,
`sklearn.base.clone`-able), so fitting, searching and scoring treat them alike.
The study's Keras head is wrapped as `KerasReportHead`; Keras is imported only
inside its methods, so the scikit-learn heads never pay Keras' import time.

A fitted head is stored as ``<head>.joblib`` with ``<head>.json`` beside it. The
JSON records the sha256 of the joblib file, and `load_head` checks it before
unpickling: unpickling runs code, so a file that changed since fit-head wrote it
is refused rather than loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from tlfeat.errors import TlfeatError
from tlfeat.fileio import atomic_write_bytes, check_format, describe_exception, read_json_object, sha256_file

MODEL_FORMAT = "tlfeat-head"
MODEL_FORMAT_VERSION = 1


class KerasReportHead(ClassifierMixin, BaseEstimator):
    """The study's head: Dense(128, no activation) -> Dropout(0.3) -> Dense(C, softmax).

    Trained with RMSprop and categorical cross-entropy; early stopping on
    validation loss restores the best epoch's weights. Validation rows come from
    ``fit(..., validation_data=(X_val, y_val))`` or, without them, a stratified
    `validation_fraction` of the training rows. The same `seed` gives the same
    model (``keras.utils.set_random_seed`` seeds initialisation, dropout and
    shuffling).

    Pickles as numpy weights plus configuration, never as a Keras object, so a
    head fitted under one Keras backend loads under another; the Keras model is
    rebuilt on first use after unpickling.
    """

    def __init__(
        self,
        hidden_units: int = 128,
        dropout: float = 0.3,
        learning_rate: float = 1e-3,
        batch_size: int = 32,
        epochs: int = 20,
        patience: int = 5,
        validation_fraction: float = 0.1,
        seed: int = 0,
        verbose: int = 0,
    ) -> None:
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.verbose = verbose

    def fit(
        self, X: Any, y: Any, validation_data: tuple[Any, Any] | None = None
    ) -> "KerasReportHead":
        import keras

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"KerasReportHead needs at least 2 classes in y, got 1 class ({self.classes_[0]!r})")
        keras.utils.set_random_seed(self.seed)
        X_fit, y_fit, X_val, y_val = self._validation_rows(X, y_index, validation_data)

        model = self._build(X.shape[1], len(self.classes_))
        model.compile(
            optimizer=keras.optimizers.RMSprop(learning_rate=self.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
        callbacks, validation = [], None
        if X_val is not None:
            validation = (X_val, self._one_hot(y_val))
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=self.patience, restore_best_weights=True
                )
            )
        history = model.fit(
            X_fit, self._one_hot(y_fit), batch_size=self.batch_size, epochs=self.epochs,
            validation_data=validation, callbacks=callbacks, shuffle=True, verbose=self.verbose,
        )
        self.history_ = {k: [float(v) for v in values] for k, values in history.history.items()}
        self.epochs_run_ = len(history.epoch)
        # EarlyStopping keeps the first epoch with the lowest val_loss; argmin agrees.
        self.best_epoch_ = (
            int(np.argmin(self.history_["val_loss"])) + 1 if X_val is not None else self.epochs_run_
        )
        self._model = model
        self._weights = None  # those of an earlier (unpickled) fit, now stale
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        import keras

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        model = self._keras_model()
        # Calling the model eagerly, not model.predict: predict traces a new graph function per
        # model and input shape, which is slower than the math for a head this small.
        chunks = [
            keras.ops.convert_to_numpy(model(X[start : start + 4096], training=False))
            for start in range(0, len(X), 4096)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)), dtype=np.float32)

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ is touched
        return self.classes_[np.argmax(proba, axis=1)]

    def _validation_rows(
        self, X: np.ndarray, y_index: np.ndarray, validation_data: tuple[Any, Any] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(X_fit, y_fit, X_val, y_val) with labels as indices into classes_; val is None when there is none."""
        if validation_data is not None:
            X_val = np.asarray(validation_data[0], dtype=np.float32)
            y_val = np.asarray(validation_data[1])
            # Rows of a class never seen in training cannot be scored by a softmax over classes_.
            known = np.isin(y_val, self.classes_)
            if not known.any():
                return X, y_index, None, None
            return X, y_index, X_val[known], np.searchsorted(self.classes_, y_val[known])
        n_val = int(round(self.validation_fraction * len(X)))
        if n_val < len(self.classes_) or len(X) - n_val < len(self.classes_):
            return X, y_index, None, None
        counts = np.bincount(y_index)
        X_fit, X_val, y_fit, y_val = train_test_split(
            X, y_index, test_size=n_val, random_state=self.seed,
            stratify=y_index if counts.min() >= 2 else None,
        )
        return X_fit, y_fit, X_val, y_val

    def _one_hot(self, y_index: np.ndarray) -> np.ndarray:
        return np.eye(len(self.classes_), dtype=np.float32)[y_index]

    def _build(self, n_features: int, n_classes: int) -> Any:
        import keras

        inputs = keras.Input((n_features,))
        # No activation on the hidden layer: that is the study's head, kept as published.
        hidden = keras.layers.Dense(self.hidden_units)(inputs)
        hidden = keras.layers.Dropout(self.dropout)(hidden)
        outputs = keras.layers.Dense(n_classes, activation="softmax")(hidden)
        return keras.Model(inputs, outputs)

    def _keras_model(self) -> Any:
        if getattr(self, "_model", None) is None:
            model = self._build(self.n_features_in_, len(self.classes_))
            model.set_weights(self._weights)
            self._model = model
        return self._model

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        model = state.pop("_model", None)
        if model is not None:
            state["_weights"] = [np.asarray(w) for w in model.get_weights()]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._model = None


@dataclass(frozen=True)
class HeadSpec:
    """One head: how to build it and which hyperparameter `--search` tunes on the val split."""

    name: str
    description: str
    build: Callable[[int], BaseEstimator]  # seed -> unfitted estimator
    param: str  # the searched hyperparameter, as a set_params key
    label: str  # its short name in tables and metadata
    grid: tuple[float, ...]  # values tried by --search; ties go to the earlier one


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec(
            name="logreg",
            description="StandardScaler + multinomial logistic regression",
            build=lambda seed: make_pipeline(
                StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, random_state=seed)
            ),
            param="logisticregression__C",
            label="C",
            grid=(0.001, 0.01, 0.1, 1.0, 10.0),
        ),
        HeadSpec(
            name="linear-svm",
            description="StandardScaler + linear SVM, probabilities by 3-fold sigmoid calibration",
            build=lambda seed: make_pipeline(
                StandardScaler(),
                # C=0.001: on standardized 1280-d features liblinear converges ~3x faster than at
                # 0.01 (Scene15: 2.6 s vs 7.3 s) with the same accuracy; --search covers the rest.
                CalibratedClassifierCV(LinearSVC(C=0.001, max_iter=10000, random_state=seed), cv=3),
            ),
            param="calibratedclassifiercv__estimator__C",
            label="C",
            # No C=1: liblinear needs ~30x the iterations there (minutes on Scene15) for no gain.
            grid=(0.0001, 0.001, 0.01, 0.1),
        ),
        HeadSpec(
            name="knn",
            description="L2-normalised features, cosine k-nearest neighbours, distance-weighted",
            build=lambda seed: make_pipeline(
                Normalizer(norm="l2"),
                KNeighborsClassifier(n_neighbors=10, weights="distance", metric="cosine", algorithm="brute"),
            ),
            param="kneighborsclassifier__n_neighbors",
            label="k",
            grid=(20, 10, 5, 3, 1),
        ),
        HeadSpec(
            name="mlp",
            description="StandardScaler + MLP, one 128-unit ReLU hidden layer (Adam)",
            build=lambda seed: make_pipeline(
                StandardScaler(),
                MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-4, max_iter=500, random_state=seed),
            ),
            param="mlpclassifier__alpha",
            label="alpha",
            grid=(1.0, 0.1, 0.01, 0.001, 0.0001),
        ),
        HeadSpec(
            name="report",
            description="the study's Keras head: Dense(128) -> Dropout(0.3) -> softmax, RMSprop",
            build=lambda seed: KerasReportHead(seed=seed),
            param="epochs",
            label="epochs",
            grid=(5, 10, 20, 40),
        ),
    )
}
HEAD_NAMES = tuple(HEADS)


def get_head(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise TlfeatError(f"unknown head {name!r}: choose one of {', '.join(HEAD_NAMES)} or all") from None


def fit_estimator(
    estimator: BaseEstimator, X: np.ndarray, y: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None
) -> BaseEstimator:
    """Fit, handing the validation rows to heads that use them (early stopping)."""
    if validation is not None and isinstance(estimator, KerasReportHead):
        return estimator.fit(X, y, validation_data=validation)
    return estimator.fit(X, y)


def metadata_path(model_path: Path) -> Path:
    """``<head>.joblib`` -> ``<head>.json``."""
    return Path(model_path).with_suffix(".json")


def save_head(estimator: BaseEstimator, model_path: Path, metadata: dict) -> dict:
    """Write the joblib file and its metadata JSON (with the file's sha256), each atomically.

    Returns the metadata as written.
    """
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    payload = buffer.getvalue()
    written = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_file": Path(model_path).name,
        "model_sha256": hashlib.sha256(payload).hexdigest(),
        **metadata,
    }
    atomic_write_bytes(Path(model_path), payload)
    # The JSON goes last: until it is replaced, the old JSON's sha256 refuses the new joblib.
    atomic_write_bytes(metadata_path(model_path), (json.dumps(written, indent=2) + "\n").encode())
    return written


def read_metadata(model_path: Path) -> dict:
    """The metadata JSON beside a model file, checked to be tlfeat's."""
    model_path = Path(model_path)
    meta_path = metadata_path(model_path)
    if not model_path.is_file():
        raise TlfeatError(f"{model_path}: model file not found")
    if model_path.suffix != ".joblib":
        raise TlfeatError(f"{model_path}: not a tlfeat head (expected a .joblib written by fit-head)")
    if not meta_path.is_file():
        raise TlfeatError(
            f"{model_path}: no metadata {meta_path.name} beside it; only heads written by fit-head are loaded"
        )
    meta = read_json_object(meta_path)
    check_format(meta_path, meta, MODEL_FORMAT, MODEL_FORMAT_VERSION, "tlfeat head metadata", "refit the head")
    return meta


def load_head(model_path: Path) -> tuple[BaseEstimator, dict]:
    """Load a head written by `save_head`, after checking its sha256 against the metadata.

    Security: a joblib file is a pickle, and unpickling runs whatever code the
    file names. The sha256 check only proves the file is the one fit-head wrote
    next to this metadata; it cannot vouch for a model+metadata pair from
    someone else. Load only heads you made or whose author you trust.
    """
    model_path = Path(model_path)
    meta = read_metadata(model_path)
    if sha256_file(model_path) != meta.get("model_sha256"):
        raise TlfeatError(f"{model_path}: model file changed since it was written; refusing to unpickle")
    try:
        estimator = joblib.load(model_path)
    except Exception as exc:  # any unpickling failure (missing class, version skew) is the file's problem
        raise TlfeatError(f"{model_path}: cannot load the head ({describe_exception(exc)})") from None
    if not (hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_")):
        raise TlfeatError(f"{model_path}: holds a {type(estimator).__name__}, not a fitted classifier")
    return estimator, meta

