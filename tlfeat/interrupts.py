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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

_requested = False
_OURS: list[Callable[[int, Any], None]] = []  # the handlers installed by the open deferred_interrupts, innermost last


def stop_requested() -> bool:
    """True once Ctrl-C was pressed inside `deferred_interrupts()`."""
    return _requested


def raise_if_requested() -> None:
    """Raise KeyboardInterrupt here if Ctrl-C was pressed: a point where stopping leaves nothing half done."""
    if _requested:
        raise KeyboardInterrupt


def _handler(second_stops_at_once: bool) -> Callable[[int, Any], None]:
    def ask_to_stop(signum: int, frame: Any) -> None:
        global _requested
        if _requested and second_stops_at_once:
            raise KeyboardInterrupt
        _requested = True  # said once stopped, in the one line of the error: a safe point is never far

    return ask_to_stop


@contextmanager
def deferred_interrupts(second_stops_at_once: bool = True) -> Iterator[None]:
    """Within it, Ctrl-C asks to stop at the next safe point. Only in the main thread, and only over Python's
    own handler: another program's handler (or a thread, where handlers cannot be set) is left alone.

    `second_stops_at_once=False` where no moment is safe but the checks: writing a file through HDF5, whose
    callbacks swallow an exception raised in them and go on writing a file that is missing data.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, *_OURS):
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    handler = _handler(second_stops_at_once)
    _OURS.append(handler)
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _OURS.remove(handler)
        if not _OURS:  # the outermost one: a request not acted on ends with it (inside, it goes on outwards)
            _requested = False


def interrupted_import(exc: BaseException) -> bool:
    """True for an ImportError that a Ctrl-C caused: a compiled module (TensorFlow's) whose initialisation it
    interrupted raises ImportError("initialization failed") from the KeyboardInterrupt."""
    cause = exc
    while isinstance(cause, ImportError):
        cause = cause.__cause__ or cause.__context__
    return isinstance(cause, KeyboardInterrupt)
