"""The heads that fit on cached embeddings: one record per head holding every fact about it.

Every head is a scikit-learn estimator (fit / predict / predict_proba / score,
`sklearn.base.clone`-able), so fitting, searching and scoring treat them alike.
A record says how to build the head, which hyperparameter `--search` tunes, how
many parameters it learns (for `compare`) and, for the linear heads, the SGD
loss that `fit-head --streaming` uses in its place. Adding a head touches one record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from tlfeat.errors import TlfeatError
from tlfeat.heads.study import HIDDEN_UNITS  # the MLP head has the study head's width

if TYPE_CHECKING:
    import numpy as np
    from sklearn.base import BaseEstimator

SVM_CALIBRATION_FOLDS = 3  # linear-svm: CalibratedClassifierCV(cv=3) keeps one SVM and one sigmoid per fold
DEFAULT_CHUNK_ROWS = 4096  # fit-head --streaming: rows per chunk read from the cache
DEFAULT_PASSES = 10  # fit-head --streaming: passes over the training rows


def _outputs(n_classes: int) -> int:
    """scikit-learn fits one output for two classes (logistic, SVM, MLP)."""
    return n_classes if n_classes > 2 else 1


def linear_params(d: int, c: int) -> int:
    """Learned parameters of one linear map from D features to the classes."""
    return d * _outputs(c) + _outputs(c)


@dataclass(frozen=True)
class HeadSpec:
    """One head: how to build it, which hyperparameter `--search` tunes on the val split, what it learns.

    Parameter counts leave out scaling statistics, as the frozen BatchNorm statistics of a fine-tuned
    base are not counted either.
    """

    name: str
    description: str
    build: Callable[[int], BaseEstimator] = field(repr=False)  # seed -> unfitted estimator
    param: str  # the searched hyperparameter, as a set_params key
    label: str  # its short name in tables and metadata
    grid: tuple[float, ...]  # values tried by --search; ties go to the earlier one
    trainable_params: Callable[[int, int], int | None] = field(repr=False)  # (feature dim, classes) -> learned parameters
    streaming_loss: str | None = None  # SGDClassifier loss of `fit-head --streaming`; None: no streaming form


# The builders import scikit-learn (and the Keras head) when a head is built: the CLI reads this
# registry for its --help, and importing scikit-learn costs seconds.
def _logreg(seed: int) -> BaseEstimator:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, random_state=seed))


def _linear_svm(seed: int) -> BaseEstimator:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    # C=0.001: on standardized 1280-d features liblinear converges ~3x faster than at
    # 0.01 (Scene15: 2.6 s vs 7.3 s) with the same accuracy; --search covers the rest.
    svm = LinearSVC(C=0.001, max_iter=10000, random_state=seed)
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(svm, cv=SVM_CALIBRATION_FOLDS))


def _knn(seed: int) -> BaseEstimator:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    knn = KNeighborsClassifier(n_neighbors=10, weights="distance", metric="cosine", algorithm="brute")
    return make_pipeline(Normalizer(norm="l2"), knn)


def _mlp(seed: int) -> BaseEstimator:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), alpha=1e-4, max_iter=500, random_state=seed)
    return make_pipeline(StandardScaler(), mlp)


def _report(seed: int) -> BaseEstimator:
    from tlfeat.heads.keras_head import KerasReportHead

    return KerasReportHead(seed=seed)


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec(
            name="logreg",
            description="StandardScaler + multinomial logistic regression",
            build=_logreg,
            param="logisticregression__C",
            label="C",
            grid=(0.001, 0.01, 0.1, 1.0, 10.0),
            trainable_params=linear_params,
            streaming_loss="log_loss",
        ),
        HeadSpec(
            name="linear-svm",
            description="StandardScaler + linear SVM, probabilities by 3-fold sigmoid calibration",
            build=_linear_svm,
            param="calibratedclassifiercv__estimator__C",
            label="C",
            # No C=1: liblinear needs ~30x the iterations there (minutes on Scene15) for no gain.
            grid=(0.0001, 0.001, 0.01, 0.1),
            # One SVM and one sigmoid (2 parameters per output) per calibration fold.
            trainable_params=lambda d, c: SVM_CALIBRATION_FOLDS * (linear_params(d, c) + 2 * _outputs(c)),
            # The modified Huber loss: the hinge made smooth, so the streaming head has predict_proba.
            streaming_loss="modified_huber",
        ),
        HeadSpec(
            name="knn",
            description="L2-normalised features, cosine k-nearest neighbours, distance-weighted",
            build=_knn,
            param="kneighborsclassifier__n_neighbors",
            label="k",
            grid=(20, 10, 5, 3, 1),
            trainable_params=lambda d, c: None,  # k-NN learns nothing: n/a
        ),
        HeadSpec(
            name="mlp",
            description="StandardScaler + MLP, one 128-unit ReLU hidden layer (Adam)",
            build=_mlp,
            param="mlpclassifier__alpha",
            label="alpha",
            grid=(1.0, 0.1, 0.01, 0.001, 0.0001),
            trainable_params=lambda d, c: linear_params(d, HIDDEN_UNITS) + linear_params(HIDDEN_UNITS, c),
        ),
        HeadSpec(
            name="report",
            description="the study's Keras head: Dense(128) -> Dropout(0.3) -> softmax, RMSprop",
            build=_report,
            # Not the epoch count: early stopping restores the best epoch, which a longer budget rarely moves.
            param="learning_rate",
            label="lr",
            grid=(0.0003, 0.001, 0.003),
            # The Keras head keeps a C-way softmax even for two classes.
            trainable_params=lambda d, c: d * HIDDEN_UNITS + HIDDEN_UNITS + HIDDEN_UNITS * c + c,
        ),
    )
}
HEAD_NAMES = tuple(HEADS)
STREAMABLE_HEADS = tuple(name for name, spec in HEADS.items() if spec.streaming_loss)  # fit-head --streaming's
STREAMING_SUFFIX = "-streaming"  # a streaming head's name: logreg-streaming, linear-svm-streaming


def get_head(name: str) -> HeadSpec:
    """The record of head `name`."""
    try:
        return HEADS[name]
    except KeyError:
        raise TlfeatError(f"unknown head {name!r}: choose one of {', '.join(HEAD_NAMES)} or all") from None


def head_trainable_params(head: str, feature_dim: int, n_classes: int) -> int | None:
    """Learned parameters of a fitted head on D-dim features and C classes; None where it learns none."""
    if head.endswith(STREAMING_SUFFIX):  # the streaming heads: one SGD linear model
        return linear_params(feature_dim, n_classes)
    if head not in HEADS:  # a head this version does not know (a newer tlfeat's): unknown, not an error
        return None
    return get_head(head).trainable_params(feature_dim, n_classes)


def list_heads() -> list[HeadSpec]:
    """Every head fit-head can fit, in the order `--head all` fits them."""
    return list(HEADS.values())


def uses_validation(estimator: BaseEstimator) -> bool:
    """Does the head choose anything on the validation rows it is given (the report head's early stopping)?"""
    from tlfeat.heads.keras_head import KerasReportHead

    return isinstance(estimator, KerasReportHead)


def fit_estimator(
    estimator: BaseEstimator, X: np.ndarray, y: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None
) -> BaseEstimator:
    """Fit, handing the validation rows to heads that use them (early stopping)."""
    if validation is not None and uses_validation(estimator):
        return estimator.fit(X, y, validation_data=validation)
    return estimator.fit(X, y)
