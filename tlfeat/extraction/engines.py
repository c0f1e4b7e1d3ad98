"""Extraction engines: where the backbone runs (`tlfeat.extraction.run.make_engine` picks one by name).

An engine is entered around a run and yields one `Rows` per finished batch;
`tlfeat.extraction.run` keys, shards, resumes and writes those rows the same way
whichever engine computed them. The local engine computes in this process; the
Ray engine (`tlfeat.extraction.ray_engine`, imported only when chosen) on a Ray cluster.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from tlfeat.backbones import Backbone
from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.cache import Rows
from tlfeat.data.entries import ImageEntry, LazySequence
from tlfeat.data.batches import shared_pool
from tlfeat.runtime import accelerator_present, compute_policy, get_extractor, map_batches

class Engine(Protocol):
    """Where the backbone runs. Entered around a run; `compute` is known on entry, before any image."""

    compute: str  # "float32", or "mixed_bfloat16" on GPUs

    def __enter__(self) -> "Engine": ...

    def __exit__(self, *exc: object) -> None: ...

    def load(self) -> None:
        """Load what computing needs in this process, once there is work and before its progress is shown: a
        Keras backend that cannot load is then the run's one line of output."""
        ...

    def embed(self, root: Path, todo: Sequence[ImageEntry], bar: Any) -> Iterator[Rows]:
        """One Rows per finished batch of `todo` (any order), advancing `bar` by the images done."""
        ...

    def keras_backend(self) -> str:
        """The Keras backend that computed this run's features."""
        ...


class LocalEngine:
    """This process: worker processes decode ahead of the backbone; batches in canonical order."""

    def __init__(
        self, backbone: Backbone, weights: str, image_size: int, batch_size: int | None, workers: int | None = None,
        tta: str = NO_TTA, most: int | None = None,
    ) -> None:
        self.backbone, self.weights, self.image_size, self.batch_size = backbone, weights, image_size, batch_size
        self.workers = workers  # decoding processes; None: one per available core
        self.tta = tta
        self.most = most  # the dataset's images: a default batch beyond them that does not fit is cut to them
        self.compute = compute_policy(accelerator_present())

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def load(self) -> None:
        importlib.import_module("keras")  # the backbone itself is built in `embed`, while the decoding pool starts

    def embed(self, root: Path, todo: Sequence[ImageEntry], bar: Any) -> Iterator[Rows]:
        pool = shared_pool(self.workers)  # a new pool's processes start while the backbone loads
        extractor = get_extractor(self.backbone, self.weights, self.image_size, self.batch_size, self.tta, self.most)
        files = FilePaths(str(root), todo)
        for batch, features in map_batches(files, self.image_size, extractor.batch_size, extractor.submit, bar, pool):
            entries = todo[batch.start : batch.start + batch.length]
            yield batch_rows(entries, features, batch.ok, batch.failures, batch.digests)

    def keras_backend(self) -> str:
        import keras

        return keras.backend.backend()


class FilePaths(LazySequence[str]):
    """The files of `entries` under `root`, as strings made a batch at a time when sliced: the whole list
    costs a string per file (27 MB for 200,000 files in its test), beside the scan's own entries."""

    def __init__(self, root: str, entries: Sequence[ImageEntry]) -> None:
        self.root, self.entries = root, entries

    def __len__(self) -> int:
        return len(self.entries)

    def _item(self, i: int) -> str:
        return os.path.join(self.root, self.entries[i].relpath)


def batch_rows(
    entries: Sequence[ImageEntry], features: np.ndarray, ok: Sequence[int], failures: Sequence[tuple[int, str]],
    digests: np.ndarray | None = None,
) -> Rows:
    """One batch's Rows: `features` row i belongs to entries[ok[i]]; failures are (position, reason);
    `digests` row j is the SHA-256 of the bytes entries[j] was decoded from."""
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
        file_ino=[e.ino for e in ok_entries],
        file_ctime_ns=[e.ctime_ns for e in ok_entries],
        file_sha256=None if digests is None else np.asarray(digests, dtype=np.uint8)[list(ok)].reshape(-1, 32),
    )
