"""One error model. `BluePrintError` is the base of every error raised on purpose; `UserError` is the branch a
user can fix (a setting, an input, storage, a model name): the CLI prints it in one line and exits 2. Anything
else is a bug and shows its traceback (exit 1).

A stage running inside a pipeline task prints the same one line with `TASK_ERROR_PREFIX` and exits 2, so
`blueprint run` (and whoever reads the pod's log) finds the cause without reading a traceback.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator

TASK_ERROR_PREFIX = "blueprint task error: "


class BluePrintError(Exception):
    """Raised on purpose by BluePrint."""


class UserError(BluePrintError):
    """Something the user can fix; the message names the setting or input."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


@contextlib.contextmanager
def user_errors_exit(stage: str, context: str = "") -> Iterator[None]:
    """Inside a task: a user error is the one line `blueprint stage` would print, then exit 2 (no traceback).
    `context` goes before the error (the run's error line keeps what follows `stage: `), e.g. which partition."""
    try:
        yield
    except USER_ERRORS as exc:
        print(f"{TASK_ERROR_PREFIX}{stage}: {context + ': ' if context else ''}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class InputError(UserError, ValueError):
    """An input artifact holds too little, or not what this stage needs (no eval pairs, another run's adapters)."""


class NonFiniteLoss(UserError, ValueError):
    """Training diverged (a loss became inf or NaN); the message names the setting to look at. Nothing is
    committed: the stage fails before its output is written."""


def check_finite_loss(value: float, where: str, setting: str, current: object) -> None:
    """Raise NonFiniteLoss when `value` is inf or NaN."""
    if not math.isfinite(value):
        raise NonFiniteLoss(
            f"{where}: the loss became {value}: training diverged; lower {setting!r} (now {current}) or check the data"
        )


class TaskFailed(BluePrintError):
    """A pipeline task failed; `user` says whether its cause was a user error (exit 2) or a bug (exit 1)."""

    def __init__(self, message: str, user: bool):
        super().__init__(message)
        self.user = user
