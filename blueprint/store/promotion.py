"""The promoted model of a name: one pointer, `{artifact_root}/promoted/{name}.json`, replaced only by compare-and-swap.

The pointer is what a deployment reads and what warm start continues from. It names the merged models, their
evaluation, the adapters and bases behind them, the run and the time, and holds the pointer it replaced, so the
history is one object. Two runs racing to promote must not lose a decision, so every write is conditional on
the version that was read: S3 `If-None-Match: *` for the first pointer and `If-Match: <ETag>` for a replacement
(AWS S3 and MinIO honour both); on a filesystem, a create-only lock file around read, compare and replace.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from blueprint.errors import UserError
from blueprint.store import commit_lock, storage

POINTER_DIR = "promoted"
REQUIRED = ("name", "models", "evaluation", "adapters", "base", "shards", "metrics", "promoted_at")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LOCK_WAIT_SECONDS = 30.0


class PointerError(UserError):
    """A pointer that cannot be read as one: corrupted, or not written by BluePrint."""


class PointerConflict(Exception):
    """The pointer changed between the read and the write: read again and decide again."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise PointerError(f"promotion name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    return name


def pointer_uri(root: str, name: str) -> str:
    return storage.join(storage.normalize(root), POINTER_DIR, f"{check_name(name)}.json")


def _parse(uri: str, data: bytes) -> dict[str, Any]:
    try:
        pointer = json.loads(data)
    except ValueError as exc:
        raise PointerError(f"promoted pointer {uri} is corrupted (not JSON: {exc}); restore it from its 'previous' "
                           "or delete it to start over") from None
    missing = [k for k in REQUIRED if not isinstance(pointer, dict) or k not in pointer]
    if missing:
        raise PointerError(f"promoted pointer {uri} is corrupted: it lacks {', '.join(missing)}")
    return pointer


def read_pointer(root: str, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(pointer, version) of `name`, or (None, None) when nothing was promoted yet. The version is what a
    replacement must name (`write_pointer`)."""
    uri = pointer_uri(root, name)
    if storage.is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = storage.split_s3(uri)
        try:
            reply = storage._boto_client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise storage.StorageError(f"cannot read {uri}: {exc}") from None
        except BotoCoreError as exc:  # no credentials, endpoint unreachable: one line, not a traceback
            raise storage.StorageError(f"cannot read {uri}: {exc}") from None
        data = reply["Body"].read()
        return _parse(uri, data), reply["ETag"]
    path = storage.local_path(uri)
    if not path.exists():
        return None, None
    data = path.read_bytes()
    return _parse(uri, data), hashlib.sha256(data).hexdigest()


def write_pointer(root: str, name: str, pointer: dict[str, Any], expected: str | None) -> None:
    """Replace the pointer of `name` with `pointer` if it is still at version `expected` (None: if there is none
    yet); otherwise raise PointerConflict and write nothing."""
    uri = pointer_uri(root, name)
    data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
    _parse(uri, data)  # never write what read_pointer would refuse
    if storage.is_s3(uri):
        _write_s3(uri, data, expected)
    else:
        _write_local(uri, data, expected)


def _write_s3(uri: str, data: bytes, expected: str | None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = storage.split_s3(uri)
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        storage._boto_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json",
                                          **condition)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey"):
            raise PointerConflict(f"{uri} changed since it was read") from None
        raise storage.StorageError(f"cannot write {uri}: {exc}") from None
    except BotoCoreError as exc:
        raise storage.StorageError(f"cannot write {uri}: {exc}") from None


def _write_local(uri: str, data: bytes, expected: str | None) -> None:
    lock = uri + ".lock"
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while not commit_lock.create_only(lock, json.dumps(commit_lock.writer_identity()).encode()):
        if time.monotonic() > deadline:
            raise storage.StorageError(f"{lock} was held for {LOCK_WAIT_SECONDS:.0f} s: another promotion hangs, "
                                       "or died holding it (delete the lock file)")
        time.sleep(0.05)
    try:
        path = storage.local_path(uri)
        current = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
        if current != expected:
            raise PointerConflict(f"{uri} changed since it was read")
        storage.write_bytes(uri, data)
    finally:
        storage.local_path(lock).unlink(missing_ok=True)


def history(pointer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The pointer and every pointer it replaced, newest first."""
    chain = []
    while pointer:
        chain.append(pointer)
        pointer = pointer.get("previous")
    return chain
