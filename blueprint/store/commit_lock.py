"""One writer at a time commits a given output prefix: a create-only lock object beside it.

Two runs that compute the same content-addressed key used to clear each other's prefix while the other read or
wrote it. Now a writer takes `{prefix}.lock` with a create-only write (S3 `If-None-Match: *`, which AWS S3,
MinIO and moto honour; `O_EXCL` on a filesystem) before it touches the prefix, and drops it after the manifest.
A writer that finds the lock held waits for the holder's manifest and becomes a cache hit. A lock whose holder
died (same host and its pid is gone, or no refresh for `STALE_SECONDS`) is broken, so a SIGKILLed run's rerun
goes on. The promoted pointer's lock and gc's hold on a partial prefix take their locks the same way (`acquire`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

from blueprint.store import storage

STALE_SECONDS = 15 * 60  # a holder refreshes the lock between uploaded files; silence this long means it is dead
POLL_SECONDS = 0.5
T = TypeVar("T")


class LockTimeout(storage.StorageError):
    """Another writer held the lock for longer than we were willing to wait."""


def lock_uri(prefix: str) -> str:
    return storage.normalize(prefix) + ".lock"


def _pid_namespace() -> str:
    """Which pid numbering this process lives in: containers on one host (host network) share its hostname."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def writer_identity() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pidns": _pid_namespace(),
        "pid": os.getpid(),
        "writer": uuid.uuid4().hex[:12],
        "time": time.time(),
    }


def _storage_call(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run one lock operation; any failure is one StorageError naming the lock (a user can act on it)."""
    try:
        return fn()
    except storage.StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore and OS errors alike
        raise storage.StorageError(f"cannot {what} {uri}: {exc}") from None


def create_only(uri: str, data: bytes) -> bool:
    """Write `uri` only if nothing is there; True when this call created it."""
    if storage.is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(uri)

        def put() -> bool:
            try:
                storage._boto_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed",
                    "412",
                    "ConditionalRequestConflict",
                ):
                    return False
                raise

        return _storage_call(uri, "lock", put)

    def create() -> bool:
        path = storage.local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)  # whole before it appears: a crash never leaves an empty lock
        try:
            os.link(tmp, path)  # atomic and create-only
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    return _storage_call(uri, "lock", create)


def holder_is_dead(holder: dict, now: float, stale_seconds: float = STALE_SECONDS) -> bool:
    try:
        silent = now - float(holder.get("time", 0))
    except (TypeError, ValueError):
        return True  # not a time any writer wrote
    if silent > stale_seconds:
        return True
    if holder.get("host") == socket.gethostname() and holder.get("pidns") == _pid_namespace():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError):
            return False
    return False


def read_holder(uri: str) -> dict | None:
    try:
        holder = json.loads(storage.read_text(uri))
    except storage.StorageError:
        return None  # released between our two calls
    except ValueError:
        return {"time": 0}  # not a lock any writer wrote whole: stale at once
    return holder if isinstance(holder, dict) else {"time": 0}


def delete_object(uri: str) -> None:
    """Remove one object or file (absent is fine)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        _storage_call(uri, "delete", lambda: storage._boto_client().delete_object(Bucket=bucket, Key=key))
    else:
        _storage_call(uri, "delete", lambda: storage.local_path(uri).unlink(missing_ok=True))


class LockLost(storage.StorageError):
    """Another writer took our lock (it judged us dead): stop before touching the prefix again."""


def acquire(
    uri: str,
    me: dict,
    *,
    wait_seconds: float,
    stale_seconds: float = STALE_SECONDS,
    done: Callable[[], bool] = lambda: False,
) -> bool:
    """Take the lock `uri` as writer `me`, breaking a dead holder's; False as soon as `done()` says it is no longer
    needed. LockTimeout when a live holder keeps it for `wait_seconds` (0: one try)."""
    deadline = time.monotonic() + wait_seconds
    while not create_only(uri, json.dumps({**me, "time": time.time()}).encode()):  # taken now, however long we waited
        if done():
            return False
        holder = read_holder(uri)
        if holder is not None and holder_is_dead(holder, time.time(), stale_seconds):
            delete_object(uri)  # the holder died holding it; what it left is cleared by whoever takes the lock
            continue
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{uri} is held by {holder}; waited {wait_seconds:.0f} s")
        time.sleep(POLL_SECONDS)
    return True


@contextlib.contextmanager
def held(prefix: str, done: Callable[[], bool], wait_seconds: float = 2 * STALE_SECONDS) -> Iterator[Callable | None]:
    """Hold the lock of `prefix` for the block, or yield None once `done()` says another writer committed it.

    Inside the block, call the yielded `refresh()` before each step that changes the prefix: it checks that the
    lock is still ours (LockLost otherwise) and renews it, so nobody takes a slow writer for a dead one.
    """
    uri = lock_uri(prefix)
    me = writer_identity()
    if not acquire(uri, me, wait_seconds=wait_seconds, done=done):
        yield None
        return

    def refresh() -> None:
        holder = read_holder(uri)
        if holder is None or holder.get("writer") != me["writer"]:
            raise LockLost(f"{prefix}: another writer took the commit lock ({holder}); this commit stops")
        storage.write_text(uri, json.dumps({**me, "time": time.time()}))

    try:
        yield refresh
    finally:
        holder = read_holder(uri)
        if holder is not None and holder.get("writer") == me["writer"]:
            with contextlib.suppress(storage.StorageError):  # never hide the block's own error
                delete_object(uri)
