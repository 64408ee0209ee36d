"""One URI layer for local paths, `file://` and `s3://bucket/prefix`.

S3 goes through pyarrow.fs (the data plane: reads, writes, listings, Parquet) and boto3 (bucket checks that turn
an opaque failure into one clear message). The endpoint comes from `AWS_ENDPOINT_URL` (MinIO, any S3-compatible
store); credentials come from the standard AWS environment/profile chain and are never taken as arguments, so
they cannot end up in logs, manifests or compiled pipelines.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from blueprint.errors import UserError

T = TypeVar("T")

# Time limits on every S3 request. A frozen endpoint (TCP accepted, nothing answers) costs one request
# CLIENT_ATTEMPTS x READ_TIMEOUT; only the clients retry timeouts, so that is also what it costs one _call.
CONNECT_TIMEOUT = 5  # s to open a connection
READ_TIMEOUT = 10  # s a request may go without receiving a byte (a stall limit, not a cap on long transfers)
CLIENT_ATTEMPTS = 2  # tries per request inside pyarrow and boto3, the only layer that retries a timeout
ANSWER_LIMIT = CLIENT_ATTEMPTS * READ_TIMEOUT
CALL_DEADLINE = 30  # s after which _call starts no new attempt
RETRIES = 3  # _call attempts for transient S3 errors (never timeouts), within CALL_DEADLINE
_PERMANENT_MARKERS = (
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "Forbidden",
    "NoSuchKey",
    "Path does not exist",
    "not found",
    "403",
    "404",
)


class StorageError(UserError, RuntimeError):
    """A storage operation failed; the message names the URI and says why."""


_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)")
CREDENTIALS_REFUSED = (
    "credentials in a URI are refused; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a Kubernetes secret"
)


def _redacted(uri: str, start: int) -> str:
    """`uri` with everything from `start` to its last '@' starred (all of it when there is no '@')."""
    at = uri.rfind("@")
    return uri[:start] + "***" + (uri[at:] if at >= start else "")


def refuse_credentials(uri: str, setting: str | None = None) -> str:
    """`uri` unchanged, or a StorageError when it carries `user[:password]@`: a URI lands in logs, manifests and
    compiled pipelines, so a key in it leaks. The message never repeats the userinfo.

    For s3:// a ':' in the bucket is refused too: no bucket name holds one, but KEY:SECRET does when the
    secret contains a '/' (which AWS secrets may), and then the '@' lands in what looks like the key.
    """
    uri = str(uri)
    m = _AUTHORITY.match(uri)
    if m is None:
        return uri
    scheme, authority = m.groups()
    if "@" in authority or (scheme.lower() == "s3://" and ":" in authority):
        where = f"{setting} " if setting else ""
        raise StorageError(f"{where}{_redacted(uri, len(scheme))}: {CREDENTIALS_REFUSED}")
    return uri


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    parsed = urlparse(refuse_credentials(uri))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URI with a bucket: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or `file://` URI."""
    uri = refuse_credentials(uri)
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])  # file:///abs and file://./rel both work
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a path, file:// or s3://")
    return Path(uri)


def normalize(uri: str) -> str:
    """Canonical form: `s3://bucket/key` without trailing slash, or an absolute `file://` URI."""
    uri = refuse_credentials(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket}/{key.strip('/')}".rstrip("/")
    return "file://" + str(local_path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    base = str(uri).rstrip("/")
    rest = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{rest}" if rest else base


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (None: AWS itself); one with user:password@ is refused."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return refuse_credentials(os.environ[name], setting=name)
    return None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.lru_cache(maxsize=8)
def _s3fs(endpoint: str | None, region: str, pid: int) -> pafs.S3FileSystem:
    """One pyarrow S3 client per endpoint and process (DataLoader workers fork; clients must not be shared)."""
    kwargs: dict[str, Any] = dict(
        region=region,
        connect_timeout=CONNECT_TIMEOUT,
        request_timeout=READ_TIMEOUT,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=CLIENT_ATTEMPTS),
    )
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)  # credentials: default AWS chain


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for `uri` (for pyarrow.parquet / datasets readers)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3fs(endpoint_url(), _region(), os.getpid()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(local_path(uri).expanduser().resolve())


def _boto_client():
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"total_max_attempts": CLIENT_ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
    )
    return boto3.client("s3", endpoint_url=endpoint_url(), region_name=_region(), config=cfg)


_HEALTHY_BUCKETS: set[tuple[str, str | None]] = set()


def _diagnose_bucket(bucket: str, endpoint: str | None) -> str | None:
    """Why `bucket` cannot be used, in one sentence, or None when it looks fine (only successes are remembered)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    where = endpoint or "AWS S3"
    if (bucket, endpoint) in _HEALTHY_BUCKETS:
        return None
    try:
        _boto_client().head_bucket(Bucket=bucket)
        _HEALTHY_BUCKETS.add((bucket, endpoint))
        return None
    except (ConnectTimeoutError, ReadTimeoutError):
        return _no_answer(endpoint)
    except EndpointConnectionError:
        return f"S3 endpoint {where} is unreachable"
    except NoCredentialsError:
        return "no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile)"
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return f"bucket {bucket!r} does not exist at {where}"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access to bucket {bucket!r} at {where} was denied: wrong credentials or missing permission"
        return f"bucket {bucket!r} at {where} answered {code or exc}"
    except BotoCoreError as exc:
        return f"S3 endpoint {where} failed: {type(exc).__name__}"


def _no_answer(endpoint: str | None) -> str:
    """The reason for a timeout, naming the endpoint and the limits it ran into."""
    return (
        f"S3 endpoint {endpoint or 'AWS S3'} did not answer within {ANSWER_LIMIT} s "
        f"({CLIENT_ATTEMPTS} tries, {READ_TIMEOUT} s each)"
    )


def _is_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a connect or read timeout (pyarrow reports curl's code 28 inside an OSError)."""
    return isinstance(exc, TimeoutError) or "curlCode: 28" in str(exc) or "Timeout was reached" in str(exc)


def _final_error(uri: str, what: str, exc: BaseException) -> StorageError | None:
    """The StorageError to raise at once for `exc`, or None when it is transient and worth another attempt."""
    if is_s3(uri):
        if _is_timeout(exc):  # no diagnosis: asking the same frozen endpoint again would double the wait
            return StorageError(f"cannot {what} {uri}: {_no_answer(endpoint_url())}")
        reason = _diagnose_bucket(split_s3(uri)[0], endpoint_url())
        if reason is not None:
            return StorageError(f"cannot {what} {uri}: {reason}")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"cannot {what} {uri}: it does not exist")
    if not is_s3(uri) or any(m in str(exc) for m in _PERMANENT_MARKERS):
        return StorageError(f"cannot {what} {uri}: {exc}")
    return None


def _call(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run `fn`, retrying transient S3 failures a bounded number of times; raise one StorageError naming `uri`.

    Timeouts are final here: the clients already tried CLIENT_ATTEMPTS times, and retrying on top multiplied a
    frozen endpoint into minutes. No new attempt starts after CALL_DEADLINE seconds.
    """
    attempts = RETRIES if is_s3(uri) else 1
    deadline = time.monotonic() + CALL_DEADLINE
    for attempt in range(attempts):
        try:
            return fn()
        except (OSError, ValueError) as exc:
            error = _final_error(uri, what, exc)
            pause = 0.5 * 2**attempt
            if error is None and (attempt == attempts - 1 or time.monotonic() + pause > deadline):
                error = StorageError(f"cannot {what} {uri}: {exc}")
            if error is not None:
                raise error from (exc if str(exc) in str(error) else None)  # chain only a cause it quotes
            time.sleep(pause)
    raise AssertionError("unreachable")


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return _call(uri, "read", lambda: local_path(uri).read_bytes())
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _call(uri, "read", read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a reader never sees half a file (temp + rename locally; one PUT on S3)."""
    if is_s3(uri):
        fs, path = filesystem(uri)

        def put() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        _call(uri, "write", put)
        return
    target = local_path(uri)

    def write_local() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique temp name opened with mode 0666, so the umask gives the file the mode a plain write would
        # (mkstemp's 0600 left artifacts in a shared root unreadable to other users and containers).
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    _call(uri, "write", write_local)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri} is not valid JSON: {exc}") from exc


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return local_path(uri).exists()
    fs, path = filesystem(uri)
    return _call(uri, "stat", lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def list_files(uri: str) -> dict[str, int]:
    """Every file below `uri` (recursively) as {relative path: size}; {} when the prefix does not exist."""
    return {rel: size for rel, (size, _) in list_file_times(uri).items()}


def list_file_times(uri: str) -> dict[str, tuple[int, dt.datetime | None]]:
    """`list_files` with each file's last change: {relative path: (size, mtime in UTC)}."""
    fs, root = filesystem(uri)

    def listing() -> dict[str, tuple[int, dt.datetime | None]]:
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return {}
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        return {i.path[len(root) :].lstrip("/"): (i.size, i.mtime) for i in infos if i.type == pafs.FileType.File}

    return dict(sorted(_call(uri, "list", listing).items()))


def delete_prefix(uri: str) -> None:
    """Remove everything below `uri` (used to clear a partial, uncommitted output before rewriting it)."""
    if not is_s3(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    fs, path = filesystem(uri)
    if list_files(uri):
        _call(uri, "delete", lambda: fs.delete_dir(path))


def delete_file(uri: str) -> None:
    """Remove one file (gone already is fine)."""
    if not is_s3(uri):
        _call(uri, "delete", lambda: local_path(uri).unlink(missing_ok=True))
        return
    fs, path = filesystem(uri)
    _call(uri, "delete", lambda: fs.delete_file(path) if fs.get_file_info(path).type == pafs.FileType.File else None)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory tree to `uri` (model folders, stage outputs)."""
    local_dir = Path(local_dir)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        target = join(uri, rel)
        if is_s3(uri):
            fs, dest = filesystem(target)
            _call(
                target,
                "upload to",
                functools.partial(
                    pafs.copy_files,
                    str(path),
                    dest,
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs,
                ),
            )
        else:
            dest_path = local_path(target)
            dest_path.parent.mkdir(parents=True, exist_ok=True)
            _call(target, "write", functools.partial(shutil.copyfile, path, dest_path))


def download_dir(uri: str, local_dir: str | Path, files: list[str] | None = None) -> Path:
    """Copy the tree below `uri` (or just `files`, relative paths) into `local_dir`; returns `local_dir`."""
    local_dir = Path(local_dir)
    names = files if files is not None else list(list_files(uri))
    if not names:
        raise StorageError(f"cannot download {uri}: nothing is stored there")
    for rel in names:
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = join(uri, rel)
        if is_s3(uri):
            fs, src = filesystem(source)
            _call(
                source,
                "download",
                functools.partial(
                    pafs.copy_files, src, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
                ),
            )
        else:
            _call(source, "read", functools.partial(shutil.copyfile, local_path(source), dest))
    return local_dir


def check_writable(uri: str) -> None:
    """Fail at start, not after an hour of work, when `uri` cannot be written."""
    probe = join(uri, f".write-probe-{os.getpid()}-{time.time_ns()}")
    write_bytes(probe, b"ok")
    if is_s3(probe):
        fs, path = filesystem(probe)
        _call(probe, "delete", lambda: fs.delete_file(path))
    else:
        local_path(probe).unlink(missing_ok=True)
