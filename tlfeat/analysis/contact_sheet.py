"""Contact sheets: a grid of thumbnails, each with a caption, as one PNG (matplotlib's Agg canvas, no display)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from tlfeat.data.decode import to_8bit
from tlfeat.reports import save_png

THUMB_PX = 160
CAPTION_CHARS = 30


@dataclass
class Tile:
    image: Path | None  # None, or a file that cannot be read: a grey tile saying so
    caption: str  # lines separated by "\n"
    colour: str = "black"  # frame and caption colour, to tell groups apart


def shorten(text: str, width: int = CAPTION_CHARS) -> str:
    """The end of a long path (the file name matters most), marked with an ellipsis."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def thumbnail(path: Path | None, size: int = THUMB_PX) -> tuple[np.ndarray, str | None]:
    """(size, size, 3) uint8 picture with the image fitted inside, and why it is blank if it is."""
    canvas = Image.new("RGB", (size, size), (235, 235, 235))
    if path is None:
        return np.asarray(canvas), "no image file"
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
            img = to_8bit(ImageOps.exif_transpose(img)).convert("RGB")
            img.thumbnail((size, size))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not found" if isinstance(exc, FileNotFoundError) else "unreadable"
        return np.asarray(canvas), reason
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas), None


def draw_sheet(tiles: Sequence[Tile | None], columns: int, title: str, out: Path, thumb_px: int = THUMB_PX) -> None:
    """Write `tiles` row by row, `columns` per row, under `title`, as a PNG at `out` (atomically); None: a gap."""
    from matplotlib.figure import Figure

    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    lines = max((t.caption.count("\n") + 1 for t in tiles if t is not None), default=1)
    # Placed in inches, not by tight_layout: square thumbnails and their captions, the same on every sheet.
    image, gap, top = 1.8, 0.2, 0.45
    cell_w, cell_h = image + gap, image + 0.12 * lines + 0.15
    width, height = columns * cell_w, top + rows * cell_h
    fig = Figure(figsize=(width, height))
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    for n, tile in enumerate(tiles):
        if tile is None:
            continue
        row, column = divmod(n, columns)
        bottom = height - top - row * cell_h - image
        ax = fig.add_axes((((column * cell_w) + gap / 2) / width, bottom / height, image / width, image / height))
        pixels, blank = thumbnail(tile.image, thumb_px)
        ax.imshow(pixels)
        if blank:
            ax.text(thumb_px / 2, thumb_px / 2, blank, ha="center", va="center", fontsize=8, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(tile.colour)
            spine.set_linewidth(2 if tile.colour != "black" else 0.5)
        ax.text(0.5, -0.02, tile.caption, transform=ax.transAxes, ha="center", va="top", fontsize=6.5,
                color=tile.colour, linespacing=1.2)
    save_png(fig, out, dpi=90, tight=False)
