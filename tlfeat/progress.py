"""Progress reporting for long work: a tqdm bar, off when the caller asks for quiet."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A context-managed bar over `total` images; `update(n)` advances it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
