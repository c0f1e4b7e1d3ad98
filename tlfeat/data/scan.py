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

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tlfeat.errors import TlfeatError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.5625, 0.1875, 0.25)  # the study's 270/90/120 of 480 per class


@dataclass(frozen=True)
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


def _list_images(root: Path, class_dir: Path, ignored: list[tuple[str, str]]) -> list[tuple[str, os.stat_result]]:
    """Image files under one class folder (recursively), with their stat; everything else is recorded in `ignored`."""
    found = []
    root_real = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames + [d for d in os.listdir(dirpath) if _is_symlinked_dir(dirpath, d)]):
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            if _is_hidden(name):
                ignored.append((rel, "hidden file"))
                continue
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append((rel, "not an image file extension"))
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not os.path.exists(target):
                    ignored.append((rel, "broken or looping symlink"))
                    continue
                if os.path.commonpath([root_real, target]) != root_real:
                    ignored.append((rel, "symlink points outside the dataset"))
                    continue
            if not os.path.isfile(full):
                ignored.append((rel, "not a regular file"))
                continue
            found.append((rel, os.stat(full)))
    return found


def _is_symlinked_dir(dirpath: str, name: str) -> bool:
    # os.walk(followlinks=False) lists symlinks to folders among dirnames and never
    # visits them; surface them so they are reported instead of silently vanishing.
    full = os.path.join(dirpath, name)
    return os.path.islink(full) and os.path.isdir(full)


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.is_symlink() and not _is_hidden(p.name)
    }


def scan_dataset(
    root: str | Path, seed: int = 0, ratios: tuple[float, float, float] = DEFAULT_RATIOS
) -> DatasetScan:
    """Scan a class-per-folder dataset (flat or pre-split) and assign every image a split."""
    root = Path(root)
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

    # split -> class -> [(relpath, stat)]
    found: dict[str, dict[str, list[tuple[str, os.stat_result]]]] = {}
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

    entries: list[ImageEntry] = []
    for class_name in class_names:
        if layout == "flat":
            files = found["all"][class_name]
            assignment = _assign(
                [rel for rel, _ in files], (train_share, val_share, test_share), SPLITS, seed
            )
        else:
            files = found["train"][class_name]
            if "val" in found:
                assignment = {rel: "train" for rel, _ in files}
            else:
                carve = val_share / (train_share + val_share)
                assignment = _assign([rel for rel, _ in files], (1 - carve, carve), ("train", "val"), seed)
            for split in ("val", "test"):
                extra = found.get(split, {}).get(class_name, [])
                files = files + extra
                assignment.update({rel: split for rel, _ in extra})
        for rel, st in files:
            entries.append(ImageEntry(rel, class_name, assignment[rel], st.st_size, st.st_mtime_ns))

    split_rank = {s: i for i, s in enumerate(SPLITS)}
    entries.sort(key=lambda e: (split_rank[e.split], e.class_name, e.relpath))
    return DatasetScan(root, layout, class_names, entries, ignored, seed, (train_share, val_share, test_share))
