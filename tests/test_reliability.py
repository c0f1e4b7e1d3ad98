"""Reliability: hostile files, SIGKILL at many points, and the cache that survives them."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, child_env, extract_run_counts, make_dataset, run_cli
from hostile import write_corpus
from tlfeat import cache
from tlfeat.extraction.run import extract

FAST = dict(backbone="vgg16", weights="none", image_size=32, progress=False)


def test_hostile_corpus_is_embedded_or_skipped_with_reasons(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=3)
    expected = write_corpus(data)
    assert len(expected) >= 20
    summary = extract(data, tmp_path / "c.h5", **FAST)
    stored = cache.load(tmp_path / "c.h5")
    embedded = set(stored.paths)
    skipped = dict(summary.skipped)
    ignored = dict(summary.ignored)
    with h5py.File(tmp_path / "c.h5", "r") as handle:
        recorded = dict(zip(handle["skipped_paths"].asstr()[...], handle["skipped_reasons"].asstr()[...]))
    assert recorded == skipped
    for item in expected:
        if item.outcome == "ok":
            assert item.relpath in embedded, item
        elif item.outcome == "skipped":
            assert item.reason in skipped.get(item.relpath, ""), (item, skipped.get(item.relpath))
        else:
            assert item.reason in ignored.get(item.relpath, ""), (item, ignored.get(item.relpath))
    assert np.isfinite(stored.features).all()
    assert summary.n_images == 6 + sum(e.outcome == "ok" for e in expected)


# Runs cli.py in a child whose chosen step is replaced by SIGKILL: the only way to
# stop a process at an exact byte of a write without a test hook in tlfeat itself.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import tlfeat.extraction.shards as cache_module

    point, nth = sys.argv[1], int(sys.argv[2])
    calls = {"n": 0}

    def due():
        calls["n"] += 1
        return calls["n"] >= nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-shard-write":
        real_savez = np.savez
        def savez(handle, **arrays):
            if due():
                handle.write(b"PK\\x03\\x04 half a shard")
                handle.flush()
                die()
            real_savez(handle, **arrays)
        cache_module.np.savez = savez
    elif point == "before-shard-rename":
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(".npz") and due():
                die()
            real_replace(src, dst)
        cache_module.os.replace = replace
    elif point == "mid-final-write":
        import tlfeat.fileio as fileio_module
        def fsync_path(path):
            die()
        fileio_module.fsync_path = fsync_path
    sys.argv = ["cli.py"] + sys.argv[3:]
    sys.path.insert(0, os.getcwd())
    import cli
    cli.app()
    """
)


def _extract_args(data: Path, out: Path) -> list[str]:
    return ["extract", str(data), "--out", str(out), "--backbone", "vgg16", "--weights", "none",
            "--image-size", "64", "--batch-size", "4", "-q"]


def _assert_cache_opens_cleanly(out: Path) -> None:
    if out.exists():
        data = cache.load(out)
        assert len(data) == len(data.features) and np.isfinite(data.features).all()


@pytest.mark.slow
def test_cache_survives_sigkill_at_many_points(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=3, per_class=20)
    out = tmp_path / "killed.h5"
    parts = Path(str(out) + ".parts")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    rng = random.Random(1234)
    kill_points = [("mid-shard-write", 2), ("random-time", 0), ("before-shard-rename", 2),
                   ("random-time", 0), ("mid-shard-write", 3), ("random-time", 0)]
    survived = 0
    for point, nth in kill_points:
        proc = subprocess.Popen(
            [sys.executable, str(killer), point, str(nth), *_extract_args(data, out)],
            cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        if point == "random-time":
            shards_before = len(list(parts.glob("shard-*.npz")))
            target = shards_before + rng.randint(1, 3)
            while proc.poll() is None and len(list(parts.glob("shard-*.npz"))) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        survived += 1
        _assert_cache_opens_cleanly(out)
    assert not out.exists(), "every run was killed before it finished"
    assert survived >= 5

    # Finish, then add one image and die while writing the final file: the old cache must survive.
    finished = subprocess.run([sys.executable, str(REPO / "cli.py"), *_extract_args(data, out)],
                              env=child_env(), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    before = cache.load(out)
    make_dataset(tmp_path / "more", n_classes=1, per_class=1)
    (tmp_path / "more" / "class_0" / "img_000.png").rename(data / "class_0" / "late.png")
    proc = subprocess.run([sys.executable, str(killer), "mid-final-write", "1", *_extract_args(data, out)],
                          cwd=REPO, env=child_env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    after_crash = cache.load(out)
    assert list(after_crash.paths) == list(before.paths)
    np.testing.assert_array_equal(after_crash.features, before.features)
    assert list(out.parent.glob(f".{out.stem}.tmp-*{out.suffix}")), "the killed final write left its temp file"

    resumed = subprocess.run([sys.executable, str(REPO / "cli.py"), *_extract_args(data, out)],
                             env=child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert extract_run_counts(resumed.stdout) == (0, 0, 0, 61)  # the late image's shard survived the crash
    assert not list(out.parent.glob(f".{out.stem}.tmp-*{out.suffix}")) and not parts.exists()

    clean_out = tmp_path / "clean.h5"
    clean = subprocess.run([sys.executable, str(REPO / "cli.py"), *_extract_args(data, clean_out)],
                           env=child_env(), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    a, b = cache.load(out), cache.load(clean_out)
    assert list(a.paths) == list(b.paths) and len(a) == 61
    np.testing.assert_array_equal(a.split, b.split)
    np.testing.assert_array_equal(a.labels, b.labels)
    # the late image was embedded alone in its own batch; all others in the same batches as the clean run
    late = list(a.paths).index("class_0/late.png")
    others = np.arange(len(a)) != late
    np.testing.assert_array_equal(a.features[others], b.features[others])
    np.testing.assert_allclose(a.features[late], b.features[late], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_concurrent_extract_on_same_output_stops_at_once(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=60)
    out = tmp_path / "c.h5"
    first = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *_extract_args(data, out)],
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = Path(str(out) + ".lock")
    while not lock.exists() and first.poll() is None:
        time.sleep(0.01)
    second = subprocess.run([sys.executable, str(REPO / "cli.py"), *_extract_args(data, out)],
                            env=child_env(), capture_output=True, text=True)
    first_still_running = first.poll() is None  # refused at start-up, not after waiting its turn
    first.wait(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    assert first_still_running


def test_a_second_run_is_refused_before_it_loads_keras(tmp_path: Path) -> None:
    # Before (this stop's random-weights key): the key's weights were computed before the lock was taken, which
    # imported Keras and TensorFlow first; the second run was refused seconds late, or ran after the first.
    from tlfeat.fileio import OutputLock

    data = make_dataset(tmp_path / "data", n_classes=2, per_class=3)
    out = tmp_path / "c.h5"
    script = textwrap.dedent(f"""
        import sys
        from tlfeat.errors import TlfeatError
        from tlfeat.extraction.run import extract
        try:
            extract({str(data)!r}, {str(out)!r}, backbone="vgg16", weights="none", image_size=32, progress=False)
        except TlfeatError as exc:
            print(exc)
        print("keras loaded" if "keras" in sys.modules else "keras not loaded")
    """)
    with OutputLock(out):
        result = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True,
                                timeout=300)
    assert f"pid {os.getpid()}" in result.stdout and result.stdout.endswith("keras not loaded\n"), result.stdout


def _state(pid: int) -> str:
    """The process state letter from /proc (Z: a zombie, dead but not reaped by its parent)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_a_killed_run_still_unreaped_as_a_zombie_does_not_block_the_rerun(tmp_path: Path) -> None:
    # Before: the lock was a pid checked with kill(pid, 0), which a zombie passes: every rerun refused
    # with "another tlfeat run (pid N) is writing this output" until the zombie was reaped.
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=30)
    out = tmp_path / "c.h5"
    parts = Path(str(out) + ".parts")
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *_extract_args(data, out)],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list(parts.glob("shard-*.npz"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # not proc.kill()/poll(): they would reap it
        while _state(proc.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(proc.pid) == "Z" and Path(str(out) + ".lock").exists()
        rerun = run_cli(*_extract_args(data, out))
        assert _state(proc.pid) == "Z"  # still unreaped while the rerun took the lock
    finally:
        proc.wait(timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    computed, reused = (int(n) for n in re.search(r"(\d+) attempted \(\d+ embedded, \d+ skipped\), (\d+) reused",
                                                    rerun.stdout).groups())
    assert reused >= 8 and computed + reused == 60  # resumed from the killed run's shards
