"""Fine-tuning data: batches of one split decoded by worker threads, training-only augmentation."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tlfeat.data.cores import default_workers
from tlfeat.data.decode import DecodeError, decode_image
from tlfeat.data.scan import DatasetScan
from tlfeat.errors import TlfeatError

CROP_SCALE = (0.75, 1.0)  # augment: side of the random crop, as a share of the image side


@functools.cache
def image_batches_class() -> Any:
    """The ImageBatches class (a keras.utils.PyDataset), created on first use."""
    import keras

    class ImageBatches(keras.utils.PyDataset):
        """(images, labels, weights) batches of one split, decoded by worker threads.

        The order of an epoch, and every augmentation, are functions of (seed,
        epoch, image), so a resumed run sees the same batches as an uninterrupted
        one whatever the thread timing. A file that cannot be decoded gets a
        zero image with sample weight 0: batch shapes stay fixed and the file
        counts neither in the loss nor in the (weighted) accuracy.
        """

        def __init__(
            self,
            files: Sequence[Path],
            labels: np.ndarray,
            size: int,
            preprocess: Callable[[np.ndarray], np.ndarray],
            batch_size: int,
            seed: int,
            shuffle: bool,
            augment: bool,
            on_failure: Callable[[Path, str], None],
        ) -> None:
            super().__init__(workers=default_workers(), use_multiprocessing=False)
            self.files = list(files)
            self.labels = np.asarray(labels, dtype=np.int32)
            self.size = size
            self.preprocess = preprocess
            self.batch_size = batch_size
            self.seed = seed
            self.shuffle = shuffle
            self.augment = augment
            self.on_failure = on_failure
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch
            n = len(self.files)
            self.order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)

        def __len__(self) -> int:
            return math.ceil(len(self.files) / self.batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            images = np.zeros((len(rows), self.size, self.size, 3), dtype=np.float32)
            weights = np.ones(len(rows), dtype=np.float32)
            for slot, row in enumerate(rows):
                try:
                    pixels = decode_image(self.files[row], self.size)
                except DecodeError as exc:
                    weights[slot] = 0.0
                    self.on_failure(self.files[row], str(exc))
                    continue
                if self.augment:
                    pixels = augment_image(pixels, np.random.default_rng((self.seed, self.epoch, int(row))))
                images[slot] = pixels
            return self.preprocess(images), self.labels[rows], weights

    return ImageBatches


def augment_image(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training-only augmentation of a (size, size, 3) uint8 image: random crop-and-zoom, then a random flip."""
    from PIL import Image

    size = pixels.shape[0]
    side = max(1, int(round(size * rng.uniform(*CROP_SCALE))))
    x0, y0 = rng.integers(0, size - side + 1, size=2)
    cropped = Image.fromarray(pixels).resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    out = np.asarray(cropped, dtype=np.uint8)
    return out[:, ::-1] if rng.random() < 0.5 else out


def dataset_fingerprint(scan: DatasetScan) -> str:
    """Which images, classes and splits a run trains on (file contents are not hashed)."""
    digest = hashlib.sha256()
    for e in scan.entries:
        digest.update(f"{e.split}\t{e.class_name}\t{e.relpath}\n".encode())
    return digest.hexdigest()


def check_trainable_split(scan: DatasetScan) -> None:
    counts = scan.split_counts()
    if "val" not in counts:
        raise TlfeatError(
            f"{scan.root}: no val images; fine-tuning keeps the best epoch by val accuracy "
            "(give `ratios` a val share or add a val/ folder)"
        )
    in_train = {e.class_name for e in scan.entries if e.split == "train"}
    missing = [c for c in scan.class_names if c not in in_train]
    if missing:
        raise TlfeatError(
            f"{scan.root}: class(es) {', '.join(missing)} have no images in the train split (each image's split "
            "is drawn on its own: with few images a class can draw none; use another `seed`, or train/ and test/ "
            "folders)"
        )
