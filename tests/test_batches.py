"""The decoding pipeline: worker processes, shared uint8 buffers, canonical order, failures and deaths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import child_env
from tlfeat.data import batches
from tlfeat.data import cores
from tlfeat.data.batches import DecodePool, iter_batches
from tlfeat.data.cores import available_cores
from tlfeat.data.decode import decode_image


def _images(folder: Path, n: int, size: tuple[int, int] = (40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_uint8_batches_equal_the_decoded_pixels_in_input_order(tmp_path: Path, scene15_subset: Path) -> None:
    files = sorted(scene15_subset.rglob("*.jpg")) + _images(tmp_path, 9)
    got = [(b.start, b.pixels.copy(), b.ok, b.failures) for b in iter_batches(files, 48, batch_size=5, workers=2)]
    assert [start for start, *_ in got] == list(range(0, len(files), 5))
    pixels = np.concatenate([p for _, p, _, _ in got])
    assert pixels.dtype == np.uint8 and pixels.shape == (len(files), 48, 48, 3)
    for path, row in zip(files, pixels):
        np.testing.assert_array_equal(row, decode_image(path, 48), err_msg=str(path))
    assert all(ok == list(range(len(p))) and not failures for _, p, ok, failures in got)


def test_order_is_canonical_whatever_order_workers_finish_in(tmp_path: Path) -> None:
    """The first chunk of each batch is slow (large PNGs), so later chunks finish first."""
    slow = _images(tmp_path / "slow", 3, size=(1500, 1000))
    fast = _images(tmp_path / "fast", 12)
    files = [slow[0], *fast[:5], slow[1], *fast[5:], slow[2]]
    with DecodePool(3) as pool:
        got = [b.pixels.copy() for b in pool.batches(files, 32, batch_size=6)]
    for path, row in zip(files, np.concatenate(got)):
        np.testing.assert_array_equal(row, decode_image(path, 32), err_msg=str(path))


def test_a_failing_image_mid_batch_costs_only_itself(tmp_path: Path) -> None:
    files = _images(tmp_path, 7)
    files[3].write_bytes(b"not an image")
    got = list((b.start, b.pixels.copy(), b.ok, b.failures) for b in iter_batches(files, 8, batch_size=3, workers=2))
    assert [start for start, *_ in got] == [0, 3, 6]
    _, pixels, ok, failures = got[1]
    assert failures == [(0, "not an image Pillow can read")] and ok == [1, 2]
    assert not pixels[0].any()  # the failed row is zeros, not a stale image
    np.testing.assert_array_equal(pixels[1], decode_image(files[4], 8))


def _blocked_on_fifo(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"  # the kernel's wait in a FIFO open
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="finds the blocked worker through /proc (Linux)")
def test_a_worker_that_dies_costs_only_its_image(tmp_path: Path) -> None:
    """Opening a FIFO with no writer blocks the worker that tries; the test kills it there, mid-batch."""
    files = _images(tmp_path, 11)
    fifo = tmp_path / "blocks.png"
    os.mkfifo(fifo)
    files.insert(5, fifo)

    with DecodePool(2) as pool:
        pids = [w.process.pid for w in pool.workers]
        killed = []

        def kill_the_blocked_worker() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed:
                killed.extend(pid for pid in pids if _blocked_on_fifo(pid))
                time.sleep(0.01)
            if killed:
                os.kill(killed[0], signal.SIGKILL)
            else:  # let the run finish, so the test fails instead of hanging
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

        killer = threading.Thread(target=kill_the_blocked_worker, daemon=True)
        killer.start()
        got = [(b.pixels.copy(), b.ok, b.failures) for b in pool.batches(files, 16, batch_size=8)]
        killer.join()
        assert killed, "no worker was seen blocked on the FIFO"
        assert killed[0] not in [w.process.pid for w in pool.workers]  # replaced
        again = [b.pixels.copy() for b in pool.batches(files[:3], 16, batch_size=8)]  # the pool still works

    (pixels, ok, failures), second = got
    assert failures == [(5, "the decoding process died on this file (killed by signal 9)")]
    assert ok == [0, 1, 2, 3, 4, 6, 7] and second[1] == [0, 1, 2, 3]
    decoded = np.concatenate([pixels, second[0]])
    for i, path in enumerate(files):
        if i != 5:
            np.testing.assert_array_equal(decoded[i], decode_image(path, 16), err_msg=str(path))
    np.testing.assert_array_equal(again[0][1], decode_image(files[1], 16))


def test_memory_is_bounded_by_the_buffers(tmp_path: Path) -> None:
    """4,000 images of 64 px (48 MB decoded) through 64-image batches: nothing grows with the count."""
    files = _images(tmp_path, 1, size=(80, 60)) * 4000
    with DecodePool(2) as pool:
        tracemalloc.start()
        buffers = set()
        for batch in pool.batches(files, 64, batch_size=64):
            buffers.add(batch.pixels.__array_interface__["data"][0])
            assert len(batch.ok) == batch.length
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert len(buffers) <= 4  # prefetch_batches + 2 slots, reused
    assert peak < 4 * 2**20, peak  # the paths and messages, not the pixels (12 kB per image)


def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    files = _images(tmp_path, 2, size=(2000, 2000)) * 200
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys\n"
        "from tlfeat.data.batches import DecodePool\n"
        "pool = DecodePool(2)\n"
        "print(*[w.process.pid for w in pool.workers], flush=True)\n"
        f"for batch in pool.batches({[str(p) for p in files]!r}, 64, batch_size=8):\n"
        "    pass\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=child_env())
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    time.sleep(1.0)  # mid-run
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_available_cores_respects_the_affinity_mask_and_cgroup_quota(tmp_path: Path) -> None:
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cores._quota(tmp_path / "cpu.max") == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores._quota(tmp_path / "cpu.max") is None
    (tmp_path / "quota").write_text("-1\n")
    (tmp_path / "period").write_text("100000\n")
    assert cores._quota(tmp_path / "quota", tmp_path / "period") is None
    (tmp_path / "quota").write_text("400000\n")
    assert cores._quota(tmp_path / "quota", tmp_path / "period") == 4.0


def test_available_memory_respects_a_cgroup_memory_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: only /proc/meminfo's MemAvailable, the host's in a container: a batch checked against 60 GB
    # could be killed by the container's 4 GB limit.
    monkeypatch.setattr(cores, "_cgroup_memory_room", lambda: 2**20)
    assert cores.available_memory() == 2**20
    monkeypatch.undo()
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("3221225472\n")  # 3 GiB used, 0.5 GiB of it droppable cache
    (tmp_path / "memory.stat").write_text("anon 2684354560\ninactive_file 536870912\nactive_file 0\n")
    room = cores._room(tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat",
                       "inactive_file")
    assert room == 2**30 + 2**29
    (tmp_path / "memory.max").write_text("max\n")
    assert cores._room(tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat",
                       "inactive_file") is None
    (tmp_path / "limit").write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert cores._room(tmp_path / "limit", tmp_path / "memory.current", tmp_path / "memory.stat", "x") is None


def test_the_shared_pool_is_kept_for_the_next_run(tmp_path: Path) -> None:
    files = _images(tmp_path, 3)
    pool = batches.shared_pool(2)
    first = [b.pixels.copy() for b in iter_batches(files, 16, batch_size=2, pool=pool)]
    assert batches.shared_pool(2) is pool and len(first) == 2
    other = batches.shared_pool(1)  # another size replaces it
    assert other is not pool and not pool.workers and batches.shared_pool(1) is other


def test_relative_paths_read_from_the_callers_folder_after_the_pool_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the pool's processes kept the folder they started in: after a notebook's os.chdir, relative paths
    # failed as "file disappeared during the run".
    files = _images(tmp_path / "images", 2)
    pool = batches.shared_pool(1)
    list(iter_batches(files, 16, batch_size=2, pool=pool))  # started from the first folder
    monkeypatch.chdir(tmp_path / "images")
    decoded = list(iter_batches([Path(f.name) for f in files], 16, batch_size=2, pool=pool))
    assert not decoded[0].failures and np.array_equal(decoded[0].pixels[1], decode_image(files[1], 16))


def test_workers_import_this_very_tlfeat() -> None:
    assert (batches.PACKAGE_ROOT / "tlfeat" / "data" / "batches.py").samefile(batches.__file__)


def test_workers_below_one_is_refused() -> None:
    from tlfeat.errors import TlfeatError

    with pytest.raises(TlfeatError, match="`workers=0`: must be at least 1"):
        DecodePool(0)


def test_a_worker_that_died_between_runs_is_replaced(tmp_path: Path) -> None:
    files = _images(tmp_path, 4)
    with DecodePool(2) as pool:
        assert len([b for b in pool.batches(files, 16, batch_size=2)]) == 2
        victim = pool.workers[0].process
        victim.kill()
        victim.wait()
        got = [b.pixels.copy() for b in pool.batches(files, 16, batch_size=2)]
        assert victim not in [w.process for w in pool.workers]
    np.testing.assert_array_equal(np.concatenate(got)[3], decode_image(files[3], 16))


@pytest.mark.parametrize("wait", [0, 3])
def test_a_process_that_ends_with_its_pool_running_leaves_no_traceback_or_warning(wait: int) -> None:
    # Before: ending right after starting the shared pool printed each loading worker's BrokenPipeError traceback
    # (wait 0), and ending later warned "subprocess N is still running" and of unclosed sockets (wait 3).
    code = f"import time; from tlfeat.data.batches import shared_pool; shared_pool(2); time.sleep({wait})"
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                            timeout=60, env=child_env())
    assert result.returncode == 0 and result.stderr == "", result.stderr
