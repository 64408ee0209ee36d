"""The promoted model of a name: one pointer, `{artifact_root}/promoted/{name}.json`, replaced only by compare-and-swap.

The pointer is what a deployment reads and what warm start continues from. It names the merged models, their
evaluation, the adapters and bases behind them, the run and the time, and the pointers it replaced as a flat list
(`history`, newest first, capped by the promote stage), so the history is one object of bounded size. Locations
under the root are stored relative to it (`stage/key`), so a copied root reads its own outputs; a base named by a
model id stays as it was given. `read_pointer` hands them back absolute, under the root it read, and still reads
the format before (absolute URIs, each replaced pointer nested in `previous`).

Two runs racing to promote must not lose a decision, so every write is conditional on the version that was read:
S3 `If-None-Match: *` for the first pointer and `If-Match: <ETag>` for a replacement (AWS S3 and MinIO honour
both); on a filesystem, a create-only lock file around read, compare and replace, broken when its holder died.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from typing import Any

from blueprint.errors import UserError
from blueprint.stages import registry
from blueprint.store import artifacts, commit_lock, storage

POINTER_DIR = "promoted"
FORMAT = 2
REQUIRED = ("name", "models", "evaluation", "adapters", "base", "shards", "metrics", "promoted_at")
LOCATIONS = ("models", "summarizer", "coder", "evaluation", "adapters", "shards", registry.GATE)  # always stage outputs
MODELS = ("base", "coder_base")  # a stage output, or a model named by its id ("org/name")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LOCK_WAIT_SECONDS = 30.0
LOCK_STALE_SECONDS = 20.0  # a holder keeps the lock for one small read and write: silence this long means it died
OLD_NESTING = 10_000  # recursion allowed while reading a format-1 pointer (its history nested ~1000 deep at most)


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


def _loads(uri: str, data: bytes) -> Any:
    try:
        try:
            return json.loads(data)
        except RecursionError:  # a format-1 pointer after ~990 promotions: each replaced one nested in the next
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(max(limit, OLD_NESTING))
            try:
                return json.loads(data)
            finally:
                sys.setrecursionlimit(limit)
    except (ValueError, RecursionError) as exc:
        raise PointerError(
            f"promoted pointer {uri} is corrupted (not JSON: {exc}); restore it from its history "
            "or delete it to start over"
        ) from None


def _entries(uri: str, pointer: Any) -> list[dict[str, Any]]:
    """The pointer's entries, current first, each checked: the flat `history` list, or a format-1 `previous`
    chain walked without recursion."""
    if not isinstance(pointer, dict):
        raise PointerError(f"promoted pointer {uri} is corrupted: it is not an object")
    if "history" in pointer:
        if not isinstance(pointer["history"], list):
            raise PointerError(f"promoted pointer {uri} is corrupted: its history is not a list")
        entries = [pointer, *pointer["history"]]
    else:
        entries, node = [], pointer
        while node is not None:
            entries.append(node)
            node = node.get("previous") if isinstance(node, dict) else None
    for n, entry in enumerate(entries):
        where = "" if n == 0 else f"its history entry {n} "
        if not isinstance(entry, dict):
            raise PointerError(f"promoted pointer {uri} is corrupted: {where or 'it '}is not an object")
        missing = [k for k in REQUIRED if k not in entry]
        if missing:
            raise PointerError(f"promoted pointer {uri} is corrupted: {where or 'it '}lacks {', '.join(missing)}")
        wrong = [k for k in (*LOCATIONS, *MODELS) if entry.get(k) is not None and not isinstance(entry[k], str)]
        if not isinstance(entry["metrics"], dict):
            wrong.insert(0, "metrics")
        if wrong:
            raise PointerError(
                f"promoted pointer {uri} is corrupted: {where or 'its '}{', '.join(wrong)} "
                f"{'is' if len(wrong) == 1 else 'are'} of the wrong type"
            )
    return entries


def _entry(entry: dict[str, Any], convert) -> dict[str, Any]:
    """One entry without its history, its locations passed through `convert(field, value)`."""
    return {
        k: convert(k, v) if k in LOCATIONS or k in MODELS else v
        for k, v in entry.items()
        if k not in ("history", "previous", "format")
    }


def relative(root: str, uri: str) -> str:
    """`uri` relative to `root` (`stage/key`, `stage/key/sub`) when it lies under it, else unchanged."""
    if not isinstance(uri, str):
        return uri
    for candidate in (uri, "file://" + uri if uri.startswith("/") else None):
        if candidate and candidate.startswith(root + "/"):
            return candidate[len(root) + 1 :]
    return uri


def _resolver(root: str):
    """`convert(field, value)`: a stored reference made absolute under `root` (a base that is not an output of
    this root is a model id, kept)."""
    outputs: dict[str, bool] = {}

    def absolute(field: str, value: Any) -> Any:
        if not isinstance(value, str) or not value or "://" in value or value.startswith("/"):
            return value
        uri = storage.join(root, value)
        if field in MODELS:
            if value not in outputs:
                outputs[value] = storage.exists(artifacts.manifest_uri(uri))
            return uri if outputs[value] else value
        return uri

    return absolute


def read_pointer(root: str, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(pointer, version) of `name`, or (None, None) when nothing was promoted yet. The pointer is the current
    entry with `history` (the replaced ones, newest first), every location absolute under `root`. The version is
    what a replacement must name (`write_pointer`)."""
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
        data, version = reply["Body"].read(), reply["ETag"]
    else:
        path = storage.local_path(uri)
        if not path.exists():
            return None, None
        data = path.read_bytes()
        version = hashlib.sha256(data).hexdigest()
    entries = _entries(uri, _loads(uri, data))
    absolute = _resolver(storage.normalize(root))
    current, *replaced = [_entry(e, absolute) for e in entries]
    return {**current, "history": replaced}, version


def write_pointer(root: str, name: str, pointer: dict[str, Any], expected: str | None) -> None:
    """Replace the pointer of `name` with `pointer` (an entry and its `history` list) if it is still at version
    `expected` (None: if there is none yet); otherwise raise PointerConflict and write nothing. Locations under
    `root` are written relative to it."""
    uri = pointer_uri(root, name)
    root = storage.normalize(root)
    entries = _entries(uri, {**pointer, "history": pointer.get("history") or []})  # never write what reads refuse

    def rel(field: str, value: str) -> str:
        return relative(root, value)

    current, *replaced = [_entry(e, rel) for e in entries]
    stored = {"format": FORMAT, **current, "history": replaced}
    data = (json.dumps(stored, indent=2, sort_keys=True) + "\n").encode()
    if storage.is_s3(uri):
        _write_s3(uri, data, expected)
    else:
        _write_local(uri, data, expected)


def _write_s3(uri: str, data: bytes, expected: str | None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = storage.split_s3(uri)
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        storage._boto_client().put_object(
            Bucket=bucket, Key=key, Body=data, ContentType="application/json", **condition
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey"):
            raise PointerConflict(f"{uri} changed since it was read") from None
        raise storage.StorageError(f"cannot write {uri}: {exc}") from None
    except BotoCoreError as exc:
        raise storage.StorageError(f"cannot write {uri}: {exc}") from None


def _write_local(uri: str, data: bytes, expected: str | None) -> None:
    lock, me = uri + ".lock", commit_lock.writer_identity()
    try:
        commit_lock.acquire(lock, me, wait_seconds=LOCK_WAIT_SECONDS, stale_seconds=LOCK_STALE_SECONDS)
    except commit_lock.LockTimeout:
        raise storage.StorageError(
            f"{lock} was held for {LOCK_WAIT_SECONDS:.0f} s by a live promotion that hangs; retry when it ends"
        ) from None
    try:
        path = storage.local_path(uri)
        current = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
        if current != expected:
            raise PointerConflict(f"{uri} changed since it was read")
        storage.write_bytes(uri, data)
    finally:
        if (commit_lock.read_holder(lock) or {}).get("writer") == me["writer"]:  # not one that judged us dead
            storage.local_path(lock).unlink(missing_ok=True)


def history(pointer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The pointer's entry and every entry it replaced (as far as kept), newest first, none with a history."""
    if not pointer:
        return []
    return [{k: v for k, v in pointer.items() if k != "history"}, *pointer.get("history", [])]
