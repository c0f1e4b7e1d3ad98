from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tlfeat.data.scan import scan_dataset
from tlfeat.errors import TlfeatError


def _touch_files(root: Path, n_classes: int, per_class: int) -> None:
    for c in range(n_classes):
        folder = root / f"c{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:04d}.jpg").write_bytes(b"x")  # the scan never decodes


def test_flat_split_matches_the_study_ratios(tmp_path: Path) -> None:
    _touch_files(tmp_path, 15, 480)
    scan = scan_dataset(tmp_path, seed=0)
    assert scan.layout == "flat" and len(scan.class_names) == 15
    per_class = Counter((e.class_name, e.split) for e in scan.entries)
    for name in scan.class_names:
        assert (per_class[(name, "train")], per_class[(name, "val")], per_class[(name, "test")]) == (270, 90, 120)


def test_split_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    _touch_files(tmp_path, 3, 40)
    first = {e.relpath: e.split for e in scan_dataset(tmp_path, seed=7).entries}
    again = {e.relpath: e.split for e in scan_dataset(tmp_path, seed=7).entries}
    other = {e.relpath: e.split for e in scan_dataset(tmp_path, seed=8).entries}
    assert first == again
    assert first != other


def test_split_is_stable_when_an_image_is_added(tmp_path: Path) -> None:
    _touch_files(tmp_path, 2, 100)
    before = {e.relpath: e.split for e in scan_dataset(tmp_path).entries}
    (tmp_path / "c00" / "new.jpg").write_bytes(b"x")
    after = {e.relpath: e.split for e in scan_dataset(tmp_path).entries}
    moved = [p for p in before if before[p] != after[p]]
    assert len(moved) <= 2  # at most the images at the share boundaries


def test_custom_ratios(tmp_path: Path) -> None:
    _touch_files(tmp_path, 2, 100)
    counts = Counter(e.split for e in scan_dataset(tmp_path, ratios=(80, 0, 20)).entries)
    assert counts == {"train": 160, "test": 40}


def test_presplit_layout_carves_val_from_train(scene15: Path) -> None:
    scan = scan_dataset(scene15)
    assert scan.layout == "pre-split"
    assert len(scan.class_names) == 15
    assert scan.split_counts() == {"train": 1125, "val": 375, "test": 2985}
    per_class = Counter((e.class_name, e.split) for e in scan.entries)
    assert all(per_class[(c, "val")] == 25 for c in scan.class_names)
    assert scan.entries == scan_dataset(scene15).entries


def test_presplit_with_val_folder_keeps_it(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        _touch_files(tmp_path / split, 2, n)
    assert scan_dataset(tmp_path).split_counts() == {"train": 12, "val": 4, "test": 6}


def test_hidden_and_non_image_files_are_ignored_with_reasons(tmp_path: Path) -> None:
    _touch_files(tmp_path, 2, 3)
    (tmp_path / "c00" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "c00" / "notes.txt").write_text("hello")
    (tmp_path / "c01" / "folder.jpg").mkdir()  # a directory named like an image
    os.symlink("/etc/hostname", tmp_path / "c01" / "outside.jpg")
    os.symlink(tmp_path / "c01" / "loop.jpg", tmp_path / "c01" / "loop.jpg")
    scan = scan_dataset(tmp_path)
    assert len(scan.entries) == 6
    reasons = dict(scan.ignored)
    assert reasons["c00/.DS_Store"] == "hidden file"
    assert reasons["c00/notes.txt"] == "not an image file extension"
    assert reasons["c01/outside.jpg"] == "symlink points outside the dataset"
    assert reasons["c01/loop.jpg"] == "broken or looping symlink"


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "dataset folder not found"),
        ("file", "is a file, not a dataset folder"),
        ("empty", "no class folders found"),
        ("one-class", "need at least 2 classes"),
        ("empty-class", "class folder holds no images"),
        ("split-without-train", "no train/ folder"),
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
