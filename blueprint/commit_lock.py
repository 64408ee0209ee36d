"""One writer at a time commits a given output prefix: a create-only lock object beside it.

Two runs that compute the same content-addressed key used to clear each other's prefix while the other read or
wrote it. Now a writer takes `{prefix}.lock` with a create-only write (S3 `If-None-Match: *`, which AWS S3,
MinIO and moto honour; `O_EXCL` on a filesystem) before it touches the prefix, and drops it after the manifest.
A writer that finds the lock held waits for the holder's manifest and becomes a cache hit. A lock whose holder
died (same host and its pid is gone, or no refresh for `STALE_SECONDS`) is broken, so a SIGKILLed run's rerun
goes on.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator

from blueprint import storage

STALE_SECONDS = 15 * 60  # a holder refreshes the lock between uploaded files; silence this long means it is dead
POLL_SECONDS = 0.5


class LockTimeout(storage.StorageError):
    """Another writer held the lock for longer than we were willing to wait."""


def lock_uri(prefix: str) -> str:
    return storage.normalize(prefix) + ".lock"


def writer_identity() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "writer": uuid.uuid4().hex[:12], "time": time.time()}


def create_only(uri: str, data: bytes) -> bool:
    """Write `uri` only if nothing is there; True when this call created it."""
    if storage.is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(uri)
        try:
            storage._boto_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                             "ConditionalRequestConflict"):
                return False
            raise storage.StorageError(f"cannot lock {uri}: {exc}") from None
    path = storage.local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _holder_is_dead(holder: dict, now: float) -> bool:
    if now - float(holder.get("time", 0)) > STALE_SECONDS:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def _read_holder(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_text(uri))
    except (storage.StorageError, ValueError):
        return None  # released (or being rewritten) between our two calls


def delete_object(uri: str) -> None:
    """Remove one object or file (absent is fine)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        storage._boto_client().delete_object(Bucket=bucket, Key=key)
    else:
        storage.local_path(uri).unlink(missing_ok=True)


@contextlib.contextmanager
def held(prefix: str, done: Callable[[], bool], wait_seconds: float = 2 * STALE_SECONDS) -> Iterator[Callable | None]:
    """Hold the lock of `prefix` for the block, or yield None once `done()` says another writer committed it.

    Inside the block, call the yielded `refresh()` now and then (between uploads) so nobody takes the lock as dead.
    """
    uri = lock_uri(prefix)
    me = writer_identity()
    deadline = time.monotonic() + wait_seconds
    while not create_only(uri, json.dumps(me).encode()):
        if done():
            yield None
            return
        holder = _read_holder(uri)
        if holder is not None and _holder_is_dead(holder, time.time()):
            delete_object(uri)  # the holder died mid-commit; its partial files are cleared by whoever takes the lock
            continue
        if time.monotonic() > deadline:
            raise LockTimeout(f"{prefix} is being committed by {holder}; waited {wait_seconds:.0f} s")
        time.sleep(POLL_SECONDS)

    def refresh() -> None:
        storage.write_text(uri, json.dumps({**me, "time": time.time()}))

    try:
        yield refresh
    finally:
        delete_object(uri)
