"""Integrity: damaged caches and shards, non-finite features, and skipped files that get fixed."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import make_image, run_cli
from tlfeat import cache
from tlfeat.errors import Interrupted, TlfeatError
from tlfeat.extraction.run import extract
from tlfeat.extraction.shards import NON_FINITE_REASON
from tlfeat.runtime import Pending

FAST = dict(backbone="vgg16", weights="none", image_size=32, progress=False)


def _overwrite_inside_features(out: Path, n_bytes: int = 4096) -> None:
    """Overwrite bytes in the middle of the first stored chunk of `features`, as a bad disk block would."""
    with h5py.File(out, "r") as handle:
        info = handle["features"].id.get_chunk_info(0)
    assert info.size > n_bytes + 200
    with open(out, "r+b") as raw:
        raw.seek(info.byte_offset + 100)
        raw.write(np.random.default_rng(0).bytes(n_bytes))


def test_damaged_features_are_refused_by_every_reader(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: 4 KB overwritten inside features passed through extract ("up to date") and fit-head unnoticed.
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    _overwrite_inside_features(out)
    damaged = rf"{out}: damaged cache: features fails its checksum or cannot be read \(.*\); rebuild it with extract --overwrite"
    with pytest.raises(TlfeatError, match=damaged):
        cache.load(out)
    with cache.open_rows(out) as (rows, features):
        assert len(rows) == 24
        with pytest.raises(TlfeatError, match=damaged):
            features[0:8]
    with pytest.raises(TlfeatError, match=damaged):
        extract(tiny_dataset, out, **FAST)
    fitted = run_cli("fit-head", str(out), "--head", "logreg", "--out", str(tmp_path / "heads"))
    assert fitted.returncode == 1 and "Traceback" not in fitted.stderr
    assert [line for line in fitted.stderr.splitlines() if line.startswith("error: ")] == [
        line for line in fitted.stderr.splitlines() if line.strip()
    ] and "damaged cache: features fails its checksum" in fitted.stderr
    rebuilt = extract(tiny_dataset, out, overwrite=True, **FAST)
    assert rebuilt.n_computed == 24 and any("could not reuse" in note for note in rebuilt.notes)
    assert np.isfinite(cache.load(out).features).all()


def _damage(out: Path, kind: str) -> None:
    with h5py.File(out, "r+") as handle:
        if kind == "newer":
            handle.attrs["format_version"] = 99
        elif kind == "missing-attribute":
            del handle.attrs["backbone"]
        elif kind == "bad-json":
            handle.attrs["split_ratios"] = "{not json"
        elif kind == "key-garbage":
            handle.attrs["input_size"] = "big"
        elif kind == "label-range":
            handle["labels"][3] = 7
        elif kind == "bad-split":
            split = handle["split"].asstr()[...].tolist()
            del handle["split"]
            handle.create_dataset("split", data=["holdout"] + split[1:], dtype=h5py.string_dtype())
        elif kind == "row-count":
            paths = handle["paths"].asstr()[...].tolist()
            del handle["paths"]
            handle.create_dataset("paths", data=paths[:-1], dtype=h5py.string_dtype())
        elif kind == "no-format-version":
            del handle.attrs["format_version"]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("newer", "written by a newer tlfeat (cache format version 99; this tlfeat reads up to 1): upgrade tlfeat"),
        ("missing-attribute", "damaged cache: attribute backbone missing"),
        ("bad-json", "damaged cache: its attributes cannot be read (JSONDecodeError)"),
        ("key-garbage", "damaged cache: its key attributes do not parse"),
        ("label-range", "damaged cache: label 7 at row 3 is outside its 3 classes (1 such rows)"),
        ("bad-split", "damaged cache: split values ['holdout'] are not train/val/test"),
        ("row-count", "damaged cache: row counts disagree (features 24, paths 23)"),
        ("no-format-version", "HDF5 file is not a tlfeat cache (no features/format_version)"),
    ],
)
def test_damaged_structure_is_a_one_line_error_naming_the_file(
    tiny_dataset: Path, tmp_path: Path, kind: str, message: str
) -> None:
    # Before: KeyError / JSONDecodeError tracebacks, or out-of-range labels and newer formats read as if fine.
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    _damage(out, kind)
    for read in (cache.load, lambda p: extract(tiny_dataset, p, **FAST)):
        with pytest.raises(TlfeatError) as info:
            read(out)
        assert str(info.value).startswith(f"{out}: ") and message in str(info.value), str(info.value)
        assert "\n" not in str(info.value)
    assert "overwrite" in str(info.value)  # extract says how to replace it (before: not always)


def test_a_damaged_cache_says_how_to_replace_it_whatever_its_path(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: a damaged cache was told from a refusal by "overwrite" in its message, so a path that held the
    # word lost the advice.
    out = tmp_path / "overwrite-tests" / "c.h5"
    out.parent.mkdir()
    extract(tiny_dataset, out, **FAST)
    _damage(out, "no-format-version")
    with pytest.raises(TlfeatError, match=r"not a tlfeat cache \(no features/format_version\); pass `overwrite` to "
                       r"compute it again$"):
        extract(tiny_dataset, out, **FAST)
    extract(tiny_dataset, out, overwrite=True, **FAST)
    _damage(out, "label-range")  # a damaged cache's own message already says how: not said twice
    with pytest.raises(TlfeatError, match=r"\(1 such rows\); rebuild it with extract --overwrite$"):
        extract(tiny_dataset, out, **FAST)


def _nan_in_first_row(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Pending.result

    def result(self: Pending) -> np.ndarray:
        features = original(self)
        features[0, 5] = np.nan  # as a model overflowing on one odd image would
        return features

    monkeypatch.setattr(Pending, "result", result)


def test_non_finite_features_are_a_failure_of_the_image_never_a_row(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: NaN rows were merged into the cache silently, and later reruns said "up to date".
    out = tmp_path / "c.h5"
    with monkeypatch.context() as patch:
        _nan_in_first_row(patch)
        summary = extract(tiny_dataset, out, batch_size=8, **FAST)
    assert summary.n_images == 21 and summary.n_skipped == 3
    assert {reason for _, reason in summary.skipped} == {NON_FINITE_REASON}
    stored = cache.load(out)
    assert len(stored) == 21 and np.isfinite(stored.features).all()
    # Not retried: the same files through the same model give the same features (a retry would recompute
    # them and rewrite the whole cache on every run).
    again = extract(tiny_dataset, out, batch_size=8, **FAST)
    assert again.up_to_date and again.n_computed == 0 and again.n_retried == 0 and again.n_skipped == 3

    # A cache written before non-finite rows were refused (no `rows_finite`): its NaN rows are recomputed.
    with h5py.File(out, "r+") as handle:
        handle["features"][4, 0] = np.inf
        del handle.attrs["rows_finite"]
    healed = extract(tiny_dataset, out, batch_size=8, **FAST)
    assert healed.n_computed == 1 and np.isfinite(cache.load(out).features).all()


def test_skipped_files_are_retried_on_every_run(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: a file fixed without changing its size or mtime (chmod, or mv back) stayed skipped forever.
    image = tiny_dataset / "class_0" / "fixed_later.png"
    make_image(image, 0, 77)
    good = image.read_bytes()
    image.write_bytes(b"\0" * len(good))  # unreadable now; same size as when it is fixed
    os.utime(image, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    out = tmp_path / "c.h5"
    first = extract(tiny_dataset, out, **FAST)
    assert first.skipped == [("class_0/fixed_later.png", "not an image Pillow can read")]
    still = extract(tiny_dataset, out, **FAST)  # still broken: retried by decoding alone, nothing to write
    assert still.up_to_date and still.n_retried == 1 and still.n_computed == 0
    from tlfeat.cli.extract import summary_line  # before: "up to date, ... nothing attempted (1 ... retried)"

    assert "nothing attempted (1 previously skipped files decoded again, still unreadable)" in summary_line(still)
    image.write_bytes(good)
    os.utime(image, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    fixed = extract(tiny_dataset, out, **FAST)
    assert fixed.n_skipped == 0 and fixed.n_computed == 1 and fixed.n_images == 25
    assert "class_0/fixed_later.png" in set(cache.load(out).paths)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    original, calls = Pending.result, {"n": 0}

    def result(self: Pending) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Pending, "result", result)


def test_damaged_shards_are_discarded_with_a_notice_and_recomputed(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a truncated or bit-flipped shard made every rerun die with a BadZipFile traceback.
    out = tmp_path / "c.h5"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 4)
        with pytest.raises(Interrupted, match="interrupted"):
            extract(tiny_dataset, out, batch_size=4, **FAST)
    shards = sorted(Path(str(out) + ".parts").glob("shard-*.npz"))
    assert len(shards) == 4
    os.truncate(shards[1], shards[1].stat().st_size // 2)
    with open(shards[2], "r+b") as raw:  # 16 flipped bytes in the middle
        raw.seek(shards[2].stat().st_size // 2)
        block = raw.read(16)
        raw.seek(-16, os.SEEK_CUR)
        raw.write(bytes(b ^ 0xFF for b in block))
    resumed = extract(tiny_dataset, out, batch_size=4, **FAST)
    assert resumed.n_reused == 8 and resumed.n_computed == 16
    notices = [n for n in resumed.notes if "discarded" in n]
    assert notices == [
        f"{shard.name} in {shard.parent} fails its checksum (damaged on disk): discarded; its images are computed again"
        for shard in shards[1:3]
    ]
    clean = extract(tiny_dataset, tmp_path / "clean.h5", batch_size=4, **FAST)
    assert clean.n_images == resumed.n_images == 24
    np.testing.assert_array_equal(cache.load(out).features, cache.load(tmp_path / "clean.h5").features)
