"""A corpus of hostile files, as found in folders scraped from the web.

`write_corpus(root)` writes them into class folders beside normal images and
returns what tlfeat must do with each: embed it ("ok"), skip it with a reason
recorded in the cache ("skipped"), or leave it out at scan time with a reason
("ignored").
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Expectation:
    relpath: str
    outcome: str  # "ok" | "skipped" | "ignored"
    reason: str = ""  # substring of the recorded reason


def _photo(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header promises width x height pixels, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _png_chunk(b"IEND", b"")
    )


def write_corpus(root: Path, class_name: str = "hostile") -> list[Expectation]:
    """Write every hostile kind into root/<class_name>/ and return the expected outcome of each."""
    folder = root / class_name
    folder.mkdir(parents=True, exist_ok=True)
    expected: list[Expectation] = []

    def rel(name: str) -> str:
        return f"{class_name}/{name}"

    def add(name: str, outcome: str, reason: str = "") -> Path:
        expected.append(Expectation(rel(name), outcome, reason))
        return folder / name

    add("zero_bytes.jpg", "skipped", "empty file").write_bytes(b"")
    good = folder / "source.jpg"
    _photo((300, 200), 1).save(good, quality=90)
    add("truncated.jpg", "skipped", "truncated").write_bytes(good.read_bytes()[:2000])
    good.unlink()
    add("random_bytes.jpg", "skipped", "not an image").write_bytes(np.random.default_rng(2).bytes(5000))
    add("text_named.png", "skipped", "not an image").write_text("<html>403 Forbidden</html>\n")
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(add("alpha.png", "ok"))
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(add("sixteen_bit.png", "ok"))
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(add("cmyk.jpg", "ok"))
    _photo().convert("P", palette=Image.ADAPTIVE).save(add("palette.gif", "ok"))
    frames = [Image.new("P", (20, 20), i) for i in (10, 20, 30)]
    frames[0].save(add("animated.gif", "ok"), save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (9, 9, 9)).save(add("one_pixel.png", "ok"))
    add("bomb.png", "skipped", "image too large").write_bytes(_bomb_png(100_000, 100_000))
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo((64, 32), 3).save(add("exif_rotated.jpg", "ok"), exif=exif)
    _photo(seed=4).save(add("name with spaces.jpg", "ok"))
    _photo(seed=5).save(add("ünïcödé_名前.png", "ok"))
    _photo(seed=6).save(add("emoji_🐱.png", "ok"))
    _photo(seed=7).save(add("UPPER.JPEG", "ok"))
    _photo(seed=8).save(add("webp_image.webp", "ok"))
    _photo(seed=9).save(add("tiff_image.tif", "ok"))
    os.symlink(folder / "loop.jpg", add("loop.jpg", "ignored", "symlink loop"))
    os.symlink("/etc/hostname", add("outside.jpg", "skipped", "not an image"))  # followed, like any symlink
    os.symlink(folder / "does_not_exist.png", add("dangling.png", "ignored", "broken symlink"))
    os.symlink(".", add("self_folder", "ignored", "symlink loop"))
    with open(os.path.join(os.fsencode(folder), b"latin1_caf\xe9.png"), "wb") as handle:
        _photo(seed=12).save(handle, format="PNG")
    expected.append(Expectation(rel("latin1_caf\\xe9.png"), "ignored", "not valid UTF-8"))
    (folder / "folder_named.jpg").mkdir()  # a folder is walked into, never decoded
    _photo(seed=10).save(add("folder_named.jpg/inside.png", "ok"))
    os.mkfifo(add("named_pipe.jpg", "ignored", "not a regular file"))  # opening it would block forever
    unreadable = add("unreadable.png", "ok" if os.geteuid() == 0 else "skipped", "permission denied")
    _photo(seed=11).save(unreadable)
    os.chmod(unreadable, 0)  # root reads it anyway; anyone else must get a recorded skip
    add(".hidden.jpg", "ignored", "hidden file").write_bytes(b"x")
    add("notes.txt", "ignored", "not an image file extension").write_text("scraped 2026-01-01")
    return expected
