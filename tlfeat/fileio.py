"""Small file utilities shared by every stage: atomic writes, hashing, checked JSON, one-line error details."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tlfeat.errors import TlfeatError


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block ends without error.

    Readers see the old file or the new one, never half of one. The temporary name keeps the suffix
    (Keras insists on ``.keras``) and carries the pid, so a killed writer's leftovers are recognisable.
    `durable` fsyncs the file and its folder, so the rename survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (folders: where the file system allows it)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write `payload` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_exception(exc: BaseException, limit: int | None = 160) -> str:
    """'ClassName: first line of the message' (cut to `limit`), for one-line errors.

    limit=None: the whole message, its lines joined, where the cause sits at the end (a download's reason).
    """
    lines = str(exc).splitlines()
    if limit is None:
        detail = " ".join(line.strip() for line in lines if line.strip()) or "no detail"
    else:
        detail = lines[0][:limit] if lines else "no detail"
    return f"{exc.__class__.__name__}: {detail}"


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding an object; anything else is a one-line error naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TlfeatError(f"{path}: unreadable ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise TlfeatError(f"{path}: not a JSON object")
    return value


def check_format(path: str | Path, document: dict, name: str, version: int, what: str, remedy: str) -> None:
    """Refuse a document that is not tlfeat's `name` format at `version` (what: e.g. "tlfeat head metadata")."""
    if document.get("format") != name:
        raise TlfeatError(f"{path}: not {what} (no format {name!r})")
    if document.get("format_version") != version:
        raise TlfeatError(
            f"{path}: format version {document.get('format_version')!r}, this tlfeat reads version {version}; {remedy}"
        )


class OutputLock:
    """An exclusive lock file ``<out>.lock`` holding the owner's pid.

    A second run on the same output stops at once; a lock left by a process that
    no longer exists is taken over.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(str(out) + ".lock")

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _pid_alive(holder):
                    raise TlfeatError(
                        f"{self.path}: another tlfeat run (pid {holder}) is writing this output; "
                        "wait for it or remove the lock if that process is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return self
        raise TlfeatError(f"{self.path}: could not take the output lock")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        if self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

