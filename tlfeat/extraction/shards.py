"""Work in progress of an extraction run: one shard file per finished batch, in ``<out>.parts/``.

A killed run loses at most the batch in flight: each shard is written to a
temporary name, fsynced and renamed, and carries the SHA-256 of its bytes in its
name, so a shard damaged on disk later is found, discarded and recomputed
rather than read as data or left to block every resume.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from tlfeat.cache import OLD_DECODE, CacheKey, Rows, without_non_finite
from tlfeat.errors import TlfeatError
from tlfeat.fileio import atomic_write_bytes, os_reason, sha256_file

SHARD_DIGEST_CHARS = 32  # hex digits of SHA-256 in a shard's name: 128 bits
_SHARD_NAME = re.compile(r"shard-(\d{7,})-([0-9a-f]{%d})\.npz" % SHARD_DIGEST_CHARS)


class ShardStore:
    """Batches finished by an unfinished run, in ``<out>.parts/``: one .npz per batch.

    ``meta.json`` records the CacheKey; shards from another key are never read. Each
    shard's name carries the SHA-256 of its bytes (``shard-<index>-<digest>.npz``); a
    shard that fails it, or does not load, is deleted and noted in `notices`, and its
    images are simply computed again.
    """

    def __init__(self, out: Path) -> None:
        self.dir = Path(str(out) + ".parts")
        if self.dir.exists() and not self.dir.is_dir():  # found now, not after the first batch is computed
            raise TlfeatError(f"{self.dir}: is a file; it is where this output's unfinished batches go: move it away")
        # Known after the first shard, so writing stays O(1) per shard over runs of many thousands.
        self._next_index: int | None = None
        self._started: CacheKey | None = None
        self.notices: list[str] = []  # one line per discarded shard

    def key(self) -> CacheKey | None:
        meta = self.dir / "meta.json"
        if not meta.exists():
            return None
        try:
            return CacheKey(**{"decode": OLD_DECODE, **json.loads(meta.read_text())})
        except (ValueError, TypeError):
            return None

    def start(self, key: CacheKey) -> None:
        """Prepare for writing shards under `key`, discarding shards of any other key (cheap to repeat)."""
        if self._started == key:
            return
        if self.dir.exists() and self.key() != key:
            self.clear()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            if not meta.exists():
                atomic_write_bytes(meta, json.dumps(asdict(key)).encode())
        except OSError as exc:
            raise TlfeatError(f"{self.dir}: cannot write here ({os_reason(exc)})") from None
        self._started = key

    def _shard_files(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz")) if self.dir.exists() else []

    def write(self, rows: Rows) -> None:
        if self._next_index is None:
            existing = [_SHARD_NAME.fullmatch(p.name) for p in self._shard_files()]
            self._next_index = max((int(m[1]) + 1 for m in existing if m), default=0)
        index = self._next_index
        self._next_index += 1
        tmp = self.dir / f".tmp-{os.getpid()}-{index}.npz"
        try:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    paths=np.array(rows.paths, dtype=str),
                    features=rows.features,
                    file_size=np.array(rows.file_size, dtype=np.int64),
                    file_mtime_ns=np.array(rows.file_mtime_ns, dtype=np.int64),
                    skipped_paths=np.array(rows.skipped_paths, dtype=str),
                    skipped_reasons=np.array(rows.skipped_reasons, dtype=str),
                    skipped_size=np.array(rows.skipped_size, dtype=np.int64),
                    skipped_mtime_ns=np.array(rows.skipped_mtime_ns, dtype=np.int64),
                )
                handle.flush()
                os.fsync(handle.fileno())
            digest = sha256_file(tmp)[:SHARD_DIGEST_CHARS]  # read back from the page cache: cheap
            os.replace(tmp, self.dir / f"shard-{index:07d}-{digest}.npz")
        except OSError as exc:
            raise TlfeatError(
                f"{self.dir}: cannot write a shard ({os_reason(exc)}); the batches finished before it are kept: "
                "make room and rerun the same command to resume"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def read(self) -> Iterator[Rows]:
        """Every intact shard (rows with non-finite features moved to skipped); damaged ones are discarded."""
        for shard in self._shard_files():
            rows, problem = self._load(shard)
            if rows is None:
                self.notices.append(f"{shard.name} in {self.dir} {problem}: discarded; its images are computed again")
                shard.unlink(missing_ok=True)
                continue
            yield without_non_finite(rows)

    @staticmethod
    def _load(shard: Path) -> tuple[Rows | None, str]:
        match = _SHARD_NAME.fullmatch(shard.name)
        if match is None:
            return None, "has no checksum in its name (written by an older tlfeat)"
        try:
            if sha256_file(shard)[:SHARD_DIGEST_CHARS] != match[2]:
                return None, "fails its checksum (damaged on disk)"
            with np.load(shard, allow_pickle=False) as data:
                return Rows(
                    paths=[str(p) for p in data["paths"]],
                    features=data["features"],
                    file_size=[int(v) for v in data["file_size"]],
                    file_mtime_ns=[int(v) for v in data["file_mtime_ns"]],
                    skipped_paths=[str(p) for p in data["skipped_paths"]],
                    skipped_reasons=[str(r) for r in data["skipped_reasons"]],
                    skipped_size=[int(v) for v in data["skipped_size"]],
                    skipped_mtime_ns=[int(v) for v in data["skipped_mtime_ns"]],
                ), ""
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            return None, f"cannot be read ({exc.__class__.__name__})"

    def clear(self) -> None:
        self._next_index = self._started = None
        if not self.dir.exists():
            return
        for item in self.dir.iterdir():
            item.unlink()
        self.dir.rmdir()
