"""How a fitted head is stored: ``<head>.joblib`` with ``<head>.json`` metadata beside it.

The JSON records the sha256 of the joblib file, and `load_head` checks it before
unpickling: unpickling runs code, so a file that changed since fit-head wrote it
is refused rather than loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import joblib
from sklearn.base import BaseEstimator

from tlfeat.errors import TlfeatError
from tlfeat.fileio import atomic_write_bytes, check_format, describe_exception, read_json_object, sha256_file

MODEL_FORMAT = "tlfeat-head"
MODEL_FORMAT_VERSION = 1


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

