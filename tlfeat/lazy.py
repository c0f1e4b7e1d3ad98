"""A package's public names imported on first use (PEP 562), so that importing the package, or one of its
modules for a constant, does not import everything its names need.

Only for names that are not also the names of the package's modules: importing a module binds its name
on the package, hiding a lazy name of the same spelling.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(
    package: str, attributes: dict[str, tuple[str, str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`: each public name -> (module, attribute), resolved once."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in attributes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = attributes[name]
        value = getattr(importlib.import_module(module), attribute)
        namespace[name] = value  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *attributes])

    return __getattr__, __dir__
