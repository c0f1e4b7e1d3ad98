"""Dataset scan and split: the one description of "which images, which class, which split".

extract, fit-head and finetune all go through `scan_dataset`, so the same seed
always gives the same split everywhere.

Two layouts are understood:

* flat: ``ROOT/<class>/<image>``; a stratified train/val/test split is made.
* pre-split: ``ROOT/train/<class>/...``, optional ``ROOT/val/...``, optional
  ``ROOT/test/...``; without ``val/``, val is carved out of train the same way.

The split is stable as well as deterministic: inside each class, files are
ordered by a hash of (seed, relative path), and the first share goes to train,
the next to val, the rest to test. Adding or removing one image moves at most a
boundary image, never reshuffles the rest.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tlfeat.errors import TlfeatError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.5625, 0.1875, 0.25)  # the study's 270/90/120 of 480 per class


@dataclass(frozen=True, slots=True)  # slots: a million entries take a third of the memory
class ImageEntry:
    """One image file: where it is, what it is, and its identity for cache reuse."""

    relpath: str  # relative to the dataset root, '/'-separated
    class_name: str
    split: str
    size: int
    mtime_ns: int


@dataclass
class DatasetScan:
    """The scanned dataset: classes, image entries in canonical order, and ignored files."""

    root: Path
    layout: str  # "flat" | "pre-split"
    class_names: list[str]
    entries: list[ImageEntry]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    seed: int = 0
    ratios: tuple[float, float, float] = DEFAULT_RATIOS

    @property
    def name(self) -> str:
        return self.root.name

    def split_counts(self) -> dict[str, int]:
        counts = Counter(e.split for e in self.entries)
        return {s: counts[s] for s in SPLITS if counts[s]}

    def label_of(self, entry: ImageEntry) -> int:
        return self._label_index[entry.class_name]

    def __post_init__(self) -> None:
        self._label_index = {name: i for i, name in enumerate(self.class_names)}


def class_of(relpath: str, layout: str) -> str:
    """The class of an image path, as the scan assigns it: its top folder in the flat layout, the one
    under the split folder in the pre-split layout ("" for a path of neither shape)."""
    parts = relpath.split("/", 2)
    position = 0 if layout == "flat" else 1
    return parts[position] if len(parts) > position + 1 else ""


def _validate_ratios(ratios: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise TlfeatError(f"split ratios {ratios}: need three non-negative numbers with train > 0")
    total = sum(ratios)
    return (ratios[0] / total, ratios[1] / total, ratios[2] / total)


def _stable_order(relpaths: list[str], seed: int) -> list[str]:
    return sorted(relpaths, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).digest())


def _assign(relpaths: list[str], shares: tuple[float, ...], names: tuple[str, ...], seed: int) -> dict[str, str]:
    """Give each path one of `names`, in proportion to `shares`, by stable hash order."""
    ordered = _stable_order(relpaths, seed)
    n = len(ordered)
    bounds, acc = [], 0.0
    for share in shares:
        acc += share
        bounds.append(round(n * acc))
    bounds[-1] = n
    if n > 1 and bounds[0] == 0:
        bounds[0] = 1  # every class keeps at least one training image
    result, start = {}, 0
    for name, stop in zip(names, bounds):
        for path in ordered[start:stop]:
            result[path] = name
        start = max(start, stop)
    return result


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_images(root: Path, class_dir: Path, ignored: list[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """Image files under one class folder (recursively) as (relpath, size, mtime_ns); everything else
    is recorded in `ignored`.

    One `stat` per regular file (from `os.scandir`, which already knows the file type) and no path
    objects: at a million files the scan costs little more than the stats themselves.
    """
    found: list[tuple[str, int, int]] = []
    root_real = os.path.realpath(root)
    folders = [(str(class_dir), Path(os.path.relpath(class_dir, root)).as_posix())]
    while folders:
        folder, rel_folder = folders.pop()
        try:
            listing = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:  # unreadable: skipped, as os.walk did
            continue
        subfolders = []
        for entry in listing:
            name, rel = entry.name, f"{rel_folder}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if not _is_hidden(name):
                    subfolders.append((entry.path, rel))
                continue
            if _is_hidden(name):
                ignored.append((rel, "hidden file"))
            elif name[name.rfind(".") :].lower() not in IMAGE_EXTENSIONS:  # no dot: the last letter, never listed
                ignored.append((rel, "not an image file extension"))
            elif entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                found.append((rel, st.st_size, st.st_mtime_ns))
            elif entry.is_symlink():
                _add_symlink(entry.path, rel, root_real, found, ignored)
            else:
                ignored.append((rel, "not a regular file"))
        folders.extend(reversed(subfolders))  # visited in name order, each after this folder's files
    return found


def _add_symlink(
    full: str, rel: str, root_real: str, found: list[tuple[str, int, int]], ignored: list[tuple[str, str]]
) -> None:
    target = os.path.realpath(full)
    if not os.path.exists(target):
        ignored.append((rel, "broken or looping symlink"))
    elif os.path.commonpath([root_real, target]) != root_real:
        ignored.append((rel, "symlink points outside the dataset"))
    elif not os.path.isfile(target):
        ignored.append((rel, "not a regular file"))
    else:
        st = os.stat(target)
        found.append((rel, st.st_size, st.st_mtime_ns))


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.is_symlink() and not _is_hidden(p.name)
    }


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a scan makes millions of objects and no cycles, and each
    full collection would walk all of them again (a third of a million-file scan's time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def scan_dataset(
    root: str | Path, seed: int = 0, ratios: tuple[float, float, float] = DEFAULT_RATIOS
) -> DatasetScan:
    """Scan a class-per-folder dataset (flat or pre-split) and assign every image a split."""
    with _collector_paused():
        return _scan(Path(root), seed, ratios)


def _scan(root: Path, seed: int, ratios: tuple[float, float, float]) -> DatasetScan:
    if not root.exists():
        raise TlfeatError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise TlfeatError(f"{root}: is a file, not a dataset folder (expected a folder with one sub-folder of images "
                          "per class)")
    root = root.resolve()
    train_share, val_share, test_share = _validate_ratios(ratios)
    ignored: list[tuple[str, str]] = []
    top = _class_dirs(root)
    split_dirs = {s: top[s] for s in SPLITS if s in top}

    # split -> class -> [(relpath, size, mtime_ns)]
    found: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
    if split_dirs:
        if "train" not in split_dirs:
            raise TlfeatError(f"{root}: has {'/'.join(split_dirs)} folders but no train/ folder")
        for split, folder in split_dirs.items():
            found[split] = {c: _list_images(root, d, ignored) for c, d in _class_dirs(folder).items()}
        layout = "pre-split"
    else:
        found["all"] = {c: _list_images(root, d, ignored) for c, d in top.items()}
        layout = "flat"

    class_names = sorted({c for per_class in found.values() for c in per_class})
    where = root / "train" if layout == "pre-split" else root
    if not class_names:
        raise TlfeatError(f"{where}: no class folders found (expected one sub-folder per class)")
    if len(class_names) < 2:
        raise TlfeatError(f"{where}: only one class folder ({class_names[0]}); need at least 2 classes")
    for split, per_class in found.items():
        for class_name, files in per_class.items():
            if not files:
                folder = root / class_name if split == "all" else root / split / class_name
                raise TlfeatError(f"{folder}: class folder holds no images")
    if layout == "pre-split":
        missing = [c for c in class_names if c not in found["train"]]
        if missing:
            raise TlfeatError(f"{root / 'train'}: no training folder for class(es) {', '.join(missing)}")

    by_split: dict[str, list[ImageEntry]] = {split: [] for split in SPLITS}
    for class_name in class_names:  # each class's listing is let go once its entries exist
        if layout == "flat":
            files = found["all"].pop(class_name)
            assignment = _assign(
                [rel for rel, _, _ in files], (train_share, val_share, test_share), SPLITS, seed
            )
        else:
            files = found["train"].pop(class_name)
            if "val" in found:
                assignment = {rel: "train" for rel, _, _ in files}
            else:
                carve = val_share / (train_share + val_share)
                assignment = _assign([rel for rel, _, _ in files], (1 - carve, carve), ("train", "val"), seed)
            for split in ("val", "test"):
                extra = found.get(split, {}).pop(class_name, [])
                files = files + extra
                assignment.update({rel: split for rel, _, _ in extra})
        files.sort()  # by relpath: the order inside (split, class)
        for rel, size, mtime_ns in files:
            split = assignment[rel]
            by_split[split].append(ImageEntry(rel, class_name, split, size, mtime_ns))

    # Canonical order (split, class, path), from classes taken in order: no million sort keys.
    entries = [entry for split in SPLITS for entry in by_split[split]]
    return DatasetScan(root, layout, class_names, entries, ignored, seed, (train_share, val_share, test_share))
