"""The Ray engine of extraction: decoding as Ray Data CPU tasks, embedding in an actor pool.

Only the embedding step runs on the cluster. `tlfeat.extraction.run` scans the
dataset, keys the cache, writes a shard per finished batch (on the driver, so a
killed run resumes like a local one) and merges the shards into the usual
single HDF5 cache. Batches finish in any order; the final file is written in
canonical row order all the same.

The cluster's workers read the images and any weights file by the driver's
absolute paths, so on several machines both must sit on storage every node
mounts at the same path, and tlfeat (with its dependencies) must be installed
on every node. Images travel to the actors as 8-bit pixels (a quarter of the
float32 size) and stay so into the model, which scales them on its device.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tlfeat.backbones import Backbone, get_backbone, weights_source
from tlfeat.cache import Rows
from tlfeat.data.decode import decode_into, failure_reason
from tlfeat.data.entries import ImageEntry
from tlfeat.errors import TlfeatError, integer, number
from tlfeat.extraction.engines import FilePaths, batch_rows
from tlfeat.runtime import FeatureExtractor, compute_policy, default_batch_size

CONNECT_TIMEOUT_S = 5
INSTALL_HINT = "pip install 'ray[data]' (tlfeat's extra: pip install -e '.[ray]')"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run. None means: decide from the cluster."""

    address: str | None = None  # "auto", "ray://host:10001", "host:6379"; None: this machine's Ray or a new one
    num_gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0 (CPU actors)
    workers: int | None = None  # actors; None: one per GPU share, or one per node without GPUs

    def validate(self) -> None:
        if self.address is not None and not self.address.strip():  # Ray's own words: "Invalid address format:"
            raise TlfeatError(f"`address={self.address!r}`: empty; leave it out for this machine's Ray, or pass the "
                              "head's address host:6379, ray://host:10001 or auto")
        if self.num_gpus_per_worker is not None:  # NaN passed every comparison and failed deep in the plan
            number("num_gpus_per_worker", self.num_gpus_per_worker, 0)
        if self.workers is not None:
            integer("workers", self.workers, 1)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is an extra of the ray package)
    except ImportError:
        raise TlfeatError(f"`engine='ray'` needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, on a host:port where nothing listens (ray.init retries for minutes)."""
    scheme, separator, _ = address.partition("://")
    if separator and scheme in ("http", "https"):  # the dashboard's http://host:8265, as Ray's job docs pass it
        # (other schemes may name a client package that ray.init imports, as anyscale:// does)
        raise TlfeatError(
            f"`address={address!r}`: {scheme}:// is not an address a Ray driver joins; pass the head's GCS "
            "address host:6379 (as `ray start --head` prints it), ray://host:10001 or auto"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and friends: Ray resolves them
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S) as connection:
            speaks_grpc = os.environ.get("RAY_USE_TLS", "0") not in ("0", "") or _answers_http2(connection)
    except OSError as exc:
        raise TlfeatError(
            f"`address={address!r}`: no Ray cluster answers there ({exc.strerror or exc.__class__.__name__}); "
            "start one with `ray start --head` or check the address"
        ) from None
    if not speaks_grpc:  # ray.init would retry it for minutes, printing Ray's C++ warnings
        raise TlfeatError(
            f"`address={address!r}`: something answers there, but not a Ray cluster (the dashboard's port 8265?); "
            "pass the head's GCS address (port 6379 by default, as `ray start --head` prints it) or ray://host:10001"
        )


def _answers_http2(connection: socket.socket) -> bool:
    """Whether the server on `connection` speaks HTTP/2, as a Ray GCS and a Ray client server (gRPC) do: the
    reply to the client's connection preface is the server's SETTINGS frame (frame type 4)."""
    connection.sendall(HTTP2_PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # and an empty SETTINGS frame
    reply = b""
    while len(reply) < 9:
        try:
            more = connection.recv(9 - len(reply))
        except socket.timeout:
            return False
        if not more:
            return False
        reply += more
    return reply[3] == 4


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address` (or this machine's, or a new local one); False if this process already had."""
    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
    # Keep the terminal for tlfeat's own progress bar: Ray's and Ray Data's log lines go to Ray's log files.
    logging.getLogger("ray").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data's own console handler; its log file stays
        if handler.name == "console":
            handler.setLevel(logging.CRITICAL)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"`address={address!r}`" if address else "local Ray instance"
        raise TlfeatError(f"{where}: cannot connect ({_first_line(exc)})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return True


def _plan(ray: Any, options: RayOptions) -> tuple[float, int]:
    """(GPUs per actor, number of actors) for this cluster."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    per_worker = options.num_gpus_per_worker
    if per_worker is None:
        per_worker = 1.0 if gpus >= 1 else 0.0
    if per_worker > gpus:
        raise TlfeatError(
            f"`num_gpus_per_worker={per_worker:g}`: the Ray cluster has {gpus:g} GPUs "
            "(pass 0 for CPU actors)"
        )
    if options.workers is not None:
        workers = options.workers
    elif per_worker > 0:
        workers = max(1, int(gpus // per_worker))
    else:
        workers = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    # Ray Data starts the whole pool before it embeds, and a decoding task needs a CPU beside it: a pool
    # the cluster cannot hold, or one that leaves no CPU to decode on, waits for ever without a word.
    cpus = float(resources.get("CPU", 0))
    fit_cpus = int((cpus - DECODE_CPUS) // _actor_cpus(per_worker)) if cpus >= DECODE_CPUS else 0
    fit = min(fit_cpus, int(gpus // per_worker)) if per_worker > 0 else fit_cpus
    if workers > fit:
        need = f"{workers} embedding actor{'s' if workers != 1 else ''} ({_actor_cpus(per_worker):g} CPU" + (
            f", {per_worker:g} GPU" if per_worker > 0 else "") + " each) beside a decoding task (1 CPU)"
        has = f"the Ray cluster has {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if per_worker > 0 else "")
        if fit < 1:
            raise TlfeatError(f"{need}: {has}, and cannot run even one actor beside the decoding")
        asked = f"`workers={workers}`" if options.workers is not None else "the default actor pool"
        raise TlfeatError(f"{asked}: {need}; {has}: pass `workers` of at most {fit}")
    return per_worker, workers


DECODE_CPUS = 1  # a decoding task's CPUs


def _actor_cpus(gpus_per_worker: float) -> float:
    """An embedding actor's CPUs: a whole one feeds a GPU; a CPU actor's backbone uses the node's cores anyway."""
    return 1 if gpus_per_worker else 0.5


class RayEngine:
    """A Ray cluster, joined (or started) on entry and left on exit: a Ray instance it started stops with it.

    A process already connected to Ray (ray.init called by a user's script) is used as it is and stays connected.
    """

    def __init__(
        self, backbone: Backbone, weights: str, image_size: int, batch_size: int | None, options: RayOptions,
        tta: str = "none",
    ) -> None:
        options.validate()
        self.backbone, self.image_size, self.options = backbone, image_size, options
        self.weights = weights_source(weights)  # the workers open it by the driver's absolute path
        self.tta = tta
        self.requested_batch_size = batch_size
        self.ray: Any = None
        self.joined = False
        # Known once the cluster is seen, on entry:
        self.gpus_per_worker, self.workers = 0.0, 1
        self.compute, self.batch_size = compute_policy(False), default_batch_size(batch_size, False)
        self.backends: set[str] = set()  # reported by the actors

    def __enter__(self) -> "RayEngine":
        self.ray = _import_ray()
        self.joined = _connect(self.ray, self.options.address)
        try:
            self.gpus_per_worker, self.workers = _plan(self.ray, self.options)
        except BaseException:
            self.__exit__()
            raise
        on_gpus = self.gpus_per_worker > 0
        self.compute, self.batch_size = compute_policy(on_gpus), default_batch_size(self.requested_batch_size, on_gpus)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.joined:
            self.ray.shutdown()  # disconnects from a running cluster; stops an instance ray.init started
            self.joined = False

    def embed(self, root: Path, todo: Sequence[ImageEntry], bar: Any) -> Iterator[Rows]:
        try:
            for done in self._pipeline(FilePaths(str(root), todo)).iter_batches(batch_size=None, batch_format="numpy"):
                self._check_backend(set(done["keras_backend"]))
                positions = [int(i) for i in done["index"]]
                errors = [str(e) for e in done["error"]]
                ok = [i for i, error in enumerate(errors) if not error]
                failures = [(i, error) for i, error in enumerate(errors) if error]
                bar.update(len(positions))
                yield batch_rows([todo[i] for i in positions], done["features"][ok], ok, failures, done["sha256"])
        except self.ray.exceptions.RayError as exc:
            raise TlfeatError(
                f"Ray run failed ({_cause(exc)}); finished batches are kept, rerun the same extract to resume"
            ) from None

    def _check_backend(self, reported: set[str]) -> None:
        self.backends |= reported
        if len(self.backends) > 1:
            raise TlfeatError(
                f"Ray workers run different Keras backends ({', '.join(sorted(self.backends))}); "
                "set KERAS_BACKEND to one of them on every node"
            )

    def load(self) -> None:
        pass  # the actors load Keras and the backbone, each in its own process

    def keras_backend(self) -> str:
        if self.backends:
            return next(iter(self.backends))
        import keras  # nothing computed this run: the rows were reused

        return keras.backend.backend()

    def _pipeline(self, paths: Sequence[str]) -> Any:
        """paths -> decode tasks -> embedding actors: a Ray Dataset of {index, features, error, keras_backend}."""
        import pyarrow  # a dependency of Ray Data: columns of a million paths stay compact

        ray = self.ray
        blocks = []  # each made from a batch of paths: never a Python string for every file at once
        for start in range(0, len(paths), self.batch_size):
            stop = min(start + self.batch_size, len(paths))
            blocks.append(pyarrow.table({"index": pyarrow.array(range(start, stop), pyarrow.int64()),
                                         "path": paths[start:stop]}))
        dataset = ray.data.from_arrow(blocks).map_batches(
            decode_batch, fn_kwargs={"image_size": self.image_size}, batch_size=self.batch_size,
            batch_format="numpy", num_cpus=DECODE_CPUS,
        )
        # A different resource shape from the decode tasks keeps Ray Data from fusing the two stages
        # into the actors, where decoding would stop overlapping with the backbone. An actor that dies
        # fails the run at once (max_restarts=0) with its own error: the shards make the rerun a resume,
        # whereas Ray's restarts would print tracebacks and retry a broken model forever.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")  # Ray's own advice
            return dataset.map_batches(
                EmbedWorker,
                fn_constructor_args=(
                    self.backbone.name, self.weights, self.image_size, self.batch_size, self.compute, self.tta,
                ),
                batch_size=self.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.workers),
                num_gpus=self.gpus_per_worker or None, num_cpus=_actor_cpus(self.gpus_per_worker),
                max_restarts=0,
            )


def _cause(exc: BaseException) -> str:
    """The worker's own error from a Ray error, whose text wraps it in Ray's and the worker's tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):  # the traceback's last "module.ErrorType: message" line
        name, separator, message = line.partition(": ")
        kind = name.rsplit(".", 1)[-1]
        if separator and " " not in name and kind.endswith(("Error", "Exception")):
            return message if kind == "TlfeatError" else f"{kind}: {message}"
    return lines[0] if lines else exc.__class__.__name__


def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: file paths -> 8-bit RGB pixels, with a one-line reason for each file that failed."""
    pixels = np.zeros((len(batch["path"]), image_size, image_size, 3), dtype=np.uint8)
    errors, digests = [], np.zeros((len(batch["path"]), 32), dtype=np.uint8)
    for i, path in enumerate(batch["path"]):
        try:
            digests[i] = np.frombuffer(decode_into(str(path), pixels[i]), dtype=np.uint8)
            errors.append("")
        except Exception as exc:  # as the local engine's workers: a decoder bug costs its image, not the run
            errors.append(failure_reason(exc))
    return {"index": batch["index"], "pixels": pixels, "error": np.array(errors, dtype=object), "sha256": digests}


class EmbedWorker:
    """Ray Data actor: one backbone per actor, built once; uint8 pixels -> pooled features."""

    def __init__(
        self, backbone: str, weights: str, image_size: int, batch_size: int, compute: str, tta: str = "none"
    ) -> None:
        import keras

        self.keras_backend = keras.backend.backend()
        spec = get_backbone(backbone)
        self.extractor = FeatureExtractor(spec, weights, image_size, batch_size, tta)
        self.extractor.check_memory()  # on this worker's node, whose memory its batches take
        if self.extractor.compute != compute:
            raise TlfeatError(
                f"a Ray worker computes in {self.extractor.compute} but the run needs {compute}: "
                "its Keras backend does not see the GPU Ray gave it"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        failed = np.array([bool(error) for error in batch["error"]], dtype=bool)
        features = self.extractor(batch["pixels"])  # uint8: the backbone scales it on the device
        features[failed] = 0.0
        backend = np.full(len(failed), self.keras_backend, dtype=object)
        return {"index": batch["index"], "features": features, "error": batch["error"], "keras_backend": backend,
                "sha256": batch["sha256"]}
