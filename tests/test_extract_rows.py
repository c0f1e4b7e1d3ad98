"""Extraction's bookkeeping: which rows a run computes, reuses and writes, with a stand-in engine.

The engine's features are a pure function of each file's bytes, so a row reused
from the old cache or from shards must be bit-identical to the same row
computed afresh; every run's file is compared, dataset by dataset, with the
file a fresh uninterrupted run writes. Larger synthetic runs check that the
driver never holds the feature rows (traced memory far below their size).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import h5py
import numpy as np
import pytest

import tlfeat.extraction.run as run_module
from tlfeat.cache import Rows
from tlfeat.cache_writer import CacheWriter
from tlfeat.data.decode import DecodeError, decode_image
from tlfeat.errors import Interrupted, TlfeatError
from tlfeat.backbones import get_backbone
from tlfeat.data.scan import ImageEntry
from tlfeat.extraction import engines
from tlfeat.extraction.engines import LocalEngine, batch_rows
from tlfeat.extraction.run import extract

RUN = dict(backbone="vgg16", weights="none", image_size=32, progress=False)
# What a run may change in a file it writes: when it ran.
VOLATILE_ATTRS = {"created"}


class StandInEngine:
    """An Engine computing `dim` features per file from its bytes; files starting with b"bad" fail.

    `order="shuffled"` yields the batches in a seeded random order, as the Ray engine may;
    `stop_after` raises KeyboardInterrupt (a user's Ctrl-C) after that many batches.
    """

    compute = "float32"

    def __init__(self, dim: int = 16, batch: int = 4, order: str = "canonical", stop_after: int | None = None):
        self.dim, self.batch, self.order, self.stop_after = dim, batch, order, stop_after
        self.computed: list[str] = []

    def __enter__(self) -> "StandInEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def load(self) -> None:
        pass  # no model to load

    def keras_backend(self) -> str:
        return "stand-in"

    def features(self, payload: bytes) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def embed(self, root: Path, todo: list, bar: Any) -> Iterator[Rows]:
        starts = list(range(0, len(todo), self.batch))
        if self.order == "shuffled":
            random.Random(len(todo)).shuffle(starts)
        for done, start in enumerate(starts):
            if self.stop_after is not None and done == self.stop_after:
                raise KeyboardInterrupt
            entries = todo[start : start + self.batch]
            payloads = [(root / e.relpath).read_bytes() for e in entries]
            ok = [i for i, p in enumerate(payloads) if not p.startswith(b"bad")]
            # The real decoder's reason: a rerun retries skipped files with it (run._recheck_skipped).
            failures = [(i, decode_failure(root / entries[i].relpath)) for i, p in enumerate(payloads)
                        if p.startswith(b"bad")]
            features = np.stack([self.features(payloads[i]) for i in ok]) if ok else np.zeros((0, self.dim), np.float32)
            self.computed.extend(e.relpath for e in entries)
            digests = np.array([list(hashlib.sha256(p).digest()) for p in payloads], dtype=np.uint8)  # as a worker's
            yield batch_rows(entries, features, ok, failures, digests)


def decode_failure(path: Path) -> str:
    try:
        decode_image(path, 32)
    except DecodeError as exc:
        return str(exc)
    raise AssertionError(f"{path} decodes")


def run(monkeypatch: pytest.MonkeyPatch, data: Path, out: Path, engine: StandInEngine | None = None, **kwargs: Any):
    engine = engine or StandInEngine()
    monkeypatch.setattr(run_module, "make_engine", lambda *args, **kw: engine)
    return extract(data, out, **{**RUN, **kwargs}), engine


def dataset(root: Path, n_classes: int = 3, per_class: int = 10) -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            write(root / f"class_{c}" / f"img_{i:03d}.png", f"{c}-{i}")
    return root


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())


def contents(path: Path) -> dict[str, Any]:
    """Every dataset (values, dtype, shape) and every attribute but the run's time."""
    with h5py.File(path, "r") as handle:
        found = {name: (handle[name].dtype.str, handle[name].shape, handle[name][...].tobytes()
                        if handle[name].dtype.kind != "O" else list(handle[name].asstr()[...]))
                 for name in handle}
        found["attrs"] = {k: v for k, v in handle.attrs.items() if k not in VOLATILE_ATTRS}
    return found


def assert_same_file(a: Path, b: Path) -> None:
    got, expected = contents(a), contents(b)
    assert got.keys() == expected.keys()
    for name in expected:
        if name == "attrs":
            assert {k: str(v) for k, v in got[name].items()} == {k: str(v) for k, v in expected[name].items()}
        else:
            assert got[name] == expected[name], f"dataset {name} differs"


def fresh(monkeypatch: pytest.MonkeyPatch, data: Path, out: Path, **kwargs: Any) -> Path:
    run(monkeypatch, data, out, **kwargs)
    return out


def test_fresh_run_writes_the_scan_rows_with_their_features(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = dataset(tmp_path / "data")
    write(data / "class_1" / "broken.png", "bad bytes")
    out = tmp_path / "c.h5"
    summary, engine = run(monkeypatch, data, out)
    assert summary.n_computed == 31 and summary.n_images == 30 and summary.skipped == [
        ("class_1/broken.png", "not an image Pillow can read")]
    assert_rows_are_the_files(out, data, engine, ["class_1/broken.png"])


def assert_rows_are_the_files(out: Path, data: Path, engine: StandInEngine, skipped: list[str]) -> None:
    """`out` holds the engine's features of every file but `skipped`, in canonical order, with their labels."""
    with h5py.File(out, "r") as handle:
        paths = list(handle["paths"].asstr()[...])
        split = list(handle["split"].asstr()[...])
        rank = {"train": 0, "val": 1, "test": 2}
        assert [(rank[s], p) for s, p in zip(split, paths)] == sorted((rank[s], p) for s, p in zip(split, paths))
        assert sorted(paths + skipped) == sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))
        expected = np.stack([engine.features((data / p).read_bytes()) for p in paths])
        assert handle["features"][...].tobytes() == expected.tobytes()
        assert list(handle["skipped_paths"].asstr()[...]) == skipped
        np.testing.assert_array_equal(handle["labels"][...], [int(p.split("/")[0][-1]) for p in paths])


@pytest.mark.parametrize("order", ["canonical", "shuffled"])
def test_final_file_is_written_while_the_run_computes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, order: str
) -> None:
    """Whole chunks of rows go to the final file once their images are settled, not after the last batch;
    in whatever order batches finish, the file holds every row in canonical order."""
    data = dataset(tmp_path / "data", n_classes=2, per_class=1100)
    write(data / "class_0" / "broken.png", "bad bytes")  # a failure among the first chunk's images
    engine = StandInEngine(batch=100, order=order)
    computed_at_write: list[int] = []
    append = CacheWriter.append

    def counting_append(writer: CacheWriter, *args: Any) -> None:
        computed_at_write.append(len(engine.computed))
        append(writer, *args)

    monkeypatch.setattr(CacheWriter, "append", counting_append)
    out = tmp_path / "c.h5"
    summary, _ = run(monkeypatch, data, out, engine)
    assert summary.n_images == 2200 and summary.n_computed == 2201
    if order == "canonical":  # the first 1,024 rows are settled after 11 of the 23 batches
        assert computed_at_write[0] <= 1500, computed_at_write
    assert_rows_are_the_files(out, data, engine, ["class_0/broken.png"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_incremental_run_equals_a_fresh_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dtype: str) -> None:
    data = dataset(tmp_path / "data")
    write(data / "class_0" / "broken.png", "bad once")
    write(data / "class_2" / "gone_bad.png", "bad forever")
    out = tmp_path / "c.h5"
    run(monkeypatch, data, out, dtype=dtype)
    write(data / "class_0" / "added.png", "new")  # added
    write(data / "class_3" / "first.png", "a new class")  # added, in a new class
    (data / "class_1" / "img_000.png").unlink()  # removed
    (data / "class_2" / "gone_bad.png").unlink()  # a skipped file removed
    write(data / "class_1" / "img_001.png", "changed, longer")  # changed
    write(data / "class_0" / "broken.png", "fixed")  # a skipped file fixed
    os.utime(data / "class_1" / "img_002.png", ns=(1, 10**18))  # touched: same bytes (SHA-256), new mtime: reused
    write(data / "class_1" / "img_004.png", "1-4")  # rewritten with the same bytes (new mtime, ctime): reused
    write(data / "class_1" / "img_006.png", "1-0")  # same size as before, other bytes: computed
    (data / "class_2" / "img_003.png").rename(data / "class_2" / "moved.png")  # renamed
    summary, engine = run(monkeypatch, data, out, dtype=dtype)
    assert sorted(engine.computed) == ["class_0/added.png", "class_0/broken.png", "class_1/img_001.png",
                                       "class_1/img_006.png", "class_2/moved.png", "class_3/first.png"]
    assert summary.n_reused == 26 and not summary.up_to_date
    assert_same_file(out, fresh(monkeypatch, data, tmp_path / "fresh.h5", dtype=dtype))


@pytest.mark.parametrize("order", ["canonical", "shuffled"])
def test_resumed_runs_equal_an_uninterrupted_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, order: str) -> None:
    data = dataset(tmp_path / "data", per_class=12)
    write(data / "class_1" / "broken.png", "bad bytes")
    out = tmp_path / "c.h5"
    for stop_after in (3, 2):  # interrupted twice: shards of two runs
        with pytest.raises(Interrupted, match="interrupted"):
            run(monkeypatch, data, out, StandInEngine(order=order, stop_after=stop_after))
        assert not out.exists()
    summary, engine = run(monkeypatch, data, out, StandInEngine(order=order))
    assert summary.n_reused == 20 and summary.n_computed == 17
    assert not Path(str(out) + ".parts").exists()
    assert_same_file(out, fresh(monkeypatch, data, tmp_path / "fresh.h5"))


def test_an_unfinished_run_of_another_dataset_folder_is_not_taken_over_unasked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: extracting folder `a` into the output of folder `f`'s interrupted run deleted f's finished
    # batches at its end, and reused their rows for a's files of the same relative path, size and time.
    first = dataset(tmp_path / "f", per_class=12)
    out = tmp_path / "c.h5"
    with pytest.raises(Interrupted, match="interrupted"):
        run(monkeypatch, first, out, StandInEngine(stop_after=2))
    parts = Path(str(out) + ".parts")
    kept = sorted(parts.glob("shard-*.npz"))
    moved = tmp_path / "a"
    shutil.copytree(first, moved)  # copy2: the same sizes and times, at the same relative paths
    with pytest.raises(TlfeatError, match=re.escape(f"holds the unfinished batches of another dataset folder "
                                                    f"({first.resolve()}, not {moved.resolve()})")):
        run(monkeypatch, moved, out)
    assert sorted(parts.glob("shard-*.npz")) == kept and not out.exists()
    with pytest.raises(Interrupted, match="interrupted"):  # made this folder's, as a moved dataset's cache is
        run(monkeypatch, moved, out, StandInEngine(stop_after=1), overwrite=True)
    summary, _ = run(monkeypatch, moved, out)  # resumed without `overwrite`: the batches are this folder's now
    assert summary.n_reused == 12 and summary.n_computed == 24
    assert_same_file(out, fresh(monkeypatch, moved, tmp_path / "fresh.h5"))


def test_resumed_incremental_run_equals_a_fresh_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Rows from the old cache, from an interrupted run's shards and from this run, in one file."""
    data = dataset(tmp_path / "data", per_class=12)
    out = tmp_path / "c.h5"
    run(monkeypatch, data, out)
    for i in range(8):
        write(data / f"class_{i % 3}" / f"new_{i}.png", f"new {i}")
    (data / "class_0" / "img_005.png").unlink()
    with pytest.raises(Interrupted, match="interrupted"):
        run(monkeypatch, data, out, StandInEngine(stop_after=1))
    write(data / "class_2" / "img_000.png", "changed after the interruption")
    summary, engine = run(monkeypatch, data, out)
    assert summary.n_computed == 5 and summary.n_reused == 38
    assert_same_file(out, fresh(monkeypatch, data, tmp_path / "fresh.h5"))


def test_up_to_date_rerun_leaves_the_file_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = dataset(tmp_path / "data")
    write(data / "class_1" / "broken.png", "bad bytes")
    out = tmp_path / "c.h5"
    run(monkeypatch, data, out)
    before = out.stat().st_mtime_ns, contents(out)
    summary, engine = run(monkeypatch, data, out)
    assert summary.up_to_date and engine.computed == [] and summary.n_skipped == 1
    assert (out.stat().st_mtime_ns, contents(out)) == before
    with pytest.raises(TlfeatError, match="rows in another split"):  # another split moves cached rows: refused
        run(monkeypatch, data, out, seed=1)
    summary, _ = run(monkeypatch, data, out, seed=1, overwrite=True)  # re-labelled, said, nothing computed
    assert not summary.up_to_date and summary.n_computed == 0 and "re-labelled" in summary.notes[0]
    assert_same_file(out, fresh(monkeypatch, data, tmp_path / "fresh.h5", seed=1))


def test_a_deleted_skipped_file_leaves_the_caches_skipped_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Before: the rerun said "up to date" and the cache still listed the deleted file as skipped.
    data = dataset(tmp_path / "data")
    write(data / "class_1" / "broken.png", "bad bytes")
    out = tmp_path / "c.h5"
    run(monkeypatch, data, out)
    (data / "class_1" / "broken.png").unlink()
    summary, engine = run(monkeypatch, data, out)
    assert not summary.up_to_date and engine.computed == [] and summary.n_skipped == 0
    with h5py.File(out, "r") as handle:
        assert list(handle["skipped_paths"].asstr()[...]) == []
    assert_same_file(out, fresh(monkeypatch, data, tmp_path / "fresh.h5"))
    assert run(monkeypatch, data, out)[0].up_to_date


# The driver's memory: N files of DIM stand-in features (78 MB) against a bound of a third of that.
N, DIM = 20000, 1024
FEATURES_MB = N * DIM * 4 / 2**20


def many_files(root: Path, n: int = N) -> Path:
    for i in range(n):
        write(root / f"c{i % 4}" / f"{i:06d}.png", str(i))
    return root


def traced_run(monkeypatch: pytest.MonkeyPatch, data: Path, out: Path, engine: StandInEngine) -> tuple[Any, float]:
    tracemalloc.start()
    try:
        summary, _ = run(monkeypatch, data, out, engine)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return summary, peak


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return many_files(tmp_path_factory.mktemp("big") / "data")


@pytest.mark.slow
def test_incremental_run_never_holds_the_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, big: Path) -> None:
    out = tmp_path / "c.h5"
    run(monkeypatch, big, out, StandInEngine(dim=DIM, batch=64))
    added = [big / "c0" / f"added_{i}.png" for i in range(50)]
    try:
        for i, path in enumerate(added):
            write(path, f"added {i}")
        summary, peak = traced_run(monkeypatch, big, out, StandInEngine(dim=DIM, batch=64))
    finally:
        for path in added:
            path.unlink()
    assert summary.n_computed == 50 and summary.n_reused == N
    assert peak < FEATURES_MB / 3, f"incremental run held {peak:.1f} MB for {FEATURES_MB:.0f} MB of features"


@pytest.mark.slow
def test_up_to_date_rerun_reads_no_features(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, big: Path) -> None:
    out = tmp_path / "c.h5"
    run(monkeypatch, big, out, StandInEngine(dim=DIM, batch=64))
    summary, peak = traced_run(monkeypatch, big, out, StandInEngine(dim=DIM, batch=64))
    assert summary.up_to_date
    assert peak < FEATURES_MB / 3, f"up-to-date rerun held {peak:.1f} MB for {FEATURES_MB:.0f} MB of features"


@pytest.mark.slow
def test_fresh_and_resumed_runs_never_hold_the_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, big: Path) -> None:
    out = tmp_path / "c.h5"
    with pytest.raises(Interrupted, match="interrupted"):
        traced_run(monkeypatch, big, out, StandInEngine(dim=DIM, batch=64, stop_after=40))
    summary, peak = traced_run(monkeypatch, big, out, StandInEngine(dim=DIM, batch=64))
    assert summary.n_reused == 40 * 64
    assert peak < FEATURES_MB / 3, f"resumed run held {peak:.1f} MB for {FEATURES_MB:.0f} MB of features"
    fresh_out = tmp_path / "fresh.h5"
    summary, peak = traced_run(monkeypatch, big, fresh_out, StandInEngine(dim=DIM, batch=64))
    assert peak < FEATURES_MB / 3, f"fresh run held {peak:.1f} MB for {FEATURES_MB:.0f} MB of features"
    assert_same_file(out, fresh_out)


class HandedOver:
    """Stands in for an engine's pipeline stage: records the file paths it is handed and the traced memory
    held then; returns an empty pipeline (iter_batches, as a Ray Dataset's)."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def __call__(self, files: Any, *args: Any) -> Any:
        self.seen.update(held_mb=tracemalloc.get_traced_memory()[0] / 2**20, n=len(files), last=files[-2:],
                         one=files[3])
        return SimpleNamespace(iter_batches=lambda **kwargs: iter(()))

    def embed(self, engine: Any, root: Path, todo: list) -> dict[str, Any]:
        tracemalloc.start()
        try:
            assert list(engine.embed(root, todo, None)) == []
        finally:
            tracemalloc.stop()
        return self.seen


MANY_FILES = 200_000


def many_entries() -> list[ImageEntry]:
    return [ImageEntry(f"class{i % 10}/image{i:07d}.jpg", f"class{i % 10}", "train", 1, 1) for i in range(MANY_FILES)]


def test_the_local_engine_makes_file_paths_a_batch_at_a_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Before: LocalEngine.embed joined every file's path before the first batch: 27 MB traced for these
    # 200,000 files (about 140 bytes a file under pytest's temporary folder), beside the scan's own entries.
    handed = HandedOver()
    monkeypatch.setattr(engines, "map_batches", lambda files, *args: iter(handed(files).iter_batches()))
    monkeypatch.setattr(engines, "get_extractor", lambda *args: SimpleNamespace(batch_size=32, submit=None))
    monkeypatch.setattr(engines, "shared_pool", lambda workers: None)
    todo = many_entries()
    seen = handed.embed(LocalEngine(get_backbone("efficientnet_lite0"), "none", 32, None), tmp_path, todo)
    assert seen["n"] == MANY_FILES and seen["one"] == os.path.join(str(tmp_path), "class3/image0000003.jpg")
    assert seen["last"] == [os.path.join(str(tmp_path), e.relpath) for e in todo[-2:]]
    assert seen["held_mb"] < 1, seen


def test_the_ray_driver_never_holds_a_path_for_every_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Before: RayEngine.embed joined every file's path into one list before building its pipeline, and kept
    # it for the whole run: 27 MB traced for these 200,000 files. (Ray itself is not needed to see it.)
    from tlfeat.extraction.ray_engine import RayEngine, RayOptions

    engine, handed = RayEngine(get_backbone("vgg16"), "none", 32, 256, RayOptions()), HandedOver()
    monkeypatch.setattr(engine, "_pipeline", handed)
    seen = handed.embed(engine, tmp_path, many_entries())
    assert seen["n"] == MANY_FILES and seen["one"] == os.path.join(str(tmp_path), "class3/image0000003.jpg")
    assert seen["held_mb"] < 1, seen


def test_a_decoder_bug_skips_its_file_on_retry_and_in_ray_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Before: the local workers skipped a file whose decoder raised anything, but the retry of skipped files
    # (run._recheck_skipped) and the Ray engine's decode_batch caught only DecodeError: a ValueError crashed them.
    from tlfeat.extraction import ray_engine

    data = dataset(tmp_path / "data")
    write(data / "class_1" / "broken.png", "bad bytes")
    out = tmp_path / "c.h5"
    run(monkeypatch, data, out)

    def buggy(*args: Any, **kwargs: Any) -> None:
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(run_module, "decode_image", buggy)
    summary, _ = run(monkeypatch, data, out)
    assert summary.n_retried == 1 and summary.skipped == [("class_1/broken.png", "decoder error (ValueError: boom)")]
    monkeypatch.setattr(ray_engine, "decode_into", buggy)
    decoded = ray_engine.decode_batch({"index": np.arange(1), "path": np.array([str(data / "class_0" / "img_000.png")])}, 8)
    assert list(decoded["error"]) == ["decoder error (ValueError: boom)"] and not decoded["pixels"].any()
