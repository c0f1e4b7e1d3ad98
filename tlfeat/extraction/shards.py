"""Shards: the batches an unfinished extraction run has finished, one .npz each in ``<out>.parts/``.

Written as each batch completes (temporary name, fsync, rename), so a killed run
loses at most the batch in flight; read back by the next run (the index of every
shard first, the features of each only when the final write needs them), and
removed once the final cache is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from tlfeat.cache import OLD_DECODE, CacheKey, Rows
from tlfeat.errors import TlfeatError
from tlfeat.fileio import atomic_write_bytes


class ShardStore:
    """Batches finished by an unfinished run, in ``<out>.parts/``: one .npz per batch.

    ``meta.json`` records the CacheKey; shards from another key are never read.
    """

    def __init__(self, out: Path) -> None:
        self.dir = Path(str(out) + ".parts")
        # Known after the first shard, so writing stays O(1) per shard over runs of many thousands.
        self._next_index: int | None = None
        self._started: CacheKey | None = None

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
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps(asdict(key)).encode())
        self._started = key

    def _shard_files(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz")) if self.dir.exists() else []

    def write(self, rows: Rows) -> int:
        """Store one batch's rows as the next shard; returns its number."""
        if self._next_index is None:
            existing = self._shard_files()
            self._next_index = int(existing[-1].stem.removeprefix("shard-")) + 1 if existing else 0
        index = self._next_index
        self._next_index += 1
        target = self._path(index)
        tmp = self.dir / f".tmp-{os.getpid()}-{index}.npz"
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
        os.replace(tmp, target)
        return index

    def _path(self, number: int) -> Path:
        return self.dir / f"shard-{number:07d}.npz"

    def read_index(self) -> Iterator[tuple[int, Rows]]:
        """(number, rows) of every complete shard, without its features (`features(number)` reads them).

        A shard that cannot be read (torn by a crash) is ignored.
        """
        for shard in self._shard_files():
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
            except (OSError, ValueError, KeyError, EOFError):
                continue
            yield int(shard.stem.removeprefix("shard-")), rows

    def features(self, number: int) -> np.ndarray:
        """The feature rows of shard `number`."""
        path = self._path(number)
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["features"]
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise TlfeatError(
                f"{path}: shard unreadable ({exc.__class__.__name__}); delete it and rerun to compute its rows again"
            ) from None

    def clear(self) -> None:
        self._next_index = self._started = None
        if not self.dir.exists():
            return
        for item in self.dir.iterdir():
            item.unlink()
        self.dir.rmdir()
