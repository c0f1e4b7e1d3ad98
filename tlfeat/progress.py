"""Progress reporting for long work: a live bar on a terminal or in a notebook, plain lines in a log file.

A bar redraws itself with carriage returns many times a second; written to a file or a pipe that is one
endless line. There a line is printed every `LINE_EVERY_S` seconds instead, and one at the end
(unless the caller prints its own, `leave=False`).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

LINE_EVERY_S = 10.0
UNIT_WORDS = {"img": "images", "batch": "batches", "row": "rows"}  # tqdm's unit -> the word in a progress line


def is_terminal(stream: IO | None) -> bool:
    """True when `stream` is an interactive terminal (False for files, pipes, closed or missing streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "img", leave: bool = True) -> Any:
    """A context-managed progress report over `total` items; `update(n)` advances it.

    `leave=False` erases a terminal bar when it closes (and drops the closing line in a log file), so a line
    the caller prints after it starts clean.
    """
    tqdm = _tqdm_class()
    notebook = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
    if enabled and not notebook and not is_terminal(sys.stderr):
        return ProgressLines(total, desc, unit=UNIT_WORDS.get(unit, unit), leave=leave)
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1, leave=leave)


def _tqdm_class() -> type:
    """tqdm's widget class inside a Jupyter kernel, its terminal class elsewhere.

    `tqdm.auto` decides the same, but to do so it imports asyncio, ssl and email (3.5 MB and 30 ms in
    every run that shows progress); a notebook kernel has always imported IPython already.
    """
    if "IPython" in sys.modules:
        from tqdm.auto import tqdm  # its class derives from tqdm.notebook's in a kernel
    else:
        from tqdm.std import tqdm
    return tqdm


class ProgressLines:
    """Progress as whole lines: `desc: 120/4485 images (3%), 25.1 images/s, about 2:54 left`."""

    def __init__(self, total: int, desc: str, every_s: float | None = None, stream: IO | None = None,
                 unit: str = "images", leave: bool = True) -> None:
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.started = self.last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.every_s and self.n < self.total:
            self.last_line = now
            self._line(now, done=False)

    def close(self) -> None:
        if self.leave:
            self._line(time.monotonic(), done=True)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, now: float, done: bool) -> None:
        elapsed = now - self.started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        if done:
            tail = f"{elapsed:.1f} s"
        elif rate > 0:
            left = round((self.total - self.n) / rate)
            tail = f"about {left // 60}:{left % 60:02d} left"
        else:
            tail = "starting"
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{percent}, {rate:.1f} {self.unit}/s, {tail}",
              file=self.stream, flush=True)
