"""Decoding ahead of the model: worker processes fill shared uint8 batch buffers, batches come out in order.

Processes, not threads: opening a file, parsing its headers and EXIF and
copying the pixels out of Pillow is Python work that holds the GIL, so a
thread pool stops scaling long before the cores run out;
bench/pipeline_ceiling.py measures both on the same files (BENCHMARKS.md).

A `DecodePool` starts its processes once (fresh interpreters, so neither a
fork of a process running JAX or TensorFlow threads nor a re-import of the
user's script) and serves any number of `iter_batches` calls, one at a time.
Each call maps one shared buffer of `prefetch_batches + 2` batch slots into
every worker; a worker writes each image straight into its row (no per-image
array sent back, no stacking copy) and marks the row done; with each chunk's
answer it sends the SHA-256 of every file's bytes (`DecodedBatch.digests`, what
the cache records per row). A file that fails
yields a zero row and a one-line reason; a worker that dies costs only the
image it was decoding (the first row of its chunk not marked done): a fresh
worker takes its place and the rest of its rows go round again. Memory is the
buffer, however many files there are.
"""

from __future__ import annotations

import atexit
import math
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tlfeat.data.cores import default_workers
from tlfeat.data.decode import decode_into, failure_reason
from tlfeat.errors import TlfeatError, parameter_error

CHUNK = 16  # files per message to a worker: a few messages per batch, and still an even share at the end
AHEAD = 2  # chunks a worker holds at once: it never waits for the next one
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds this tlfeat: the workers import it, whatever their path


@dataclass
class DecodedBatch:
    """One batch of files from `start`: `pixels` row i is file start + i.

    `pixels` is a view into a buffer the pipeline reuses: it stays valid until two
    more batches have been taken (so the model may still read it while the next
    batch is being dispatched); copy it to keep it longer. Rows of failed files are zeros.
    """

    start: int
    pixels: np.ndarray  # (length, size, size, 3) uint8
    ok: list[int]  # rows that hold an image
    failures: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)
    # (length, 32) uint8: the SHA-256 of the bytes each row was decoded from (zeros for failed rows)
    digests: np.ndarray = field(default_factory=lambda: np.zeros((0, 32), dtype=np.uint8))

    @property
    def length(self) -> int:
        return len(self.pixels)


def iter_batches(
    paths: Sequence[str | Path],
    size: int,
    batch_size: int,
    workers: int | None = None,
    prefetch_batches: int = 2,
    pool: DecodePool | None = None,
) -> Iterator[DecodedBatch]:
    """Decode `paths` to (size, size, 3) uint8 RGB, `batch_size` at a time, in input order.

    Uses `pool`, or a pool of `workers` processes (default: one per available core)
    started for this call; decodes up to `prefetch_batches` batches ahead of the consumer.
    """
    if len(paths) == 0:
        return
    if pool is None:
        with DecodePool(min(workers or default_workers(), len(paths))) as own:
            yield from own.batches(paths, size, batch_size, prefetch_batches)
    else:
        yield from pool.batches(paths, size, batch_size, prefetch_batches)


def bytes_in_flight(batch_size: int, size: int, prefetch_batches: int = 2) -> int:
    """The most memory a run's decoded images take at once: the shared buffer's batch slots (uint8), and
    the batch the model takes in as float32."""
    batch = batch_size * size * size * 3
    return (prefetch_batches + 2) * batch + 4 * batch


_SHARED: list[DecodePool] = []  # at most one


def shared_pool(workers: int | None = None) -> DecodePool:
    """This process's pool of `workers` processes (default: one per core), started once and kept.

    Like a built backbone, it serves the next run at once: only the first pays for starting
    the interpreters. Its processes end with this one.
    """
    size = workers or default_workers()
    if _SHARED and (_SHARED[0].size != size or not _SHARED[0].workers):
        _SHARED.pop().close()
    if not _SHARED:
        _SHARED.append(DecodePool(size))
    return _SHARED[0]


@atexit.register
def _close_shared_pool() -> None:
    """Stop the shared pool's processes as this one exits (without this, Python warns of them still running)."""
    while _SHARED:
        _SHARED.pop().close()


@dataclass(eq=False)  # compared by identity
class _Worker:
    process: subprocess.Popen
    channel: Connection  # pickled messages both ways
    fds: socket.socket  # the same socket, for handing over a buffer's file descriptor
    started: bool = False
    assigned: deque = field(default_factory=deque)  # chunks sent, in the order it decodes them


class DecodePool:
    """Decoding processes, started at once (they load in the background) and reused by every call.

    Close it (or use it as a context manager) to stop them; they also stop when this process ends.
    """

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise parameter_error("workers", workers, "must be at least 1")
        self.size = workers or default_workers()
        self.busy = threading.Lock()
        self.shape: tuple[int, ...] | None = None  # the current run's buffer, handed to every worker
        self.buffer_fd: int | None = None
        self.workers = [self._start_worker() for _ in range(self.size)]

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self.workers:
            worker.channel.close()  # EOF once both of our descriptors are closed: the worker returns
            worker.fds.close()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.workers = []

    def batches(
        self, paths: Sequence[str | Path], size: int, batch_size: int, prefetch_batches: int = 2
    ) -> Iterator[DecodedBatch]:
        """Decode `paths` in order, `batch_size` at a time (see `iter_batches`)."""
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("a DecodePool decodes one sequence of files at a time")
        try:
            run = _Run(self, paths, size, batch_size, prefetch_batches)
            try:
                yield from run.batches()
            finally:
                run.close()
        finally:
            self.busy.release()

    def _start_worker(self) -> _Worker:
        ours, theirs = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {str(PACKAGE_ROOT)!r}); "
                f"from tlfeat.data.batches import _serve; _serve({theirs.fileno()})")
        process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                   stdin=subprocess.DEVNULL)
        theirs.close()  # the child's end: closing ours lets each side see the other's death as EOF
        worker = _Worker(process, Connection(os.dup(ours.fileno())), ours)
        if self.buffer_fd is not None:
            self._attach(worker)
        return worker

    def _attach(self, worker: _Worker) -> None:
        """Hand the current buffer to a worker: its shape as a message, then its descriptor."""
        worker.channel.send(("buffer", self.shape))
        socket.send_fds(worker.fds, [b"b"], [self.buffer_fd])

    def _replace(self, worker: _Worker) -> str:
        """Start a worker in place of one that died; returns why it died."""
        code = worker.process.wait()
        cause = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if not worker.started:
            raise TlfeatError(f"a decoding worker process could not start ({cause})")
        worker.channel.close()
        worker.fds.close()
        self.workers[self.workers.index(worker)] = self._start_worker()
        return cause


def _serve(fd: int) -> None:
    """A decoding process: takes buffers and (slot, first row, paths) chunks; answers per chunk; ends at EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes our socket
    channel, fds = Connection(os.dup(fd)), socket.socket(fileno=fd)
    try:
        channel.send(None)  # started: a process that dies before this could not start at all
    except (BrokenPipeError, ConnectionResetError):  # the parent ended while we loaded: nothing to decode
        return
    pixels = done = None
    while True:
        try:
            message = channel.recv()
        except (EOFError, ConnectionResetError):  # the parent stopped or died (reset: with our message unread)
            return
        if message[0] == "buffer":
            shape = message[1]
            _, (buffer_fd,), _, _ = socket.recv_fds(fds, 1, 1)
            pixels, done = _views(mmap.mmap(buffer_fd, _nbytes(shape)), shape)
            os.close(buffer_fd)  # the mapping keeps the memory
            continue
        slot, first, chunk = message
        failures, digests = [], bytearray(32 * len(chunk))  # SHA-256 of each file's bytes, zeros if it failed
        for k, (row, path) in enumerate(enumerate(chunk, first)):
            try:
                digests[32 * k : 32 * k + 32] = decode_into(path, pixels[slot, row])
            except Exception as exc:  # a decoder bug too costs its image, not the run
                failures.append((row, failure_reason(exc)))
                pixels[slot, row] = 0
            done[slot, row] = 1
        try:
            channel.send((slot, first, len(chunk), failures, bytes(digests)))
        except (BrokenPipeError, ConnectionResetError):  # the parent died while we decoded
            return


def _nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) + math.prod(shape[:2])


def _views(buffer: mmap.mmap, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The pixel rows (slot, row, size, size, 3) and their done flags (slot, row) of one shared buffer."""
    pixels = np.frombuffer(buffer, dtype=np.uint8, count=math.prod(shape)).reshape(shape)
    done = np.frombuffer(buffer, dtype=np.uint8, offset=pixels.nbytes).reshape(shape[:2])
    return pixels, done


def _anonymous_file(nbytes: int) -> int:
    """A descriptor of `nbytes` of shared memory with no name: nothing is left behind however processes end."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tlfeat-decode")
    else:
        with tempfile.TemporaryFile() as handle:  # already unlinked
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, nbytes)
    return fd


class _Run:
    """One `batches` call: its buffer, and a feeder thread that keeps the pool's workers busy."""

    def __init__(self, pool: DecodePool, paths: Sequence[str | Path], size: int, batch_size: int, prefetch: int) -> None:
        self.pool, self.paths, self.batch_size = pool, paths, batch_size
        # The workers live on across calls, in the folder they started in: a relative path is sent whole, as it
        # reads from the caller's working folder now (a notebook may have changed it since).
        self.cwd = os.getcwd()
        self.n_batches = math.ceil(len(paths) / batch_size)
        slots = min(prefetch + 2, self.n_batches)
        rows = min(batch_size, len(paths))
        pool.shape = (slots, rows, size, size, 3)
        pool.buffer_fd = _anonymous_file(_nbytes(pool.shape))
        # The mapping lives as long as the arrays that view it, even past the end of the run.
        self.pixels, self.done = _views(mmap.mmap(pool.buffer_fd, _nbytes(pool.shape)), pool.shape)
        self.digests = np.zeros((slots, rows, 32), dtype=np.uint8)  # filled from the workers' answers
        for worker in list(pool.workers):
            try:
                pool._attach(worker)
            except OSError:  # it died since the last run: a fresh one (handed the buffer as it starts)
                pool._replace(worker)
        self.chunk = max(1, min(CHUNK, math.ceil(rows / pool.size)))
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self.free.put(slot)
        self.ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        reader, writer = os.pipe()
        self.wake_reader, self.wake_writer = Connection(reader, writable=False), Connection(writer, readable=False)
        self.stopping = False
        self.pending: deque[tuple[int, int, list[str]]] = deque()  # (slot, first row, paths) not yet sent
        self.remaining: dict[int, int] = {}  # slot -> rows not yet decoded
        self.failures: dict[int, list[tuple[int, str]]] = {}
        self.feeder = threading.Thread(target=self._feed, name="tlfeat-decode-feeder", daemon=True)
        self.feeder.start()

    def batches(self) -> Iterator[DecodedBatch]:
        held: deque[int] = deque()
        for index in range(self.n_batches):
            if len(held) == 2:  # the consumer is done with the batch before last
                self.free.put(held.popleft())
                self.wake_writer.send_bytes(b"")
            item = self.ready.get()
            if isinstance(item, BaseException):
                raise item
            slot, failures = item
            start = index * self.batch_size
            length = min(self.batch_size, len(self.paths) - start)
            failed = {row for row, _ in failures}
            held.append(slot)
            yield DecodedBatch(start, self.pixels[slot, :length], [i for i in range(length) if i not in failed],
                               sorted(failures), self.digests[slot, :length].copy())

    def close(self) -> None:
        """Stop feeding and wait for the chunks still out (a few images), so the next run starts clean."""
        self.stopping = True
        self.wake_writer.send_bytes(b"")
        self.feeder.join()
        for worker in list(self.pool.workers):
            while worker.assigned and self._receive(worker):
                if worker.assigned:
                    wait([worker.channel])
            if worker.assigned:  # it died: start another; nothing of this run is waiting for it
                self.pool._replace(worker)
        self.wake_reader.close()
        self.wake_writer.close()
        os.close(self.pool.buffer_fd)
        self.pool.buffer_fd = self.pool.shape = None

    def _feed(self) -> None:
        try:
            self._feed_loop()
        except BaseException as exc:  # handed to the consumer, raised there
            self.ready.put(exc)

    def _feed_loop(self) -> None:
        order: deque[int] = deque()  # slots in batch order, until handed over
        next_batch = 0
        while not self.stopping and (order or next_batch < self.n_batches):
            while next_batch < self.n_batches and not self.free.empty():
                slot = self.free.get()
                start = next_batch * self.batch_size
                batch = [os.path.join(self.cwd, p) for p in self.paths[start : start + self.batch_size]]
                self.done[slot] = 0
                self.digests[slot] = 0
                self.remaining[slot], self.failures[slot] = len(batch), []
                order.append(slot)
                self.pending.extend((slot, first, batch[first : first + self.chunk])
                                    for first in range(0, len(batch), self.chunk))
                next_batch += 1
            for worker in self.pool.workers:
                while self.pending and len(worker.assigned) < AHEAD:
                    try:
                        worker.channel.send(self.pending[0])
                    except OSError:  # it died: its socket says so below
                        break
                    worker.assigned.append(self.pending.popleft())
            while order and self.remaining[order[0]] == 0:  # hand over finished batches, in order
                slot = order.popleft()
                self.ready.put((slot, self.failures.pop(slot)))
            if not order and next_batch == self.n_batches:
                break
            by_channel = {worker.channel: worker for worker in self.pool.workers}
            for ready in wait([*by_channel, self.wake_reader]):
                if ready is self.wake_reader:
                    self.wake_reader.recv_bytes()
                elif not self._receive(by_channel[ready]):
                    self._requeue(by_channel[ready])

    def _receive(self, worker: _Worker) -> bool:
        """Take every message the worker has sent; False once it has died."""
        try:
            while worker.channel.poll():
                message = worker.channel.recv()
                if message is None:
                    worker.started = True
                    continue
                slot, first, count, failed, digests = message
                self.digests[slot, first : first + count] = np.frombuffer(digests, dtype=np.uint8).reshape(count, 32)
                worker.assigned.popleft()
                self.remaining[slot] -= count
                self.failures[slot].extend(failed)
        except (EOFError, OSError):  # its end of the socket closed: it died
            return False
        return True

    def _requeue(self, worker: _Worker) -> None:
        """A worker died: the image it was decoding fails, its other rows go round again."""
        cause = self.pool._replace(worker)
        retry, blamed = [], False
        for slot, first, chunk in worker.assigned:
            undone = [] if blamed else [k for k in range(len(chunk)) if not self.done[slot, first + k]]
            if not undone:  # rows it finished but never reported go round again: their reasons are lost
                retry.append((slot, first, chunk))
                continue
            blamed, culprit = True, undone[0]  # it decodes in order: the first row not done killed it
            self.pixels[slot, first + culprit] = 0
            self.failures[slot].append((first + culprit, f"the decoding process died on this file ({cause})"))
            self.remaining[slot] -= 1
            retry += [(slot, first, chunk[:culprit]), (slot, first + culprit + 1, chunk[culprit + 1 :])]
        self.pending.extendleft(reversed([task for task in retry if task[2]]))
