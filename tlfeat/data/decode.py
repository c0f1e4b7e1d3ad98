"""Image decoding: any file Pillow reads -> fixed-size 8-bit RGB, in parallel, ahead of the model.

Decoding needs Pillow and numpy only (no TensorFlow), so it runs the same under
every Keras backend. Pillow releases the GIL while decoding and resizing, so a
thread pool keeps the cores busy while the model computes the previous batch.

Resize method: the whole image is resized to size x size (aspect ratio not
kept, as keras.utils.image_dataset_from_directory does) with Pillow's bilinear
filter, which antialiases when shrinking.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse images whose header promises more pixels than this before decoding
# them: a 40000 x 40000 PNG would need 4.8 GB as RGB.
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold

# Truncated files must fail loudly, not decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(Exception):
    """A file that cannot become an image; the message is the one-line reason."""


def to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit "L" (grey sources) or "RGB": 16-bit and float greys rescaled, alpha on white.

    Grey stays one channel so that resizing costs a third; `decode_image` repeats it into RGB afterwards,
    which gives the same pixels as converting to RGB first (the resize filter works per channel).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        # 16-bit PNGs open as I;16 or I; scale by the real range so 12-bit scans survive too.
        top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode not in ("L", "RGB"):
        return img.convert("RGB")
    return img


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Read one image file as a (size, size, 3) uint8 RGB array, EXIF orientation applied.

    Raises DecodeError with a one-line reason for anything that is not a usable image.
    """
    try:
        if os.path.getsize(path) == 0:
            raise DecodeError("empty file (0 bytes)")
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise DecodeError(f"image too large ({width}x{height} pixels, limit {MAX_PIXELS})")
            img.load()  # first frame only for animations
            img = ImageOps.exif_transpose(img)
            pixels = np.asarray(to_8bit(img).resize((size, size), Image.BILINEAR), dtype=np.uint8)
            return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large ({exc})") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except FileNotFoundError:
        raise DecodeError("file disappeared during the run") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DecodeError(f"corrupt or truncated image data ({detail})") from None


@dataclass
class DecodedBatch:
    """One batch: `images` holds the decodable files (preprocessed), `ok` their positions in the batch."""

    start: int  # index of the batch's first file in the input sequence
    images: np.ndarray  # (len(ok), size, size, 3) float32, preprocessed
    ok: list[int]  # positions within the batch [0, batch_len)
    failures: list[tuple[int, str]]  # (position within the batch, reason)
    length: int


def _decode_one(path: str | Path, size: int, preprocess: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | str:
    try:
        pixels = decode_image(path, size)
    except DecodeError as exc:
        return str(exc)
    return preprocess(pixels[None].astype(np.float32))[0]


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def iter_batches(
    paths: Sequence[str | Path],
    size: int,
    preprocess: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    workers: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[DecodedBatch]:
    """Decode `paths` in order, `batch_size` at a time, up to `prefetch_batches` ahead.

    Memory is bounded by (prefetch_batches + 1) batches of decoded images,
    however many paths there are.
    """
    lookahead = batch_size * (prefetch_batches + 1)
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="tlfeat-decode") as pool:
        pending: deque[Future] = deque()
        next_submit = 0

        def fill() -> None:
            nonlocal next_submit
            while next_submit < len(paths) and len(pending) < lookahead:
                pending.append(pool.submit(_decode_one, paths[next_submit], size, preprocess))
                next_submit += 1

        try:
            for start in range(0, len(paths), batch_size):
                fill()
                length = min(batch_size, len(paths) - start)
                results = [pending.popleft().result() for _ in range(length)]
                fill()
                ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
                failures = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
                images = (
                    np.stack([results[i] for i in ok])
                    if ok
                    else np.zeros((0, size, size, 3), dtype=np.float32)
                )
                yield DecodedBatch(start, images, ok, failures, length)
        finally:
            for future in pending:
                future.cancel()
