"""Progress reporting for long work: a tqdm bar, off when the caller asks for quiet."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "img", leave: bool = True) -> Any:
    """A context-managed bar over `total` items on stderr; `update(n)` advances it.

    `leave=False` erases the bar when it closes, so a line printed after it starts clean.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1, leave=leave)
