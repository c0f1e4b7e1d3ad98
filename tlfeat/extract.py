"""Extraction: dataset scan -> decoding -> backbone -> cache, resumable and incremental.

A run reuses every row whose file (relative path, size, mtime) is unchanged,
from the finished cache and from shards of an interrupted run, computes only the
rest, and writes the final cache in canonical row order. The local engine
computes missing images in fixed-size batches in canonical order, so a resumed
run forms the same batches as an uninterrupted one and writes the identical
file. The Ray engine (tlfeat.ray_engine) replaces only the embedding step: it
yields the same per-batch rows, in whatever order batches finish, and this
module keys, shards, resumes and writes them the same way.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import numpy as np

from tlfeat.backbones import Backbone, build_model, get_backbone, weights_identity
from tlfeat.cache import (
    CacheKey, OutputLock, Rows, ShardStore, read_rows, remove_stale_temporaries, write_cache,
)
from tlfeat.dataset import DEFAULT_RATIOS, DatasetScan, ImageEntry, scan_dataset
from tlfeat.decode import iter_batches
from tlfeat.errors import TlfeatError

if TYPE_CHECKING:
    from tlfeat.ray_engine import RayOptions

CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256
DTYPES = ("float32", "float16")
ENGINES = ("local", "ray")


@dataclass
class ExtractSummary:
    out: Path
    n_images: int  # rows in the cache
    n_computed: int  # rows computed by this run
    n_reused: int  # rows taken from the previous cache or shards
    n_skipped: int
    skipped: list[tuple[str, str]]  # (relative path, reason)
    ignored: list[tuple[str, str]]  # non-image files seen by the scan
    feature_dim: int
    seconds: float
    images_per_s: float  # computed rows per second of this run
    split_counts: dict[str, int] = field(default_factory=dict)
    up_to_date: bool = False


@dataclass
class EmbedResult:
    features: np.ndarray  # (len(ok), D) float32
    ok: list[int]  # indices of the input files that were embedded
    failures: list[tuple[str, str]]  # (path, reason)


def accelerator_present() -> bool:
    """True when the active Keras backend sees a GPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # a broken accelerator runtime means: compute on the CPU
        return False
    return False


def compute_policy(on_gpu: bool) -> str:
    """The precision a backbone computes in, part of the cache key: mixed_bfloat16 on a GPU, float32 on a CPU."""
    return "mixed_bfloat16" if on_gpu else "float32"


def default_batch_size(requested: int | None, on_gpu: bool) -> int:
    return requested or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)


class FeatureExtractor:
    """A backbone ready for inference: fixed batch shape, bfloat16 compute on a GPU, float32 out."""

    def __init__(self, backbone: Backbone, weights: str, image_size: int, batch_size: int | None = None) -> None:
        import keras

        self.backbone = backbone
        self.image_size = image_size
        self.on_gpu = accelerator_present()
        self.compute = compute_policy(self.on_gpu)
        self.batch_size = default_batch_size(batch_size, self.on_gpu)
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.compute)
        try:
            self.model = build_model(backbone, weights, image_size)
        finally:
            keras.config.set_dtype_policy(previous)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) preprocessed float32 -> (n, D) float32, n <= batch_size."""
        n = len(images)
        if n == 0:
            return np.zeros((0, self.backbone.feature_dim), dtype=np.float32)
        if n < self.batch_size:  # one input shape: the compiled function is traced once
            pad = np.zeros((self.batch_size - n, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, pad])
        features = self.model.predict_on_batch(images)
        return np.asarray(features, dtype=np.float32)[:n]


_EXTRACTORS: OrderedDict[tuple, FeatureExtractor] = OrderedDict()


def get_extractor(backbone: Backbone, weights: str, image_size: int, batch_size: int | None) -> FeatureExtractor:
    """Build or reuse (per process, two at most) the extractor for these settings."""
    key = (backbone.name, weights, image_size, batch_size)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(backbone, weights, image_size, batch_size)
        while len(_EXTRACTORS) > 2:
            _EXTRACTORS.popitem(last=False)
    _EXTRACTORS.move_to_end(key)
    return _EXTRACTORS[key]


def default_output(data: Path, backbone: str) -> Path:
    return Path("cache") / f"{Path(data).resolve().name}-{backbone}.h5"


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _absorb(known: dict[str, tuple], rows: Rows) -> None:
    for i, path in enumerate(rows.paths):
        known[path] = (rows.file_size[i], rows.file_mtime_ns[i], rows.features[i], None)
    for path, reason, size, mtime in zip(
        rows.skipped_paths, rows.skipped_reasons, rows.skipped_size, rows.skipped_mtime_ns
    ):
        known[path] = (size, mtime, None, reason)


def _known_rows(key: CacheKey, out: Path, shards: ShardStore, overwrite: bool) -> dict[str, tuple]:
    """relpath -> (size, mtime_ns, feature row | None, skip reason | None) from earlier work under `key`."""
    known: dict[str, tuple] = {}
    if out.exists() and not overwrite:
        old_key, rows = read_rows(out)
        if old_key != key:
            raise TlfeatError(
                f"{out}: cache was made with other settings ({key.differences(old_key)} "
                "[this run vs file]); pass --overwrite to replace it or --out for a new file"
            )
        _absorb(known, rows)
    shard_key = shards.key()
    if shard_key is not None and shard_key != key and not overwrite:
        raise TlfeatError(
            f"{shards.dir}: unfinished run with other settings ({key.differences(shard_key)} "
            "[this run vs unfinished]); rerun that command to finish it, or pass --overwrite"
        )
    if overwrite:
        shards.clear()
    elif shard_key == key:
        for rows in shards.read():
            _absorb(known, rows)
    return known


class Engine(Protocol):
    """Where the backbone runs. Entered around a run; `compute` is known on entry, before any image."""

    compute: str  # "float32", or "mixed_bfloat16" on GPUs

    def __enter__(self) -> "Engine": ...

    def __exit__(self, *exc: object) -> None: ...

    def embed(self, root: Path, todo: list[ImageEntry], bar: Any) -> Iterator[Rows]:
        """One Rows per finished batch of `todo` (any order), advancing `bar` by the images done."""
        ...

    def keras_backend(self) -> str:
        """The Keras backend that computed this run's features."""
        ...


class LocalEngine:
    """This process: threads decode ahead of the backbone; batches in canonical order."""

    def __init__(self, backbone: Backbone, weights: str, image_size: int, batch_size: int | None) -> None:
        self.backbone, self.weights, self.image_size, self.batch_size = backbone, weights, image_size, batch_size
        self.compute = compute_policy(accelerator_present())

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def embed(self, root: Path, todo: list[ImageEntry], bar: Any) -> Iterator[Rows]:
        extractor = get_extractor(self.backbone, self.weights, self.image_size, self.batch_size)
        files = [root / e.relpath for e in todo]
        for batch in iter_batches(files, self.image_size, self.backbone.preprocess, extractor.batch_size):
            entries = todo[batch.start : batch.start + batch.length]
            features = extractor(batch.images)
            bar.update(batch.length)
            yield batch_rows(entries, features, batch.ok, batch.failures)

    def keras_backend(self) -> str:
        import keras

        return keras.backend.backend()


def batch_rows(
    entries: Sequence[ImageEntry], features: np.ndarray, ok: Sequence[int], failures: Sequence[tuple[int, str]]
) -> Rows:
    """One batch's Rows: `features` row i belongs to entries[ok[i]]; failures are (position, reason)."""
    ok_entries = [entries[i] for i in ok]
    failed = [(entries[i], reason) for i, reason in failures]
    return Rows(
        paths=[e.relpath for e in ok_entries],
        features=features,
        file_size=[e.size for e in ok_entries],
        file_mtime_ns=[e.mtime_ns for e in ok_entries],
        skipped_paths=[e.relpath for e, _ in failed],
        skipped_reasons=[r for _, r in failed],
        skipped_size=[e.size for e, _ in failed],
        skipped_mtime_ns=[e.mtime_ns for e, _ in failed],
    )


def extract(
    data: Path,
    out: Path | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str = "imagenet",
    image_size: int | None = None,
    batch_size: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    overwrite: bool = False,
    progress: bool = True,
    engine: str = "local",
    ray_options: RayOptions | None = None,
) -> ExtractSummary:
    """Embed every image of a dataset with `backbone` into the HDF5 cache at `out`.

    engine "local" runs in this process; "ray" runs on a Ray cluster (`ray_options`), importing Ray only then.
    """
    started = time.perf_counter()
    spec = get_backbone(backbone)
    if engine not in ENGINES:
        raise TlfeatError(f"--engine {engine}: use local or ray")
    if ray_options is not None and engine != "ray":
        raise TlfeatError("--address, --num-gpus-per-worker and --workers need --engine ray")
    if dtype not in DTYPES:
        raise TlfeatError(f"--dtype {dtype}: use float32 or float16")
    if batch_size is not None and batch_size < 1:
        raise TlfeatError(f"--batch-size {batch_size}: must be at least 1")
    size = image_size or spec.input_size
    if size < 32:
        raise TlfeatError(f"--image-size {size}: must be at least 32 pixels")
    scan = scan_dataset(data, seed=seed, ratios=ratios)
    out = Path(out) if out is not None else default_output(scan.root, spec.name)
    if out.exists() and out.is_dir():
        raise TlfeatError(f"{out}: is a folder; --out needs a file path such as {out / 'features.h5'}")
    weights_id = weights_identity(spec, weights)

    with OutputLock(out), _make_engine(engine, spec, weights, size, batch_size, ray_options) as runner:
        remove_stale_temporaries(out)
        shards = ShardStore(out)
        key = CacheKey(spec.name, weights_id, size, spec.preprocessing, dtype, runner.compute)
        known = _known_rows(key, out, shards, overwrite)

        todo = [e for e in scan.entries if _reusable(known.get(e.relpath), e) is None]
        n_reused = len(scan.entries) - len(todo)
        compute_seconds = 0.0
        if todo:
            computed_before = time.perf_counter()
            try:
                with _progress(len(todo), progress, f"extract {spec.name}") as bar:
                    for rows in runner.embed(scan.root, todo, bar):
                        shards.start(key)  # at the first finished batch: a model that fails to load leaves no shards
                        shards.write(rows)
                        _absorb(known, rows)
            except KeyboardInterrupt:
                raise TlfeatError(
                    f"interrupted: finished batches are kept in {shards.dir}; "
                    "rerun the same command to resume"
                ) from None
            compute_seconds = time.perf_counter() - computed_before

        up_to_date = not todo and _same_as_file(out, scan, known)
        if not up_to_date:
            _write_final(out, key, scan, known, weights, size, runner.keras_backend())
        shards.clear()

    skipped = [(e.relpath, known[e.relpath][3]) for e in scan.entries if known[e.relpath][2] is None]
    n_rows = len(scan.entries) - len(skipped)
    return ExtractSummary(
        out=out,
        n_images=n_rows,
        n_computed=len(todo),
        n_reused=n_reused,
        n_skipped=len(skipped),
        skipped=skipped,
        ignored=scan.ignored,
        feature_dim=spec.feature_dim,
        seconds=time.perf_counter() - started,
        images_per_s=len(todo) / compute_seconds if todo and compute_seconds > 0 else 0.0,
        split_counts=_split_counts(scan, known),
        up_to_date=up_to_date,
    )


def _make_engine(
    engine: str, backbone: Backbone, weights: str, image_size: int, batch_size: int | None,
    ray_options: RayOptions | None,
) -> Engine:
    if engine == "ray":
        from tlfeat.ray_engine import RayEngine, RayOptions

        return RayEngine(backbone, weights, image_size, batch_size, ray_options or RayOptions())
    return LocalEngine(backbone, weights, image_size, batch_size)


def _reusable(record: tuple | None, entry: ImageEntry) -> tuple | None:
    if record is None or record[0] != entry.size or record[1] != entry.mtime_ns:
        return None
    return record


def _split_counts(scan: DatasetScan, known: dict[str, tuple]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in scan.entries:
        if known[e.relpath][2] is not None:
            counts[e.split] = counts.get(e.split, 0) + 1
    return counts


def _same_as_file(out: Path, scan: DatasetScan, known: dict[str, tuple]) -> bool:
    """True when `out` already holds exactly these rows, splits and classes (nothing to write)."""
    if not out.exists():
        return False
    from tlfeat.cache import load

    current = load(out)
    rows = [e for e in scan.entries if known[e.relpath][2] is not None]
    return (
        current.class_names == scan.class_names
        and list(current.paths) == [e.relpath for e in rows]
        and list(current.split) == [e.split for e in rows]
        and current.attrs.get("seed") == scan.seed
    )


def _write_final(
    out: Path, key: CacheKey, scan: DatasetScan, known: dict[str, tuple], weights: str, size: int,
    keras_backend: str,
) -> None:
    rows = [e for e in scan.entries if known[e.relpath][2] is not None]
    skipped = [
        (e.relpath, known[e.relpath][3], e.size, e.mtime_ns) for e in scan.entries if known[e.relpath][2] is None
    ]
    spec = get_backbone(key.backbone)
    # Rows, not one stacked matrix: the run already holds every feature once, and need not hold them twice.
    features = [known[e.relpath][2] for e in rows] if rows else np.zeros((0, spec.feature_dim), dtype=np.float32)
    weights_source = weights if weights in ("imagenet", "none") else str(Path(weights).resolve())
    write_cache(
        out,
        key,
        features=features,
        labels=np.array([scan.label_of(e) for e in rows], dtype=np.int32),
        paths=[e.relpath for e in rows],
        split=[e.split for e in rows],
        file_size=[e.size for e in rows],
        file_mtime_ns=[e.mtime_ns for e in rows],
        class_names=scan.class_names,
        skipped=skipped,
        extra_attrs={
            "keras_backend": keras_backend,
            "dataset_root": str(scan.root),
            "layout": scan.layout,
            "seed": scan.seed,
            "split_ratios": list(scan.ratios),
            "weights_source": weights_source,
            "resize": f"pillow-bilinear {size}x{size}, aspect not kept",
        },
    )


def embed_files(
    files: Sequence[str | Path],
    backbone: str,
    weights: str,
    image_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> EmbedResult:
    """Embed loose image files (no cache), e.g. for `predict`."""
    spec = get_backbone(backbone)
    size = image_size or spec.input_size
    extractor = get_extractor(spec, weights, size, batch_size)
    chunks, ok, failures = [], [], []
    with _progress(len(files), progress, f"embed {spec.name}") as bar:
        for batch in iter_batches(list(files), size, spec.preprocess, extractor.batch_size):
            chunks.append(extractor(batch.images))
            ok.extend(batch.start + i for i in batch.ok)
            failures.extend((str(files[batch.start + i]), reason) for i, reason in batch.failures)
            bar.update(batch.length)
    features = np.concatenate(chunks) if chunks else np.zeros((0, spec.feature_dim), dtype=np.float32)
    return EmbedResult(features, ok, failures)
