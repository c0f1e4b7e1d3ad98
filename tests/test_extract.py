from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest

from conftest import REPO, child_env, extract_run_counts, make_dataset, make_image, run_cli
from tlfeat import cache, cache_writer
from tlfeat.extraction import shards
from tlfeat.errors import Interrupted, TlfeatError
from tlfeat.backbones import build_model, get_backbone
from tlfeat.extraction.run import default_output, extract
from tlfeat.fileio import OutputLock

FAST = dict(backbone="vgg16", weights="none", image_size=32, progress=False)


@pytest.mark.parametrize("backbone, dim", [("resnet101", 2048), ("vgg16", 512)])
@pytest.mark.slow
def test_keras_backbones_give_their_feature_dims(scene15_subset: Path, tmp_path: Path, backbone: str, dim: int) -> None:
    out = tmp_path / f"{backbone}.h5"
    summary = extract(scene15_subset, out, backbone=backbone, weights="none", progress=False)
    data = cache.load(out)
    assert summary.n_images == 12 and summary.feature_dim == dim
    assert data.features.shape == (12, dim)
    assert np.isfinite(data.features).all() and data.features.std() > 0
    assert data.attrs["backbone"] == backbone and data.attrs["input_size"] == 224
    assert data.attrs["preprocessing"] == "caffe:BGR-mean"


def test_cache_round_trip_and_plain_h5py_layout(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    everything = cache.load(out)
    train = cache.load(out, split="train")
    assert len(everything) == 24 and everything.class_names == ["class_0", "class_1", "class_2"]
    assert len(train) == sum(everything.split == "train") > 0
    assert set(train.split) == {"train"}
    with h5py.File(out, "r") as handle:  # what a user of the documented format sees
        assert handle["features"].shape == (24, 512) and handle["features"].chunks is not None
        assert list(handle["paths"].asstr()[:2]) == list(everything.paths[:2])
        assert handle.attrs["weights"] == f"none:{handle.attrs['keras_backend']}" and handle.attrs["feature_dim"] == 512
        assert handle.attrs["keras_backend"] in ("tensorflow", "jax", "torch")
    np.testing.assert_array_equal(everything.labels, [["class_0", "class_1", "class_2"].index(p.split("/")[0]) for p in everything.paths])


def test_float16_storage(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.h5"
    extract(tiny_dataset, out, dtype="float16", **FAST)
    with h5py.File(out, "r") as handle:
        assert handle["features"].dtype == np.float16
    assert cache.load(out).features.dtype == np.float32


def test_rerun_on_unchanged_inputs_computes_nothing(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    mtime = out.stat().st_mtime_ns
    again = extract(tiny_dataset, out, **FAST)
    assert again.n_computed == 0 and again.up_to_date
    assert out.stat().st_mtime_ns == mtime


def test_incremental_update_after_adding_changing_renaming_and_removing(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    make_image(tiny_dataset / "class_0" / "added_a.png", 0, 100)
    make_image(tiny_dataset / "class_2" / "added_b.png", 2, 101)
    (tiny_dataset / "class_1" / "img_000.png").unlink()
    changed = tiny_dataset / "class_1" / "img_001.png"
    make_image(changed, 1, 999, size=(50, 50))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (tiny_dataset / "class_2" / "img_002.png").rename(tiny_dataset / "class_2" / "renamed.png")
    summary = extract(tiny_dataset, out, **FAST)
    assert summary.n_computed == 4 and summary.n_reused == 21 and summary.n_images == 25
    fresh_out = tmp_path / "fresh.h5"
    extract(tiny_dataset, fresh_out, **FAST)
    updated, fresh = cache.load(out), cache.load(fresh_out)
    assert list(updated.paths) == list(fresh.paths)
    assert "class_1/img_000.png" not in set(updated.paths) and "class_2/img_002.png" not in set(updated.paths)
    assert "class_2/renamed.png" in set(updated.paths)
    np.testing.assert_allclose(updated.features, fresh.features, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(updated.split, fresh.split)


def test_mismatched_settings_are_refused_then_overwritten(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    with pytest.raises(TlfeatError, match=r"input_size 48 vs 32.*`overwrite`"):
        extract(tiny_dataset, out, **{**FAST, "image_size": 48})
    assert cache.load(out).attrs["input_size"] == 32  # the old cache is intact
    extract(tiny_dataset, out, overwrite=True, **{**FAST, "image_size": 48})
    assert cache.load(out).attrs["input_size"] == 48


def test_cache_decoded_before_jpeg_dct_scaling_is_not_mixed_with_new_rows(tiny_dataset: Path, tmp_path: Path) -> None:
    """A cache from before DCT scaling has no "decode" record: its large JPEGs were decoded at full size."""
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    with h5py.File(out, "r+") as handle:
        assert handle.attrs["decode"] == "pillow-bilinear,jpeg-dct-scaled"
        del handle.attrs["decode"]
    with pytest.raises(TlfeatError, match=r"decode 'pillow-bilinear,jpeg-dct-scaled' vs 'pillow-bilinear'"):
        extract(tiny_dataset, out, **FAST)
    extract(tiny_dataset, out, overwrite=True, **FAST)
    assert cache.load(out).attrs["decode"] == "pillow-bilinear,jpeg-dct-scaled"


def test_corrupt_files_are_skipped_and_recorded(tiny_dataset: Path, tmp_path: Path) -> None:
    folder = tiny_dataset / "class_0"
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "random.jpg").write_bytes(os.urandom(3000))
    (folder / "text.png").write_text("this is not a png")
    good = folder / "img_000.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "c.h5"
    summary = extract(tiny_dataset, out, **FAST)
    assert summary.n_images == 24 and summary.n_skipped == 4
    reasons = dict(summary.skipped)
    assert reasons["class_0/zero.jpg"] == "empty file (0 bytes)"
    assert reasons["class_0/text.png"] == "not an image Pillow can read"
    assert "truncated" in reasons["class_0/truncated.png"]
    with h5py.File(out, "r") as handle:
        assert set(handle["skipped_paths"].asstr()[...]) == set(reasons)
        assert handle.attrs["n_skipped"] == 4
    assert extract(tiny_dataset, out, **FAST).n_computed == 0  # still bad: retried by decoding alone, no model


def test_second_run_on_same_output_is_locked_out_and_a_stale_lock_file_never_blocks(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c.h5"
    lock = Path(str(out) + ".lock")
    lock.write_text("1")  # before: a lock naming any live process (here pid 1: `echo 1 > out.lock`) blocked forever
    assert extract(tiny_dataset, out, **FAST).n_images == 24
    assert not lock.exists()
    with OutputLock(out):  # a live run holds it
        with pytest.raises(TlfeatError, match=rf"another tlfeat run \(pid {os.getpid()} on .+\) is writing this output"):
            extract(tiny_dataset, out, **FAST)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=3, per_class=40)
    args = ["--backbone", "vgg16", "--weights", "none", "--image-size", "96", "--batch-size", "4", "-q"]
    killed_out = tmp_path / "killed.h5"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "extract", str(data), "--out", str(killed_out), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    parts = Path(str(killed_out) + ".parts")
    deadline = time.time() + 300
    while len(list(parts.glob("shard-*.npz"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed_out.exists(), "the run finished before it could be killed"
    n_shards = len(list(parts.glob("shard-*.npz")))
    assert n_shards >= 3

    resumed = run_cli("extract", str(data), "--out", str(killed_out), *args)
    assert resumed.returncode == 0, resumed.stderr
    attempted, embedded, skipped, reused = extract_run_counts(resumed.stdout)
    assert reused >= 4 * n_shards and attempted + reused == 120 and embedded + skipped == attempted
    assert not parts.exists()

    clean_out = tmp_path / "clean.h5"
    clean = run_cli("extract", str(data), "--out", str(clean_out), *args)
    assert clean.returncode == 0, clean.stderr
    a, b = cache.load(killed_out), cache.load(clean_out)
    assert list(a.paths) == list(b.paths)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.split, b.split)
    np.testing.assert_array_equal(a.features, b.features)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "dataset folder not found"),
        ("image-file", "image_000.png: is a file, not a dataset folder"),
        ("empty", "no class folders found"),
        ("one-class", "need at least 2 classes"),
        ("empty-class", "class folder holds no images"),
        ("bad-backbone", "unknown backbone 'alexnet'"),
        ("bad-weights", "weights file not found"),
        ("image-size-0", "--image-size 0: vgg16 takes 32 to 1024 pixels"),  # before: silently 224
        ("image-size-huge", "--image-size 100000: vgg16 takes 32 to 1024 pixels"),  # before: tens of GB
        ("split-nan", "--split nan,1,1: need three finite"),  # before: a ValueError traceback
        ("corrupt-weights", "cannot load as vgg16 weights"),  # fails once the decoding processes run
    ],
)
@pytest.mark.slow
def test_cli_bad_input_is_one_line_error(tmp_path: Path, setup: str, message: str) -> None:
    root = tmp_path / "data"
    extra: list[str] = []
    if setup == "image-file":  # `extract photo.png`: the path exists, but it is not a folder of class folders
        make_image(tmp_path / "image_000.png", 0, 0)
        root = tmp_path / "image_000.png"
    elif setup != "missing":
        root.mkdir()
    if setup in ("one-class", "empty-class", "bad-backbone", "bad-weights", "corrupt-weights"):
        make_dataset(root, n_classes=1 if setup == "one-class" else 2, per_class=2)
    if setup == "empty-class":
        (root / "zz").mkdir()
    if setup == "bad-backbone":
        extra = ["--backbone", "alexnet"]
    if setup == "bad-weights":
        extra = ["--backbone", "vgg16", "--weights", str(tmp_path / "nope.weights.h5")]
    if setup in ("image-size-0", "image-size-huge", "split-nan"):
        make_dataset(root, n_classes=2, per_class=2)
        extra = ["--backbone", "vgg16", "--weights", "none", "-q"] + {
            "image-size-0": ["--image-size", "0"], "image-size-huge": ["--image-size", "100000"],
            "split-nan": ["--split", "nan,1,1"],
        }[setup]
    if setup == "corrupt-weights":
        (tmp_path / "corrupt.h5").write_text("not HDF5")
        extra = ["--backbone", "vgg16", "--weights", str(tmp_path / "corrupt.h5")]
    result = run_cli("extract", str(root), "--out", str(tmp_path / "o.h5"), *extra)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_extract_prints_summary(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    result = run_cli("extract", str(tiny_dataset), "--backbone", "vgg16", "--weights", "none",
                     "--image-size", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"{out}: 24 images x 512 dims" in result.stdout
    assert "images/s" in result.stdout
    assert "extract vgg16: 24/24 images (100%)" in result.stderr  # progress, as lines: stderr is not a terminal


def test_final_write_takes_rows_without_stacking_them(tmp_path: Path) -> None:
    import tracemalloc

    n, dim = 32000, 512  # 62.5 MB of float32 rows, written in chunks of 1024
    batches = [np.random.default_rng(i).standard_normal((32, dim)).astype(np.float32) for i in range(n // 32)]
    rows = [row for batch in batches for row in batch]  # views into the batches, as a run holds them
    paths, split, zeros = [f"c/{i}.png" for i in range(n)], ["train"] * n, [0] * n
    key = cache.CacheKey("vgg16", "none", 32, "caffe:BGR-mean", dtype="float16")
    tracemalloc.start()
    try:
        cache_writer.write_cache(tmp_path / "c.h5", key, rows, np.zeros(n, np.int32), paths, split, zeros, zeros,
                          ["c"], [], {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * dim * 4 / 4, f"the write held {peak / 2**20:.1f} MB for {n * dim * 4 / 2**20:.1f} MB of rows"
    with h5py.File(tmp_path / "c.h5", "r") as handle:
        assert handle["features"].dtype == np.float16 and handle["features"].chunks[0] == cache.FILE_CHUNK_ROWS
        np.testing.assert_array_equal(handle["features"][...], np.stack(rows).astype(np.float16))


def _embed_then(tail: BaseException):
    """A LocalEngine.embed that computes every batch as usual, then raises `tail` (Ctrl-C, a failing disk)."""
    from tlfeat.extraction.engines import LocalEngine

    real = LocalEngine.embed

    def embed(self, root, todo, bar):
        yield from real(self, root, todo, bar)
        raise tail

    return embed


@pytest.mark.slow
def test_ctrl_c_keeps_every_finished_batch_including_those_still_queued_for_writing(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlfeat.extraction.engines import LocalEngine

    monkeypatch.setattr(LocalEngine, "embed", _embed_then(KeyboardInterrupt()))
    out = tmp_path / "c.h5"
    with pytest.raises(Interrupted, match="interrupted: finished batches are kept"):
        extract(tiny_dataset, out, batch_size=4, **FAST)
    parts = Path(str(out) + ".parts")
    assert len(list(parts.glob("shard-*.npz"))) == 6  # 24 images in batches of 4, all written
    monkeypatch.undo()
    assert "0 attempted (0 embedded, 0 skipped), 24 reused" in run_cli("extract", str(tiny_dataset), "--out", str(out), "--backbone", "vgg16",
                                              "--weights", "none", "--image-size", "32", "--batch-size", "4").stdout


def test_ctrl_c_in_a_python_loop_is_not_swallowed_by_except_tlfeaterror(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: Ctrl-C became a TlfeatError, so a notebook loop skipping failed datasets went on to the next one.
    from tlfeat.extraction.engines import LocalEngine

    monkeypatch.setattr(LocalEngine, "embed", _embed_then(KeyboardInterrupt()))
    attempted = []
    with pytest.raises(KeyboardInterrupt, match="interrupted: finished batches are kept") as info:
        for name in ("first", "second"):
            attempted.append(name)
            try:
                extract(tiny_dataset, tmp_path / f"{name}.h5", batch_size=4, **FAST)
            except TlfeatError:
                continue
    assert attempted == ["first"] and isinstance(info.value, Interrupted) and not isinstance(info.value, TlfeatError)


def test_a_failing_shard_write_stops_the_run(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_write = shards.ShardStore.write

    def write(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_write(self, rows)

    monkeypatch.setattr(shards.ShardStore, "write", write)
    with pytest.raises(OSError, match="No space left"):
        extract(tiny_dataset, tmp_path / "c.h5", batch_size=4, **FAST)
    assert not (tmp_path / "c.h5").exists()
    assert calls["n"] <= 4  # the run stopped soon after, not at the end


@pytest.mark.slow
def test_cli_workers_sets_the_local_decoding_processes(tiny_dataset: Path, tmp_path: Path) -> None:
    args = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "-q"]
    ok = run_cli("extract", str(tiny_dataset), "--out", str(tmp_path / "c.h5"), "--workers", "1", *args)
    assert ok.returncode == 0 and "24 attempted (24 embedded" in ok.stdout, ok.stderr
    bad = run_cli("extract", str(tiny_dataset), "--out", str(tmp_path / "d.h5"), "--workers", "0", *args)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --workers 0: must be at least 1"


def test_another_split_is_refused_then_relabelled_with_overwrite(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, seed=0, **FAST)
    before = cache.load(out)
    with pytest.raises(TlfeatError, match=r"rows in another split \(seed 0 -> 1.*pass `overwrite` to re-label") as info:
        extract(tiny_dataset, out, seed=1, **FAST)
    assert "\n" not in str(info.value)
    np.testing.assert_array_equal(cache.load(out).split, before.split)  # nothing re-labelled silently
    relabelled = extract(tiny_dataset, out, seed=1, overwrite=True, **FAST)
    assert relabelled.n_computed == 0  # the features are the same; only the split column changes
    assert any(note.startswith("re-labelled ") and "seed 0 -> 1" in note for note in relabelled.notes)
    after = cache.load(out)
    assert after.attrs["seed"] == 1 and list(after.split) != list(before.split)
    assert extract(tiny_dataset, out, seed=1, **FAST).up_to_date


def test_default_cache_name_carries_a_non_default_image_size() -> None:
    assert default_output(Path("data/scene15"), "efficientnet_lite0") == Path("cache/scene15-efficientnet_lite0.h5")
    assert default_output(Path("data/scene15"), "efficientnet_lite0", 224) == Path("cache/scene15-efficientnet_lite0.h5")
    assert default_output(Path("data/scene15"), "efficientnet_lite0", 288) == Path("cache/scene15-efficientnet_lite0-288.h5")


def test_offline_imagenet_error_keeps_the_whole_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import urllib.error

    from keras.src.utils import file_utils

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    monkeypatch.setattr(file_utils, "get_file", _uncached(file_utils.get_file))
    with pytest.raises(TlfeatError) as info:
        build_model(get_backbone("vgg16"), "imagenet", 32)
    message = str(info.value)
    assert "[Errno -3] Temporary failure in name resolution); offline, download" in message, message
    assert "\n" not in message


def _uncached(get_file: Any) -> Any:
    """keras' get_file with its cache in a fresh folder, so no weights file on this machine short-cuts it."""
    import tempfile

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["cache_dir"] = tempfile.mkdtemp(prefix="tlfeat-no-weights-")
        return get_file(*args, **kwargs)

    return wrapper


def test_a_cache_of_another_dataset_folder_is_not_made_this_ones_unasked(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: extracting another folder into an existing cache of the same settings dropped its rows
    # silently (exit 0); and an incremental run said nothing of rows removed with their images.
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    other = tmp_path / "moved"
    shutil.copytree(tiny_dataset, other)  # copy2: the same sizes and times, at the same relative paths
    with pytest.raises(TlfeatError, match=rf"holds the features of another dataset folder \({tiny_dataset}, not"):
        extract(other, out, **FAST)
    summary = extract(other, out, overwrite=True, **FAST)
    assert summary.n_computed == 0 and summary.n_reused == 24
    gone = sorted(other.rglob("*.png"))[:2]
    for path in gone:
        path.unlink()
    summary = extract(other, out, **FAST)
    assert f"2 rows of {out} are of images no longer in the dataset: left out" in summary.notes
    assert len(cache.load(out).paths) == 22


def test_a_batch_beyond_the_dataset_pads_only_to_the_dataset(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: 24 images were padded to batches of 20,000 (about 15 GiB of VGG16 activations at 32 px; with
    # 100,000, a segfault, no message, and <out>.lock left behind).
    from tlfeat import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 2**30)  # room for 24 images, not 100,000 decoded
    summary = extract(tiny_dataset, tmp_path / "c.h5", batch_size=100000, **FAST)  # ones (the input guard
    assert summary.n_embedded == 24  # counted the batch before it was cut to the dataset, and refused it)


def test_a_default_batch_that_does_not_fit_is_cut_to_the_images_there_are(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the device's default batch (32 on a CPU) was never cut: 24 images, or one image to predict, were
    # refused with "use `batch_size=...`", a batch size the user never gave.
    from tlfeat import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 44 * 2**20)  # 24 of VGG16's 32 px images fit, 32 not
    assert extract(tiny_dataset, tmp_path / "c.h5", **FAST).n_embedded == 24
    one = sorted(tiny_dataset.rglob("*.png"))[:1]
    monkeypatch.setattr(runtime, "available_memory", lambda: 4 * 2**20)  # one image fits
    assert runtime.embed_files(one, "vgg16", "none", image_size=32).outputs.shape == (1, 512)


def test_a_batch_whose_activations_do_not_fit_is_refused_with_one_that_does(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: only the decoded 8-bit images were counted, never the backbone's activations, dozens of
    # times larger: a batch that passed that check could exhaust memory inside native code (a segfault).
    from tlfeat import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 20 * 2**20)
    out = tmp_path / "c.h5"
    with pytest.raises(TlfeatError, match=r"`batch_size=24` at 32 px needs about 19 MiB for vgg16's activations "
                                          r"and images at once; 20 MiB of memory is available: use `batch_size=12` "
                                          r"or less$") as info:
        extract(tiny_dataset, out, batch_size=24, **FAST)  # 24: the input guard alone let it through
    assert "\n" not in str(info.value) and not Path(str(out) + ".lock").exists() and not out.exists()
    assert extract(tiny_dataset, out, batch_size=12, **FAST).n_embedded == 24
    with pytest.raises(TlfeatError, match="use `batch_size=12` or less"):
        extract(tiny_dataset, tmp_path / "d.h5", batch_size=13, **FAST)


def test_far_more_workers_than_cores_is_said(tiny_dataset: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: --workers 500 on 2 cores ran at 1 image/s, 8x slower than the default, without a word.
    from tlfeat.extraction import run as run_module

    monkeypatch.setattr(run_module, "available_cores", lambda: 1)
    summary = extract(tiny_dataset, tmp_path / "c.h5", workers=3, **FAST)
    assert "3 decoding processes on 1 available cores" in " ".join(summary.notes)
    assert not any("decoding processes" in n for n in extract(tiny_dataset, tmp_path / "d.h5", workers=2, **FAST).notes)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_inside_the_final_write_never_puts_a_file_missing_data_in_place(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, presses: int
) -> None:
    # Before: a KeyboardInterrupt raised inside HDF5's write callback was swallowed by h5py ("Exception
    # ignored"), the chunk was lost, and the file was renamed over the good cache: all labels 0, or all
    # features 0, then "up to date" on every rerun.
    import threading

    from tlfeat.fileio import FirstErrorSink

    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    good = out.read_bytes()
    make_image(tiny_dataset / "class_0" / "new.png", 0, 99)  # the next run rewrites the cache
    original, calls = FirstErrorSink.write, [0]

    def write(self: FirstErrorSink, data: object) -> int:
        if threading.current_thread() is threading.main_thread():  # the final write's own calls
            calls[0] += 1
            if calls[0] <= presses:
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, data)

    monkeypatch.setattr(FirstErrorSink, "write", write)
    with pytest.raises(Interrupted, match="interrupted while writing .*: the previous cache is unchanged"):
        extract(tiny_dataset, out, **FAST)
    assert out.read_bytes() == good and calls[0] > presses
    monkeypatch.setattr(FirstErrorSink, "write", original)
    resumed = extract(tiny_dataset, out, **FAST)
    assert resumed.n_computed == 0 and resumed.n_reused == 25  # the batch computed before is kept in the shards
    clean = extract(tiny_dataset, tmp_path / "clean.h5", **FAST)
    with cache.CacheReader(out) as a, cache.CacheReader(clean.out) as b:
        assert a.n_rows == b.n_rows and np.array_equal(a.rows(0, a.n_rows).features, b.rows(0, b.n_rows).features)


def test_an_output_through_a_symlink_and_stray_or_damaged_batches(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: a run on link.h5 took the lock link.h5.lock, so it ran beside a run on its target, and the
    # rename made the link a plain file; a folder in <out>.parts failed every later update ("Is a
    # directory"); a damaged meta.json threw the batches away without a word.
    (tmp_path / "link.h5").symlink_to(tmp_path / "b.h5")
    summary = extract(tiny_dataset, tmp_path / "link.h5", **FAST)
    assert summary.out == tmp_path / "b.h5" and (tmp_path / "link.h5").is_symlink() and (tmp_path / "b.h5").is_file()

    parts = tmp_path / "b.h5.parts"
    make_image(tiny_dataset / "class_0" / "new.png", 0, 99)
    parts.mkdir()
    (parts / "meta.json").write_text("garbage")
    (parts / "stray").mkdir()
    again = extract(tiny_dataset, tmp_path / "b.h5", **FAST)
    assert again.n_computed == 1 and not parts.exists()
    assert any("meta.json is damaged" in note for note in again.notes)


def test_random_weights_of_another_backend_are_another_model(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: `weights=none` was keyed "none" under every backend, so a run under JAX added rows of its own
    # random model to a TensorFlow cache (relative L2 difference 1.2 between the two models' features).
    import keras

    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, backbone="vgg16", weights="none", image_size=32, progress=False)
    other = "jax" if keras.backend.backend() != "jax" else "tensorflow"
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "extract", str(tiny_dataset), "--out", str(out), "--backbone", "vgg16",
         "--weights", "none", "--image-size", "32", "-q"],
        capture_output=True, text=True, timeout=600, env={**child_env(), "KERAS_BACKEND": other},
    )
    assert result.returncode == 1, result.stdout
    assert f"weights 'none:{other}' vs 'none:{keras.backend.backend()}'" in result.stderr, result.stderr


def test_the_command_names_ignored_files_that_may_be_images(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: only counted ("2 ignored (1 not in a class folder, 1 ...)"): the user could not find them.
    from typer.testing import CliRunner

    from cli import app

    make_image(tiny_dataset / "stray.png", 0, 99)
    (tiny_dataset / "class_0" / "notes.txt").write_text("routine: not named")
    result = CliRunner().invoke(app, ["extract", str(tiny_dataset), "--out", str(tmp_path / "c.h5"), "--backbone",
                                      "vgg16", "--weights", "none", "--image-size", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert "  ignored stray.png: not in a class folder" in result.stdout
    assert "notes.txt" not in result.stdout and "2 ignored" in result.stdout


def test_a_class_whose_every_file_is_unreadable_is_named(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: only its files were listed as skipped; fit-head then blamed the split ("extract with another seed").
    broken = tiny_dataset / "class_9"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.jpg").write_text("not an image")
    summary = extract(tiny_dataset, tmp_path / "c.h5", **FAST)
    assert ("class(es) class_9 have no training rows: every one of their train files was skipped as unreadable"
            in summary.notes)
    # A pre-split dataset whose train/ files of a class are all unreadable, its test/ files fine: the same note.
    split = tmp_path / "split"
    for part in ("train", "test"):
        for name in ("a", "b"):
            for i in range(2):
                make_image(split / part / name / f"{i}.png", ord(name), i)
    for path in (split / "train" / "b").iterdir():
        path.write_text("not an image")
    summary = extract(split, tmp_path / "s.h5", **FAST)
    assert "class(es) b have no training rows: every one of their train files was skipped as unreadable" in summary.notes


def test_a_cache_of_the_dataset_read_in_another_layout_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a cache made when Train/ and Test/ read as two classes of a flat dataset was refused with "rerun
    # with the cache's seed and ratios", which cannot work: the layout, not the split's settings, changed.
    data = tmp_path / "data"
    for part in ("Train", "Test"):
        for name in ("a", "b"):
            for i in range(3):
                make_image(data / part / name / f"{i}.png", ord(name), i)
    out = tmp_path / "c.h5"
    from tlfeat.data import scan as scan_module

    with monkeypatch.context() as before:  # the scan before split folders were known in any case
        before.setattr(scan_module, "_split_folders", lambda root, names: {s: s for s in ("train", "test") if s in names})
        assert extract(data, out, **FAST).split_counts != {"train": 6, "test": 6}
    with pytest.raises(TlfeatError, match=r"the dataset now reads as pre-split, the cache was made when it read as "
                                          r"flat \(\d+ of its 12 rows change split\); pass `overwrite`"):
        extract(data, out, **FAST)
    again = extract(data, out, overwrite=True, **FAST)
    assert again.split_counts["test"] == 6 and cache.load(out).class_names == ["a", "b"]


def test_a_weights_file_saved_again_is_embedded_with_its_new_weights(tmp_path: Path) -> None:
    # A notebook saves its next fine-tune's weights under the same name and extracts again in the same kernel.
    # Before: the extractor kept for that path embedded with the old weights, under the new file's sha256.
    data = make_dataset(tmp_path / "d", n_classes=2, per_class=3)
    weights = tmp_path / "mine.weights.h5"
    model = build_model(get_backbone("vgg16"), "none", 32)
    model.save_weights(weights)
    first = cache.load(extract(data, tmp_path / "a.h5", **{**FAST, "weights": str(weights)}).out)
    model.set_weights([w * 0.5 for w in model.get_weights()])
    model.save_weights(weights)
    second = cache.load(extract(data, tmp_path / "b.h5", **{**FAST, "weights": str(weights)}).out)
    assert first.attrs["weights"] != second.attrs["weights"]  # the caches record two files
    assert not np.allclose(first.features, second.features)  # and hold two models' features


def test_an_up_to_date_rerun_loads_no_framework_where_there_is_no_gpu_driver(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: learning whether a GPU was there imported Keras and TensorFlow (4.4 of an up-to-date rerun's 4.6 s,
    # against 0.4 s now), though a machine without any GPU driver cannot have one.
    from tlfeat.runtime import GPU_DRIVER_MARKERS, no_gpu_driver

    if not no_gpu_driver():
        pytest.skip(f"this machine has a GPU driver ({', '.join(GPU_DRIVER_MARKERS)}): its backend is asked")
    out = tmp_path / "c.h5"
    # The default backbone's offline ImageNet weights: random ones name the backend, so they load Keras.
    assert run_cli("extract", str(tiny_dataset), "--out", str(out), "--image-size", "32", "-q").returncode == 0
    script = ("import sys; from tlfeat.extraction.run import extract\n"
              f"summary = extract({str(tiny_dataset)!r}, {str(out)!r}, image_size=32, progress=False)\n"
              "print(summary.up_to_date, sorted({'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), timeout=300)
    assert result.stdout.split() == ["True", "[]"], result.stdout + result.stderr[-2000:]


def test_a_gpu_driver_leaves_the_question_to_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlfeat import runtime

    monkeypatch.setattr(runtime.glob, "glob", lambda pattern: ["/dev/nvidia0"] if pattern == "/dev/nvidia*" else [])
    assert not runtime.no_gpu_driver()
    monkeypatch.setattr(runtime, "sys", SimpleNamespace(platform="darwin"))  # Apple's GPUs leave none of these
    monkeypatch.setattr(runtime.glob, "glob", lambda pattern: [])
    assert not runtime.no_gpu_driver()
