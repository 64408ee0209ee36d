"""Reading a local source file safely: regular files only (a device, FIFO or socket is never read), never more
than the size limit plus one byte, and read again while a writer is at work on it.

Pure standard library: the parsing workers import it (through blueprint.data.extract) and must start fast.
"""

from __future__ import annotations

import hashlib
import os
import stat

from blueprint.errors import UserError

READ_ATTEMPTS = 3  # reads of a file that keeps changing while it is read, before that is the user's error


class InputChanged(UserError, ValueError):
    """A source file changed each time it was read; the message names it."""


def content_identity(raw: bytes) -> str:
    """What incremental sharding matches a local file on: its size and the sha256 of its bytes."""
    return f"{len(raw)}:{hashlib.sha256(raw).hexdigest()}"


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def read_regular(abs_path: str, limit: int) -> bytes | None:
    """At most `limit + 1` bytes of a regular file (more than `limit` says "too large" without reading the rest),
    or None when `abs_path` is not one: a device, FIFO or socket is never read. Opened without blocking (a FIFO
    would wait for a writer) and checked on the open descriptor, so a file swapped for a FIFO after a stat is
    caught too."""
    if not stat.S_ISREG(os.stat(abs_path).st_mode):  # a socket cannot be opened, a device may act when opened
        return None
    fd = os.open(abs_path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read(limit + 1)


def read_settled(abs_path: str, limit: int) -> tuple[bytes, int] | None:
    """A local regular file's bytes (at most `limit + 1`) and the mtime_ns they belong to, read again when its size
    or mtime moved during the read (a writer was at work): the pairs and the identity recorded are then of one
    version of the file. None when it is not a regular file."""
    for _ in range(READ_ATTEMPTS):
        before = _stamp(abs_path)
        raw = read_regular(abs_path, limit)
        if raw is None or len(raw) > limit:  # not a file, or too large whatever its version
            return None if raw is None else (raw, before[1])
        if _stamp(abs_path) == before == (len(raw), before[1]):
            return raw, before[1]
    raise InputChanged(
        f"source file {abs_path} changed during each of {READ_ATTEMPTS} reads: run again once nothing writes to it"
    )
