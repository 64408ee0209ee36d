"""A pool of fresh-interpreter worker processes: `fn` over tasks, results in order, safe in a threaded parent.

Why not multiprocessing (CPython 3.11):
- "fork" copies a parent that already runs threads (pyarrow I/O pools, OpenMP, tokenizers, jemalloc): a child can
  inherit a mutex that another thread held at the fork and then wait on it forever (the shard stage hung that way);
- "spawn" and "forkserver" re-run the user's main script in every child: `spawn.get_preparation_data` sends
  `init_main_from_path` and the child's `spawn.prepare` runs that file as `__mp_main__` (`set_forkserver_preload`
  only changes what the server imports, not what each child prepares), so a plain script without an
  `if __name__ == "__main__":` guard would re-run its training code in every worker.

Here each worker is a new interpreter started by subprocess (exec right after fork, no Python code between) that
imports `blueprint.data.workers`, never `__main__`, and talks to the parent over its stdin/stdout pipes in
length-prefixed pickle frames. So `fn` and the tasks must pickle by reference: a module-level function (or a
functools.partial of one) in an importable module, as with "spawn".

Frames, parent -> worker: setup (parent's sys.path, pickled fn), then one task per frame; EOF = stop.
Worker -> parent: one (ok, value, traceback text) frame per task, in the order the tasks came.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_HEADER = struct.Struct("<Q")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this very `blueprint` package
# -c rather than -m: sys.path[0] is then exactly this package's root, whatever the worker's working directory holds.
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import blueprint.data.workers as w; w.main()"
_STOP_TIMEOUT_S = 10.0


class WorkerError(RuntimeError):
    """A worker died before it answered, or raised an exception that could not be sent back as itself."""


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame, or None at end of stream (a frame cut short counts as the end: its writer died)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)  # a buffered read returns fewer bytes only at end of stream
    return body if len(body) == size else None


class _Worker:
    """One worker process plus the thread that feeds it. Writes happen off the caller's thread: a worker blocked on
    writing a big result (full pipe) stops reading its tasks, and the caller must stay free to read that result."""

    def __init__(self, setup: bytes, index: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, _PACKAGE_ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
        )
        self._inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._inbox.put(setup)
        self._feeder = threading.Thread(target=self._feed, name=f"blueprint-worker-feed-{index}", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        """Send queued frames until None; then close stdin, which tells the worker to exit."""
        stdin = self.proc.stdin
        try:
            while (payload := self._inbox.get()) is not None:
                write_frame(stdin, payload)
        except (OSError, ValueError):
            pass  # the worker died or was stopped: result() reports it
        finally:
            try:
                stdin.close()
            except (OSError, ValueError):
                pass

    def submit(self, payload: bytes) -> None:
        self._inbox.put(payload)

    def result(self) -> Any:
        """The answer to the oldest unanswered task; its exception re-raised here, or WorkerError if it died."""
        frame = read_frame(self.proc.stdout)
        if frame is None:
            try:
                code: int | str | None = self.proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = "unknown (still running)"
            raise WorkerError(f"worker process {self.proc.pid} exited with code {code} before returning a result")
        ok, value, remote_tb = pickle.loads(frame)
        if ok:
            return value
        raise _remote_error(value, remote_tb)

    def stop(self) -> None:
        """Close its stdin (it exits at EOF, or was terminated already) and reap it."""
        self._inbox.put(None)
        try:
            self.proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._feeder.join(timeout=_STOP_TIMEOUT_S)
        self.proc.stdout.close()


def _remote_error(exc_bytes: bytes | None, remote_tb: str) -> BaseException:
    """The worker's exception as itself, its traceback attached as a note; WorkerError when it does not unpickle."""
    try:
        exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
    except Exception:  # noqa: BLE001 - unpickling runs the exception's own code: anything can fail
        exc = None
    if not isinstance(exc, BaseException):
        return WorkerError(f"a worker process failed:\n{remote_tb}")
    exc.add_note(f"raised in a worker process:\n{remote_tb.rstrip()}")
    return exc


class WorkerPool:
    """`workers` processes running `fn`. A context manager: leaving it normally lets them exit, leaving it on an
    exception (GeneratorExit included: a consumer closed the generator early) terminates them."""

    def __init__(self, fn: Callable[[Any], Any], workers: int):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        setup = pickle.dumps((list(sys.path), pickle.dumps(fn, _PROTOCOL)), _PROTOCOL)  # fails here if fn can't
        self._workers: list[_Worker] = []
        self._closed = False
        try:
            for i in range(workers):
                self._workers.append(_Worker(setup, i))
        except BaseException:
            self.close(kill=True)
            raise

    def map_ordered(self, tasks: Iterable[Any], window: int = 4) -> Iterator[Any]:
        """fn(task) for each task, in input order. Task i goes to worker i % workers and at most `window` tasks wait
        per worker, so a streamed input is never drained ahead. `tasks` is iterated in the caller's thread."""
        pending: collections.deque[_Worker] = collections.deque()
        limit = len(self._workers) * max(1, window)
        for i, task in enumerate(tasks):
            worker = self._workers[i % len(self._workers)]
            worker.submit(pickle.dumps(task, _PROTOCOL))
            pending.append(worker)
            while len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    @property
    def processes(self) -> list[subprocess.Popen]:
        """The worker processes (reaped once the pool is closed)."""
        return [worker.proc for worker in self._workers]

    def close(self, kill: bool = False) -> None:
        """Stop every worker: at once when `kill` (tasks in flight are dropped), else after its queued tasks."""
        if self._closed:
            return
        self._closed = True
        if kill:
            for worker in self._workers:
                worker.proc.terminate()  # all first: terminating one by one would wait for each in turn
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type | None, *_: Any) -> None:
        self.close(kill=exc_type is not None)


# ----- worker side -----


def _claim_pipes() -> tuple[BinaryIO, BinaryIO]:
    """The protocol's own handles on fds 0 and 1; stray reads then see /dev/null and stray prints go to stderr,
    so nothing `fn` prints can corrupt a frame."""
    inp, out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return inp, out


def _failure(exc: BaseException) -> bytes:
    remote_tb = "".join(traceback.format_exception(exc))
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, _PROTOCOL)
    except Exception:  # noqa: BLE001 - pickling runs the exception's own code: anything can fail
        exc_bytes = None
    return pickle.dumps((False, exc_bytes, remote_tb), _PROTOCOL)


def _answer(fn: Callable[[Any], Any], frame: bytes) -> bytes:
    try:
        return pickle.dumps((True, fn(pickle.loads(frame)), ""), _PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - the task's failure is the caller's to raise (an unpicklable result too)
        return _failure(exc)


def main() -> None:
    """Worker entry point: read the setup frame, then answer each task frame in order until EOF."""
    inp, out = _claim_pipes()
    try:
        setup = read_frame(inp)
        if setup is None:
            return
        sys_path, fn_bytes = pickle.loads(setup)
        sys.path[:] = [_PACKAGE_ROOT] + [p for p in sys_path if p != _PACKAGE_ROOT]
        try:
            fn, setup_error = pickle.loads(fn_bytes), None
        except Exception as exc:  # noqa: BLE001 - reported as the answer to every task, so the caller sees why
            fn, setup_error = None, _failure(exc)
        while (frame := read_frame(inp)) is not None:
            write_frame(out, setup_error or _answer(fn, frame))
    except (KeyboardInterrupt, BrokenPipeError):
        pass  # Ctrl-C reaches the whole process group, and the parent is handling it
