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
    cell_w, cell_h = 2.0, 2.0 + 0.13 * lines
    fig = Figure(figsize=(columns * cell_w, rows * cell_h + 0.5))
    fig.suptitle(title, fontsize=10)
    for n, tile in enumerate(tiles):
        ax = fig.add_subplot(rows, columns, n + 1)
        if tile is None:
            ax.set_axis_off()
            continue
        pixels, blank = thumbnail(tile.image, thumb_px)
        ax.imshow(pixels)
        if blank:
            ax.text(thumb_px / 2, thumb_px / 2, blank, ha="center", va="center", fontsize=8, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(tile.colour)
            spine.set_linewidth(2 if tile.colour != "black" else 0.5)
        ax.set_xlabel(tile.caption, fontsize=6.5, color=tile.colour, linespacing=1.2)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    save_png(fig, out, dpi=90)
