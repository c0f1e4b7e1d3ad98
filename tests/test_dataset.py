from __future__ import annotations

import os
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_dataset, make_image
from tlfeat.data.scan import DEFAULT_RATIOS, SPLITS, ImageEntry, class_of, scan_dataset, split_of
from tlfeat.errors import TlfeatError


def _touch_files(root: Path, n_classes: int, per_class: int) -> None:
    for c in range(n_classes):
        folder = root / f"c{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:04d}.jpg").write_bytes(b"x")  # the scan never decodes


def test_flat_split_follows_the_ratios_within_sampling_noise(tmp_path: Path) -> None:
    _touch_files(tmp_path, 15, 480)
    scan = scan_dataset(tmp_path, seed=0)
    assert scan.layout == "flat" and len(scan.class_names) == 15
    per_class = Counter((e.class_name, e.split) for e in scan.entries)
    for name in scan.class_names:
        for split, share in zip(("train", "val", "test"), DEFAULT_RATIOS):
            expected, sd = 480 * share, (480 * share * (1 - share)) ** 0.5
            assert abs(per_class[(name, split)] - expected) < 4 * sd, (name, split, per_class[(name, split)])
    totals = scan.split_counts()
    assert abs(totals["train"] / 7200 - DEFAULT_RATIOS[0]) < 0.02


def test_split_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    _touch_files(tmp_path, 3, 40)
    first = {e.relpath: e.split for e in scan_dataset(tmp_path, seed=7).entries}
    again = {e.relpath: e.split for e in scan_dataset(tmp_path, seed=7).entries}
    other = {e.relpath: e.split for e in scan_dataset(tmp_path, seed=8).entries}
    assert first == again
    assert first != other


def test_an_images_split_depends_on_itself_alone(tmp_path: Path) -> None:
    # The case reported in the issue: 3 classes of 12; adding 2 valid images and 3 unreadable files
    # moved existing images between splits (a model could then be scored on its own training images).
    data = tmp_path / "data"
    make_dataset(data, n_classes=3, per_class=12)
    before = {e.relpath: e.split for e in scan_dataset(data).entries}
    make_image(data / "class_0" / "added_a.png", 0, 50)
    make_image(data / "class_1" / "added_b.png", 1, 51)
    for i in range(3):
        (data / "class_2" / f"unreadable_{i}.jpg").write_bytes(b"not a jpeg")
    (data / "class_1" / "img_003.png").unlink()
    after = {e.relpath: e.split for e in scan_dataset(data).entries}
    moved = {p: (before[p], after[p]) for p in before.keys() & after.keys() if before[p] != after[p]}
    assert not moved
    for relpath, split in after.items():  # a function of (relative path, seed, ratios) alone
        assert split_of(relpath, 0, DEFAULT_RATIOS) == split


def test_split_is_stable_when_many_images_come_and_go(tmp_path: Path) -> None:
    _touch_files(tmp_path, 2, 100)
    before = {e.relpath: e.split for e in scan_dataset(tmp_path).entries}
    for i in range(0, 100, 3):
        (tmp_path / "c00" / f"{i:04d}.jpg").unlink()
    for i in range(40):
        (tmp_path / "c01" / f"new{i}.jpg").write_bytes(b"x")
    after = {e.relpath: e.split for e in scan_dataset(tmp_path).entries}
    assert all(after[p] == before[p] for p in before.keys() & after.keys())


def test_custom_ratios(tmp_path: Path) -> None:
    _touch_files(tmp_path, 2, 100)
    scan = scan_dataset(tmp_path, ratios=(80, 0, 20))
    counts = Counter(e.split for e in scan.entries)
    assert set(counts) == {"train", "test"} and abs(counts["train"] - 160) < 4 * (200 * 0.8 * 0.2) ** 0.5
    assert scan.notes == []  # 80+0+20 = 100: nothing rescaled


def test_ratios_that_do_not_sum_to_100_are_rescaled_and_said_so(tmp_path: Path) -> None:
    _touch_files(tmp_path, 2, 10)
    scan = scan_dataset(tmp_path, ratios=(50, 30, 30))
    assert scan.ratios == pytest.approx((50 / 110, 30 / 110, 30 / 110))
    assert scan.notes == ["split shares 50,30,30 sum to 110, neither 100 nor 1: rescaled to 45.45%,27.27%,27.27%"]
    # Fractions, the Python default's unit (before: "sum to 0.9, not 100", as if percent were expected)
    assert scan_dataset(tmp_path, ratios=(0.5, 0.2, 0.2)).notes == [
        "split shares 0.5,0.2,0.2 sum to 0.9, neither 100 nor 1: rescaled to 55.56%,22.22%,22.22%"]


@pytest.mark.parametrize("ratios", [(float("nan"), 1, 1), (1, float("inf"), 1), (0, 1, 1), (1, -1, 1), (1, 1),
                                    "56.25,18.75,25", ("1", "2", "3")])  # strings: a ValueError from a format before
def test_bad_ratios_are_one_line_errors(tmp_path: Path, ratios: tuple) -> None:
    _touch_files(tmp_path, 2, 3)
    with pytest.raises(TlfeatError, match="need three finite, non-negative numbers with train > 0"):
        scan_dataset(tmp_path, ratios=ratios)


def test_presplit_layout_carves_val_from_train(scene15: Path) -> None:
    scan = scan_dataset(scene15)
    assert scan.layout == "pre-split"
    assert len(scan.class_names) == 15
    # Pinned: the rule is a pure function of (path, seed, ratios); changing it would re-label every cache.
    assert scan.split_counts() == {"train": 1089, "val": 411, "test": 2985}
    per_class = Counter((e.class_name, e.split) for e in scan.entries)
    assert all(abs(per_class[(c, "val")] - 25) < 4 * (100 * 0.25 * 0.75) ** 0.5 for c in scan.class_names)
    assert scan.entries == scan_dataset(scene15).entries


def test_presplit_with_val_folder_keeps_it(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        _touch_files(tmp_path / split, 2, n)
    assert scan_dataset(tmp_path).split_counts() == {"train": 12, "val": 4, "test": 6}


def test_an_empty_val_or_test_folder_is_refused(tmp_path: Path) -> None:
    # Before: an empty val/ silently meant "no val split": --search failed later, the report head had no val.
    _touch_files(tmp_path / "train", 2, 6)
    (tmp_path / "val").mkdir()
    with pytest.raises(TlfeatError, match=r"val: holds no class folders: .* without it, val is carved from train"):
        scan_dataset(tmp_path)
    (tmp_path / "val").rmdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(TlfeatError, match=r"test: holds no class folders: add them, or remove the folder$"):
        scan_dataset(tmp_path)


def test_hidden_and_non_image_files_are_ignored_with_reasons(tmp_path: Path) -> None:
    _touch_files(tmp_path, 2, 3)
    (tmp_path / "c00" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "c00" / ".thumbnails").mkdir()
    (tmp_path / "c00" / "notes.txt").write_text("hello")
    (tmp_path / "c01" / "folder.jpg").mkdir()  # a directory named like an image: walked into
    os.symlink(tmp_path / "c01" / "loop.jpg", tmp_path / "c01" / "loop.jpg")
    os.symlink(tmp_path / "c01" / "gone.jpg", tmp_path / "c01" / "dangling.jpg")
    os.mkfifo(tmp_path / "c01" / "pipe.jpg")
    (tmp_path / "README.md").write_text("about this set")
    scan = scan_dataset(tmp_path)
    assert len(scan.entries) == 6
    assert dict(scan.ignored) == {
        "c00/.DS_Store": "hidden file",
        "c00/.thumbnails": "hidden folder",
        "c00/notes.txt": "not an image file extension",
        "c01/loop.jpg": "symlink loop",
        "c01/dangling.jpg": "broken symlink (its target is missing)",
        "c01/pipe.jpg": "not a regular file",
        "README.md": "not in a class folder",
    }


def _write_bytes_name(folder: Path, name: bytes, payload: bytes = b"x") -> None:
    with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
        handle.write(payload)


def test_names_that_are_not_utf8_are_ignored_with_a_reason(tmp_path: Path) -> None:
    # Before: the whole scan stopped with UnicodeEncodeError.
    _touch_files(tmp_path, 2, 3)
    _write_bytes_name(tmp_path / "c00", b"caf\xe9.jpg")
    (tmp_path / "c00" / "sub").mkdir()
    latin_folder = os.path.join(os.fsencode(tmp_path / "c00" / "sub"), b"cl\xe4sse")
    os.mkdir(latin_folder)
    _write_bytes_name(Path(os.fsdecode(latin_folder)), b"a.jpg")
    scan = scan_dataset(tmp_path)
    assert len(scan.entries) == 6 and scan.class_names == ["c00", "c01"]
    assert dict(scan.ignored) == {
        "c00/caf\\xe9.jpg": "name is not valid UTF-8 (cannot be stored in the cache)",
        "c00/sub/cl\\xe4sse": "name is not valid UTF-8 (cannot be stored in the cache)",
    }
    # A class folder so named is an error: before, the class was dropped, counted among "1 ignored".
    latin_class = os.path.join(os.fsencode(tmp_path), b"cl\xe4sse")
    os.mkdir(latin_class)
    _write_bytes_name(Path(os.fsdecode(latin_class)), b"a.jpg")
    with pytest.raises(TlfeatError, match=r"cl\\xe4sse: folder name is not valid UTF-8 .*; rename it$"):
        scan_dataset(tmp_path)


def test_macos_zip_leftovers_and_jfif_files(tmp_path: Path) -> None:
    # Before: a __MACOSX/ folder stopped extract ("class folder holds no images"), and .jfif photos (a browser's
    # JPEG downloads) were ignored as "not an image file extension".
    _touch_files(tmp_path, 2, 2)
    (tmp_path / "__MACOSX" / "c00").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "c00" / "._0000.jpg").write_bytes(b"x")
    (tmp_path / "c00" / "photo.jfif").write_bytes(b"x")
    scan = scan_dataset(tmp_path)
    assert scan.class_names == ["c00", "c01"] and len(scan.entries) == 5
    assert dict(scan.ignored) == {"__MACOSX": "hidden folder"}


def test_symlinks_are_followed_wherever_they_point_and_keep_their_path(tmp_path: Path) -> None:
    # Before: symlinked class folders and test/ folders were dropped, and a subset made of symlinks
    # into another dataset was refused ("class folder holds no images").
    elsewhere = tmp_path / "elsewhere"
    _touch_files(elsewhere / "train", 2, 4)
    _touch_files(elsewhere / "test", 2, 2)
    data = tmp_path / "data"
    (data / "train" / "c00").mkdir(parents=True)
    for i in range(3):  # a subset: symlinks to files of another dataset
        os.symlink(elsewhere / "train" / "c00" / f"{i:04d}.jpg", data / "train" / "c00" / f"{i:04d}.jpg")
    os.symlink(elsewhere / "train" / "c01", data / "train" / "c01")  # a symlinked class folder
    os.symlink(elsewhere / "test", data / "test")  # a symlinked split folder
    os.symlink(data / "train", data / "train" / "c01-loop")  # a folder that contains itself
    os.symlink(".", elsewhere / "train" / "c01" / "self")  # reached through a symlink, loops too
    scan = scan_dataset(data)
    paths = {e.relpath: e.split for e in scan.entries}
    assert scan.class_names == ["c00", "c01"]
    assert {p for p, s in paths.items() if s == "test"} == {f"test/c0{c}/{i:04d}.jpg" for c in (0, 1) for i in range(2)}
    assert {p for p in paths if p.startswith("train/")} == (
        {f"train/c00/{i:04d}.jpg" for i in range(3)} | {f"train/c01/{i:04d}.jpg" for i in range(4)}
    )
    assert dict(scan.ignored) == {
        "train/c01-loop": "symlink loop (a folder that contains itself)",
        "train/c01/self": "symlink loop (a folder that contains itself)",
    }
    entry = next(e for e in scan.entries if e.relpath == "train/c00/0000.jpg")
    assert entry.size == 1  # the target's identity, not the link's


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "dataset folder not found"),
        ("file", "is a file, not a dataset folder"),
        ("empty", "no class folders found"),
        ("one-class", "need at least 2 classes"),
        ("empty-class", "class folder holds no images"),
        ("split-without-train", "but no train folder"),
    ],
)
def test_bad_datasets_get_one_line_errors(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout != "missing":
        root.mkdir()
    if layout == "one-class":
        _touch_files(root, 1, 3)
    elif layout == "empty-class":
        _touch_files(root, 2, 3)
        (root / "zz_empty").mkdir()
    elif layout == "split-without-train":
        _touch_files(root / "test", 2, 3)
    with pytest.raises(TlfeatError, match=message) as info:
        scan_dataset(root)
    assert "\n" not in str(info.value)
    assert str(root.name) in str(info.value)


def test_the_scan_holds_its_entries_compactly(tmp_path: Path) -> None:
    # Before: a list of ImageEntry objects, 196 bytes a file held after the scan, and 370 at its peak (each
    # class folder's listing kept every file's cached stat, about 0.5 KB, until the folder was done).
    _touch_files(tmp_path, 4, 5000)
    scan_dataset(tmp_path)  # imports and first-call caches out of the figures
    tracemalloc.start()
    try:
        scan = scan_dataset(tmp_path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(scan.entries) == 20000
    assert held / 20000 < 80 and peak / 20000 < 250, f"held {held / 20000:.0f} B/file, peak {peak / 20000:.0f}"


def test_the_entries_read_as_a_list_in_canonical_order(tmp_path: Path) -> None:
    # Pre-split, val carved from train, test holding only some classes, files in sub-folders (whose walk
    # order differs from path order: "a.jpg" sorts before "a/b.jpg").
    for path in ["train/zeta/a/b.jpg", "train/zeta/a.jpg", "train/alpha/x.png", "train/alpha/y.png",
                 "train/mid/m1.jpg", "train/mid/m2.jpg", "test/zeta/t.jpg", "test/alpha/t.jpg", "train/mid/n.txt"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"xy")
    scan = scan_dataset(tmp_path, seed=3)
    entries = list(scan.entries)
    assert scan.class_names == ["alpha", "mid", "zeta"] and len(entries) == 8
    ranks = [(SPLITS.index(e.split), scan.class_names.index(e.class_name), e.relpath) for e in entries]
    assert ranks == sorted(ranks)
    assert all(e.class_name == class_of(e.relpath, "pre-split") and e.size == 2 for e in entries)
    assert [e.relpath for e in entries if e.split == "test"] == ["test/alpha/t.jpg", "test/zeta/t.jpg"]
    assert {e.split for e in entries if e.relpath.startswith("train/")} <= {"train", "val"}
    assert scan.entries == entries and scan.entries[-1] == entries[-1] and scan.entries[2:5] == entries[2:5]
    assert isinstance(scan.entries[0], ImageEntry)
    with pytest.raises(IndexError):
        scan.entries[8]
    assert scan.split_counts() == {s: n for s in SPLITS if (n := sum(e.split == s for e in entries))}


def test_split_folders_are_known_in_any_case_and_by_their_usual_names(tmp_path: Path) -> None:
    # Before: Train/ and Test/ were read as two classes of a flat dataset (every label wrong, no word said),
    # and validation/ was ignored while val was carved from train.
    root = tmp_path / "data"
    _touch_files(root / "Train", 2, 4)
    _touch_files(root / "validation", 2, 2)
    _touch_files(root / "TEST", 2, 3)
    scan = scan_dataset(root)
    assert scan.layout == "pre-split" and scan.class_names == ["c00", "c01"]
    assert scan.split_counts() == {"train": 8, "val": 4, "test": 6}
    assert scan.notes == ["split folders: Train/ is train, validation/ is val, TEST/ is test"]
    assert all(e.relpath.startswith({"train": "Train/", "val": "validation/", "test": "TEST/"}[e.split])
               for e in scan.entries)
    _touch_files(root / "train", 2, 1)
    with pytest.raises(TlfeatError, match=r"Train/ and train/ both hold the train split"):
        scan_dataset(root)
    flat = tmp_path / "flat"
    _touch_files(flat / "bus", 1, 2)
    _touch_files(flat / "test", 1, 2)
    with pytest.raises(TlfeatError, match=r"has test/ but no train folder \(a top-level train, val or test folder"):
        scan_dataset(flat)
    # Another spelling alone is a class, as it always was: a flat dataset of vehicles may have Train/.
    vehicles = tmp_path / "vehicles"
    for name in ("Bus", "Car", "Train"):
        (vehicles / name).mkdir(parents=True)
        (vehicles / name / "0.jpg").write_bytes(b"x")
    assert scan_dataset(vehicles).class_names == ["Bus", "Car", "Train"]


def test_class_names_that_differ_only_in_unicode_normalisation_are_refused(tmp_path: Path) -> None:
    # Before: "café" written by macOS (NFD) and by Linux (NFC) became two classes that print the same.
    import unicodedata

    _touch_files(tmp_path / unicodedata.normalize("NFC", "café"), 1, 2)
    _touch_files(tmp_path / unicodedata.normalize("NFD", "café"), 1, 2)
    _touch_files(tmp_path / "forest", 1, 2)
    with pytest.raises(TlfeatError, match=r"look the same but are spelt with different Unicode characters"):
        scan_dataset(tmp_path)
