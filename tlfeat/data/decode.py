"""Image decoding: any file Pillow reads -> fixed-size 8-bit RGB.

Decoding needs Pillow and numpy only (no TensorFlow), so it runs the same under
every Keras backend; `tlfeat.data.batches` runs it in parallel worker processes.

Resize method: the whole image is resized to size x size (aspect ratio not
kept, as keras.utils.image_dataset_from_directory does) with Pillow's bilinear
filter, which antialiases when shrinking. A JPEG at least twice the target
size in both sides is first decoded at a reduced scale by libjpeg (1/2, 1/4
or 1/8, Pillow's `draft`; never below the target size), which skips most of
the decoding work; the bilinear resize then does the rest. BENCHMARKS.md
measures what that changes in pixels and features.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse images that would decode to more pixels than this (a JPEG's at its reduced scale), before
# decoding them: a 40000 x 40000 PNG would need 4.8 GB as RGB.
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold

# Truncated files must fail loudly, not decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(Exception):
    """A file that cannot become an image; the message is the one-line reason."""


def failure_reason(exc: Exception) -> str:
    """The one-line reason a file is skipped for: a DecodeError's own text; any other exception is a decoder
    bug, which costs its image, not the run. Every decoding path (local workers, Ray tasks, the retry of
    skipped files) uses this, so a file skipped by one is skipped, not crashed on, by the others."""
    if isinstance(exc, DecodeError):
        return str(exc)
    first_line = next(iter(str(exc).splitlines()), "")  # one line, the parenthesis closed
    return f"decoder error ({exc.__class__.__name__}: {first_line})"


def to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit "L" (grey sources) or "RGB": 16-bit and float greys rescaled, alpha on white.

    Grey stays one channel so that resizing costs a third; `decode_into` copies it into R, G and B afterwards,
    which gives the same pixels as converting to RGB first (the resize filter works per channel).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        # 16-bit PNGs (I;16, or I) scale by their format's range, as viewers show them (a 12-bit scan stored in
        # 16 bits stays dark: nothing in the file says 12); values that fit 0..255 by 255; floats in 0..1 by 1.
        if img.mode == "F" and values.max() <= 1.0:
            top = 1.0
        else:
            top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # also a grey or RGB PNG's colour key
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode not in ("L", "RGB"):
        return img.convert("RGB")
    return img


_LIMIT_LOCK = threading.Lock()


@contextmanager
def _open_limit_lifted() -> Iterator[None]:
    """Pillow refuses (over twice its limit) or warns about an image at open, by its header's size; but a
    large JPEG is decoded at up to 1/8 scale. `decode_into` applies MAX_PIXELS itself, after `draft`, to the
    pixels actually decoded (a 400-megapixel JPEG decodes as 6 megapixels for 224 px), before any decoding."""
    with _LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


# Part of the cache key: features of a file decoded another way never mix with these.
DECODE = "pillow-bilinear,jpeg-dct-scaled"


def decode_into(path: str | Path, out: np.ndarray) -> bytes:
    """Decode one image file into `out`, a (size, size, 3) uint8 array: RGB, EXIF orientation applied.

    Returns the SHA-256 (32 bytes) of the exact bytes decoded: the file is read whole once, hashed, and
    Pillow decodes that copy (the cache keeps the digest, so a later run can tell a file of the same
    size whose content changed from one merely copied or moved). Raises DecodeError with a one-line
    reason for anything that is not a usable image (`out` is then left as it was).
    """
    size = out.shape[0]
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise DecodeError("empty file (0 bytes)")
            data = file.read()
        digest = hashlib.sha256(data).digest()
        with _open_limit_lifted():
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if img.format == "JPEG":  # libjpeg scales by 1/2..1/8 only while both sides stay >= size
                img.draft(None, (size, size))
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise DecodeError(f"image too large ({width}x{height} pixels, limit {MAX_PIXELS})")
            img.load()  # first frame only for animations
            ImageOps.exif_transpose(img, in_place=True)
            pixels = np.asarray(to_8bit(img).resize((size, size), Image.BILINEAR))
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large ({exc})") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except FileNotFoundError:
        raise DecodeError("broken symbolic link" if os.path.islink(path) else "file disappeared during the run") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DecodeError(f"corrupt or truncated image data ({detail})") from None
    if pixels.ndim == 2:  # grey: one channel resized, copied into all three
        for channel in range(3):
            out[:, :, channel] = pixels
    else:
        out[...] = pixels
    return digest


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Read one image file as a new (size, size, 3) uint8 RGB array (see `decode_into`)."""
    out = np.empty((size, size, 3), dtype=np.uint8)
    decode_into(path, out)
    return out
