"""Extraction: dataset scan -> decoding -> backbone -> cache, resumable and incremental.

A run reuses every row whose file (relative path, size, mtime) is unchanged,
from the finished cache and from shards of an interrupted run, computes only the
rest, and writes the final cache in canonical row order. The local engine
computes missing images in fixed-size batches in canonical order, so a resumed
run forms the same batches as an uninterrupted one and writes the identical
file. The Ray engine (tlfeat.extraction.ray_engine) replaces only the embedding step: it
yields the same per-batch rows, in whatever order batches finish, and this
module keys, shards, resumes and writes them the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlfeat.backbones import get_backbone, weights_identity
from tlfeat.cache import CacheKey, Rows, ShardStore, load, read_rows, remove_stale_temporaries, write_cache
from tlfeat.data.scan import DEFAULT_RATIOS, DatasetScan, ImageEntry, scan_dataset
from tlfeat.errors import TlfeatError
from tlfeat.extraction.engines import make_engine
from tlfeat.fileio import OutputLock
from tlfeat.progress import progress_bar

if TYPE_CHECKING:
    from tlfeat.extraction.ray_engine import RayOptions

DTYPES = ("float32", "float16")


@dataclass
class ExtractSummary:
    out: Path
    n_images: int  # rows in the cache
    n_computed: int  # images this run tried to embed: n_embedded of them were, the others are skipped
    n_embedded: int  # rows this run added to the cache
    n_reused: int  # images whose row (or skip record) came from the previous cache or shards
    n_skipped: int  # images in no row (unreadable), whichever run tried them
    skipped: list[tuple[str, str]]  # (relative path, reason)
    ignored: list[tuple[str, str]]  # non-image files seen by the scan
    feature_dim: int
    seconds: float
    images_per_s: float  # computed rows per second of this run
    split_counts: dict[str, int] = field(default_factory=dict)
    up_to_date: bool = False


def default_output(data: Path, backbone: str) -> Path:
    return Path("cache") / f"{Path(data).resolve().name}-{backbone}.h5"


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
                "[this run vs file]); pass `overwrite` to replace it or `out` for a new file"
            )
        _absorb(known, rows)
    shard_key = shards.key()
    if shard_key is not None and shard_key != key and not overwrite:
        raise TlfeatError(
            f"{shards.dir}: unfinished run with other settings ({key.differences(shard_key)} "
            "[this run vs unfinished]); rerun that command to finish it, or pass `overwrite`"
        )
    if overwrite:
        shards.clear()
    elif shard_key == key:
        for rows in shards.read():
            _absorb(known, rows)
    return known


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
    if dtype not in DTYPES:
        raise TlfeatError(f"`dtype={dtype!r}`: use float32 or float16")
    if batch_size is not None and batch_size < 1:
        raise TlfeatError(f"`batch_size={batch_size!r}`: must be at least 1")
    size = image_size or spec.input_size
    if size < 32:
        raise TlfeatError(f"`image_size={size!r}`: must be at least 32 pixels")
    scan = scan_dataset(data, seed=seed, ratios=ratios)
    out = Path(out) if out is not None else default_output(scan.root, spec.name)
    if out.exists() and out.is_dir():
        raise TlfeatError(f"{out}: is a folder; `out` needs a file path such as {out / 'features.h5'}")
    weights_id = weights_identity(spec, weights)

    with OutputLock(out), make_engine(engine, spec, weights, size, batch_size, ray_options) as runner:
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
                with progress_bar(len(todo), progress, f"extract {spec.name}") as bar:
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
        n_embedded=sum(known[e.relpath][2] is not None for e in todo),
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
