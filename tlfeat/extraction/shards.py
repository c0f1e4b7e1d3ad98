"""Shards: the batches an unfinished extraction run has finished, one .npz each in ``<out>.parts/``.

Written as each batch completes (temporary name, fsync, rename), so a killed run
loses at most the batch in flight; read back by the next run (the index of every
shard first, the features of each only when the final write needs them), and
removed once the final cache is written. Each shard's name carries the SHA-256
of its bytes, so a shard damaged on disk is found, discarded with a notice and
its images computed again, rather than read as data or left to block every
resume. Rows whose features hold NaN or inf never become shard rows: they are
failures of those images (`without_non_finite`). `ShardWriter` writes them on a
thread of their own while the next batch computes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import re
import shutil
import threading
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from tlfeat.cache import OLD_DECODE, CacheKey, Rows
from tlfeat.errors import TlfeatError
from tlfeat.fileio import atomic_write_bytes, os_reason, sha256_file

SHARD_DIGEST_CHARS = 32  # hex digits of SHA-256 in a shard's name: 128 bits
_SHARD_NAME = re.compile(r"shard-(\d{7,})-([0-9a-f]{%d})\.npz" % SHARD_DIGEST_CHARS)
# How extract's refusals say to leave an existing cache alone (a recipe, whose caches move with `cache_dir`, rewords it).
NEW_FILE = "`out` for a new file"
NON_FINITE_REASON = "the backbone gave NaN or inf features for this image"


def without_non_finite(rows: Rows) -> Rows:
    """`rows` with every row whose features hold NaN or inf moved to the skipped files, with the reason."""
    finite = np.isfinite(rows.features).all(axis=1) if len(rows.paths) else np.ones(0, dtype=bool)
    if finite.all():
        return rows
    keep, drop = np.flatnonzero(finite), np.flatnonzero(~finite)
    kept = lambda column: None if column is None else [column[i] for i in keep]  # noqa: E731
    return Rows(
        paths=[rows.paths[i] for i in keep],
        features=rows.features[keep],
        file_size=[rows.file_size[i] for i in keep],
        file_mtime_ns=[rows.file_mtime_ns[i] for i in keep],
        skipped_paths=rows.skipped_paths + [rows.paths[i] for i in drop],
        skipped_reasons=rows.skipped_reasons + [NON_FINITE_REASON] * len(drop),
        skipped_size=rows.skipped_size + [rows.file_size[i] for i in drop],
        skipped_mtime_ns=rows.skipped_mtime_ns + [rows.file_mtime_ns[i] for i in drop],
        file_ino=kept(rows.file_ino),
        file_ctime_ns=kept(rows.file_ctime_ns),
        file_sha256=None if rows.file_sha256 is None else rows.file_sha256[keep],
    )


def file_identity_columns(rows: Rows) -> dict[str, np.ndarray]:
    """file_ino, file_ctime_ns and file_sha256 of `rows` as arrays (-1 and zeros where not recorded)."""
    n = len(rows.paths)
    return {
        "file_ino": np.array(rows.file_ino if rows.file_ino is not None else [-1] * n, dtype=np.int64),
        "file_ctime_ns": np.array(rows.file_ctime_ns if rows.file_ctime_ns is not None else [-1] * n, dtype=np.int64),
        "file_sha256": np.zeros((n, 32), dtype=np.uint8) if rows.file_sha256 is None
        else np.asarray(rows.file_sha256, dtype=np.uint8).reshape(n, 32),
    }


class _HashedFile:
    """A file opened for writing that hashes what goes through it. It has no `seek`, so a zip (np.savez)
    is written in one pass, each member's sizes after its data, and the shard is never held whole."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha256, self._written = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self._written += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        self.raw.flush()

    def read(self, size: int = -1) -> bytes:  # np.savez takes only objects with `read` for open files
        raise io.UnsupportedOperation("write-only")


class ShardStore:
    """Batches finished by an unfinished run, in ``<out>.parts/``: one .npz per batch.

    ``meta.json`` records the CacheKey and the dataset folder; shards from another key are never read (the
    run refuses another folder's unless asked, as it refuses another folder's cache). A shard is named
    ``shard-<number>-<sha256 of its bytes>.npz``; one that fails that check or does not load is deleted
    and noted in `notices` (its images are simply computed again).
    """

    def __init__(self, out: Path, dataset_root: Path | None = None) -> None:
        self.dir = Path(str(out) + ".parts")
        self.dataset_root = dataset_root  # the folder whose images this run's shards hold
        if self.dir.exists() and not self.dir.is_dir():  # found now, not after the first batch is computed
            raise TlfeatError(f"{self.dir}: is a file; it is where this output's unfinished batches go: move it away")
        # Known after the first shard, so writing stays O(1) per shard over runs of many thousands.
        self._next_index: int | None = None
        self._started: CacheKey | None = None
        self._files: dict[int, Path] = {}  # number -> file, for the shards read or written by this run
        self.notices: list[str] = []  # one line per discarded shard

    def key(self) -> CacheKey | None:
        meta = self.dir / "meta.json"
        if not meta.exists():
            return None
        try:
            fields = json.loads(meta.read_text())
            fields.pop("dataset_root", None)
            return CacheKey(**{"decode": OLD_DECODE, **fields})
        except (ValueError, TypeError, AttributeError, OSError):
            notice = f"{meta} is damaged: the batches in {self.dir} are discarded; their images are computed again"
            if notice not in self.notices:  # asked more than once in a run
                self.notices.append(notice)
            return None

    def recorded_root(self) -> str | None:
        """The dataset folder the shards' images are in; None without shards, or from a tlfeat before it was kept."""
        try:
            root = json.loads((self.dir / "meta.json").read_text()).get("dataset_root")
        except (ValueError, AttributeError, OSError):  # none, or damaged: `key` says so, and no shard is read
            return None
        return root if isinstance(root, str) else None

    def check_dataset(self, key: CacheKey, overwrite: bool) -> None:
        """Refuse, without `overwrite`, the batches of another dataset folder's unfinished run, as a run refuses
        its finished cache: they would be deleted at the end, and their rows of files at the same relative paths,
        sizes and times reused, unasked. With `overwrite` they become this folder's (rows of the same files are
        reused, as for a moved dataset's cache), so that run, interrupted, resumes without `overwrite`."""
        old_root = self.recorded_root()
        if not old_root or self.dataset_root is None or Path(old_root) == self.dataset_root:  # none: an older tlfeat's
            return
        if not overwrite:
            raise TlfeatError(
                f"{self.dir}: holds the unfinished batches of another dataset folder ({old_root}, not "
                f"{self.dataset_root}); rerun that command to finish it, pass `overwrite` to make them this one's "
                f"(rows of the same files are reused) or {NEW_FILE}"
            )
        self.start(key)

    def start(self, key: CacheKey) -> None:
        """Prepare for writing shards under `key`, discarding shards of any other key (cheap to repeat)."""
        if self._started == key:
            return
        if self.dir.exists() and self.key() != key:
            self.clear()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            root = None if self.dataset_root is None else str(self.dataset_root)
            if not (self.dir / "meta.json").exists() or self.recorded_root() != root:  # a moved dataset's, adopted
                atomic_write_bytes(self.dir / "meta.json", json.dumps({**asdict(key), "dataset_root": root}).encode())
        except OSError as exc:
            raise TlfeatError(f"{self.dir}: cannot write here ({os_reason(exc)})") from None
        self._started = key

    def _shard_files(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz")) if self.dir.exists() else []

    def write(self, rows: Rows) -> int:
        """Store one batch's rows as the next shard; returns its number."""
        if self._next_index is None:
            existing = [_SHARD_NAME.fullmatch(p.name) for p in self._shard_files()]
            self._next_index = max((int(m[1]) + 1 for m in existing if m), default=0)
        index = self._next_index
        self._next_index += 1
        tmp = self.dir / f".tmp-{os.getpid()}-{index}.npz"
        try:
            with open(tmp, "wb") as handle:
                hashed = _HashedFile(handle)  # hashed as written, not read back
                np.savez(
                    hashed,
                    paths=np.array(rows.paths, dtype=str),
                    features=rows.features,
                    file_size=np.array(rows.file_size, dtype=np.int64),
                    file_mtime_ns=np.array(rows.file_mtime_ns, dtype=np.int64),
                    skipped_paths=np.array(rows.skipped_paths, dtype=str),
                    skipped_reasons=np.array(rows.skipped_reasons, dtype=str),
                    skipped_size=np.array(rows.skipped_size, dtype=np.int64),
                    skipped_mtime_ns=np.array(rows.skipped_mtime_ns, dtype=np.int64),
                    **file_identity_columns(rows),
                )
                handle.flush()
                os.fsync(handle.fileno())
            digest = hashed.sha256.hexdigest()[:SHARD_DIGEST_CHARS]
            target = self.dir / f"shard-{index:07d}-{digest}.npz"
            os.replace(tmp, target)
        except OSError as exc:
            raise TlfeatError(
                f"{self.dir}: cannot write a shard ({os_reason(exc)}); the batches finished before it are kept: "
                "make room and rerun the same extract to resume"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        self._files[index] = target
        return index

    def read_index(self) -> Iterator[tuple[int, Rows]]:
        """(number, rows) of every complete shard, without its features (`features(number)` reads them).

        A shard that fails its checksum or cannot be read is deleted, with a line in `notices`.
        """
        for shard in self._shard_files():
            match = _SHARD_NAME.fullmatch(shard.name)
            problem = "has no checksum in its name (written by an older tlfeat)" if match is None else ""
            try:
                if match is not None and sha256_file(shard)[:SHARD_DIGEST_CHARS] != match[2]:
                    problem = "fails its checksum (damaged on disk)"
            except OSError as exc:
                problem = f"cannot be read ({os_reason(exc)})"
            if problem:
                self._discard(shard, problem)
                continue
            try:
                with np.load(shard, allow_pickle=False) as data:  # an .npz reads only the members asked for
                    rows = Rows(
                        paths=[str(p) for p in data["paths"]],
                        features=np.empty((0, 0), dtype=np.float32),
                        file_size=[int(v) for v in data["file_size"]],
                        file_mtime_ns=[int(v) for v in data["file_mtime_ns"]],
                        skipped_paths=[str(p) for p in data["skipped_paths"]],
                        skipped_reasons=[str(r) for r in data["skipped_reasons"]],
                        skipped_size=[int(v) for v in data["skipped_size"]],
                        skipped_mtime_ns=[int(v) for v in data["skipped_mtime_ns"]],
                    )
                    if "file_sha256" in data.files:  # absent from shards of an older tlfeat: stat and hash unknown
                        rows.file_ino = data["file_ino"].tolist()
                        rows.file_ctime_ns = data["file_ctime_ns"].tolist()
                        rows.file_sha256 = data["file_sha256"].reshape(-1, 32)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                self._discard(shard, f"cannot be read ({exc.__class__.__name__})")
                continue
            self._files[int(match[1])] = shard
            yield int(match[1]), rows

    def _discard(self, shard: Path, problem: str) -> None:
        self.notices.append(f"{shard.name} in {self.dir} {problem}: discarded; its images are computed again")
        shard.unlink(missing_ok=True)

    def contents(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The feature rows of shard `number` (one this run read the index of, or wrote) and their files'
        SHA-256 digests ((n, 32) uint8; None in a shard of a tlfeat before they were kept), in one read."""
        path = self._files[number]
        try:
            with np.load(path, allow_pickle=False) as data:
                digests = data["file_sha256"].reshape(-1, 32) if "file_sha256" in data.files else None
                return data["features"], digests
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise TlfeatError(
                f"{path}: shard unreadable ({exc.__class__.__name__}); delete it and rerun to compute its rows again"
            ) from None

    def clear(self) -> None:
        self._next_index = self._started = None
        self._files.clear()
        if not self.dir.exists():
            return
        shutil.rmtree(self.dir)  # tlfeat's own folder: whatever else landed in it (a folder) goes too


class ShardWriter:
    """Writes each finished batch's shard on a thread, so the next batch computes while one is fsynced.

    After each shard, `on_written(number, rows)` (the ledger), then `then()` (the final file's next
    chunks), both on this thread. At most `depth` batches wait to be written (memory stays bounded, and a
    killed run loses at most those and the batch in flight). A failed write stops the run at the next
    `put`; leaving the block writes every batch still queued first, after Ctrl-C too: finished batches
    are kept (but `then` is skipped once the run is failing: its file will not be kept).
    """

    def __init__(
        self, shards: ShardStore, key: CacheKey, on_written: Callable[[int, Rows], None],
        then: Callable[[], None], depth: int = 2,
    ) -> None:
        self.shards, self.key, self.on_written, self.then = shards, key, on_written, then
        self.queue: queue.Queue[Rows | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.failing = False
        self.thread = threading.Thread(target=self._write, name="tlfeat-shard-writer", daemon=True)
        self.thread.start()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self.failing = kind is not None
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
                    # The run reads its ledger only after this thread has ended.
                    self.on_written(self.shards.write(rows), rows)
                    if not self.failing:
                        self.then()
                except BaseException as exc:  # raised in the run's thread
                    self.error = exc
