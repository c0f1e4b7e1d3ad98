"""Which rows a head has seen, so that no score is ever computed on them.

A head records the identities of the rows it was fitted on (`train`) and, when it
chose anything on them (a `search`, the report head's early stopping), of its
`val` rows. Each row is identified twice:

- by its image: the path relative to the dataset root and the file's byte size,
  which finds the same images in a re-split cache, or in a cache of another
  folder that shares some of them (a copied subset keeps its relative paths);
- by its feature vector, the exact float32 values, which finds copies of an
  image under other names, as long as they were embedded the same way.

A scored split may not hold rows the head saw in an earlier role: `val` never
holds training rows, `test` neither training nor selection rows. `train` is
scored as it is (it is the training score). Such rows are left out and counted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Roles a head's rows play, and the earlier roles each scored split must not contain.
EARLIER_ROLES = {"train": (), "val": ("train",), "test": ("train", "val")}


def _key(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def image_keys(paths: Sequence[str], file_sizes: Sequence[int]) -> np.ndarray:
    """Each image's identity by file: a 64-bit key of its path relative to the dataset root and its byte size."""
    return np.array([_key(f"{p}\0{int(s)}".encode()) for p, s in zip(paths, file_sizes)], dtype=np.uint64)


@dataclass(frozen=True)
class RowIds:
    """Identities of some rows: by image (path and size) and by features, 64-bit hashes in row order."""

    by_file: np.ndarray
    by_features: np.ndarray

    @classmethod
    def of(cls, paths: Sequence[str], file_sizes: Sequence[int], features: np.ndarray) -> "RowIds":
        rows = np.ascontiguousarray(features, dtype=np.float32)
        return cls(
            image_keys(paths, file_sizes),
            np.array([_key(row.tobytes()) for row in rows], dtype=np.uint64),
        )

    def __len__(self) -> int:
        return len(self.by_file)

    def take(self, mask: np.ndarray) -> "RowIds":
        return RowIds(self.by_file[mask], self.by_features[mask])

    def seen_in(self, other: "RowIds") -> np.ndarray:
        """Per row: does `other` hold the same image or the same features?"""
        return np.isin(self.by_file, other.by_file) | np.isin(self.by_features, other.by_features)

    @staticmethod
    def concat(parts: Sequence["RowIds"]) -> "RowIds":
        return RowIds(
            np.concatenate([p.by_file for p in parts]) if parts else np.zeros(0, np.uint64),
            np.concatenate([p.by_features for p in parts]) if parts else np.zeros(0, np.uint64),
        )

    def to_arrays(self, role: str) -> dict[str, np.ndarray]:
        """As stored in a head file (`tlfeat.heads.store`)."""
        return {f"{role}_file": self.by_file, f"{role}_features": self.by_features}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, "RowIds"]:
        roles = sorted({name.rsplit("_", 1)[0] for name in arrays})
        return {r: RowIds(arrays[f"{r}_file"], arrays[f"{r}_features"]) for r in roles}


def seen_rows(split: str, ids: RowIds, seen: dict[str, RowIds]) -> np.ndarray:
    """Rows of scored split `split` that the head saw in a role that split must not contain."""
    mask = np.zeros(len(ids), dtype=bool)
    for role in EARLIER_ROLES.get(split, ("train", "val")):
        if role in seen:
            mask |= ids.seen_in(seen[role])
    return mask


def rows_digest(split: np.ndarray, ids: RowIds) -> str:
    """One digest of which images sit in which split: heads in one folder share it, so their scores compare."""
    order = np.lexsort((ids.by_file, split))
    digest = hashlib.sha256()
    for name, key in zip(split[order], ids.by_file[order]):
        digest.update(f"{name}\t{int(key)}\n".encode())
    return digest.hexdigest()
