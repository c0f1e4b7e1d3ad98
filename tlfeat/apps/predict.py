"""predict: classify image files with a head written by fit-head, or with a fine-tuned run.

`predict_images` classifies image files (`tlfeat.apps.evaluate` scores a head on
labelled caches).

The images are embedded exactly as the head's training caches were: same
backbone(s), weights, image size and preprocessing, taken from the head's
metadata JSON; a fused head embeds with each backbone and concatenates in the
recorded order.

Security: a head file loads without running code from it (`tlfeat.heads.store`);
one that holds types tlfeat does not trust, or a tlfeat 0.1 pickle, loads only
with `trust`. The class names come from the same file as the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from tlfeat.backbones import get_backbone, random_weights_backend, weights_identity
from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.cache import OLD_DECODE
from tlfeat.data.decode import DECODE
from tlfeat.data.scan import image_files
from tlfeat.errors import TlfeatError, integer
from tlfeat.fileio import check_output_path, path_list, path_value
from tlfeat.runtime import check_batch_size
from tlfeat.heads.store import load_head
from tlfeat.reports import write_csv


@dataclass
class Prediction:
    """One image's path and its `top` classes as (class, probability), most probable first."""

    path: str
    top: list[tuple[str, float]]  # (class, probability), most probable first


@dataclass
class PredictResult:
    """What `predict` gave: one `Prediction` per readable image, in input order, and the files it
    `skipped` (path, reason); `meta` is the head's (or run's) metadata."""

    model: Path
    meta: dict = field(repr=False)  # the head's whole metadata (per-class metrics and more): pages in a notebook
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def collect_images(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named directly, plus the image files found under folders as the dataset scan finds them
    (`tlfeat.data.scan.image_files`: symlinks followed, hidden files and pipes left out); and, as (path,
    reason), what was left out under the folders that may be an image (a pipe, a broken link).

    A path that does not exist, or a pipe or device named directly (reading it would block), is an error
    naming it.
    """
    missing = [str(item) for item in map(Path, inputs) if not item.exists()]
    if missing:
        broken = " (a broken symbolic link)" if len(missing) == 1 and os.path.islink(missing[0]) else ""
        raise TlfeatError(f"{', '.join(missing)}: not found{broken}")
    files: list[Path] = []
    left_out: list[tuple[str, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found, notable = image_files(item)
            files += found
            left_out += [(str(path), reason) for path, reason in notable]
        elif not item.is_file():
            raise TlfeatError(f"{item}: not a regular file (a pipe or device); name image files or folders")
        else:
            files.append(item)
    return files, left_out


def _check_sources(model: Path, sources: list[dict]) -> None:
    """Refuse before embedding anything if the recorded weights or preprocessing can no longer be reproduced.

    `model` is a head, or a cache whose features new images must match (`similar`).
    """
    for source in sources:
        spec = get_backbone(source["backbone"])
        if spec.preprocessing != source["preprocessing"]:
            raise TlfeatError(
                f"{model}: made from {source['backbone']} features with preprocessing "
                f"{source['preprocessing']!r}, this tlfeat uses {spec.preprocessing!r}; extract (and fit) again"
            )
        decode = source.get("decode") or OLD_DECODE  # not recorded: a cache from before the record existed
        if decode != DECODE:
            raise TlfeatError(
                f"{model}: made from features of images decoded as {decode!r}; this tlfeat decodes as "
                f"{DECODE!r} (images at least twice the input size are decoded at reduced scale), so new "
                f"images would not be embedded the way its training images were: extract (and fit) again"
            )
        weights_source = source.get("weights_source")
        if not weights_source:
            raise TlfeatError(f"{model}: its cache {source['file']} did not record weights_source; cannot re-embed")
        identity = weights_identity(spec, weights_source)
        if identity == source["weights"]:
            continue
        recorded_backend = random_weights_backend(source["weights"])
        if recorded_backend:
            raise TlfeatError(
                f"{model}: made from features of {source['backbone']}'s random weights under the "
                f"{recorded_backend} Keras backend, which this one ({random_weights_backend(identity)}) does not "
                f"draw; set KERAS_BACKEND={recorded_backend} to embed new images the same way"
            )
        raise TlfeatError(
            f"{model}: made from {source['backbone']} features from weights {source['weights']}, "
            f"but weights {weights_source} are now {identity}; refusing to mix features"
        )


def embed_for_head(
    model: Path, meta: dict, files: Sequence[Path], batch_size: int | None = None, progress: bool = False
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """The head's feature vector for each file: (features, indices of files embedded, failures).

    `meta` needs "sources" (one `tlfeat.heads.fit.source_record` per cache, in column order) and "feature_dim".
    """
    from tlfeat.runtime import embed_files

    sources = meta["sources"]
    _check_sources(model, sources)
    blocks: list[dict[int, np.ndarray]] = []
    reasons: dict[int, str] = {}
    index_of = {str(f): i for i, f in enumerate(files)}
    for source in sources:
        result = embed_files(
            list(files), source["backbone"], source["weights_source"], image_size=int(source["input_size"]),
            batch_size=batch_size, progress=progress, tta=source.get("tta", NO_TTA),
        )
        if result.outputs.shape[1] != source["feature_dim"]:
            raise TlfeatError(
                f"{model}: {source['backbone']} now gives {result.outputs.shape[1]}-d features, "
                f"{model.name} was made from {source['feature_dim']}-d ones"
            )
        # Features are stored at the cache's dtype; round the same way so predict sees what fit saw.
        features = result.outputs.astype(source.get("dtype") or "float32").astype(np.float32)
        blocks.append(dict(zip(result.ok, features)))
        reasons.update((index_of[path], reason) for path, reason in result.failures)
    embedded = set.intersection(*(set(block) for block in blocks))
    ok = sorted(embedded)
    failures = [
        (str(files[i]), reasons.get(i, "changed while it was being embedded"))
        for i in range(len(files)) if i not in embedded
    ]
    if not ok:
        return np.zeros((0, int(meta["feature_dim"])), dtype=np.float32), [], failures
    features = np.concatenate([np.stack([block[i] for i in ok]) for block in blocks], axis=1)
    return features, ok, failures


def _is_finetune_run(model: Path) -> bool:
    from tlfeat.finetuning import MODEL_NAME, SUMMARY_NAME

    return model.is_dir() or model.suffix == Path(MODEL_NAME).suffix or model.name == SUMMARY_NAME


def predict_images(
    model: str | Path, inputs: str | Path | Sequence[str | Path], top: int = 1, batch_size: int | None = None, progress: bool = True,
    trust: bool = False, csv: str | Path | None = None,
) -> PredictResult:
    """Classify the images under `inputs` with a fit-head head file or a fine-tune run (folder or model.keras).

    inputs: image files or folders of them. top: the classes kept per image, most probable first.
    batch_size, progress: of embedding the images (default batch: 256 on a GPU, 32 on a CPU).
    Files that cannot be decoded are listed in `skipped`; an input path that does not exist, or no file
    that decodes, is an error. `trust` loads a head holding types tlfeat does not trust
    (`tlfeat.heads.store.load_head`). csv: also write the predictions and skipped files there
    (`write_predictions_csv`).
    """
    top = integer("top", top, 1)
    if csv is not None:
        csv = path_value("csv", csv)
        check_output_path(csv, parameter="csv", suffix=".csv")  # before the images are embedded
    model = path_value("model", model)
    inputs = path_list(inputs, "inputs", "image files or folders")
    batch_size = check_batch_size(batch_size)
    if not model.exists():
        raise TlfeatError(f"{model}: model not found (a fit-head .skops or a fine-tune run folder)")
    files, left_out = collect_images(inputs)
    if not files:
        where = ", ".join(str(p) for p in inputs)
        raise TlfeatError(f"{where}: no image files to predict")
    if _is_finetune_run(model):
        from tlfeat.finetuning import predict_files, read_run_summary

        meta = read_run_summary(model)
        proba, ok, failures, names = predict_files(model, files, batch_size, progress)
    else:
        estimator, meta = load_head(model, trust=trust)
        features, ok, failures = embed_for_head(model, meta, files, batch_size, progress)
        proba = estimator.predict_proba(features) if ok else np.zeros((0, len(estimator.classes_)))
        names = [meta["classes"][int(c)] for c in estimator.classes_]
    result = PredictResult(model, meta, skipped=failures + left_out)
    top = min(top, len(names))  # a CSV column pair per rank: none that could only ever be empty
    order = np.argsort(-proba, axis=1, kind="stable")[:, :top]
    for row, index in enumerate(ok):
        result.predictions.append(
            Prediction(str(files[index]), [(names[j], float(proba[row, j])) for j in order[row]])
        )
    if csv is not None:
        write_predictions_csv(csv, result, top)
    if not result.predictions:
        path, reason = result.skipped[0]
        others = f"; {len(result.skipped) - 1} more skipped" if len(result.skipped) > 1 else ""
        listed = f", listed in {csv}" if csv is not None else ""
        raise TlfeatError(f"{path}: {reason}; none of the {len(result.skipped)} files could be read as an image"
                          f"{others}{listed}")
    return result


def write_predictions_csv(path: Path, result: PredictResult, top: int) -> None:
    """One row per image: path, class, probability (then class_2, probability_2 ... up to top), skipped reason."""
    headers = ["path", "class", "probability"]
    for rank in range(2, top + 1):
        headers += [f"class_{rank}", f"probability_{rank}"]
    headers.append("skipped")
    rows = []
    for p in result.predictions:
        cells = [c for name, prob in p.top for c in (name, round(prob, 6))]
        rows.append([p.path, *cells, *[None] * (2 * top - len(cells)), None])
    rows += [[path, *[None] * (2 * top), reason] for path, reason in result.skipped]
    write_csv(path, headers, rows)

