"""Hits-only mode: a stage whose output is committed returns it as usual; one that would compute stops first.

`blueprint run` answers each task's cache hit this way in its own process (pipelines/cache_hits.py) instead of
starting an interpreter per task only to find a manifest; a task that has work to do then runs as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("hits_only", default=False)


class NotCached(BaseException):
    """Inside `on()`, a stage would compute its output (or --force recomputes it). A BaseException, so no
    handler of the stage's own (a user error, an out-of-memory hint) takes it for a failure."""


@contextlib.contextmanager
def on() -> Iterator[None]:
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get()


def check(uri: str) -> None:
    """Called where a stage is about to compute `uri`: raises NotCached inside `on()`."""
    if _ACTIVE.get():
        raise NotCached(uri)
