"""Seeding Keras for reproducible runs without reseeding the caller's own random streams.

`keras.utils.set_random_seed` seeds Python's `random`, NumPy's global generator
and the backend's. A notebook that fits a head and then draws its own random
numbers would get the head's seed's sequence: these keep the caller's `random`
and `np.random` states as they were (the backend's global seed stays set).
Importing a library for the first time may still draw from them (TensorFlow and
scikit-learn do); that is the library's doing, not a reseed.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np


@contextmanager
def caller_streams_kept() -> Iterator[None]:
    """Restore `random` and `np.random` to their states at entry; also a decorator."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """`keras.utils.set_random_seed(seed)` for the block, the caller's streams kept (a first import of Keras,
    and of TensorFlow with it, draws from both: it happens inside)."""
    with caller_streams_kept():
        import keras

        keras.utils.set_random_seed(seed)
        yield
