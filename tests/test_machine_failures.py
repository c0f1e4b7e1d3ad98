"""Failures of the machine, not of the input: full disks, unwritable or oddly named outputs, Ctrl-C.

Each must end `extract` with one line naming the cause, and leave nothing behind that the next run trips
on (no temporary file, no lock), with every finished batch kept. Disk-full cases run by simulation
everywhere (a write that raises ENOSPC) and on a real, tiny tmpfs where this process may mount one.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, child_env, make_image
from tlfeat import cache, cache_writer
from tlfeat.errors import Interrupted, TlfeatError
from tlfeat.extraction import engines, shards as shards_module
from tlfeat.extraction.run import extract
from tlfeat.runtime import FeatureExtractor
import tlfeat.fileio as fileio

FAST = dict(backbone="vgg16", weights="none", image_size=32, progress=False)
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class _Module:
    """A module seen through one module's global name, with some functions replaced: the patch stays local."""

    def __init__(self, module: object, **replaced: object) -> None:
        self._module, self.__dict__["replaced"] = module, replaced

    def __getattr__(self, name: str) -> object:
        return self.replaced.get(name) or getattr(self._module, name)


def _leftovers(out: Path) -> list[str]:
    """Files a failed run must not leave: temporaries beside `out` or among its shards, and the lock."""
    parts = Path(str(out) + ".parts")
    found = [p.name for p in out.parent.glob("*.tmp-*")] + [p.name for p in parts.glob(".tmp-*")]
    return found + ([Path(str(out) + ".lock").name] if Path(str(out) + ".lock").exists() else [])


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _cli_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "╭" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), "extract", *args, "--backbone", "vgg16",
                           "--weights", "none", "--image-size", "32", "-q"],
                          capture_output=True, text=True, env=child_env(), timeout=600)


# --- disk full, by simulation --------------------------------------------------------------------------


def test_disk_full_while_writing_a_shard(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c.h5"
    real_savez, calls = np.savez, {"n": 0}

    def savez(handle: object, **arrays: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ENOSPC
        real_savez(handle, **arrays)

    monkeypatch.setattr(shards_module, "np", _Module(np, savez=savez))
    with pytest.raises(TlfeatError) as info:
        extract(tiny_dataset, out, batch_size=4, **FAST)
    _one_line(info, str(out) + ".parts", "no space left on the device", "kept")
    assert _leftovers(out) == [] and len(list(Path(str(out) + ".parts").glob("shard-*.npz"))) == 2
    monkeypatch.undo()
    assert extract(tiny_dataset, out, batch_size=4, **FAST).n_reused == 8  # the two shards before it count


def test_disk_full_during_the_final_write(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c.h5"
    extract(tiny_dataset, out, **FAST)
    before = cache.load(out)
    make_image(tiny_dataset / "class_0" / "late.png", 0, 99)

    def full(*args: object, **kwargs: object) -> None:
        raise ENOSPC

    monkeypatch.setattr(cache_writer, "_numbers", full)
    with pytest.raises(TlfeatError) as info:
        extract(tiny_dataset, out, **FAST)
    _one_line(info, f"{out}: cannot write the cache (no space left on the device)", "rerun")
    assert _leftovers(out) == []
    np.testing.assert_array_equal(cache.load(out).features, before.features)  # the previous cache is intact
    monkeypatch.undo()
    assert extract(tiny_dataset, out, **FAST).n_computed == 0  # the late image's shard was kept


def test_free_space_is_checked_before_the_final_write(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c.h5"
    real_usage = fileio.shutil.disk_usage

    def nearly_full(path: object) -> object:
        usage = real_usage(path)
        return type(usage)(usage.total, usage.total - 10_000, 10_000)

    monkeypatch.setattr(fileio, "shutil", _Module(fileio.shutil, disk_usage=nearly_full))
    with pytest.raises(TlfeatError) as info:
        extract(tiny_dataset, out, **FAST)
    _one_line(info, f"{tmp_path}: writing {out.name} needs about", "MB free", "rerun")
    assert not out.exists() and _leftovers(out) == []


def test_disk_full_while_taking_the_lock(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c.h5"

    def full(fd: int, data: bytes) -> int:
        raise ENOSPC

    monkeypatch.setattr(fileio, "os", _Module(os, write=full))
    with pytest.raises(TlfeatError) as info:
        extract(tiny_dataset, out, **FAST)
    _one_line(info, f"{out}.lock: cannot write the output lock (no space left on the device)")
    assert _leftovers(out) == []  # no empty lock left behind


# --- disk full, for real -------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Path:
    """A 1 MB tmpfs, mounted for the test (needs root and a kernel that lets this process mount)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); the simulated cases still run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_the_run_finishes_elsewhere(tmp_path: Path, tiny_tmpfs: Path) -> None:
    # Before: a long h5py traceback (and, on the machine, a segfault) when the final write hit ENOSPC.
    data = tmp_path / "data"
    for c in range(2):
        for v in range(150):  # 300 rows of 512 float32: 600 KB of shards, and as much again to write
            make_image(data / f"c{c}" / f"{v:04d}.png", c, v, size=(16, 16))
    out = tiny_tmpfs / "c.h5"
    failed = _cli(str(data), "--out", str(out))
    _cli_error(failed, "needs about", "MB free")
    assert _leftovers(out) == [] and len(list(Path(str(out) + ".parts").glob("shard-*.npz"))) > 0


def test_a_real_full_disk_inside_the_hdf5_write(
    tiny_dataset: Path, tiny_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free-space check passed, then another process filled the disk: HDF5's own ENOSPC, mid-write."""
    out = tiny_tmpfs / "c.h5"

    def passed_then_filled(folder: Path, need: int, what: str) -> None:
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        (tiny_tmpfs / "filler").write_bytes(b"\0" * (free - 8192))

    monkeypatch.setattr(cache_writer, "check_free_space", passed_then_filled)
    with pytest.raises(TlfeatError) as info:
        extract(tiny_dataset, out, **FAST)
    _one_line(info, f"{out}: cannot write the cache (no space left on the device)")
    assert _leftovers(out) == [] and not out.exists()


# --- outputs that cannot be written ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("parent-is-a-file", ["is a file, not a folder"]),
        ("lock-is-a-folder", [".lock: is a folder", "move it away"]),
        ("parts-is-a-file", [".parts: is a file", "move it away"]),
        ("name-too-long", ["file name too long for this file system"]),
    ],
)
def test_unusable_output_names_are_refused_before_any_image_is_computed(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, fragments: list[str]
) -> None:
    out = tmp_path / "c.h5"
    if case == "parent-is-a-file":
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "c.h5"
    elif case == "lock-is-a-folder":
        Path(str(out) + ".lock").mkdir()
    elif case == "parts-is-a-file":
        Path(str(out) + ".parts").write_text("x")
    elif case == "name-too-long":
        out = tmp_path / ("x" * 250 + ".h5")  # fits NAME_MAX (255), its temporary name would not

    def never(*args: object) -> None:
        raise AssertionError("an image was computed before the output was checked")

    monkeypatch.setattr(FeatureExtractor, "submit", never)
    with pytest.raises(TlfeatError) as info:
        extract(tiny_dataset, out, **FAST)
    _one_line(info, *fragments)


def test_read_only_output_folder_by_simulation(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio, "os", _Module(os, open=read_only))
    with pytest.raises(TlfeatError) as info:
        extract(tiny_dataset, tmp_path / "c.h5", **FAST)
    _one_line(info, f"{tmp_path}: cannot write here (Read-only file system)")


def test_read_only_output_folder_for_real(tiny_dataset: Path, tiny_tmpfs: Path) -> None:
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], capture_output=True, text=True)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only ({remounted.stderr.strip()})")
    _cli_error(_cli(str(tiny_dataset), "--out", str(tiny_tmpfs / "c.h5")), "cannot write here (Read-only file system)")


# --- Ctrl-C ------------------------------------------------------------------------------------------------


def test_ctrl_c_while_the_model_loads_is_one_line(tiny_dataset: Path, tmp_path: Path) -> None:
    # Before: a bare exit 130 and nothing said (the KeyboardInterrupt came during the Keras import and build).
    out = tmp_path / "c.h5"
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "extract", str(tiny_dataset), "--out", str(out),
                             "--backbone", "vgg16", "--weights", "none", "--image-size", "32", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            # Ctrl-C as in a terminal: a runner started in the background hands down SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not Path(str(out) + ".lock").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)  # into the Keras import / model build that follows the lock
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    _cli_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "interrupted")
    assert _leftovers(out) == []


def test_ctrl_c_simulated_in_the_model_build_and_in_the_final_write(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c.h5"
    with monkeypatch.context() as patch:
        def interrupted(*args: object) -> None:
            raise KeyboardInterrupt

        patch.setattr(engines, "get_extractor", interrupted)
        with pytest.raises(Interrupted) as info:
            extract(tiny_dataset, out, **FAST)
        _one_line(info, "interrupted")
    extract(tiny_dataset, out, **FAST)
    before = cache.load(out)
    make_image(tiny_dataset / "class_2" / "late.png", 2, 98)
    with monkeypatch.context() as patch:
        def interrupted_fsync(path: Path) -> None:
            raise KeyboardInterrupt

        patch.setattr(fileio, "fsync_path", interrupted_fsync)
        with pytest.raises(Interrupted) as info:
            extract(tiny_dataset, out, **FAST)
        _one_line(info, f"interrupted while writing {out}", "unchanged", "rerun")
    assert _leftovers(out) == []
    np.testing.assert_array_equal(cache.load(out).features, before.features)
    assert extract(tiny_dataset, out, **FAST).n_computed == 0  # the late image's shard survived
