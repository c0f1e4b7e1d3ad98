"""Ctrl-C at safe points, for work that a raw KeyboardInterrupt can leave in a broken state.

A KeyboardInterrupt is raised in whatever Python code runs when the signal arrives: in the middle of
TensorFlow tracing a graph (which then fails on its own with an AssertionError, a traceback instead of
the one-line message), or in a garbage-collection callback of JAX's, where Python prints "Exception
ignored" and the work simply goes on. Inside `deferred_interrupts()` the first Ctrl-C only asks to stop:
the work checks `stop_requested()` / `raise_if_requested()` at its safe points (between heads, after a
training batch); a second Ctrl-C raises at once, as usual.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_requested = False


def stop_requested() -> bool:
    """True once Ctrl-C was pressed inside `deferred_interrupts()`."""
    return _requested


def raise_if_requested() -> None:
    """Raise KeyboardInterrupt here if Ctrl-C was pressed: a point where stopping leaves nothing half done."""
    if _requested:
        raise KeyboardInterrupt


def _ask_to_stop(signum: int, frame: Any) -> None:
    global _requested
    if _requested:
        raise KeyboardInterrupt
    _requested = True
    try:
        print("stopping after the current step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
    except OSError:  # no stderr to tell: stopping matters more than saying so
        pass


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within it, Ctrl-C asks to stop at the next safe point. Only in the main thread, and only over Python's
    own handler: another program's handler (or a thread, where handlers cannot be set) is left alone."""
    global _requested
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _ask_to_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _requested = False
