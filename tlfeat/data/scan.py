"""Dataset scan and split: the one description of "which images, which class, which split".

extract, fit-head and finetune all go through `scan_dataset`, so the same seed
always gives the same split everywhere.

Two layouts are understood:

* flat: ``ROOT/<class>/<image>``; a stratified train/val/test split is made.
* pre-split: ``ROOT/train/<class>/...``, optional ``ROOT/val/...``, optional
  ``ROOT/test/...``; without ``val/``, val is carved out of train the same way.

An image's split is a function of the image alone: its relative path, the seed
and the ratios map through SHA-256 to a number in [0, 1), compared with the
cumulative shares (`split_of`). Adding, removing or failing images never moves
any other image, and the same files and seed always give the same split. The
price: per-class counts follow the ratios up to sampling noise (binomial), not
exactly.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import math
import os
import stat
import unicodedata
from numbers import Real
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from tlfeat.data.entries import SPLITS, EntrySubset, ImageEntry, ImageTable, split_bounds
from tlfeat.errors import TlfeatError
from tlfeat.fileio import shown_path

__all__ = ["SPLITS", "DEFAULT_RATIOS", "SPLIT_RULE", "DatasetScan", "EntrySubset", "ImageEntry", "ImageTable",
           "class_of", "image_files", "is_routine", "normalise_ratios", "scan_dataset", "split_bounds", "split_of"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
# Top-level folder names (any case) that make a dataset pre-split, and the split each holds.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
PRE_SPLIT_HINT = ("a top-level train, val or test folder makes a dataset pre-split (train/<class>/<image>; Train/, "
                  "validation/ and the like too, beside another split's folder): rename a class so named")
DEFAULT_RATIOS = (0.5625, 0.1875, 0.25)  # the study's shares (270/90/120 of 480 per class, on average)
# Recorded in caches: a cache split by another rule would be re-labelled by a rerun, so reruns compare it.
SPLIT_RULE = "sha256(seed, path) vs cumulative shares"


@dataclass
class DatasetScan:
    """The scanned dataset: classes, image entries in canonical order, and ignored files."""

    root: Path
    layout: str  # "flat" | "pre-split"
    class_names: list[str]
    entries: ImageTable
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    seed: int = 0
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    notes: list[str] = field(default_factory=list)  # one line each: rescaled shares, classes with no train image

    @property
    def name(self) -> str:
        return self.root.name

    def split_counts(self) -> dict[str, int]:
        return {split: hi - lo for split, lo, hi in split_bounds(self.entries)}

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


def normalise_ratios(ratios: Sequence[float]) -> tuple[tuple[float, float, float], str | None]:
    """Shares that sum to 1, and a note when the given ones summed to neither 1 nor 100 (rescaled)."""
    numbers = not isinstance(ratios, (str, bytes)) and all(isinstance(r, Real) for r in ratios)
    if not numbers or len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios) or not ratios[0] > 0:
        shown = ",".join(f"{r:g}" for r in ratios) if numbers else repr(ratios)
        raise TlfeatError(f"`ratios={shown}`: need three finite, non-negative numbers with train > 0")
    total = float(sum(ratios))
    shares = (ratios[0] / total, ratios[1] / total, ratios[2] / total)
    note = None
    if not (math.isclose(total, 1.0, rel_tol=1e-6) or math.isclose(total, 100.0, rel_tol=1e-6)):
        note = (
            f"split shares {','.join(f'{r:g}' for r in ratios)} sum to {total:g}, neither 100 nor 1: rescaled to "
            + ",".join(f"{100 * s:.4g}%" for s in shares)
        )
    return shares, note


def _unit_hash(relpath: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str, seed: int, ratios: Sequence[float]) -> str:
    """The split ("train", "val" or "test") of a flat dataset's image at `relpath`, given seed and ratios."""
    return SPLITS[_flat_split_of(relpath, seed, normalise_ratios(ratios)[0])]


def _flat_split_of(relpath: str, seed: int, shares: tuple[float, float, float]) -> int:
    """The split, as an index in SPLITS, of a flat dataset's image."""
    u = _unit_hash(relpath, seed)
    return 0 if u < shares[0] else 1 if u < shares[0] + shares[1] else 2


def _carved_split_of(relpath: str, seed: int, shares: tuple[float, float, float]) -> int:
    """A pre-split dataset's train/ image without a val/ folder: train or val (0 or 1), in the ratio train:val."""
    return 0 if _unit_hash(relpath, seed) < shares[0] / (shares[0] + shares[1]) else 1


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # the resource forks macOS puts in a zip


def _utf8(name: str) -> bool:
    """False for names the OS handed over with undecodable bytes (surrogate escapes): HDF5 cannot store them."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True




Ignored = list[tuple[str, str]]  # (relpath as shown, reason)
_LOOP = "symlink loop (a folder that contains itself)"


def _stat(entry: os.DirEntry, rel: str, ignored: Ignored) -> os.stat_result | None:
    """The stat of what `entry` leads to, symlinks followed; None (recorded in `ignored`) where it leads nowhere."""
    try:
        return entry.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "symlink loop"
        elif entry.is_symlink():
            reason = "broken symlink (its target is missing)"
        else:
            reason = f"cannot be read ({exc.strerror})"
        ignored.append((shown_path(rel), reason))
        return None


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _entries(
    folder: str, rel: str, ignored: Ignored, folders_must_be_named: bool = False, any_name: bool = False
) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name, relpath, stat) of what a folder holds, in name order, hidden and unnamable entries recorded in
    `ignored`; with `folders_must_be_named` (class and split folders), a folder whose name is not UTF-8 is an
    error: ignoring it would drop a whole class. `any_name`: names that are not UTF-8 are kept (no cache).

    One `stat` per entry, symlinks followed (`os.scandir` knows a hidden folder without one); no path
    objects: at a million files the scan costs little more than the stats themselves. Each entry, with the
    stat it caches (about 0.5 KB), is let go once handed over, so a folder of many files is not held twice.
    """
    try:
        with os.scandir(folder) as listing:
            found = sorted(listing, key=lambda entry: entry.name, reverse=True)
    except OSError as exc:
        ignored.append((shown_path(rel), f"folder cannot be read ({exc.strerror})"))
        return
    while found:
        entry = found.pop()
        name = entry.name
        child = f"{rel}/{name}" if rel else name
        if not any_name and not _utf8(name):
            if folders_must_be_named and _is_folder(entry):
                raise TlfeatError(f"{shown_path(os.path.join(folder, name))}: folder name is not valid UTF-8 (it cannot "
                                  "be stored in the cache); rename it")
            ignored.append((shown_path(child), "name is not valid UTF-8 (cannot be stored in the cache)"))
        elif _is_hidden(name):
            ignored.append((child, "hidden folder" if _is_folder(entry) else "hidden file"))
        elif (st := _stat(entry, child, ignored)) is not None:
            yield name, child, st


def _list_images(
    folder: str, rel: str, ancestors: frozenset[tuple[int, int]], ignored: Ignored, any_name: bool = False
) -> list[tuple[str, int, int]]:
    """Image files under one class folder (recursively, symlinks followed wherever they point), as
    (relpath, size, mtime_ns, ino, ctime_ns): the stat (a symlink's target's) that tells an untouched file.

    `ancestors` are the (device, inode) of the folders above, so a symlink back up is recorded, not walked.
    """
    found = []
    for name, child, st in _entries(folder, rel, ignored, any_name=any_name):
        full = os.path.join(folder, name)
        if stat.S_ISDIR(st.st_mode):  # also a folder named like an image
            if (st.st_dev, st.st_ino) in ancestors:
                ignored.append((child, _LOOP))
            else:
                found += _list_images(full, child, ancestors | {(st.st_dev, st.st_ino)}, ignored, any_name)
        elif name[name.rfind(".") :].lower() not in IMAGE_EXTENSIONS:  # no dot: the last letter, never listed
            ignored.append((child, "not an image file extension"))
        elif not stat.S_ISREG(st.st_mode):
            ignored.append((child, "not a regular file"))  # a pipe or device would block or never end
        else:
            found.append((child, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))  # not `st`: ~0.5 KB
    return found


def image_files(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files under `folder` as the scan finds them in a class folder (recursively, symlinks followed
    but not round a loop; hidden files, other extensions and pipes or devices left out), any name kept; and
    what was left out that may be an image (a pipe, a broken or looping link), with the reason."""
    folder = Path(folder)
    st = folder.stat()
    ignored: Ignored = []
    found = _list_images(str(folder), "", frozenset({(st.st_dev, st.st_ino)}), ignored, any_name=True)
    notable = [(folder / relpath, reason) for relpath, reason in ignored if not is_routine(reason)]
    return [folder / found_file[0] for found_file in found], notable


def is_routine(reason: str) -> bool:
    """Whether an ignored entry's reason is one every dataset has (hidden files, other file types), not one
    that may hide an image the user expects."""
    return reason.startswith(("hidden ", "not an image file extension"))


def _class_dirs(
    folder: str, rel: str, ancestors: frozenset[tuple[int, int]], ignored: Ignored, what: str
) -> dict[str, tuple[str, str, frozenset[tuple[int, int]]]]:
    """Sub-folders of `folder` (symlinks followed): name -> (path, relpath, ancestors for their walk).

    Anything else there is recorded in `ignored`, saying it is not in a class folder (`what`).
    """
    dirs = {}
    for name, child, st in _entries(folder, rel, ignored, folders_must_be_named=True):
        if not stat.S_ISDIR(st.st_mode):
            ignored.append((child, what))
        elif (st.st_dev, st.st_ino) in ancestors:
            ignored.append((child, _LOOP))
        else:
            dirs[name] = (os.path.join(folder, name), child, ancestors | {(st.st_dev, st.st_ino)})
    return dirs


class _Walk:
    """A dataset's walk: each class folder's images, once listed, go into one ImageTable per split (class
    indices in order of first sight until the walk ends), so the walk holds one folder's listing at a time."""

    def __init__(self, ignored: Ignored) -> None:
        self.ignored = ignored
        self.tables = {split: ImageTable([]) for split in SPLITS}
        self.class_ids: dict[str, int] = {}
        self.class_folders: dict[str, set[str]] = {}  # top folder ("all" when flat) -> its class folders
        self.empty: list[str] = []  # class folders holding no image

    def classes_in(
        self, top: str, folder: str, rel: str, ancestors: frozenset[tuple[int, int]], split_of: Callable[[str], int]
    ) -> None:
        """Walk the class folders in `folder`; `split_of` gives each image's split (an index in SPLITS)."""
        dirs = _class_dirs(folder, rel, ancestors, self.ignored, "not in a class folder")
        self.class_folders[top] = set(dirs)
        for name, where in dirs.items():
            files = _list_images(*where, self.ignored)
            if not files:
                self.empty.append(where[0])
                continue
            class_id = self.class_ids.setdefault(name, len(self.class_ids))
            files.sort(key=lambda item: item[0])  # by relpath: the order inside (split, class)
            for relpath, *file_stat in files:  # size, mtime_ns, ino, ctime_ns
                self.tables[SPLITS[split := split_of(relpath)]].append(relpath, class_id, split, *file_stat)

    def table(self, class_names: list[str]) -> ImageTable:
        """The entries in canonical order (split, class, path): train's table, the others appended to it
        and let go (never a second copy of the largest)."""
        index = {name: i for i, name in enumerate(class_names)}
        class_map = np.array([index[name] for name in self.class_ids], dtype=np.int32)
        entries = self.tables.pop("train")
        entries.rename_classes(class_map, class_names)
        for split in SPLITS[1:]:
            entries.extend(self.tables.pop(split), class_map)
        return entries


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


def _check_distinct_looking(where: Path, class_names: list[str]) -> None:
    """Refuse two class folders whose names differ only in Unicode normalisation (macOS writes "é" as e and an
    accent, Linux as one character): they read as one class, and would be scored as two."""
    seen: dict[str, str] = {}
    for name in class_names:
        other = seen.setdefault(unicodedata.normalize("NFC", name), name)
        if other != name:
            raise TlfeatError(f"{where}: class folders {other!r} and {name!r} look the same but are spelt with "
                              "different Unicode characters (NFC and NFD); merge them, or rename one")


def _split_folders(root: Path, names: set[str]) -> dict[str, str]:
    """The pre-split layout's folders by split ("train" -> "Train"), empty for a flat dataset.

    train/, val/ and test/ are split folders whatever else is there, as they always were; another spelling
    (Train/, validation/, ...) only when a train folder and another split's are both present, so that a flat
    dataset can still have a class named Train or Validation. Two folders for one split are refused.
    """
    found: dict[str, str] = {}
    for name in sorted(names):
        split = SPLIT_FOLDERS.get(name.lower())
        if split is None:
            continue
        if split in found:
            raise TlfeatError(f"{root}: {found[split]}/ and {name}/ both hold the {split} split; merge them, or "
                              "rename one")
        found[split] = name
    if not ("train" in found and len(found) >= 2):
        found = {split: name for split, name in found.items() if name == split}
    return {split: found[split] for split in SPLITS if split in found}


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
    shares, ratio_note = normalise_ratios(ratios)
    ignored: Ignored = []
    root_stat = root.stat()
    root_id = frozenset({(root_stat.st_dev, root_stat.st_ino)})
    names = {name for name, _, st in _entries(str(root), "", []) if stat.S_ISDIR(st.st_mode)}
    split_folders = _split_folders(root, names)

    walk = _Walk(ignored)
    notes = [ratio_note] if ratio_note else []
    if split_folders:
        if "train" not in split_folders:
            present = ", ".join(f"{folder}/" for folder in split_folders.values())
            raise TlfeatError(f"{root}: has {present} but no train folder ({PRE_SPLIT_HINT})")
        top = _class_dirs(str(root), "", root_id, ignored, "not in a train/val/test folder")
        carve = "val" not in split_folders
        for split, name in split_folders.items():
            folder, rel, ancestors = top[name]
            if split == "train":
                walk.classes_in(split, folder, rel, ancestors,
                                lambda path: _carved_split_of(path, seed, shares) if carve else 0)
            else:
                walk.classes_in(split, folder, rel, ancestors, lambda path, index=SPLITS.index(split): index)
        ignored += [(name, "not a train/val/test folder of a pre-split dataset")
                    for name in sorted(set(top) - set(split_folders.values()))]
        if any(name != split for split, name in split_folders.items()):
            notes.append("split folders: " + ", ".join(f"{name}/ is {split}" for split, name in split_folders.items()))
        layout = "pre-split"
    else:
        walk.classes_in("all", str(root), "", root_id, lambda path: _flat_split_of(path, seed, shares))
        layout = "flat"

    class_names = sorted(set().union(*walk.class_folders.values()))
    where = root / split_folders["train"] if layout == "pre-split" else root
    if not class_names:
        hint = f"; {PRE_SPLIT_HINT}" if layout == "pre-split" else ""
        raise TlfeatError(f"{where}: no class folders found (expected one sub-folder per class{hint})")
    if len(class_names) < 2:
        raise TlfeatError(f"{where}: only one class folder ({class_names[0]}); need at least 2 classes")
    if walk.empty:
        raise TlfeatError(f"{walk.empty[0]}: class folder holds no images")
    _check_distinct_looking(where, class_names)
    if layout == "pre-split":
        for split, folders in walk.class_folders.items():
            if not folders and split != "train":  # before: an empty val/ silently meant "no val split"
                carved = "; without it, val is carved from train" if split == "val" else ""
                raise TlfeatError(
                    f"{root / split_folders[split]}: holds no class folders: add them, or remove the folder{carved}"
                )
        missing = [c for c in class_names if c not in walk.class_folders["train"]]
        if missing:
            raise TlfeatError(f"{where}: no training folder for class(es) {', '.join(missing)}")

    entries = walk.table(class_names)
    in_train = entries.classes_in("train")
    if len(in_train) < len(class_names):
        missing = ", ".join(c for c in class_names if c not in in_train)
        notes.append(f"class(es) {missing} drew no train image (too few images for these shares)")
    return DatasetScan(root, layout, class_names, entries, ignored, seed, shares, notes)
