"""A scan's image entries: one image's `ImageEntry`, and `ImageTable`, the compact columns a scan keeps them in.

Entries are always in canonical order: split (train, val, test), then class, then path.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar, overload

import numpy as np

SPLITS = ("train", "val", "test")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)  # slots: a million entries take a third of the memory
class ImageEntry:
    """One image file: where it is, what it is, and its identity for cache reuse."""

    relpath: str  # relative to the dataset root, '/'-separated
    class_name: str
    split: str
    size: int
    mtime_ns: int
    ino: int = -1  # inode number and status-change time (stat follows symlinks: the target's); -1 unknown
    ctime_ns: int = -1


class LazySequence(Sequence[T]):
    """A sequence whose items are made when asked for (`_item`), never held: indexing makes one, a slice a list."""

    def _item(self, i: int) -> T:  # 0 <= i < len(self)
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        return self._item(index % len(self))


class ImageTable(LazySequence[ImageEntry]):
    """Image entries as columns: 45 bytes an image plus its path's UTF-8 bytes, where a list of `ImageEntry`
    objects costs about 190 bytes an image (the object, its path string and its two ints). Indexing makes
    the `ImageEntry`; a slice, a list of them.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self._paths = bytearray()  # every relpath's UTF-8 bytes, one after the other
        self._ends = array("q")  # where each relpath ends in _paths
        self._sizes, self._mtimes = array("q"), array("q")
        self._inos, self._ctimes = array("q"), array("q")
        self._classes, self._splits = array("i"), array("b")  # indices in class_names and SPLITS

    def append(
        self, relpath: str, class_index: int, split_index: int, size: int, mtime_ns: int, ino: int = -1,
        ctime_ns: int = -1,
    ) -> None:
        self._paths += relpath.encode()
        self._ends.append(len(self._paths))
        self._sizes.append(size)
        self._mtimes.append(mtime_ns)
        self._inos.append(min(ino, 2**63 - 1))
        self._ctimes.append(ctime_ns)
        self._classes.append(class_index)
        self._splits.append(split_index)

    def rename_classes(self, class_map: np.ndarray, class_names: Sequence[str]) -> None:
        """Class index i becomes class_map[i], an index in `class_names`."""
        classes = np.frombuffer(self._classes, dtype=np.int32)  # a view: the array's buffer is writable
        classes[:] = class_map[classes]
        self.class_names = list(class_names)

    def extend(self, other: "ImageTable", class_map: np.ndarray) -> None:
        """Append `other`'s entries, its class indices mapped through `class_map` to this table's."""
        shift = len(self._paths)
        self._paths += other._paths
        self._ends.frombytes((np.frombuffer(other._ends, dtype=np.int64) + shift).tobytes())
        self._sizes += other._sizes
        self._mtimes += other._mtimes
        self._inos += other._inos
        self._ctimes += other._ctimes
        self._classes.frombytes(class_map[np.frombuffer(other._classes, dtype=np.int32)].tobytes())
        self._splits += other._splits

    def __len__(self) -> int:
        return len(self._ends)

    def relpath(self, index: int) -> str:
        """An entry's path (index >= 0), without making its ImageEntry: the ledger's matching asks for
        a million of these."""
        return self._paths[self._ends[index - 1] if index else 0 : self._ends[index]].decode()

    def stat(self, index: int) -> tuple[int, int, int, int]:
        """(size, mtime_ns, ino, ctime_ns) of an entry's file: identical in a cached row means untouched."""
        return self._sizes[index], self._mtimes[index], self._inos[index], self._ctimes[index]

    def split(self, index: int) -> str:
        return SPLITS[self._splits[index]]

    def classes_in(self, split: str) -> set[str]:
        """The classes with at least one entry in `split`."""
        return self.classes_where(self.in_split(split))

    def in_split(self, split: str) -> np.ndarray:
        """One bool per entry: whether it is in `split`."""
        return np.frombuffer(self._splits, dtype=np.int8) == SPLITS.index(split)

    def classes_where(self, mask: np.ndarray) -> set[str]:
        """The classes with at least one entry where `mask` (one bool per entry) is true."""
        return {self.class_names[i] for i in np.unique(np.frombuffer(self._classes, dtype=np.int32)[mask])}

    def _item(self, i: int) -> ImageEntry:
        return ImageEntry(self.relpath(i), self.class_names[self._classes[i]], SPLITS[self._splits[i]],
                          self._sizes[i], self._mtimes[i], self._inos[i], self._ctimes[i])

    def __iter__(self) -> Iterator[ImageEntry]:
        return map(self._item, range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable while a scan builds it


class EntrySubset(LazySequence[ImageEntry]):
    """Some entries of a sequence, by position (8 bytes each): what a run computes, without an object each."""

    def __init__(self, entries: Sequence[ImageEntry], positions: np.ndarray) -> None:
        self.entries, self.positions = entries, positions

    def __len__(self) -> int:
        return len(self.positions)

    def _item(self, i: int) -> ImageEntry:
        return self.entries[int(self.positions[i])]


def split_bounds(entries: Sequence[ImageEntry]) -> list[tuple[str, int, int]]:
    """(split, first entry, end) of each split present in `entries` (canonical order: split first)."""
    rank = {split: r for r, split in enumerate(SPLITS)}
    starts = [bisect_left(entries, r, key=lambda e: rank[e.split]) for r in range(len(SPLITS))] + [len(entries)]
    return [(split, lo, hi) for split, lo, hi in zip(SPLITS, starts, starts[1:]) if hi > lo]
