"""Small file utilities shared by every stage: atomic writes, hashing, one-line error details."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_exception(exc: BaseException, limit: int = 160) -> str:
    """'ClassName: first line of the message' (cut to `limit`), for one-line errors."""
    lines = str(exc).splitlines()
    detail = lines[0][:limit] if lines else "no detail"
    return f"{exc.__class__.__name__}: {detail}"
