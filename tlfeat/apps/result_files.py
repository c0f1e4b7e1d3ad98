"""Which files on disk are results compare reads: fit-head models (``.skops``, or a tlfeat 0.1 ``.joblib`` and its
``.json``) and fine-tune runs (their folder, ``model.keras`` or ``summary.json``), named or found under folders,
and runs that have not finished."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tlfeat.errors import TlfeatError
from tlfeat.fileio import read_json_object
from tlfeat.finetuning.runs import RUN_FORMAT, STATE_FORMAT, STATE_NAME, SUMMARY_NAME, unfinished_run
from tlfeat.heads.store import HEAD_SUFFIX, LEGACY_SUFFIX, MODEL_FORMAT


def _json_format(path: Path) -> str | None:
    """The "format" field of a small JSON file, or None for anything else (never raises)."""
    try:
        if path.stat().st_size > 10_000_000:
            return None
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value.get("format") if isinstance(value, dict) else None


def _classify(path: Path) -> tuple[str, Path] | None:
    """("head", model path), ("run", run folder) or ("unfinished", run folder) for a file that describes one,
    else None."""
    if path.suffix in (HEAD_SUFFIX, LEGACY_SUFFIX):
        return "head", path
    if path.suffix == ".keras" and (path.parent / SUMMARY_NAME).is_file():
        return "run", path.parent
    if path.suffix != ".json" or path.name.endswith(".metrics.json"):
        return None
    fmt = _json_format(path)
    if path.name == SUMMARY_NAME and fmt == RUN_FORMAT:
        return "run", path.parent
    if path.name == STATE_NAME and fmt == STATE_FORMAT and unfinished_run(path.parent):
        return "unfinished", path.parent
    if fmt == MODEL_FORMAT:  # a tlfeat 0.1 head's metadata
        return "head", path.with_suffix(LEGACY_SUFFIX)
    return None


def _classify_or_refuse(path: Path) -> tuple[str, Path] | None:
    """`_classify`, except that a damaged run summary is an error naming it: a run must not drop out of the
    table without a word, nor be called the wrong kind of file."""
    hit = _classify(path)
    if hit is None and path.name == SUMMARY_NAME:
        read_json_object(path)
    return hit


def find_results(inputs: Sequence[Path]) -> list[tuple[str, Path]]:
    """Every fit-head model and fine-tune run named by, or found under, `inputs`; each once, in order. A run that
    has not finished is refused when named, and ("unfinished", its folder) when found under a folder."""
    found: list[tuple[str, Path]] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise TlfeatError(f"{item}: not found")
        if item.is_dir():
            if _classify(item / STATE_NAME):  # a run that has not finished: it has nothing to compare yet
                raise TlfeatError(f"{item}: {unfinished_run(item)}")
            for dirpath, dirnames, filenames in os.walk(item):
                # checkpoints/ holds a run's resume files, not results
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
                for name in sorted(filenames):
                    if name.endswith((".json", HEAD_SUFFIX)) and not name.startswith("."):
                        hit = _classify_or_refuse(Path(dirpath) / name)
                        if hit is not None:
                            found.append(hit)
        else:
            hit = _classify_or_refuse(item)
            if hit is None:
                raise TlfeatError(
                    f"{item}: neither a fit-head model ({HEAD_SUFFIX}, or a tlfeat 0.1 .joblib or its .json) nor a fine-tune run "
                    f"(its folder, model.keras or {SUMMARY_NAME})"
                )
            if hit[0] == "unfinished":
                raise TlfeatError(f"{hit[1]}: {unfinished_run(hit[1])}")
            found.append(hit)
    unique: dict[tuple[str, Path], None] = {}
    for kind, path in found:
        unique.setdefault((kind, path.resolve()), None)
    return list(unique)
