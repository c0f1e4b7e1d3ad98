"""Shared fixtures: generated image folders, the Scene15 location, an isolated TLFEAT_HOME."""

from __future__ import annotations

import csv
import gc
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest
from PIL import Image

from tlfeat.cache import CacheKey
from tlfeat.cache_writer import write_cache
from tlfeat.heads.keras_head import KerasReportHead

REPO = Path(__file__).resolve().parents[1]
# The shared data folder beside the repository, or where TLFEAT_SCENE15 says (a clone elsewhere).
SCENE15 = Path(os.environ.get("TLFEAT_SCENE15") or REPO / ".." / "shared" / "data" / "scene15").resolve()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Converted weights go to one folder per test session, never the user's ~/.cache. Set at
# import, before any session- or module-scoped fixture can build a model; child
# processes inherit it.
os.environ["TLFEAT_HOME"] = tempfile.mkdtemp(prefix="tlfeat-test-home-")


def child_env() -> dict[str, str]:
    """The environment of a tlfeat child process: quiet TensorFlow, and this checkout's tlfeat whether
    installed or not (a child script may live in a temp folder; the editable install may point elsewhere)."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}


def training_accuracy_under_jax(lines: str) -> float:
    """Run `lines` (Python, with `X, y = gaussian_blobs(100, 5, 192, 1)` and keras imported before them; they
    leave the predicted labels in `predicted`) under KERAS_BACKEND=jax in a child process: the accuracy."""
    pytest.importorskip("jax")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import keras, numpy as np; "
              "from conftest import gaussian_blobs; X, y = gaussian_blobs(100, 5, 192, 1)\n" + lines
              + "\nprint(keras.backend.backend(), (predicted == y).mean())")
    result = subprocess.run([sys.executable, "-c", script, str(REPO / "tests")], capture_output=True, text=True,
                            timeout=300, env={**child_env(), "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr
    backend, accuracy = result.stdout.split()[-2:]
    assert backend == "jax", result.stdout
    return float(accuracy)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a child process, output captured as text."""
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env())


def extract_run_counts(stdout: str) -> tuple[int, int, int, int]:
    """(attempted, embedded, skipped, reused) from the summary line `extract` prints."""
    match = re.search(r"this run: (\d+) attempted \((\d+) embedded, (\d+) skipped\), (\d+) reused", stdout)
    assert match, stdout
    return tuple(int(n) for n in match.groups())  # type: ignore[return-value]


def make_image(path: Path, class_index: int, variant: int, size: tuple[int, int] = (48, 40)) -> None:
    """A small RGB picture whose colour and stripes depend on the class, texture on the variant."""
    rng = np.random.default_rng(1000 * class_index + variant)
    height, width = size[1], size[0]
    base = np.array([(class_index * 97) % 256, (class_index * 57 + 80) % 256, (class_index * 31 + 160) % 256])
    pixels = np.tile(base, (height, width, 1)).astype(np.float32)
    pixels[:, :: 2 + class_index % 4] *= 0.5
    pixels += rng.normal(0, 12, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


# A split seed under which every class of make_dataset's sets (4 or 8 images a class) draws train and val
# images. The split is per image, so small classes vary with the seed: under seed 0, class_1 of 8 images
# draws no train image, and training on it is refused.
TRAINABLE_SEED = 5


def make_dataset(root: Path, n_classes: int = 3, per_class: int = 8, ext: str = "png") -> Path:
    for c in range(n_classes):
        for v in range(per_class):
            make_image(root / f"class_{c}" / f"img_{v:03d}.{ext}", c, v)
    return root



@pytest.fixture(autouse=True)
def pythons_own_ctrl_c_handler() -> Iterator[None]:
    """Each test starts with Python's own SIGINT handler. tlfeat defers Ctrl-C only over that one (another
    program's handler is left alone, by design), and Python keeps SIGINT ignored when it starts with it
    ignored, as a background job of a script or under nohup: there the Ctrl-C tests saw no interrupt (the
    full suite run as `(pytest &)` failed 3 of them). The handler found is named in a warning and replaced."""
    handler = signal.getsignal(signal.SIGINT)
    if handler is not signal.default_int_handler:
        warnings.warn(f"SIGINT handler {handler!r} at the start of a test; Python's own is restored")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield

@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def scene15() -> Path:
    if not (SCENE15 / "train").is_dir():
        pytest.skip(f"Scene15 not found at {SCENE15} (the shared data folder beside the repo; TLFEAT_SCENE15 sets another)")
    return SCENE15


@pytest.fixture(scope="session")
def scene15_subset(scene15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small flat dataset of 12 real Scene15 images, copied to a temp folder (shared data stays untouched)."""
    root = tmp_path_factory.mktemp("scene15-subset")
    for class_dir in sorted((scene15 / "train").iterdir())[:3]:
        for image in sorted(class_dir.iterdir())[:4]:
            (root / class_dir.name).mkdir(exist_ok=True)
            (root / class_dir.name / image.name).write_bytes(image.read_bytes())
    return root


# --- helpers shared by several test files ------------------------------------------------


def gaussian_blobs(
    n_per_class: int = 40, n_classes: int = 3, dim: int = 16, seed: int = 0, spread: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Classes as gaussian clouds around well-separated random centres (non-negative, like pooled CNN features)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 6, size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + rng.normal(0, spread, size=(len(labels), dim))
    return np.abs(features).astype(np.float32), labels


def plant_features(cache: Path, *values: tuple[tuple, float]) -> Path:
    """Overwrite feature values in a written cache, as damage or another program would (tlfeat refuses to
    write NaN or inf rows itself). `values`: (h5py index, value) pairs, e.g. ((7, slice(0, 2)), np.inf)."""
    with h5py.File(cache, "r+") as handle:
        for index, value in values:
            handle["features"][index] = value
    return cache


def write_synthetic_cache(
    path: Path,
    n_per_class: int = 40,
    n_classes: int = 3,
    dim: int = 16,
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "val", "test"),
    shares: tuple[float, ...] = (0.5, 0.25, 0.25),
    backbone: str = "efficientnet_lite0",
    features: np.ndarray | None = None,
    class_names: list[str] | None = None,
    path_prefix: str = "",
    dataset_root: str = "/synthetic",
) -> Path:
    """A tlfeat cache of gaussian blobs; row paths look like '<class>/img_<i>.png'."""
    blob_features, labels = gaussian_blobs(n_per_class, n_classes, dim, seed)
    features = blob_features if features is None else features
    class_names = class_names or [f"class_{c}" for c in range(n_classes)]
    split = []
    for _ in range(n_classes):
        counts = [int(round(s * n_per_class)) for s in shares]
        counts[0] += n_per_class - sum(counts)
        split += [name for name, count in zip(splits, counts) for _ in range(count)]
    paths = [f"{path_prefix}{class_names[label]}/img_{i:04d}.png" for i, label in enumerate(labels)]
    write_cache(
        path,
        CacheKey(backbone=backbone, weights="none", input_size=32, preprocessing="synthetic"),
        features=features, labels=labels, paths=paths, split=split,
        file_size=[100] * len(labels), file_mtime_ns=[0] * len(labels),
        class_names=class_names, skipped=[],
        extra_attrs={"weights_source": "none", "dataset_root": dataset_root, "seed": seed},
    )
    return path


def live_train_graphs() -> int:
    """TensorFlow's traced-function graphs alive after a collection: a train step kept by TensorFlow's
    process-wide gradient registry stays among them (`tlfeat.heads.keras_head.rmsprop`). Under another Keras
    backend the test is skipped: only TensorFlow's registry kept them."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the train graphs were kept by TensorFlow's gradient registry")
    from tensorflow.python.framework.func_graph import FuncGraph

    gc.collect()
    return sum(isinstance(o, FuncGraph) for o in gc.get_objects())


def assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def summary_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as handle:
        return {row["head"]: row for row in csv.DictReader(handle)}


def fitted_parameters(estimator: object) -> int | None:
    """Learned numbers in a fitted head, counted from its arrays (None for k-NN, which learns none)."""
    if isinstance(estimator, KerasReportHead):
        return sum(w.size for w in estimator._weights)
    final = estimator.steps[-1][1]
    if hasattr(final, "calibrated_classifiers_"):
        return sum(
            c.estimator.coef_.size + c.estimator.intercept_.size
            + sum(np.size(cal.a_) + np.size(cal.b_) for cal in c.calibrators)
            for c in final.calibrated_classifiers_
        )
    if hasattr(final, "coefs_"):
        return sum(a.size for a in final.coefs_ + final.intercepts_)
    if hasattr(final, "coef_"):
        return final.coef_.size + final.intercept_.size
    return None
