"""Small file utilities shared by every stage: atomic writes, hashing, checked JSON, one-line error details."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tlfeat.errors import TlfeatError


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
