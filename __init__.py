"""The repository folder of a clone named `tlfeat`, imported as a package: `import tlfeat` run in its parent.

Python searches the current folder first. Without this file it would take the clone for an empty namespace
package and stop there, ahead of an editable install's finder (`tlfeat.load` then fails, and `tlfeat.cache`
is the results folder cache/). This file loads the real package, ./tlfeat/, in its place.
"""

import importlib.util
import sys
from pathlib import Path

if __name__ == "tlfeat":
    _package = Path(__file__).resolve().parent / "tlfeat"
    _spec = importlib.util.spec_from_file_location(
        "tlfeat", _package / "__init__.py", submodule_search_locations=[str(_package)]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["tlfeat"] = _module  # the import statement returns what sys.modules holds once this file ran
    _spec.loader.exec_module(_module)
