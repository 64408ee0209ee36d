"""Corpus files on S3, read where they are: object listings (key, size, ETag) and row streams that never hold a
whole file.

A corpus bigger than a pod's disk cannot be copied in first, so `parquet:`/`jsonl:`/`csv:` and `dir:` sources that
name an `s3://` prefix are listed here and streamed through pyarrow (Parquet row groups, JSON lines, CSV blocks);
`datasets` is not involved. Listings come from boto3 `list_objects_v2` because it gives each object's ETag in the
same page as its size: ETag changes with the content, so it goes into the source fingerprint, and the cache key of
the shards changes exactly when an object does. A tree's source file is read whole by one GET conditional on
its listed ETag (If-Match): one replaced since the listing is listed again and read as it is now, and the index
records the ETag of the bytes read. Failures are raised as storage.StorageError with storage's own
diagnosis (missing bucket, denied, no credentials, no answer); the source adds its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import glob
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

import pyarrow as pa

from blueprint.store import storage

EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl", "csv": ".csv"}  # what a bare prefix lists, per kind
BATCH_ROWS = 64  # rows decoded at a time: code files average a few KB, the largest kept is max_file_bytes
READ_BUFFER = 1 << 20  # bytes per request when streaming JSON lines and CSV


@dataclasses.dataclass(frozen=True)
class RemoteObject:
    uri: str  # s3://bucket/key
    rel_path: str  # key below the listed prefix ("" for the object the prefix names itself)
    size: int
    etag: str  # changes when the content does (an MD5 for single-part uploads)


def _page_through(bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object whose key starts with `prefix`, as list_objects_v2 returns them (key order)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        pages = storage._boto_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj for page in pages for obj in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as exc:  # as OSError, so storage diagnoses it (bucket, credentials, timeout)
        raise OSError(str(exc)) from exc


def list_below(uri: str) -> list[RemoteObject]:
    """The object `uri` names, or every object below it as a folder (`s3://b/data` lists `data/...`, never
    `data2/...`), sorted by key."""
    bucket, key = storage.split_s3(uri)
    folder = key.rstrip("/") + "/" if key.strip("/") else ""
    prefix = folder if key.endswith("/") or not folder else key  # a name without '/' may be one object
    found = storage._call(uri, "list", lambda: _page_through(bucket, prefix))
    objects = [
        RemoteObject(
            f"s3://{bucket}/{o['Key']}", o["Key"][len(folder) :], int(o["Size"]), str(o.get("ETag", "")).strip('"')
        )
        for o in found
        if o["Key"] == key or o["Key"].startswith(folder)
    ]
    return sorted((o for o in objects if not o.uri.endswith("/")), key=lambda o: o.uri)  # "folder/" markers


def list_data_files(uri: str, kind: str) -> list[RemoteObject]:
    """The files of a `kind` source at `uri`: the keys matching a glob (fnmatch on the whole key, so `*` also
    crosses '/'), or every `.kind` file below a prefix, or the one object a key names; sorted by key."""
    bucket, key = storage.split_s3(uri)
    if glob.has_magic(key):
        fixed = key[: min(key.find(c) for c in "*?[" if c in key)]
        base = f"s3://{bucket}/{fixed[: fixed.rfind('/') + 1]}"
        return [o for o in list_below(base) if fnmatch.fnmatchcase(o.uri[len(f"s3://{bucket}/") :], key)]
    return [o for o in list_below(uri) if o.rel_path == "" or o.rel_path.endswith(EXTENSIONS[kind])]


def _open(obj: RemoteObject, random_access: bool):
    fs, path = storage.filesystem(obj.uri)
    if random_access:
        return storage._call(obj.uri, "open", lambda: fs.open_input_file(path))
    return storage._call(obj.uri, "open", lambda: fs.open_input_stream(path, buffer_size=READ_BUFFER))


def _parquet_rows(obj: RemoteObject, columns: list[str], code_column: str) -> Iterator[dict[str, Any]]:
    """Rows one batch at a time (a row group is the most pyarrow holds), only the columns the source uses when the
    code column is there (else all, so the missing-column message can list them)."""
    import pyarrow.parquet as pq

    with _open(obj, random_access=True) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        wanted = [c for c in names if c in columns] if code_column in names else None
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted, use_threads=False):
            yield from batch.to_pylist()


def _jsonl_rows(obj: RemoteObject) -> Iterator[dict[str, Any]]:
    with _open(obj, random_access=False) as stream:
        for number, line in enumerate(io.BufferedReader(stream, READ_BUFFER), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise storage.StorageError(f"cannot read {obj.uri}: line {number} is not a JSON object")
            yield row


def _csv_rows(obj: RemoteObject, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows block by block; the text columns stay strings (a column of digits is not turned into numbers) and an
    empty field is null, as the `datasets` CSV reader gives it for local files."""
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=True)
    with _open(obj, random_access=False) as stream:
        reader = pcsv.open_csv(
            stream, parse_options=pcsv.ParseOptions(newlines_in_values=True), convert_options=convert
        )
        for batch in reader:
            yield from batch.to_pylist()


def rows(objects: Iterable[RemoteObject], kind: str, columns: list[str], code_column: str) -> Iterator[dict]:
    """The rows of every object in turn. `columns`: those the source reads (code, summary, language, ...)."""
    for obj in objects:
        if kind == "parquet":
            stream = _parquet_rows(obj, columns, code_column)
        elif kind == "jsonl":
            stream = _jsonl_rows(obj)
        else:
            stream = _csv_rows(obj, columns)
        try:
            yield from stream
        except (OSError, pa.ArrowException) as exc:  # a broken or foreign file, or the connection dropped
            raise storage.StorageError(f"cannot read {obj.uri}: {exc}") from None


READ_ATTEMPTS = 3  # conditional reads of an object that keeps changing under its reader, before a user error


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, pid: int):
    """One boto3 client per endpoint and process (making one costs more than a small GET)."""
    return storage._boto_client()


def _get_if_match(uri: str, etag: str, limit: int | None = None) -> bytes | None:
    """The object's bytes (at most `limit + 1` of them) if its ETag is still `etag` (one conditional GET: S3
    serves one version whole), else None (412: it was replaced since that ETag was seen)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = storage.split_s3(uri)

    def get() -> bytes | None:
        try:
            client = _client(storage.endpoint_url(), os.getpid())
            answer = client.get_object(Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
            with contextlib.closing(answer["Body"]) as body:  # closed early: the rest is never transferred
                return body.read() if limit is None else body.read(limit + 1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return None
            raise OSError(str(exc)) from exc  # as OSError, so storage diagnoses it (missing, denied, no answer)
        except BotoCoreError as exc:
            raise OSError(str(exc)) from exc

    return storage._call(uri, "read", get)


def _listed_etag(uri: str) -> str:
    """The object's ETag as a listing gives it now (the object was replaced, or deleted: then a StorageError)."""
    found = [o.etag for o in list_below(uri) if o.uri == uri]
    if not found:
        raise storage.StorageError(f"cannot read {uri}: it was deleted after the source was listed")
    return found[0]


def read_object(uri: str, etag: str, limit: int | None = None) -> tuple[bytes, str]:
    """One whole object (a source file) and the ETag of the bytes read; with `limit`, no more than `limit + 1`
    bytes (more than `limit` says "too large", whatever size the listing gave). It is read only while its ETag is
    `etag` (the listing's); an object replaced since is listed again and read as it is now, so what the index
    records is what was read. An object that changes at every try is a StorageError naming it."""
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            etag = _listed_etag(uri)
        data = _get_if_match(uri, etag, limit)
        if data is not None:
            return data, etag
    raise storage.StorageError(
        f"cannot read {uri}: it was replaced before each of {READ_ATTEMPTS} read(s) could "
        "finish; run again once nothing writes to it"
    )


HUB_SPECIAL_REFS = re.compile(r"^refs/(convert/\w+|pr/\d+)$")  # the hub's own refs, kept unquoted


def hub_files_url(dataset_id: str, pattern: str, revision: str | None) -> str:
    """`hf://datasets/ID@REV/PATTERN`, the hub's files streamed as they are at `revision`. A revision with a '/'
    is quoted (a branch `my/branch` -> `my%2Fbranch`), except the hub's own refs (`refs/convert/parquet`,
    `refs/pr/N`), which its URL parser expects as they are."""
    if not revision:
        return f"hf://datasets/{dataset_id}/{pattern}"
    rev = revision if HUB_SPECIAL_REFS.match(revision) else quote(revision, safe="")
    return f"hf://datasets/{dataset_id}@{rev}/{pattern}"
