"""Which cached rows a rerun reuses: stat first, the file's SHA-256 when the stat is not conclusive.

Before: a file's identity was (relative path, size, mtime_ns). Two same-size files with the same mtime
swapped between class folders by mv, a `cp -p` of another same-size image, a symlink re-pointed: the
rerun said "up to date" and the rows kept the old file's features under the new label. And a dataset
copied with whole-second mtimes (tar, zip, scp -p) was computed again whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from conftest import make_dataset
from tlfeat import cache
from tlfeat.extraction.run import extract

FAST = dict(backbone="vgg16", weights="none", image_size=32, progress=False)
SAME_TIME = 1_700_000_000_123_456_789  # ns: every file gets this mtime, as an archive's shared timestamp


def _bmp_dataset(root: Path) -> Path:
    """BMPs of one size (the same byte count each), every one with the same mtime."""
    make_dataset(root, per_class=4, ext="bmp")
    for path in root.rglob("*.bmp"):
        os.utime(path, ns=(SAME_TIME, SAME_TIME))
    return root


def _rows_by_path(out: Path) -> dict[str, np.ndarray]:
    data = cache.load(out)
    return {str(p): f for p, f in zip(data.paths, data.features)}


def _assert_each_row_is_its_files(data: Path, out: Path, tmp_path: Path) -> None:
    """Every row of `out` equals a fresh extraction of the dataset as it is now."""
    fresh = tmp_path / "fresh.h5"
    extract(data, fresh, **FAST)
    got, want = _rows_by_path(out), _rows_by_path(fresh)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    fresh.unlink()


def test_same_size_same_mtime_files_swapped_between_classes_are_recomputed(tmp_path: Path) -> None:
    data, out = _bmp_dataset(tmp_path / "ds"), tmp_path / "c.h5"
    assert extract(data, out, **FAST).n_computed == 12
    a, b, spare = data / "class_0" / "img_001.bmp", data / "class_1" / "img_002.bmp", data / "swap.tmp"
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    a.rename(spare)  # mv keeps each file's bytes and mtime: only the path (so the label) changes
    b.rename(a)
    spare.rename(b)
    second = extract(data, out, **FAST)
    assert not second.up_to_date and second.n_computed == 2 and second.n_reused == 10
    assert "2 files changed stat but not size: read to compare their SHA-256 with the cache's, 0 have the same " \
           "bytes (reused)" in second.notes
    _assert_each_row_is_its_files(data, out, tmp_path)
    assert extract(data, out, **FAST).up_to_date  # and now nothing is read again


def test_a_same_size_image_copied_over_another_with_its_time_is_recomputed(tmp_path: Path) -> None:
    data, out = _bmp_dataset(tmp_path / "ds"), tmp_path / "c.h5"
    extract(data, out, **FAST)
    target = data / "class_2" / "img_000.bmp"
    shutil.copy2(data / "class_0" / "img_003.bmp", target)  # cp -p: same size, same mtime, other bytes
    assert target.stat().st_mtime_ns == SAME_TIME
    second = extract(data, out, **FAST)
    assert second.n_computed == 1 and second.n_reused == 11
    _assert_each_row_is_its_files(data, out, tmp_path)


def test_a_symlink_re_pointed_to_a_same_size_file_is_recomputed(tmp_path: Path) -> None:
    store = _bmp_dataset(tmp_path / "store")
    data, out = tmp_path / "ds", tmp_path / "c.h5"
    for path in sorted(store.rglob("*.bmp")):
        link = data / path.relative_to(store)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    extract(data, out, **FAST)
    link = data / "class_1" / "img_000.bmp"
    link.unlink()
    link.symlink_to(store / "class_2" / "img_001.bmp")  # stat follows the link: same size and mtime
    second = extract(data, out, **FAST)
    assert second.n_computed == 1 and second.n_reused == 11
    _assert_each_row_is_its_files(data, out, tmp_path)


def test_a_dataset_moved_with_whole_second_mtimes_is_reused_not_recomputed(tmp_path: Path) -> None:
    data, out = make_dataset(tmp_path / "ds", per_class=4), tmp_path / "c.h5"
    extract(data, out, **FAST)
    before = _rows_by_path(out)
    moved = tmp_path / "elsewhere" / "ds"
    shutil.copytree(data, moved)  # a copy: new inodes and ctimes
    for path in moved.rglob("*.png"):  # tar, zip and scp -p keep whole seconds
        seconds = path.stat().st_mtime_ns // 10**9 * 10**9
        os.utime(path, ns=(seconds, seconds))
    shutil.rmtree(data)
    second = extract(moved, out, overwrite=True, **FAST)  # another folder: `overwrite` makes it this one's
    assert second.n_computed == 0 and second.n_reused == 12
    assert ("12 files changed stat but not size: read to compare their SHA-256 with the cache's, 12 have the same "
            "bytes (reused)") in second.notes
    after = _rows_by_path(out)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    third = extract(moved, out, **FAST)  # the rewritten cache holds the new stats: no file is read again
    assert third.up_to_date and third.n_computed == 0


def test_the_cache_records_each_files_stat_and_sha256(tmp_path: Path) -> None:
    data, out = make_dataset(tmp_path / "ds", per_class=4), tmp_path / "c.h5"
    extract(data, out, **FAST)
    with h5py.File(out) as handle:
        paths = list(handle["paths"].asstr()[:])
        inos, ctimes, digests = handle["file_ino"][:], handle["file_ctime_ns"][:], handle["file_sha256"][:]
    for path, ino, ctime, digest in zip(paths, inos, ctimes, digests):
        st = (data / path).stat()
        assert (ino, ctime) == (st.st_ino, st.st_ctime_ns)
        assert bytes(digest) == hashlib.sha256((data / path).read_bytes()).digest()


def _as_old_format(out: Path) -> None:
    """Make `out` a cache as tlfeat wrote it before inode, ctime and SHA-256 were kept."""
    with h5py.File(out, "r+") as handle:
        for name in ("file_ino", "file_ctime_ns", "file_sha256"):
            del handle[name]


def test_a_cache_from_before_file_digests_is_reused_and_given_them(tmp_path: Path) -> None:
    data, out = make_dataset(tmp_path / "ds", per_class=4), tmp_path / "c.h5"
    extract(data, out, **FAST)
    before = _rows_by_path(out)
    _as_old_format(out)
    assert len(cache.load(out).paths) == 12  # still readable
    second = extract(data, out, **FAST)  # trusted on (size, mtime) as before; rewritten with the new columns
    assert second.n_computed == 0 and second.n_reused == 12 and not second.up_to_date
    after = _rows_by_path(out)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    with h5py.File(out) as handle:
        paths, digests = list(handle["paths"].asstr()[:]), handle["file_sha256"][:]
    assert all(bytes(d) == hashlib.sha256((data / p).read_bytes()).digest() for p, d in zip(paths, digests))
    assert extract(data, out, **FAST).up_to_date


def test_an_old_format_cache_row_whose_mtime_changed_is_recomputed(tmp_path: Path) -> None:
    # No digest to compare with: a row of an older cache is reused on (size, mtime) or computed again.
    data, out = make_dataset(tmp_path / "ds", per_class=4), tmp_path / "c.h5"
    extract(data, out, **FAST)
    _as_old_format(out)
    touched = data / "class_1" / "img_002.png"
    os.utime(touched, ns=(1, 10**18))
    second = extract(data, out, **FAST)
    assert second.n_computed == 1 and second.n_reused == 11
