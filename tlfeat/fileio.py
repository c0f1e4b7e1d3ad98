"""Small file utilities shared by every stage: atomic writes, hashing, checked JSON, one-line error details."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from tlfeat.errors import TlfeatError, parameter_error


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block ends without error.

    Readers see the old file or the new one, never half of one. The temporary name keeps the suffix
    (Keras insists on ``.keras``) and carries the pid, so a killed writer's leftovers are recognisable.
    `durable` fsyncs the file and its folder, so the rename survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(path))
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_name(path: Path, pid: int | str | None = None) -> str:
    """The name `atomic_path` writes `path` under first: hidden, with the writer's pid, suffix kept."""
    return f".{path.stem}.tmp-{os.getpid() if pid is None else pid}{path.suffix}"


# Linux pids have at most 7 digits (pid_max <= 4194304): the longest temporary name a writer can use.
_LONGEST_PID = 9_999_999


def check_output_path(out: Path, folder: bool = False, parameter: str = "out", suffix: str | None = None) -> None:
    """Refuse, before any work, an output file (or with `folder`, an output folder) that cannot be
    written: under a file, the wrong kind of thing already there, in a folder this process may not write
    (read-only or not permitted), a file name the file system cannot hold (the temporary name is the
    longest), or a folder squatting on its lock name. `parameter`: the one that named `out`. `suffix`
    (".csv", ".png", ...): an existing file is replaced only if it has that suffix, so a slip of the
    command line (`--csv photo.jpg`) never overwrites an image, a cache or anything else."""
    out = Path(out)
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if existing == out:
        if folder and not out.is_dir():
            raise TlfeatError(f"{out}: is a file; `{parameter}` needs a folder")
        if not folder and out.is_dir():
            raise TlfeatError(f"{out}: is a folder; `{parameter}` needs a file path such as {out / 'output'}")
        if suffix is not None and not folder and out.suffix.lower() != suffix:
            raise TlfeatError(f"{out}: exists and is not a {suffix} file; `{parameter}` replaces only a {suffix} "
                              "file: give a new name")
        existing = out if folder else out.parent
    elif not existing.is_dir():
        raise TlfeatError(f"{out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise TlfeatError(f"{out}: cannot write here ({os.strerror(errno.EROFS if read_only else errno.EACCES)})")
    if folder:
        return
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = len(os.fsencode(temporary_name(out, _LONGEST_PID)))
    if longest > name_max:
        raise TlfeatError(
            f"{out}: file name too long for this file system ({len(os.fsencode(out.name))} bytes, and the "
            f"temporary name written first takes {longest}; the limit is {name_max}): choose a shorter `{parameter}`"
        )
    lock = Path(str(out) + ".lock")
    if lock.is_dir():
        raise TlfeatError(f"{lock}: is a folder; it is the lock of this output: move it away")


def path_value(name: str, value: Any) -> Path:
    """Parameter `name`, one path (a str or an os.PathLike such as a Path), as a Path; anything else (a list, a
    number, a result object) is one error naming the parameter, before any work."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise parameter_error(name, value, "expected a path (a str or a Path)")


def path_list(value: str | os.PathLike | Sequence[str | os.PathLike], name: str, what: str) -> list:
    """Parameter `name` as a non-empty list: one path (a str or a Path) is a list of one, so that a notebook's
    `f("a.h5")` means the file, never its letters. `what`: what the parameter holds, for the messages."""
    if isinstance(value, (str, os.PathLike)):
        return [value]
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(item, (str, os.PathLike)) for item in items):
        raise parameter_error(name, value, f"expected a path or a list of paths ({what})")
    if not items:
        raise parameter_error(name, items, f"give at least one ({what})")
    return items


def check_outside_dataset(out: Path, dataset_root: str | Path | None, parameter: str = "out") -> None:
    """Refuse an output inside the dataset folder `dataset_root` (None: not known): the next scan would
    take its folder for a class of images. `parameter`: the one that named `out`, for the message."""
    if dataset_root and Path(out).resolve().is_relative_to(Path(dataset_root).resolve()):
        raise TlfeatError(
            f"{out}: inside the dataset folder {dataset_root}, where the next scan would take it for a class; "
            f"tlfeat never writes there: pass `{parameter}` elsewhere (or run from outside the dataset)"
        )


def no_space(exc: BaseException) -> bool:
    """A full disk or quota, however it was reported (h5py puts errno 28 in its message, not in errno)."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)


def os_reason(exc: BaseException) -> str:
    """The one-line cause of a failed file operation."""
    if no_space(exc):
        return "no space left on the device"
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [exc.__class__.__name__])[0]
    return reason[:160]


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse to start writing `what` (about `need` bytes) into `folder` when the file system has less free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < need:
        raise TlfeatError(
            f"{folder}: writing {what} needs about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free: free space first"
        )


def remove_stale_temporaries(path: Path) -> None:
    """Delete half-written files that a killed writer left beside `path` (call while holding its lock)."""
    path = Path(path)
    for leftover in path.parent.glob(temporary_name(path.with_name(glob.escape(path.name)), pid="*")):
        leftover.unlink(missing_ok=True)


class FirstErrorSink:
    """A binary file for HDF5 (h5py's file-object driver) whose writes never fail in HDF5's sight.

    A write failing inside HDF5 (a full disk) leaves the library holding a broken file that segfaults the
    interpreter when it is collected or at exit. Here the first OSError is kept in `error`; that write and
    every later one are held in memory instead, and reads see them, so HDF5 stays consistent and closes
    cleanly. The caller stops writing as soon as `error` is set (what is held is then one chunk and the
    metadata written on closing), raises it, and deletes the file. Any other exception in a write (a
    KeyboardInterrupt) is kept the same way: escaping into HDF5 it would be swallowed, and the file
    committed without the data.
    """

    def __init__(self, raw: Any) -> None:
        self.raw, self.error = raw, None  # raw: unbuffered (FileIO), so nothing is left to flush on closing
        self._pos = 0
        self._held: list[tuple[int, bytes]] = []  # (offset, bytes) written after the error, in order

    def write(self, data: Any) -> int:
        view, done = memoryview(data).cast("B"), 0
        if self.error is None:
            try:
                self.raw.seek(self._pos)
                while done < len(view):  # h5py ignores short writes: finish them here
                    done += self.raw.write(view[done:]) or 0
            except BaseException as exc:  # h5py would swallow it (even a KeyboardInterrupt) and write on
                self.error = exc
        if done < len(view):
            self._held.append((self._pos + done, bytes(view[done:])))
        self._pos += len(view)
        return len(view)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        self.raw.seek(self._pos)
        got = self.raw.readinto(view) or 0
        view[got:] = bytes(len(view) - got)  # past the end of the file: zeros, as HDF5 expects
        for offset, data in self._held:
            low, high = max(offset, self._pos), min(offset + len(data), self._pos + len(view))
            if low < high:
                view[low - self._pos : high - self._pos] = data[low - offset : high - offset]
        self._pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self._end() - self._pos) if size < 0 else size)
        self.readinto(buffer)
        return bytes(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset + (0, self._pos, self._end())[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self.raw.truncate(size)
            except BaseException as exc:  # as in `write`
                self.error = exc
        return size

    def flush(self) -> None:
        pass  # nothing buffered: `raw` is unbuffered and the held writes are discarded with the file

    def _end(self) -> int:
        return max([os.fstat(self.raw.fileno()).st_size] + [offset + len(data) for offset, data in self._held])


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
        detail = lines[0] if lines else "no detail"
        if len(detail) > limit:  # cut at a word, and say so: "... or Orba)" read as the whole message
            detail = detail[: detail.rfind(" ", 0, limit) if " " in detail[:limit] else limit] + " ..."
    return f"{exc.__class__.__name__}: {detail}"


def shown_path(path: str | os.PathLike) -> str:
    """A path (or any text holding paths) as text to print or write: bytes that are not UTF-8 as \\xNN (the OS
    hands such names over as surrogates, which cannot be written as UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def one_line_path(path: str | os.PathLike) -> str:
    """`shown_path` with tabs, newlines and other control characters escaped (\\t, \\n, \\xNN), and a
    backslash doubled so that the escapes read back: a path in tab-separated output stays one field of one
    line."""
    return "".join(_ONE_LINE.get(ch, ch) for ch in os.fsdecode(path))


_ONE_LINE = (
    {chr(code): f"\\x{code:02x}" for code in [*range(32), 127]}
    | {chr(0xDC00 + byte): f"\\x{byte:02x}" for byte in range(0x80, 0x100)}  # bytes that are not UTF-8
    | {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}
)


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
    """One writer per output: an OS-level exclusive lock (flock) on ``<out>.lock``.

    The kernel drops the lock when its holder dies, however it dies (a SIGKILLed run
    still waiting to be reaped as a zombie included), so a leftover lock file never
    blocks anyone; a second live run stops at once. The file's text ("pid N on host
    H") only names the holder in that message. Reusable for any output path: a
    cache file, a head folder, a fine-tune run folder.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(str(out) + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl  # POSIX only; imported here so that the rest of tlfeat imports anywhere
        except ImportError:
            raise TlfeatError(f"{self.path}: output locks need a POSIX system (no fcntl here)") from None
        for _ in range(10):  # the holder may unlink the file between our open and our flock: open again
            fd = _open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise TlfeatError(
                    f"{self.path}: another tlfeat run ({holder}) is writing this output; wait for it to finish"
                ) from None
            if _is_current(fd, self.path):
                self._fd = fd
                self._record_holder()
                return self
            os.close(fd)
        raise TlfeatError(f"{self.path}: could not take the output lock (the file kept being replaced)")

    def _record_holder(self) -> None:
        try:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as exc:
            self.__exit__()  # no empty lock left behind
            raise TlfeatError(f"{self.path}: cannot write the output lock ({os_reason(exc)})") from None

    def holder(self) -> str | None:
        """Who holds this lock now ("pid N on host H"), or None when no live process does.

        Probes with a shared lock released at once and never creates the file, so a reader (compare) can tell a
        run still writing its output from one that was killed.
        """
        try:
            import fcntl
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except (ImportError, OSError):  # no lock file: nobody holds it; no fcntl: nothing to tell
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(fd)
        finally:
            os.close(fd)  # also drops the shared lock, if it was taken
        return None

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a run waiting on this file sees it replaced
        finally:
            os.close(self._fd)
            self._fd = None


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except IsADirectoryError:
        raise TlfeatError(f"{path}: is a folder; it is the lock of this output: move it away") from None
    except OSError as exc:  # a read-only folder, no permission, a full disk (creating the file)
        raise TlfeatError(f"{path.parent}: cannot write here ({os_reason(exc)}): no output lock {path.name}") from None


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.startswith("pid ") else "a process that has not written its pid yet"


def _is_current(fd: int, path: Path) -> bool:
    """True when `path` still names the file open as `fd`."""
    try:
        mine, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)
