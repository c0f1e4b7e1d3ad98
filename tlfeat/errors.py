"""User-facing errors: the CLI prints these as one line and exits non-zero.

Library messages name parameters the way Python callers pass them, in
backquotes: `` `batch_size=0`: must be at least 1 ``, `` pass `overwrite` `` (a flag).
`cli_terms` rewrites those into the CLI's options (``--batch-size 0``,
``--overwrite``), so each audience reads its own names.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Mapping, Sequence

_PARAMETER = re.compile(r"`(\w+)(?:=([^`]*))?`")


class TlfeatError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a notebook's "interrupt kernel") during long work, saying in one line what was kept and
    how to go on. A KeyboardInterrupt, not a TlfeatError: a loop that skips failed inputs with
    `except TlfeatError` (or `except Exception`) must still stop when the user interrupts it."""


def parameter_error(name: str, value: Any, problem: str) -> TlfeatError:
    """A TlfeatError about one parameter's value: "`name=value`: problem"."""
    return TlfeatError(f"`{name}={value!r}`: {problem}")


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int, numpy integers included (a notebook's `np.arange` seed), else one error.

    Floats, strings and bools are refused before any work: they failed deep in a library, or after the work
    when a JSON record of the run could not hold a numpy integer.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise parameter_error(name, value, "must be an integer")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"between {minimum} and {maximum}" if minimum is not None and maximum is not None
                  else f"at least {minimum}" if minimum is not None else f"at most {maximum}")
        raise parameter_error(name, value, f"must be {bounds}")
    return int(value)


# scikit-learn's random_state, NumPy's legacy seeding and `keras.utils.set_random_seed` all take 0..2**32 - 1;
# beyond that they fail deep inside a fit (fit-head skipped every seeded head and exited 0).
MAX_SEED = 2**32 - 1


def seed_value(value: Any) -> int:
    """A `seed` parameter as an int that every library tlfeat seeds accepts, else one error before any work."""
    return integer("seed", value, 0, MAX_SEED)


def number(name: str, value: Any, low: float | None = None, high: float | None = None, what: str = "") -> float:
    """`value` as a Python float (ints and numpy numbers included) within [low, high], else one error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise parameter_error(name, value, f"must be a finite number{f' ({what})' if what else ''}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low:g} and {high:g}" if low is not None and high is not None
                  else f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise parameter_error(name, value, f"{what + ', ' if what else 'must be '}{bounds}")
    return float(value)


def some_of(names: Sequence[str], shown: int = 3) -> str:
    """The first `shown` names joined for a message, and how many more there are: "a, b, c and 4 more"."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def cli_terms(message: str, options: Mapping[str, str] | None = None) -> str:
    """Rewrite the backquoted parameter mentions (name or name=value) of a library message as CLI options.

    `options` maps parameter names whose option is not simply ``--name-with-dashes`` (e.g. ratios -> --split).
    """
    options = options or {}

    def option(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        flag = options.get(name, "--" + name.replace("_", "-"))
        if value is None or value == "True":
            return flag
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"{flag} {value}"

    return _PARAMETER.sub(option, message)
