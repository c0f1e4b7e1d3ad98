"""The study's head (Dense 128 -> Dropout 0.3 -> softmax), built in one place for fit-head and fine-tuning.

`KerasReportHead` wraps it as a scikit-learn estimator over cached features;
`tlfeat.finetuning` puts the same layers on top of a backbone. Keras is imported
only inside functions, so the scikit-learn heads never pay its import time.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.model_selection import train_test_split
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_consistent_length, check_is_fitted, column_or_1d, validate_data

from tlfeat.errors import MAX_SEED
from tlfeat.heads.study import DROPOUT, HIDDEN_UNITS
from tlfeat.interrupts import raise_if_requested, stop_requested
from tlfeat.seeding import seeded


def study_head(features: Any, n_classes: int, hidden_units: int = HIDDEN_UNITS, dropout: float = DROPOUT,
               name: str | None = None, logits: bool = False) -> Any:
    """The study's head on a Keras tensor of features: Dense(hidden, no activation) -> Dropout -> softmax.

    No activation on the hidden layer: that is the study's head, kept as published. The softmax layer
    computes in float32 even under mixed precision: bfloat16 probabilities are too coarse for the loss.
    `name` prefixes the layer names (fine-tune runs load checkpoints by them). `logits=True` leaves the
    softmax out (the same weights), for a loss computed from logits.
    """
    import keras

    def layer_name(part: str) -> str | None:
        return f"{name}_{part}" if name else None

    hidden = keras.layers.Dense(hidden_units, name=layer_name("dense"))(features)
    hidden = keras.layers.Dropout(dropout, name=layer_name("dropout"))(hidden)
    return keras.layers.Dense(n_classes, activation=None if logits else "softmax", dtype="float32",
                              name="predictions" if name else None)(hidden)


def stop_when_asked_callback() -> Any:
    """A Keras callback that ends training after the batch during which Ctrl-C asked to stop
    (`tlfeat.interrupts`); the head's fit then raises KeyboardInterrupt."""
    import keras

    class StopWhenAsked(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if stop_requested():
                self.model.stop_training = True

    return StopWhenAsked()


def rmsprop(learning_rate: float) -> Any:
    """RMSprop for the study's head and fine-tuning; under TensorFlow, without Keras' sum of the gradients over
    replicas when no `tf.distribute` strategy is in use.

    Keras' TensorFlow optimizer sums the gradients over replicas even under the default strategy's single
    one, and TensorFlow builds that sum with `tf.custom_gradient`, which registers a gradient function in a
    process-wide registry at every trace and never removes it. That function holds the traced train step:
    each head fitted left its two train graphs behind (about 6 MB on 1280 features, so a grid search grew
    without bound: bench/keras_head_memory.py), each fine-tune run its stages' graphs of the whole backbone
    (tensorflow/tensorflow#80895, keras-team/tf-keras#286). `keras.backend.clear_session()` does not free
    them, and would break the models other code holds. The sum is replaced on this optimizer alone, not on
    its class: a model saved with it records a plain RMSprop, which loads anywhere.
    """
    import keras

    optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate)
    skip_single_replica_sum(optimizer)
    return optimizer


def skip_single_replica_sum(optimizer: Any) -> None:
    """Make a Keras optimizer skip its sum of gradients over replicas outside a strategy (`rmsprop`): a sum over
    one replica is its own gradients. Only TensorFlow's optimizers have the sum; others are left as they are."""
    import keras

    # A Keras without the method has changed how it sums: nothing left to skip.
    if keras.backend.backend() != "tensorflow" or not hasattr(optimizer, "_all_reduce_sum_gradients"):
        return
    import tensorflow as tf

    keras_sum = optimizer._all_reduce_sum_gradients

    def sum_over_replicas(grads_and_vars: Any) -> Any:
        if tf.distribute.has_strategy():  # several replicas may need it: Keras' own sum
            return keras_sum(grads_and_vars)
        return list(grads_and_vars)

    optimizer._all_reduce_sum_gradients = sum_over_replicas


class KerasReportHead(ClassifierMixin, BaseEstimator):
    """The study's head: Dense(128, no activation) -> Dropout(0.3) -> Dense(C, softmax).

    Trained with RMSprop and categorical cross-entropy; early stopping on
    validation loss restores the best epoch's weights. Validation rows come from
    ``fit(..., validation_data=(X_val, y_val))`` or, without them, a stratified
    `validation_fraction` of the training rows. The same `seed` gives the same
    model (``keras.utils.set_random_seed`` seeds initialisation, dropout and
    shuffling; the caller's `random` and `np.random` streams are left as they were).

    Pickles as numpy weights plus configuration, never as a Keras object, so a
    head fitted under one Keras backend loads under another; the Keras model is
    rebuilt on first use after unpickling.
    """

    # Checked by `fit` (scikit-learn's `_fit_context`), before any work: a bad value failed deep inside Keras
    # (`epochs=0` as a KeyError 'val_loss', `batch_size=-1` as a tensor shape error) or was silently accepted.
    _parameter_constraints: dict = {
        "hidden_units": [Interval(Integral, 1, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],  # Keras' Dropout refuses a rate of 1
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "seed": [Interval(Integral, 0, MAX_SEED, closed="both")],
        "verbose": ["verbose", StrOptions({"auto"})],  # as Keras' fit takes it
    }

    def __init__(
        self,
        hidden_units: int = HIDDEN_UNITS,
        dropout: float = DROPOUT,
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

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(
        self, X: Any, y: Any, validation_data: tuple[Any, Any] | None = None
    ) -> "KerasReportHead":
        # A fit that fails (one class in y, Ctrl-C) leaves no model: the previous fit's would go on answering
        # with its own classes and features while classes_ and n_features_in_ describe the new data.
        self._model = self._weights = None
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"KerasReportHead needs at least 2 classes in y, got 1 class ({self.classes_[0].item()!r})"
            )
        # The parameters reach Keras as Python numbers (here and in `_build`): it refuses NumPy ones, which
        # pass validation as Integral or Real and are what a grid of np.arange or np.float32 values holds.
        with seeded(int(self.seed)):
            import keras  # its first import draws from the caller's streams: inside `seeded`, which keeps them

            X_fit, y_fit, X_val, y_val = self._validation_rows(X, y_index, validation_data)
            model = self._build(X.shape[1], len(self.classes_))
            model.compile(
                optimizer=rmsprop(float(self.learning_rate)),
                # From logits: on softmax outputs only TensorFlow's Keras recovers the logits; JAX and torch
                # clip the probabilities at 1e-7, so a class the start scores that low got no gradient and
                # the head stayed stuck at chance on it (0.2-0.8 training accuracy on separable features).
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            callbacks, validation = [stop_when_asked_callback()], None
            if X_val is not None:
                validation = (X_val, self._one_hot(y_val))
                callbacks.append(keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=int(self.patience), restore_best_weights=True
                ))
            history = model.fit(
                X_fit, self._one_hot(y_fit), batch_size=int(self.batch_size), epochs=int(self.epochs),
                validation_data=validation, callbacks=callbacks, shuffle=True, verbose=self.verbose,
            )
        raise_if_requested()  # a head stopped short by Ctrl-C is no fitted head
        self.history_ = {k: [float(v) for v in values] for k, values in history.history.items()}
        self.epochs_run_ = len(history.epoch)
        # EarlyStopping keeps the first epoch with the lowest val_loss; argmin agrees.
        self.best_epoch_ = (
            int(np.argmin(self.history_["val_loss"])) + 1 if X_val is not None else self.epochs_run_
        )
        self._model = model
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        import keras

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        model = self._keras_model()
        # Calling the model eagerly, not model.predict: predict traces a new graph function per
        # model and input shape, which is slower than the math for a head this small.
        chunks = [
            keras.ops.convert_to_numpy(keras.ops.softmax(model(X[start : start + 4096], training=False)))
            for start in range(0, len(X), 4096)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)), dtype=np.float32)

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ is touched
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_is_fitted__(self) -> bool:
        """Fitted once a fit has finished: attributes set on the way (classes_) do not make a model."""
        return getattr(self, "_model", None) is not None or getattr(self, "_weights", None) is not None

    def _validation_rows(
        self, X: np.ndarray, y_index: np.ndarray, validation_data: tuple[Any, Any] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(X_fit, y_fit, X_val, y_val) with labels as indices into classes_; val is None when there is none."""
        if validation_data is not None:
            X_val, y_val = validation_data
            X_val = validate_data(self, X_val, reset=False, dtype=np.float32)  # the training rows' features
            y_val = column_or_1d(y_val)
            check_consistent_length(X_val, y_val)
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
        return keras.Model(inputs, study_head(inputs, n_classes, int(self.hidden_units), float(self.dropout),
                                              logits=True))

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

