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

import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfeat.backbones import get_backbone, resolve_image_size, weights_identity
from tlfeat.cache import (
    CacheKey, Rows, load, open_rows, read_key, read_rows, without_non_finite, write_cache,
)
from tlfeat.data.batches import bytes_in_flight
from tlfeat.data.cores import available_memory
from tlfeat.data.decode import DecodeError, decode_image
from tlfeat.data.scan import DEFAULT_RATIOS, SPLIT_RULE, DatasetScan, ImageEntry, scan_dataset
from tlfeat.errors import TlfeatError
from tlfeat.extraction.engines import make_engine
from tlfeat.extraction.shards import ShardStore
from tlfeat.fileio import OutputLock, check_output_path, remove_stale_temporaries
from tlfeat.progress import progress_bar

if TYPE_CHECKING:
    from tlfeat.extraction.ray_engine import RayOptions

DTYPES = ("float32", "float16")


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
    notes: list[str] = field(default_factory=list)  # one line each: rescaled shares, re-labelled rows, ...
    n_retried: int = 0  # previously skipped files tried again (every run)


class ShardWriter:
    """Writes each finished batch's shard on a thread, so the next batch computes while one is fsynced.

    At most `depth` batches wait to be written (memory stays bounded, and a killed run loses at most
    those and the batch in flight). A failed write stops the run at the next `put`; leaving the block
    writes every batch still queued first, after Ctrl-C too: finished batches are kept.
    """

    def __init__(self, shards: ShardStore, key: CacheKey, depth: int = 2) -> None:
        self.shards, self.key = shards, key
        self.queue: queue.Queue[Rows | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, name="tlfeat-shard-writer", daemon=True)
        self.thread.start()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and kind is None:
            raise self.error

    def put(self, rows: Rows) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(rows)

    def _write(self) -> None:
        while (rows := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.shards.start(self.key)  # at the first finished batch: a model that fails to load leaves none
                    self.shards.write(rows)
                except BaseException as exc:  # raised in the run's thread
                    self.error = exc


def default_output(data: Path, backbone: str, image_size: int | None = None) -> Path:
    """cache/<dataset>-<backbone>.h5, or ...-<size>.h5 for an image size other than the backbone's own."""
    spec = get_backbone(backbone)
    suffix = f"-{image_size}" if image_size not in (None, spec.input_size) else ""
    return Path("cache") / f"{Path(data).resolve().name}-{spec.name}{suffix}.h5"


def _absorb(known: dict[str, tuple], rows: Rows) -> None:
    for i, path in enumerate(rows.paths):
        known[path] = (rows.file_size[i], rows.file_mtime_ns[i], rows.features[i], None)
    for path, reason, size, mtime in zip(
        rows.skipped_paths, rows.skipped_reasons, rows.skipped_size, rows.skipped_mtime_ns
    ):
        known[path] = (size, mtime, None, reason)


def _known_rows(key: CacheKey, out: Path, shards: ShardStore, overwrite: bool, notes: list[str]) -> dict[str, tuple]:
    """relpath -> (size, mtime_ns, feature row | None, skip reason | None) from earlier work under `key`.

    With `overwrite`, work under another key, or in a damaged cache, is dropped (a note says so); work under
    this key is always reused.
    """
    known: dict[str, tuple] = {}
    if out.exists():
        try:
            old_key, rows = read_rows(out)
        except TlfeatError as exc:
            if not overwrite:
                raise
            notes.append(f"could not reuse {exc}: its images are computed again")
            old_key, rows = None, None
        if rows is not None and old_key == key:
            _absorb(known, rows)
        elif rows is not None and not overwrite:
            raise TlfeatError(
                f"{out}: cache was made with other settings ({key.differences(old_key)} "
                "[this run vs file]); pass `overwrite` to replace it or `out` for a new file"
            )
    shard_key = shards.key()
    if shard_key is not None and shard_key != key:
        if not overwrite:
            raise TlfeatError(
                f"{shards.dir}: unfinished run with other settings ({key.differences(shard_key)} "
                "[this run vs unfinished]); rerun that command to finish it, or pass `overwrite`"
            )
        shards.clear()
    elif shard_key == key:
        for rows in shards.read():
            _absorb(known, rows)
    return known


def _check_split(out: Path, key: CacheKey, scan: DatasetScan, overwrite: bool) -> str | None:
    """Refuse a run whose split would move rows of the existing cache; with `overwrite`, say that it does."""
    if not out.exists():
        return None
    try:
        if read_key(out) != key:
            return None
        with open_rows(out) as (current, _):
            was = dict(zip(current.paths, current.split))
            old_seed, old_ratios = current.attrs.get("seed"), current.attrs.get("split_ratios")
            rule = current.attrs.get("split_rule")
    except TlfeatError:
        if overwrite:
            return None  # a damaged cache is replaced whole
        raise
    moved = sum(1 for e in scan.entries if e.relpath in was and was[e.relpath] != e.split)
    if not moved:
        return None
    settings = f"seed {old_seed} -> {scan.seed}, shares {_shares(old_ratios)} -> {_shares(scan.ratios)}"
    if rule != SPLIT_RULE:
        settings += "; the cache was split by an earlier tlfeat's rule"
    if not overwrite:
        raise TlfeatError(
            f"{out}: this run's split puts {moved} of its {len(was)} rows in another split ({settings}); "
            "rerun with the cache's `seed` and `ratios`, or pass `overwrite` to re-label them"
        )
    return f"re-labelled {moved} of {len(was)} rows of {out} to this run's split ({settings})"


def _shares(ratios: Any) -> str:
    try:
        return "/".join(f"{100 * float(r):.4g}" for r in ratios)
    except (TypeError, ValueError):
        return repr(ratios)


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
    workers: int | None = None,
) -> ExtractSummary:
    """Embed every image of a dataset with `backbone` into the HDF5 cache at `out`.

    engine "local" runs in this process, decoding in `workers` processes (default: one per available
    core); "ray" runs on a Ray cluster (`ray_options`), importing Ray only then.
    """
    started = time.perf_counter()
    spec = get_backbone(backbone)
    if dtype not in DTYPES:
        raise TlfeatError(f"`dtype={dtype!r}`: use float32 or float16")
    size = resolve_image_size(spec, image_size)
    if batch_size is not None:
        _check_batch_size(batch_size, size)
    stage, parts = "scanning the dataset", None  # what a Ctrl-C interrupts; where finished batches are kept
    try:
        scan = scan_dataset(data, seed=seed, ratios=ratios)
        out = Path(out) if out is not None else default_output(scan.root, spec.name, size)
        if out.exists() and out.is_dir():
            raise TlfeatError(f"{out}: is a folder; `out` needs a file path such as {out / 'features.h5'}")
        check_output_path(out)
        weights_id = weights_identity(spec, weights)
        parts = ShardStore(out).dir

        stage = "loading the model"
        with OutputLock(out), make_engine(engine, spec, weights, size, batch_size, ray_options, workers) as runner:
            remove_stale_temporaries(out)
            shards = ShardStore(out)
            key = CacheKey(spec.name, weights_id, size, spec.preprocessing, dtype, runner.compute)
            notes = list(scan.notes)
            relabelled = _check_split(out, key, scan, overwrite)
            notes += [relabelled] if relabelled else []
            known = _known_rows(key, out, shards, overwrite, notes)
            notes += shards.notices
            still_failing, reasons_changed = _recheck_skipped(scan, known, size)
            todo = [
                e for e in scan.entries
                if (record := _reusable(known.get(e.relpath), e)) is None
                or (record[2] is None and e.relpath not in still_failing)
            ]
            n_retried = len(still_failing) + sum(1 for e in todo if e.relpath in known and known[e.relpath][2] is None)
            n_reused = len(scan.entries) - len(todo)
            compute_seconds = 0.0
            if todo:
                computed_before = time.perf_counter()
                with progress_bar(len(todo), progress, f"extract {spec.name}") as bar, \
                        ShardWriter(shards, key) as writer, closing(runner.embed(scan.root, todo, bar)) as batches:
                    for rows in batches:  # closed however the loop ends: the decoding pool is free again
                        stage = "computing"
                        rows = without_non_finite(rows)  # a failure of those images, never features
                        writer.put(rows)
                        _absorb(known, rows)
                compute_seconds = time.perf_counter() - computed_before

            up_to_date = not todo and not reasons_changed and _same_as_file(out, scan, known)
            if not up_to_date:
                stage = "writing"
                try:
                    _write_final(out, key, scan, known, weights, size, runner.keras_backend())
                except TlfeatError as exc:
                    raise TlfeatError(f"{exc}; {_KEPT.format(parts=parts)} to finish") from None
            shards.clear()
    except KeyboardInterrupt:
        raise TlfeatError(_interrupted(stage, out, parts)) from None

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
        notes=notes,
        n_retried=n_retried,
    )


_KEPT = "finished batches are kept in {parts}: rerun the same command"


def _interrupted(stage: str, out: Path | None, parts: Path | None) -> str:
    """The one line for a Ctrl-C, by what it interrupted."""
    if stage == "writing":
        return f"interrupted while writing {out}: the previous cache is unchanged; {_KEPT.format(parts=parts)} to finish"
    if stage == "computing":
        return f"interrupted: {_KEPT.format(parts=parts)} to resume"
    return f"interrupted while {stage}; nothing was written"


def _check_batch_size(batch_size: int, size: int) -> None:
    """At least 1, and its decoded images in flight within half the memory available now."""
    if batch_size < 1:
        raise TlfeatError(f"`batch_size={batch_size}`: must be at least 1")
    need, free = bytes_in_flight(batch_size, size), available_memory()
    if free is not None and need > free / 2:
        fits = max(1, batch_size * free // (2 * need))
        raise TlfeatError(
            f"`batch_size={batch_size}` at {size} px holds {need / 2**30:.1f} GiB of decoded images at once; "
            f"{free / 2**30:.1f} GiB of memory is available: use `batch_size={fits}` or less"
        )


def _recheck_skipped(scan: DatasetScan, known: dict[str, tuple], size: int) -> tuple[set[str], bool]:
    """Retry every previously skipped, unchanged file (a chmod or mv can fix it without touching size or mtime).

    Decoding needs no model, so it happens here: files that still fail keep a skip record with today's reason
    (returned, with whether any reason changed); files that decode now are left for the engine.
    """
    still, changed = set(), False
    for entry in scan.entries:
        record = _reusable(known.get(entry.relpath), entry)
        if record is None or record[2] is not None:
            continue
        try:
            decode_image(scan.root / entry.relpath, size)
        except DecodeError as exc:
            still.add(entry.relpath)
            changed = changed or str(exc) != record[3]
            known[entry.relpath] = (entry.size, entry.mtime_ns, None, str(exc))
    return still, changed


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
        and current.attrs.get("split_ratios") == list(scan.ratios)
        and current.attrs.get("split_rule") == SPLIT_RULE
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
            "split_rule": SPLIT_RULE,
            "weights_source": weights_source,
            "resize": f"pillow-bilinear {size}x{size}, aspect not kept",
        },
    )
