"""TensorFlow's native start-up notes, kept off the terminal without hiding anything else.

Importing TensorFlow 2.16+ prints from C++, before its logging is initialised (so `TF_CPP_MIN_LOG_LEVEL`
cannot hide them, tensorflow/tensorflow#100442), twice because two of its shared libraries log them::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1795718807.346596   14019 port.cc:153] oneDNN custom operations are on. You may see ...
    I0000 00:00:1795718807.474507   14019 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ...
    To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow ...

`install()` (run by `import tlfeat`) makes the first import of tensorflow, whoever triggers it (Keras,
tlfeat or the user's own code), run with file descriptor 2 pointed at a filter process, which passes the
text on to the real stderr without those notes: warnings, errors and tracebacks stay visible, even when
the import kills the process.
Nothing is switched off: oneDNN stays on, so results and speed are TensorFlow's defaults. Setting
TF_CPP_MIN_LOG_LEVEL=0 shows the notes again.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

NOTES = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|I\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] "  # absl's INFO lines (oneDNN banner, CPU features, ...)
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:[\d.]+: I "  # TensorFlow's own INFO lines, older format
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$"
    # CUDA builds: each library registers the CUDA plugins again and complains, harmlessly
    r"|E\d{4} .*Unable to register cu\w+ factory: Attempting to register factory for plugin \w+ when one "
    r"has already been registered$"
)


def without_notes(text: str) -> str:
    """`text` minus the lines TensorFlow's start-up notes consist of."""
    return "".join(line for line in text.splitlines(keepends=True) if not NOTES.match(line.rstrip("\r\n")))


# The filter runs in a child process: if the import kills this one (TensorFlow aborts on a CPU without the
# instructions it was built for, a CUDA library crashes), the child still gets what was written so far,
# its last words included, and prints it. A temporary file replayed afterwards lost them with the process.
_FILTER = (
    "import sys; sys.path.insert(0, sys.argv[1]); from tlfeat.quiet_import import without_notes; "
    "sys.stdout.write(without_notes(sys.stdin.buffer.read().decode(errors='replace'))); sys.stdout.flush()"
)


@contextlib.contextmanager
def native_notes_filtered() -> Iterator[None]:
    """Send what anything in this process writes to fd 2 through a filter process that drops the notes."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a GUI launcher): nothing to keep clean
        yield
        return
    try:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # Its own session: a Ctrl-C at the terminal (sent to the whole foreground group) must not kill the
        # filter, and with it everything written to stderr until the import ends.
        notes_filter = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, package_root],
                                        stdin=subprocess.PIPE, stdout=saved, stderr=saved, start_new_session=True)
    except OSError:  # no new process allowed: the notes show, nothing else changes
        os.close(saved)
        yield
        return
    os.dup2(notes_filter.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()  # Python-level writes made meanwhile go through the filter too
        os.dup2(saved, 2)
        os.close(saved)
        notes_filter.stdin.close()
        notes_filter.wait()  # its lines are out before anything printed after the import


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` inside `native_notes_filtered`."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        uninstall()  # one import: its submodules, and any later import, go the usual way
        # The module keeps its real loader: resources, reloads and introspection never see this wrapper.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with native_notes_filtered():
            self.loader.exec_module(module)


class _QuietTensorflowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the other finders would, and wraps its loader.

    It stays installed until the import itself runs: a look-up that imports nothing (torch asks
    `importlib.util.find_spec("tensorflow")` whether TensorFlow is installed) left the later, real import
    unfiltered.
    """

    def __init__(self) -> None:
        self.finding = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname != "tensorflow" or self.finding:
            return None
        self.finding = True  # the look-up below walks sys.meta_path again, this finder included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Filter the notes out of the first `import tensorflow` of this process (no-op when it already happened,
    or when TF_CPP_MIN_LOG_LEVEL=0 asks for every log line)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    if not any(isinstance(f, _QuietTensorflowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorflowFinder())


def uninstall() -> None:
    """Let `import tensorflow` print everything again."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorflowFinder)]
