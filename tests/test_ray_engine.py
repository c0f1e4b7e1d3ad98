"""The Ray engine of extract: same cache as the local engine, resumable after a kill, clear errors.

These tests start private local Ray instances (2 CPUs on the CI machine), a few seconds each.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, child_env, extract_run_counts, make_dataset, run_cli
from tlfeat import cache
from tlfeat.errors import TlfeatError
from tlfeat.extraction.run import extract
from tlfeat.extraction.ray_engine import RayOptions, _cause, _plan

pytest.importorskip("ray.data", reason="the Ray engine needs ray[data] (in tlfeat's dev extras)")

FAST = dict(backbone="vgg16", weights="none", image_size=32, progress=False)


def _assert_same_cache(a: Path, b: Path) -> None:
    x, y = cache.load(a), cache.load(b)
    assert list(x.paths) == list(y.paths) and list(x.split) == list(y.split)
    np.testing.assert_array_equal(x.labels, y.labels)
    np.testing.assert_allclose(x.features, y.features, rtol=1e-5, atol=1e-5)
    assert cache.read_key(a) == cache.read_key(b)
    assert x.attrs["keras_backend"] == y.attrs["keras_backend"]
    with h5py.File(a) as fa, h5py.File(b) as fb:  # each row's SHA-256 of its file, from Ray's decode tasks too
        np.testing.assert_array_equal(fa["file_sha256"][:], fb["file_sha256"][:])
        assert fa["file_sha256"][:].any(axis=1).all()


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_cache(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=3, per_class=8)
    (data / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    local = extract(data, tmp_path / "local.h5", batch_size=4, **FAST)
    ray = extract(data, tmp_path / "ray.h5", batch_size=4, engine="ray", **FAST)

    _assert_same_cache(tmp_path / "local.h5", tmp_path / "ray.h5")
    assert ray.n_computed == local.n_computed == 25 and ray.n_images == 24
    assert ray.skipped == local.skipped and "class_1/broken.png" in dict(ray.skipped)
    assert not Path(str(tmp_path / "ray.h5") + ".parts").exists()
    import ray as ray_module

    assert not ray_module.is_initialized(), "the engine leaves Ray as it found it"

    # Nothing new: a rerun is up to date, whichever engine ran first.
    assert extract(data, tmp_path / "local.h5", engine="ray", **FAST).up_to_date


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_killed_ray_run_resumes_and_matches_the_local_engine(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=3, per_class=40)
    args = ["--backbone", "vgg16", "--weights", "none", "--image-size", "96", "--batch-size", "4", "-q"]
    out = tmp_path / "killed.h5"
    parts = Path(str(out) + ".parts")
    # Its own session, so the kill takes the run's whole Ray instance down with it, as Ctrl-\ would.
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "extract", str(data), "--out", str(out),
                             "--engine", "ray", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), start_new_session=True)
    deadline = time.time() + 300
    while len(list(parts.glob("shard-*.npz"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    rows_in_shards = sum(len(np.load(shard)["paths"]) for shard in parts.glob("shard-*.npz"))
    assert rows_in_shards >= 3

    resumed = run_cli("extract", str(data), "--out", str(out), "--engine", "ray", *args)
    assert resumed.returncode == 0, resumed.stderr
    attempted, _, _, reused = extract_run_counts(resumed.stdout)
    assert reused >= rows_in_shards and attempted + reused == 120 and attempted < 120
    assert not parts.exists()

    local = run_cli("extract", str(data), "--out", str(tmp_path / "local.h5"), *args)
    assert local.returncode == 0, local.stderr
    _assert_same_cache(out, tmp_path / "local.h5")


@pytest.mark.slow
def test_a_relative_weights_file_is_opened_by_its_absolute_path_on_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the actors got `weights` as typed, so a cluster started in another folder failed with
    # "vgg.weights.h5: weights file not found", after the driver had hashed the very file for the key.
    import ray

    from tlfeat.backbones import get_backbone
    from tlfeat.backbones.registry import build_model

    data = make_dataset(tmp_path / "data", n_classes=2, per_class=2)
    (tmp_path / "cluster").mkdir()
    (tmp_path / "here").mkdir()
    build_model(get_backbone("vgg16"), "none", 32).save_weights(tmp_path / "here" / "vgg.weights.h5")
    monkeypatch.chdir(tmp_path / "cluster")  # the Ray instance, and its workers, start here
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        monkeypatch.chdir(tmp_path / "here")
        summary = extract(data, tmp_path / "c.h5", backbone="vgg16", weights="vgg.weights.h5", image_size=32,
                          progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert summary.n_images == 4 and not summary.skipped


@pytest.mark.slow
def test_a_worker_that_cannot_load_the_model_fails_the_run_in_one_line(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=2)
    weights = tmp_path / "broken.weights.h5"
    weights.write_bytes(b"not an HDF5 file")
    out = tmp_path / "c.h5"
    result = run_cli("extract", str(data), "--out", str(out), "--backbone", "vgg16", "--weights", str(weights),
                  "--image-size", "32", "--engine", "ray", "-q")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(weights) in errors[0] and "cannot load as vgg16 weights" in errors[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert not out.exists() and not Path(str(out) + ".parts").exists()


def test_engine_options_are_checked_before_any_work(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=2)
    port = _free_port()
    unreachable = run_cli("extract", str(data), "--out", str(tmp_path / "c.h5"), "--engine", "ray",
                       "--address", f"127.0.0.1:{port}", "-q")
    assert unreachable.returncode == 1
    assert f"error: --address 127.0.0.1:{port}: no Ray cluster answers there" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr

    with pytest.raises(TlfeatError, match="need `engine=.ray.`"):
        extract(data, tmp_path / "c.h5", ray_options=RayOptions(workers=2), **FAST)
    with pytest.raises(TlfeatError, match="`engine='spark'`: use local or ray"):
        extract(data, tmp_path / "c.h5", engine="spark", **FAST)
    with pytest.raises(TlfeatError, match="`workers=0`"):
        extract(data, tmp_path / "c.h5", engine="ray", ray_options=RayOptions(workers=0), **FAST)


def test_an_address_where_something_else_answers_is_refused_in_seconds(tmp_path: Path) -> None:
    # The dashboard's port (8265) or any web server: ray.init retried it for minutes (killed after 150 s),
    # printing Ray's C++ warnings, where a closed port was refused at once.
    import http.server
    import threading

    from tlfeat.extraction.ray_engine import _check_reachable

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        started = time.perf_counter()
        with pytest.raises(TlfeatError, match=f"^`address='{address}'`: something answers there, but not a Ray"):
            _check_reachable(address)
        assert time.perf_counter() - started < 10
    finally:
        server.shutdown()
        server.server_close()


def test_an_address_with_another_scheme_is_refused_for_what_it_is() -> None:
    # Before: http://127.0.0.1:8265 (the dashboard's address in Ray's job docs) was looked up as the host
    # "http://127.0.0.1": "no Ray cluster answers there (Name or service not known)", a wrong diagnosis.
    from tlfeat.extraction.ray_engine import _check_reachable

    with pytest.raises(TlfeatError, match=r"^`address='http://127.0.0.1:8265'`: http:// is not an address a Ray"):
        _check_reachable("http://127.0.0.1:8265")



def test_an_empty_address_is_refused_before_ray_starts() -> None:
    # Before: `--address ''` reached ray.init: "local Ray instance: cannot connect (Invalid address format:)".
    from tlfeat.extraction.ray_engine import RayOptions

    for address in ("", " "):
        with pytest.raises(TlfeatError, match=r"^`address='\s*'`: empty; leave it out"):
            RayOptions(address=address).validate()

def test_without_ray_installed_the_ray_engine_says_how_to_get_it(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=2)
    script = (
        "import sys; sys.modules['ray'] = None\n"  # makes `import ray` fail as if it were not installed
        f"sys.argv = ['cli.py', 'extract', {str(data)!r}, '--out', {str(tmp_path / 'c.h5')!r}, '--engine', 'ray']\n"
        "import cli; cli.app()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), cwd=REPO)
    assert result.returncode == 1
    assert "error: --engine ray needs Ray Data, which is not installed: pip install" in result.stderr


@pytest.mark.slow
def test_the_local_engine_never_imports_ray(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=2)
    script = (
        "import sys\nfrom pathlib import Path\nfrom tlfeat.extraction.run import extract\n"
        f"extract(Path({str(data)!r}), Path({str(tmp_path / 'c.h5')!r}), backbone='vgg16', weights='none', "
        "image_size=32, progress=False)\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0, result.stderr


class _Cluster:
    """What _plan asks of a Ray cluster: its resources and its nodes."""

    def __init__(self, gpus: float, nodes: int, cpus_per_node: float = 8.0) -> None:
        self.gpus, self.n_nodes, self.cpus_per_node = gpus, nodes, cpus_per_node

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_node * self.n_nodes, **({"GPU": self.gpus} if self.gpus else {})}

    def nodes(self) -> list[dict]:
        return [{"Alive": True}] * self.n_nodes + [{"Alive": False}]


def test_plan_puts_one_actor_per_gpu_or_per_node() -> None:
    assert _plan(_Cluster(gpus=4, nodes=2), RayOptions()) == (1.0, 4)
    assert _plan(_Cluster(gpus=4, nodes=2), RayOptions(num_gpus_per_worker=0.5)) == (0.5, 8)
    assert _plan(_Cluster(gpus=0, nodes=3), RayOptions()) == (0.0, 3)
    assert _plan(_Cluster(gpus=4, nodes=2), RayOptions(num_gpus_per_worker=0, workers=5)) == (0.0, 5)
    with pytest.raises(TlfeatError, match="has 0 GPUs"):
        _plan(_Cluster(gpus=0, nodes=1), RayOptions(num_gpus_per_worker=1))


def test_plan_refuses_more_actors_than_the_cluster_can_run_beside_the_decoding_tasks() -> None:
    # Ray Data waits for every actor of the pool, and for a CPU to decode on: `--workers 3` on a 2-CPU
    # machine (3 x 0.5 CPU, leaving 0.5 for decoding tasks of 1 CPU) hung with no message, for ever.
    two_cpus = _Cluster(gpus=0, nodes=1, cpus_per_node=2)
    assert _plan(two_cpus, RayOptions(workers=2)) == (0.0, 2)
    with pytest.raises(TlfeatError, match=r"^`workers=3`: .*2 CPUs.*at most 2$"):
        _plan(two_cpus, RayOptions(workers=3))
    with pytest.raises(TlfeatError, match=r"^`workers=5`: .*4 GPUs.*at most 4$"):
        _plan(_Cluster(gpus=4, nodes=2), RayOptions(workers=5))
    with pytest.raises(TlfeatError, match=r"1 CPU.*cannot run"):  # the default pool: one actor a node
        _plan(_Cluster(gpus=0, nodes=1, cpus_per_node=1), RayOptions())


def test_ray_options_out_of_range_are_one_line_errors_before_any_work(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=2)
    for options, message in [
        (RayOptions(num_gpus_per_worker=float("nan")), "`num_gpus_per_worker=nan`: must be a finite number"),
        (RayOptions(num_gpus_per_worker=float("inf")), "`num_gpus_per_worker=inf`: must be a finite number"),
        (RayOptions(workers=2.5), "`workers=2.5`: must be an integer"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(TlfeatError, match=re.escape(message)):
            extract(data, tmp_path / "c.h5", engine="ray", ray_options=options, **FAST)
    assert not (tmp_path / "c.h5.lock").exists()


def test_cause_finds_the_workers_own_error_in_rays_text() -> None:
    text = (
        "The actor died because of an error raised in its creation task, ray::MapWorker.__init__() (pid=1)\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise TlfeatError(msg)\n"
        "tlfeat.errors.TlfeatError: /w.h5: cannot load as vgg16 weights (OSError: bad signature)\n"
    )
    assert _cause(RuntimeError(text)) == "/w.h5: cannot load as vgg16 weights (OSError: bad signature)"
    assert _cause(RuntimeError("boom\n  File \"y.py\"\nnumpy.core._exceptions.MemoryError: out of memory")) == (
        "MemoryError: out of memory"
    )
    assert _cause(RuntimeError("node lost")) == "node lost"

