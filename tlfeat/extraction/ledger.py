"""Where each image's feature row lives during an extraction run, and the final write that gathers them.

A run's driver (with the local engine and the Ray engine alike) never holds feature rows. For each
image of the scan it keeps one int32: the global number of the row holding its features (the old
cache's rows first, then each shard's rows in turn), NOWHERE (to compute) or FAILED (a file that
could not be decoded; the reasons, few, are kept aside). That is 4 bytes per image, plus a few
per shard.

Records (path, size, mtime, ino, ctime, SHA-256) from the old cache, the shards and this run's batches
are matched with the scan's entries by canonical position (split, class, path), the order in which the
scan lists them and every cache and shard stores them: the next record is nearly always the entry after
the last one matched, and a binary search finds the others, so no table of paths is built. A later
record replaces an earlier one for the same path.

Which rows are reused (`Ledger.record`), as git's index does: a record whose stat (size, mtime_ns, inode,
ctime_ns; symlinks followed) is the file's own is reused without reading the file. One of the same size
whose other stat fields differ (a dataset copied or moved, mtimes cut to whole seconds by tar, zip or
scp -p; a file swapped for another by mv or cp -p; a symlink re-pointed) is reused only when the SHA-256
of the file's bytes, read now, is the one recorded when its features were computed; otherwise, or
when the size differs, its image is computed again. Records from before tlfeat kept inode, ctime and
digest (older caches and shards) are trusted on (size, mtime) as they always were, and the final write
hashes those files once, so the rewritten cache has them. Skipped files keep the (size, mtime) rule:
they are decoded again on every run anyway.

`FinalWriter` walks the scan in canonical order, a chunk of rows at a time, copies each chunk's
features from the old cache (run by run of consecutive rows, straight into the chunk) and from the
shards, and appends it to a CacheWriter: memory is one chunk whatever the number of rows. It writes
while the run computes, each chunk once every image up to its end is settled, so the final write
overlaps the compute instead of following it.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tlfeat.cache import WRITE_CHUNK_ROWS, CacheKey, CacheReader, Rows
from tlfeat.cache_writer import CacheWriter
from tlfeat.data.cores import available_cores
from tlfeat.data.entries import SPLITS, EntrySubset, ImageEntry, ImageTable, split_bounds
from tlfeat.data.scan import class_of
from tlfeat.extraction.shards import ShardStore
from tlfeat.fileio import sha256_file
from tlfeat.interrupts import raise_if_requested

NOWHERE, FAILED = -1, -2
OLD_CACHE = -1  # the source number of the old cache's rows (shards have their own numbers, from 0)
_RANK = {split: rank for rank, split in enumerate(SPLITS)}
SCAN_BLOCK = 1 << 16  # entries of the ledger looked at per step of the final write
PATH_CHUNK_ROWS = 1 << 10  # paths read (or compared) at a time from a cache


def _canonical(entry: ImageEntry) -> tuple[int, str, str]:
    return _RANK[entry.split], entry.class_name, entry.relpath


_NO_DIGEST = bytes(32)


def file_digest(path: str | Path) -> bytes:
    """SHA-256 of a file's bytes; zeros (not known) when it cannot be read."""
    try:
        return bytes.fromhex(sha256_file(path))
    except OSError:
        return _NO_DIGEST


def file_digests(paths: Sequence[str | Path]) -> list[bytes]:
    """`file_digest` of each path, a thread per available core (reading and hashing release the GIL)."""
    if len(paths) <= 1:
        return [file_digest(path) for path in paths]
    with ThreadPoolExecutor(min(len(paths), max(2, available_cores()))) as pool:
        return list(pool.map(file_digest, paths))


class Ledger:
    """For each of `entries` (a scan's, in canonical order), where its row lives; see the module doc."""

    def __init__(self, entries: ImageTable, layout: str, root: Path | None = None) -> None:
        self.entries, self.layout, self.root = entries, layout, root  # root: where to read files to hash
        self.restat = False  # a row was reused whose recorded stat is not the file's: the cache must be rewritten
        self.n_hashed = self.n_same_bytes = 0  # files read to compare with a recorded SHA-256; those that matched
        self.where = np.full(len(entries), NOWHERE, dtype=np.int32)
        self.reasons: dict[int, str] = {}  # entry index -> why its file failed
        self._bases = array("q")  # first global row of each source
        self._sources = array("q")  # OLD_CACHE or a shard number, per source
        self._rows = 0
        # (split rank, first entry, end) of each split present
        self._sections = [(_RANK[split], lo, hi) for split, lo, hi in split_bounds(entries)]

    def add_source(self, source: int, n_rows: int) -> int:
        """Number a source's rows (OLD_CACHE or a shard number); returns the global number of its first."""
        base = self._rows
        if base + n_rows > np.iinfo(np.int32).max:
            raise OverflowError("more than 2**31 rows in one run")
        self._bases.append(base)
        self._sources.append(source)
        self._rows += n_rows
        return base

    def locate(self, path: str, hint: int = 0) -> int:
        """The index of the entry with this path (trying `hint` first), or -1 when the scan has none."""
        entries = self.entries
        if hint < len(entries) and entries.relpath(hint) == path:
            return hint
        class_name = class_of(path, self.layout)
        for rank, lo, hi in self._sections:
            i = bisect_left(entries, (rank, class_name, path), lo, hi, key=_canonical)
            if i < hi and entries.relpath(i) == path:
                return i
        return -1

    def record(
        self, base: int, paths: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int],
        failed: Sequence[str] | None = None,
        stats: tuple[Sequence[int], Sequence[int], np.ndarray] | None = None,
    ) -> int:
        """Rows base, base+1, ... hold the features of `paths` (or, with `failed`, those files failed for
        those reasons), as of the files' `sizes` and `mtimes`, and `stats`: their inode numbers, ctimes
        and SHA-256 digests ((n, 32) uint8; None, -1 or zeros: not recorded). See the module doc for which
        are reused. Returns how many paths the scan no longer has."""
        where, entries, reasons, hint, gone = self.where, self.entries, self.reasons, 0, 0
        to_hash: list[tuple[int, int]] = []  # (entry, k): same size, other stat: reused if the content is the same
        for k, (path, size, mtime) in enumerate(zip(paths, sizes, mtimes)):
            i = self.locate(path, hint)
            if i < 0:
                gone += 1  # a file no longer in the dataset
                continue
            hint = i + 1
            reasons.pop(i, None)
            where[i] = NOWHERE
            now = entries.stat(i)
            if now[0] != size:
                continue
            if failed is not None:
                if now[1] == mtime:
                    where[i], reasons[i] = FAILED, failed[k]
            elif stats is None or stats[0][k] == -1:  # recorded before inode, ctime and digest were kept
                if now[1] == mtime:
                    where[i] = base + k
                    self.restat = True  # rewritten with them (the final write hashes the file)
            elif now[1:] == (mtime, stats[0][k], stats[1][k]):
                where[i] = base + k  # untouched: not read
            elif self.root is not None and bytes(stats[2][k]) != _NO_DIGEST:
                to_hash.append((i, k))
        if to_hash:
            found = file_digests([self.root / entries.relpath(i) for i, _ in to_hash])
            self.n_hashed += len(to_hash)
            for (i, k), digest in zip(to_hash, found):
                if digest == bytes(stats[2][k]):
                    where[i] = base + k
                    self.restat = True
                    self.n_same_bytes += 1
        return gone

    def moved(self, paths: Sequence[str], splits: Sequence[str]) -> int:
        """How many of `paths` (stored in `splits`) the scan puts in another split."""
        count, hint = 0, 0
        for path, split in zip(paths, splits):
            i = self.locate(path, hint)
            if i >= 0:
                hint = i + 1
                count += self.entries.split(i) != split
        return count

    def record_rows(self, source: int, rows: Rows) -> None:
        """A shard's or a batch's Rows: its rows, then its failures."""
        stats = None if rows.file_sha256 is None else (rows.file_ino, rows.file_ctime_ns, rows.file_sha256)
        self.record(self.add_source(source, len(rows.paths)), rows.paths, rows.file_size, rows.file_mtime_ns,
                    stats=stats)
        self.record(0, rows.skipped_paths, rows.skipped_size, rows.skipped_mtime_ns, failed=rows.skipped_reasons)

    def forget(self, paths: Sequence[str]) -> None:
        """Send these paths' images back to be computed (rows found unusable after they were recorded)."""
        hint = 0
        for path in paths:
            i = self.locate(path, hint)
            if i >= 0:
                self.where[i], hint = NOWHERE, i + 1

    def todo(self) -> EntrySubset:
        """The entries to compute, in canonical order."""
        return EntrySubset(self.entries, np.flatnonzero(self.where == NOWHERE))

    def failures(self) -> list[tuple[ImageEntry, str]]:
        return [(self.entries[i], self.reasons[i]) for i in sorted(self.reasons) if self.where[i] == FAILED]

    def n_rows(self) -> int:
        return int(np.count_nonzero(self.where >= 0))

    def split_counts(self) -> dict[str, int]:
        """Rows per split (splits without rows left out)."""
        counts = {SPLITS[rank]: int(np.count_nonzero(self.where[lo:hi] >= 0)) for rank, lo, hi in self._sections}
        return {split: n for split, n in counts.items() if n}

    def chunks(self, chunk_rows: int) -> Iterator[np.ndarray]:
        """Entry indices of the rows, in canonical order, `chunk_rows` at a time."""
        yield from RowQueue(self.where).rest(chunk_rows)

    def sources_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, row within the source) of global row numbers."""
        bases = np.frombuffer(self._bases, dtype=np.int64)
        which = np.searchsorted(bases, rows, side="right") - 1
        return np.frombuffer(self._sources, dtype=np.int64)[which], rows - bases[which]


class RowQueue:
    """Walks a ledger's `where` in canonical order, a block of entries at a time, and hands out the
    entry indices of rows (where >= 0) in groups: memory is a block of indices whatever the rows."""

    def __init__(self, where: np.ndarray) -> None:
        self.where = where
        self.next = 0  # the first entry not yet looked at
        self.size = 0  # rows looked at, not yet handed out
        self._parts: list[np.ndarray] = []

    def take(self, end: int, n: int) -> Iterator[np.ndarray]:
        """Every whole group of `n` rows among the entries up to `end`, which the walk then has passed."""
        for start in range(self.next, end, SCAN_BLOCK):
            stop = min(start + SCAN_BLOCK, end)
            found = np.flatnonzero(self.where[start:stop] >= 0) + start
            self._parts.append(found)
            self.size += len(found)
            self.next = stop
            while self.size >= n:
                yield self.pop(n)

    def rest(self, n: int) -> Iterator[np.ndarray]:
        """Every row not yet handed out, `n` at a time (the last group may be shorter)."""
        yield from self.take(len(self.where), n)
        if self.size:
            yield self.pop(self.size)

    def pop(self, n: int) -> np.ndarray:
        """The next `n` rows (at most `size`)."""
        # One part is the usual case: slicing it copies nothing, where joining would copy the block per group.
        joined = self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)
        self._parts, self.size = [joined[n:]], self.size - min(n, len(joined))
        return joined[:n]


def same_as_file(old: CacheReader, ledger: Ledger, class_names: list[str], seed: int) -> bool:
    """True when the cache `old` already holds exactly the ledger's rows, splits and classes (nothing to
    write). Reads its paths and splits a chunk at a time, never its features."""
    if old.class_names != class_names or old.attrs.get("seed") != seed or old.n_rows != ledger.n_rows() \
            or ledger.restat:  # rows reused on their content (or an older cache): their stat is rewritten
        return False
    start = 0
    for indices in ledger.chunks(PATH_CHUNK_ROWS):
        stored = old.rows(start, start + len(indices), with_features=False)
        entries = ledger.entries
        if list(stored.paths) != [entries.relpath(i) for i in indices] or \
                list(stored.split) != [entries.split(i) for i in indices]:
            return False
        start += len(indices)
    return True


def _copy_old_rows(old: CacheReader, rows: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
    """out[positions] = the old cache's feature rows `rows`: run by run where both advance together (an
    incremental run's usual case: no buffer for float32 caches), else all at once."""
    cuts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(positions) != 1)) + 1
    if len(cuts) > len(rows) // 16:  # scattered: a few large reads beat many small ones
        out[positions] = old.take(rows)
        return
    for first, end in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]):
        old.copy_rows(int(rows[first]), int(rows[end - 1]) + 1, out, int(positions[first]))


def _feature_dim(ledger: Ledger, old: CacheReader | None, shards: ShardStore, default: int) -> int:
    first = next(ledger.chunks(1), None)
    if first is None:
        return default
    source, _ = ledger.sources_of(ledger.where[first])
    return old.feature_dim if source[0] == OLD_CACHE else shards.contents(int(source[0]))[0].shape[1]


class FinalWriter:
    """The final cache, written while the run still computes: each chunk of rows goes out, in canonical
    order, as soon as every image up to its end is settled (its row reused, computed, or failed).

    `advance` (after each batch is recorded in the ledger) writes what is ready; `commit` writes the rest
    and finishes the file, which replaces `out` when the `with` block ends (atomically: until then the
    previous file stays, and the shards keep every finished batch). Rows are gathered a chunk at a time
    from the old cache `old` and the shards, so memory is one chunk whatever the number of rows; an
    uninterrupted run's last batch leaves little but its own rows to write.
    """

    def __init__(
        self, out: Path, key: CacheKey, ledger: Ledger, class_names: list[str], old: CacheReader | None,
        shards: ShardStore, default_dim: int,
    ) -> None:
        self.ledger, self.old, self.shards = ledger, old, shards
        self.label_of = {name: i for i, name in enumerate(class_names)}
        self.class_names, self.out, self.key, self.default_dim = class_names, out, key, default_dim
        self._rows = RowQueue(ledger.where)
        self._writer: CacheWriter | None = None  # opened at the first rows: their width is the file's
        self._features = np.empty((0, 0), dtype=np.float32)

    def __enter__(self) -> "FinalWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.__exit__(*exc)

    def _open(self) -> CacheWriter:
        if self._writer is None:
            dim = _feature_dim(self.ledger, self.old, self.shards, self.default_dim)
            most = int(np.count_nonzero((self.ledger.where >= 0) | (self.ledger.where == NOWHERE)))  # some may fail
            writer = CacheWriter(self.out, self.key, most, dim)
            writer.__enter__()
            self._writer, self._features = writer, np.empty((WRITE_CHUNK_ROWS, dim), dtype=np.float32)
        return self._writer

    def advance(self) -> None:
        """Write every whole chunk of rows before the first image still to compute."""
        for indices in self._rows.take(self._settled_end(), WRITE_CHUNK_ROWS):
            self._write(indices)

    def commit(self, extra_attrs: dict) -> None:
        """Write the remaining rows (every image settled by now) and finish the file."""
        for indices in self._rows.rest(WRITE_CHUNK_ROWS):
            raise_if_requested()  # Ctrl-C between chunks, never inside HDF5's writes (`tlfeat.interrupts`)
            self._write(indices)
        raise_if_requested()
        skipped = [(e.relpath, reason, e.size, e.mtime_ns) for e, reason in self.ledger.failures()]
        self._open().commit(self.class_names, skipped, extra_attrs)

    def _settled_end(self) -> int:
        """The first entry at or after the walk's position that is still to compute (or the end)."""
        where, start = self.ledger.where, self._rows.next
        while start < len(where):
            waiting = np.flatnonzero(where[start : start + SCAN_BLOCK] == NOWHERE)
            if len(waiting):
                return start + int(waiting[0])
            start += SCAN_BLOCK
        return len(where)

    def _write(self, indices: np.ndarray) -> None:
        """Append the rows of these entries (a chunk, in canonical order) to the file."""
        ledger = self.ledger
        writer = self._open()
        sources, rows = ledger.sources_of(ledger.where[indices])
        features = self._features[: len(indices)]  # one buffer for every chunk: no allocation per chunk
        digests = np.zeros((len(indices), 32), dtype=np.uint8)
        for source in np.unique(sources):
            mine = np.flatnonzero(sources == source)
            if source == OLD_CACHE:
                _copy_old_rows(self.old, rows[mine], mine, features)
                digests[mine] = self.old.digests(rows[mine])
            else:
                stored, found = self.shards.contents(int(source))
                features[mine] = stored[rows[mine]]
                if found is not None:
                    digests[mine] = found[rows[mine]]
        entries = [ledger.entries[i] for i in indices]
        unknown = np.flatnonzero(~digests.any(axis=1))  # rows of an older tlfeat's cache or shards: hashed now, once
        if len(unknown) and ledger.root is not None:
            found = file_digests([ledger.root / entries[j].relpath for j in unknown])
            digests[unknown] = np.frombuffer(b"".join(found), dtype=np.uint8).reshape(-1, 32)
        # Each row with its file's stat as the scan found it: the same file, untouched, is reused unread next time.
        writer.append(
            features, [self.label_of[e.class_name] for e in entries], [e.relpath for e in entries],
            [e.split for e in entries], [e.size for e in entries], [e.mtime_ns for e in entries],
            [e.ino for e in entries], [e.ctime_ns for e in entries], digests,
        )

