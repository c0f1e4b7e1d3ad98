"""fit-head's output folder: one writer at a time, one kind of data, every head in its summary.

- One writer: the folder is held under `tlfeat.fileio.OutputLock` (``<out>.lock``)
  for the whole run, as extract holds its cache.
- One kind of data: every head in a folder was fitted on the same images in the
  same splits, from caches with the same feature settings (`folder_key`), so
  their scores compare; a run on other data is refused before it writes anything.
- Every head: ``summary.md``/``summary.csv`` are rebuilt from the head files present
  after each run (not only the heads just fitted); replacing a head is reported.
- A head is one file (`tlfeat.heads.store`), replaced by one rename. Its views,
  ``<head>.metrics.json`` and ``<head>.confusion.png``, are drawn from it right after.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator, Sequence

import numpy as np
import sklearn
from sklearn.base import BaseEstimator

from tlfeat import __version__
from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError, some_of
from tlfeat.fileio import OutputLock, atomic_write_bytes
from tlfeat.heads.rows import RowIds, seen_rows
from tlfeat.heads.store import HEAD_SUFFIX, LEGACY_SUFFIX, head_path, read_fitted_rows, read_metadata, save_head
from tlfeat.reports import ImageOutcomes, markdown_table, plot_confusion, write_csv, write_json

# The cache settings a head's features depend on: heads sharing a folder, and a cache a head is scored on, agree on each.
FEATURE_KEY = ("backbone", "weights", "input_size", "preprocessing", "tta", "feature_dim")
# Heads fitted before a setting existed recorded nothing for it: they had its default.
FEATURE_DEFAULTS = {"tta": "none"}


@dataclass
class HeadResult:
    """One fitted head: its name, hyperparameters, search trials, scores per split (n, accuracy,
    macro_f1, over rows it never saw), timings, notes and the files written (model, metrics, plots)."""

    head: str
    params: dict  # the tuned hyperparameter's label -> value used
    search: list[dict] | None  # [{label: value, "val_accuracy": a}, ...] when `search` ran
    scores: dict[str, dict]  # split -> {"n", "accuracy", "macro_f1"}
    fit_seconds: float  # fitting the kept model
    search_seconds: float | None  # all fits of the search, the kept one included
    notes: list[str]  # warnings raised while fitting, rows left out of a score: one line each
    files: dict[str, Path]
    replaced: str | None = None  # what the head file held before this run replaced it


@dataclass
class FitSummary:
    """What `fit_heads` wrote to the head folder `out`: this run's `results`, the heads it could not fit,
    and `table`, every head in the folder ranked by val accuracy (also summary.md and summary.csv)."""

    out: Path
    sources: list[dict]  # the caches fitted on, as recorded in each model's metadata
    split_counts: dict[str, int]
    results: list[HeadResult] = field(default_factory=list)  # the heads fitted by this run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (head, why it could not be fitted)
    heads: list[str] = field(default_factory=list)  # every head in the folder, as ranked in the table
    table: str = ""  # markdown, every head in the folder, sorted by val accuracy when there is val
    table_files: tuple[Path, Path] | None = None  # (summary.md, summary.csv)

    def __repr__(self) -> str:  # every head's scores and files and each cache's record fill a notebook cell
        split = "val" if "val" in self.split_counts else "test"
        accuracy = {r.head: round(r.scores[split]["accuracy"], 4) for r in self.results if split in r.scores}
        return (f"FitSummary(out={str(self.out)!r}, caches={[s['file'] for s in self.sources]}, "
                f"{split} accuracy (.results) {accuracy}, skipped={[head for head, _ in self.skipped]}, "
                f"{len(self.heads)} heads ranked in .table)")


def folder_key(sources: Sequence[dict], digest: str) -> tuple:
    """What heads sharing a folder must agree on: the images in each split, and each cache's feature settings."""
    return digest, tuple(tuple(s.get(k, FEATURE_DEFAULTS.get(k)) for k in FEATURE_KEY) for s in sources)


def describe_sources(sources: Sequence[dict]) -> str:
    return ", ".join(f"{s['file']} ({s['backbone']}, {s['feature_dim']}-d)" for s in sources)


# What a model records about each cache it was fitted on: enough for predict to
# recompute the features, and to tell which cache (and which weights) it was.
SOURCE_ATTRS = (
    "backbone", "weights", "weights_source", "input_size", "preprocessing", "dtype", "compute", "decode", "tta",
    "feature_dim", "keras_backend", "created", "tlfeat_version", "dataset_root", "seed", "split_ratios",
)


def default_out(caches: Sequence[Path]) -> Path:
    """``<folder of the first cache>/heads/<stem>[+<stem>...]/``, i.e. cache/heads/... for caches in cache/."""
    first = Path(caches[0])
    return first.parent / "heads" / "+".join(Path(c).stem for c in caches)


def source_record(path: Path, attrs: dict, n_rows: int, feature_dim: int) -> dict:
    """What a model records about one cache it was fitted on."""
    return {
        "path": str(Path(path).resolve()),
        "file": Path(path).name,
        "n_rows": n_rows,
        **{name: attrs.get(name) for name in SOURCE_ATTRS},
        "tta": attrs.get("tta", NO_TTA),
        "feature_dim": feature_dim,
    }


def head_metadata(
    name: str, description: str, estimator: BaseEstimator, class_names: list[str], feature_dim: int,
    sources: list[dict], label: str, rows: dict, params: dict, trials: list[dict] | None, seed: int,
    fit_seconds: float, search_seconds: float | None,
) -> dict:
    """What a head file records besides its model, scores and row identities (`tlfeat.heads.folder.save_fitted_head`).

    `rows`: {"digest": which images sit in which split (`tlfeat.heads.rows.rows_digest`), "counts": rows per split}.
    """
    return {
        "head": name,
        "description": description,
        "estimator": repr(estimator),
        "classes": class_names,
        "feature_dim": feature_dim,
        "sources": sources,
        "label": label,
        "rows": rows,
        "params": params,
        "search": trials,
        "seed": seed,
        "fit_seconds": fit_seconds,
        "search_seconds": search_seconds,
        "tlfeat_version": __version__,
        "sklearn_version": sklearn.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextmanager
def locked_folder(out: Path) -> Iterator[Path]:
    """The output folder, created and held by this process until the block ends."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TlfeatError(f"{out}: exists and is not a folder; `out` needs a folder")
    with OutputLock(out):
        out.mkdir(parents=True, exist_ok=True)
        # Half-written temporaries of a killed run (`tlfeat.fileio.atomic_path`): nobody else writes here now.
        for leftover in out.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)
        yield out


NON_FINITE_ADVICE = "re-extract this cache (extract `overwrite`)"


def check_unique_paths(path: Path, paths: np.ndarray) -> None:
    """Refuse a cache with an image path in several rows: its rows could not be told apart."""
    if len(set(paths)) != len(paths):
        raise TlfeatError(f"{path}: the same image path occurs in several rows; re-extract this cache")


def check_trainable(label: str, labels: np.ndarray, split: np.ndarray, class_names: Sequence[str]) -> None:
    """Refuse to fit a head on data without train rows, or with a class that has none (saying why it has none)."""
    train_labels = labels[split == "train"]
    if not len(train_labels):
        raise TlfeatError(f"{label}: no train split rows; nothing to fit on")
    present = np.bincount(train_labels, minlength=len(class_names))
    total = np.bincount(labels, minlength=len(class_names))
    unreadable = [name for i, name in enumerate(class_names) if total[i] == 0]
    if unreadable:
        raise TlfeatError(
            f"{label}: class {unreadable[0]!r} has no images in this cache: every one of its files was skipped as "
            "unreadable (extract lists them); fix or remove them, or remove the class folder"
        )
    missing = [i for i in range(len(class_names)) if present[i] == 0]
    if len(missing) == 1:
        i = missing[0]
        raise TlfeatError(
            f"{label}: class {class_names[i]!r} has no images in the train split ({total[i]} in val/test); every "
            "class needs training images: if its train files were all unreadable, extract's notes name it; in a "
            "flat dataset each image's split is drawn on its own, so with few images a class can draw none "
            "(extract with another `seed`, or use train/ and test/ folders)"
        )
    if missing:
        raise TlfeatError(
            f"{label}: {len(missing)} classes have no images in the train split "
            f"({some_of([repr(class_names[i]) for i in missing], 5)}); every class needs "
            f"training images, and with {int(np.median(total))} images a class (the median) each one's split "
            "drawn on its own leaves some without: give train a larger share (`ratios`, e.g. 0.8,0.1,0.1) or use "
            "train/ and test/ folders"
        )


def left_out_note(split: str, count: int, selected: bool = False) -> str:
    """The note of a score that leaves out `count` rows of `split`, copies of rows the head learnt from."""
    role = "fitted or selected" if selected else "fitted"
    return f"{split}: {count} rows left out of the score, copies of rows this head was {role} on"


def existing_heads(out: Path, replacing: Collection[str] = ()) -> dict[str, dict]:
    """Metadata of every head file in `out`, by head name; a folder with tlfeat 0.1 heads is refused.

    A damaged head file is an error saying how to go on, unless it is the file of a head in `replacing` (the
    heads this run fits): refitting a head is how its damaged file is replaced, so that file is left out.
    """
    legacy = sorted(p.name for p in Path(out).glob(f"*{LEGACY_SUFFIX}"))
    if legacy:
        raise TlfeatError(
            f"{out}: holds heads from tlfeat 0.1 ({', '.join(legacy)}), whose summary this run cannot keep; "
            "choose another `out`, or move them away"
        )
    heads = {}
    for path in sorted(Path(out).glob(f"[!.]*{HEAD_SUFFIX}")):  # not the hidden temporaries of atomic writes
        try:
            meta = read_metadata(path, whole=True)
        except TlfeatError as exc:
            if path.stem in replacing:
                continue
            raise TlfeatError(f"{exc}; {DAMAGED_HEAD_ADVICE}") from None
        heads[meta["head"]] = meta
    return heads


# How to go on past a damaged head file in a folder of heads (fit-head's summary and compare read every one).
DAMAGED_HEAD_ADVICE = "move or remove that file, or fit that head again into its folder, which replaces it"


def check_same_data(
    out: Path, key: tuple, ids: RowIds, split: np.ndarray, label: str, replacing: Collection[str] = (),
) -> dict[str, dict]:
    """Refuse to add heads to a folder whose heads were fitted on other data; returns the heads there.
    `replacing`: the heads this run fits, whose files may be damaged (`existing_heads`)."""
    heads = existing_heads(out, replacing)
    for name, meta in heads.items():
        if folder_key(meta["sources"], meta["rows"]["digest"]) == key:
            continue
        if meta["rows"]["digest"] == key[0]:  # the same images and splits: only the features differ
            raise TlfeatError(
                f"{out}: holds heads fitted on the same images with other features ({name}: "
                f"{describe_sources(meta['sources'])}), and one summary would rank scores of different "
                f"features as if they compared; choose another `out` for {label}"
            )
        seen = RowIds.from_arrays(read_fitted_rows(head_path(out, name)) or {})
        leaked = sum(int(seen_rows(s, ids.take(split == s), seen).sum()) for s in ("val", "test"))
        raise TlfeatError(
            f"{out}: holds heads fitted on other data ({name}: {describe_sources(meta['sources'])}, rows "
            f"{', '.join(f'{k} {v}' for k, v in meta['rows']['counts'].items())}); {leaked} val/test rows of "
            f"{label} are rows it was fitted on, and one summary would rank scores that do not compare; "
            "choose another `out`"
        )
    return heads


def save_fitted_head(
    out: Path, estimator: object, metadata: dict, metrics: dict[str, dict], seen: dict[str, RowIds], notes: list[str],
    test: ImageOutcomes | None,
) -> HeadResult:
    """Replace head `metadata["head"]` in `out` (one file, one rename), then draw its views. `test`: the head's
    outcome on each test image scored (None without a test score)."""
    name, class_names = metadata["head"], metadata["classes"]
    scores = {s: {k: m[k] for k in ("n", "accuracy", "macro_f1")} for s, m in metrics.items()}
    files = {
        "model": head_path(out, name),
        "metrics": out / f"{name}.metrics.json",
        "confusion": out / f"{name}.confusion.png",
    }
    replaced = None
    if files["model"].exists():
        try:
            before = read_metadata(files["model"])
        except TlfeatError:  # a damaged file (`existing_heads`): what it held cannot be said
            replaced = "a damaged file"
        else:
            val = before.get("scores", {}).get("val")
            replaced = _params_text(before) + (f", val acc {val['accuracy']:.3f}" if val else "")
    rows = {k: v for role, ids in seen.items() for k, v in ids.to_arrays(role).items()}
    save_head(estimator, files["model"], {**metadata, "scores": scores, "metrics": metrics, "notes": notes}, rows, test)
    write_json(files["metrics"], {"head": name, "classes": class_names, "splits": metrics})
    shown = "test" if "test" in metrics else list(metrics)[-1]
    plot_confusion(
        np.array(metrics[shown]["confusion_matrix"]), class_names,
        f"{name} on {metadata['label']}: {shown} accuracy {metrics[shown]['accuracy']:.3f}", files["confusion"],
    )
    return HeadResult(
        name, metadata["params"], metadata["search"], scores, metadata["fit_seconds"], metadata["search_seconds"],
        notes, files, replaced,
    )


def _params_text(meta: dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in meta["params"].items())
    trials = meta.get("search") or []
    if any("cv_accuracy" in trial for trial in trials):  # a recipe head: C by cross-validation over train+val
        return text + " (cross-validated)"
    return text + (" (searched on val)" if trials else "")


def write_summary(
    out: Path, results: list[HeadResult], sources: list[dict], split_counts: dict[str, int],
    skipped: Sequence[tuple[str, str]] = (),
) -> FitSummary:
    """summary.md and summary.csv over every head in `out`, sorted by val accuracy when there is val."""
    heads = existing_heads(out)
    splits = [s for s in SPLITS if s in split_counts]
    ranked = sorted(
        heads.values(), key=lambda m: -(m["scores"].get("val", {}).get("accuracy", -1.0)) if "val" in splits else 0
    )
    headers = ["head", "params"]
    for split in splits:
        headers += [f"{split} acc", f"{split} macro-F1"]
    headers.append("fit s")
    rows = []
    for meta in ranked:
        row = [meta["head"], _params_text(meta)]
        for split in splits:
            score = meta["scores"].get(split)
            row += [score["accuracy"], score["macro_f1"]] if score else [None, None]
        seconds = meta["search_seconds"] if meta.get("search_seconds") is not None else meta["fit_seconds"]
        rows.append(row + [f"{seconds:.2f}"])
    summary = FitSummary(out, sources, split_counts, results, list(skipped), [m["head"] for m in ranked])
    summary.table = markdown_table(headers, rows)
    summary.table_files = (out / "summary.md", out / "summary.csv")
    counts = ", ".join(f"{k} {v}" for k, v in split_counts.items())
    notes = [f"- {m['head']}: {note}" for m in ranked for note in m.get("notes", [])]
    notes += [f"- {head}: not fitted: {reason}" for head, reason in skipped]
    text = f"# Heads on {describe_sources(sources)}\n\nRows: {counts}. Every head in this folder.\n\n{summary.table}"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    atomic_write_bytes(summary.table_files[0], text.encode())
    write_csv(summary.table_files[1], headers, rows)
    return summary
