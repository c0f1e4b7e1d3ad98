"""How a fitted head is stored: one file, ``<head>.skops``, that loads without running code from it.

The file is a skops archive (a zip): the estimator as a schema of known types plus
numpy arrays, never a pickle. skops rebuilds only types it trusts (scikit-learn's
estimators, numpy, builtins) and lists the others instead of importing them; tlfeat
adds the few types its own heads are made of (`TLFEAT_TYPES`). Anything else in a
file is refused by name unless the caller passes `trust`.

More members sit in the same zip: ``tlfeat-head.json`` (classes, caches,
settings, scores, per-split metrics), ``tlfeat-rows.npz`` (which rows the
head was fitted and selected on, `tlfeat.heads.rows`) and ``tlfeat-test.npz``
(the head's prediction for each test image it scored, `tlfeat.reports.ImageOutcomes`,
which compare pairs with another model's; heads fitted before it have none). Everything predict and
evaluate rely on is therefore one file, written by one atomic rename and checked
by the zip's CRC-32 on every read: no side file can drift from the model, and a
kill leaves the old head or the new one. The CRC detects damage, not editing:
nothing signs a head, so its recorded scores are the writer's word. `skops.io.load` opens the file as it is.

Heads written by tlfeat 0.1 (``<head>.joblib`` plus ``<head>.json``) are pickles:
they load only with `trust`, else the error says to refit them.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from tlfeat.errors import TlfeatError
from tlfeat.fileio import atomic_write_bytes, check_format, describe_exception, path_value, read_json_object, sha256_file
from tlfeat.reports import ImageOutcomes

MODEL_FORMAT = "tlfeat-head"
MODEL_FORMAT_VERSION = 2
HEAD_SUFFIX = ".skops"
META_MEMBER = "tlfeat-head.json"
ROWS_MEMBER = "tlfeat-rows.npz"
TEST_MEMBER = "tlfeat-test.npz"
LEGACY_SUFFIX = ".joblib"  # tlfeat 0.1: a pickle, with <head>.json beside it
LEGACY_FORMAT_VERSION = 1

# Types tlfeat's heads are built from that skops does not trust by default (checked by the tests
# against every head in the registry). Loading one runs only its class's __setstate__.
TLFEAT_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "tlfeat.heads.keras_head.KerasReportHead",
)


def head_path(out: Path, name: str) -> Path:
    """Where fit-head keeps head `name` in folder `out`."""
    return Path(out) / f"{name}{HEAD_SUFFIX}"


def save_head(
    estimator: BaseEstimator, model_path: Path, metadata: dict, rows: dict[str, np.ndarray],
    test: ImageOutcomes | None = None,
) -> dict:
    """Write the head file in one atomic step: the skops estimator, `metadata`, the row identities and the
    outcome on each test image scored.

    Returns the metadata as written.
    """
    import skops.io as sio

    written = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **metadata}
    buffer = io.BytesIO(sio.dumps(estimator))
    rows_buffer = io.BytesIO()
    np.savez(rows_buffer, **rows)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr(META_MEMBER, json.dumps(written, indent=2) + "\n")
        archive.writestr(ROWS_MEMBER, rows_buffer.getvalue())
        if test is not None:
            archive.writestr(TEST_MEMBER, test.to_npz())
    atomic_write_bytes(Path(model_path), buffer.getvalue())
    return written


def _member(model_path: Path, payload: bytes | None, name: str) -> bytes:
    """One member of a head file, read and CRC-checked; a file that is no such zip is a one-line error."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload) if payload is not None else model_path) as archive:
            if name not in archive.namelist():
                raise TlfeatError(f"{model_path}: not a tlfeat head (no {name} inside); only fit-head's heads are loaded")
            return archive.read(name)
    except zipfile.BadZipFile as exc:  # also a failed CRC-32: the file changed after it was written
        raise TlfeatError(f"{model_path}: not a readable head file ({describe_exception(exc)})") from None
    except OSError as exc:
        raise TlfeatError(f"{model_path}: unreadable ({describe_exception(exc)})") from None


def _checked_metadata(model_path: Path, payload: bytes | None = None) -> dict:
    try:
        meta = json.loads(_member(model_path, payload, META_MEMBER))
    except (UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise TlfeatError(f"{model_path}: its {META_MEMBER} is not a JSON object")
    check_format(model_path, meta, MODEL_FORMAT, MODEL_FORMAT_VERSION, "a tlfeat head", "refit the head")
    return meta


def _legacy_metadata_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def is_legacy(model_path: Path) -> bool:
    """A tlfeat 0.1 head (a pickle with JSON beside it)."""
    return Path(model_path).suffix == LEGACY_SUFFIX


def read_metadata(model_path: Path, whole: bool = False) -> dict:
    """A head's metadata, read without loading its model (so without skops or pickle). `whole`: also check
    every other member's CRC-32, for those who list a head as usable without loading it (fit-head's summary,
    compare): a byte flipped in the model itself is otherwise found only when predict loads it."""
    model_path = Path(model_path)
    if model_path.is_dir():
        raise TlfeatError(f"{model_path}: is a folder, not a head file (a .skops written by fit-head or recipe; "
                          "a fine-tune run scores itself, in its summary.json)")
    if not model_path.is_file():
        raise TlfeatError(f"{model_path}: model file not found")
    if is_legacy(model_path):
        meta_path = _legacy_metadata_path(model_path)
        if not meta_path.is_file():
            raise TlfeatError(f"{model_path}: no metadata {meta_path.name} beside it; only fit-head's heads are loaded")
        meta = read_json_object(meta_path)
        check_format(meta_path, meta, MODEL_FORMAT, LEGACY_FORMAT_VERSION, "tlfeat head metadata", "refit the head")
        return meta
    if model_path.suffix != HEAD_SUFFIX:
        raise TlfeatError(f"{model_path}: not a tlfeat head (expected a {HEAD_SUFFIX} file written by fit-head)")
    meta = _checked_metadata(model_path)
    if whole:
        _check_members(model_path)
    return meta


def _check_members(model_path: Path) -> None:
    """Every member of a head file read and CRC-checked, one member in memory at a time."""
    try:
        with zipfile.ZipFile(model_path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError) as exc:  # zlib: a deflated member's data itself damaged
        raise TlfeatError(f"{model_path}: not a readable head file ({describe_exception(exc)})") from None
    if damaged is not None:
        raise TlfeatError(f"{model_path}: damaged ({damaged} fails its CRC-32 check)")


def read_fitted_rows(model_path: Path) -> dict[str, np.ndarray] | None:
    """The row identities a head file records (`tlfeat.heads.rows`); None for a tlfeat 0.1 head."""
    model_path = Path(model_path)
    if is_legacy(model_path):
        return None
    try:
        with np.load(io.BytesIO(_member(model_path, None, ROWS_MEMBER)), allow_pickle=False) as rows:
            return {name: rows[name] for name in rows.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise TlfeatError(f"{model_path}: its {ROWS_MEMBER} is unreadable ({describe_exception(exc)})") from None


def read_test_outcomes(model_path: Path) -> ImageOutcomes | None:
    """The head's outcome on each test image it scored; None for a head fitted before heads kept them."""
    model_path = Path(model_path)
    if is_legacy(model_path):
        return None
    try:
        with zipfile.ZipFile(model_path) as archive:
            if TEST_MEMBER not in archive.namelist():
                return None
            return ImageOutcomes.from_npz(archive.read(TEST_MEMBER))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise TlfeatError(f"{model_path}: its {TEST_MEMBER} is unreadable ({describe_exception(exc)})") from None


def untrusted_types(model_path: Path, payload: bytes) -> list[str]:
    """Types in a head file that neither skops nor tlfeat trusts: loading them could run their code."""
    import skops.io as sio

    try:
        found = sio.get_untrusted_types(data=payload)
    except Exception as exc:  # a damaged schema is the file's problem
        raise TlfeatError(f"{model_path}: cannot read the head ({describe_exception(exc)})") from None
    return [name for name in found if name not in TLFEAT_TYPES]


def load_head(model_path: str | Path, trust: bool = False) -> tuple[BaseEstimator, dict]:
    """Load a head written by fit-head or recipe: (fitted scikit-learn estimator, metadata).

    The estimator predicts on rows of the features it was fitted on (`tlfeat.load(cache).features`, the
    caches' columns side by side for a fused head); `estimator.classes_` index `metadata["classes"]`.

    Nothing in the file runs unless `trust`: a type outside skops' defaults and
    `TLFEAT_TYPES` is refused by name, and a tlfeat 0.1 pickle is refused whole.
    """
    model_path = path_value("model_path", model_path)
    meta = read_metadata(model_path)
    if is_legacy(model_path):
        estimator = _load_legacy(model_path, meta, trust)
    else:
        import skops.io as sio

        payload = model_path.read_bytes()
        meta = _checked_metadata(model_path, payload)  # the same bytes as the model, read once
        unknown = untrusted_types(model_path, payload)
        if unknown and not trust:
            raise TlfeatError(
                f"{model_path}: holds types tlfeat does not load from a file it did not make: {', '.join(unknown)}; "
                "pass `trust` only if you trust whoever made this file"
            )
        try:
            estimator = sio.loads(payload, trusted=[*TLFEAT_TYPES, *unknown])
        except Exception as exc:  # a damaged or foreign schema is the file's problem
            raise TlfeatError(f"{model_path}: cannot load the head ({describe_exception(exc)})") from None
    _check_estimator(model_path, estimator, meta)
    return estimator, meta


def _load_legacy(model_path: Path, meta: dict, trust: bool) -> Any:
    """A tlfeat 0.1 head: a pickle, loaded only with `trust` and only if its sha256 matches its metadata."""
    if not trust:
        raise TlfeatError(
            f"{model_path}: a head from tlfeat 0.1, stored as a pickle, which runs code when loaded; "
            f"refit it with fit-head (now {HEAD_SUFFIX}), or pass `trust` if you made it"
        )
    import joblib

    if sha256_file(model_path) != meta.get("model_sha256"):
        raise TlfeatError(f"{model_path}: model file changed since it was written; refusing to unpickle")
    try:
        return joblib.load(model_path)
    except Exception as exc:  # any unpickling failure (missing class, version skew) is the file's problem
        raise TlfeatError(f"{model_path}: cannot load the head ({describe_exception(exc)})") from None


def _check_estimator(model_path: Path, estimator: Any, meta: dict) -> None:
    """The loaded model must be a fitted classifier over the metadata's classes and feature size."""
    if not (hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_")):
        raise TlfeatError(f"{model_path}: holds a {type(estimator).__name__}, not a fitted classifier")
    classes, dim = meta.get("classes") or [], meta.get("feature_dim")
    if list(np.asarray(estimator.classes_).tolist()) != list(range(len(classes))) or (
        getattr(estimator, "n_features_in_", dim) != dim
    ):
        raise TlfeatError(
            f"{model_path}: the model ({len(estimator.classes_)} classes, {getattr(estimator, 'n_features_in_', '?')} "
            f"features) does not match its metadata ({len(classes)} classes, {dim} features)"
        )

