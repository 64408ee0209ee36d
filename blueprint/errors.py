"""One error model: a user error prints one line naming the input and exits 2; anything else is a bug.

A stage running inside a pipeline task prints the same one line with `TASK_ERROR_PREFIX` and exits 2, so
`blueprint run` (and whoever reads the pod's log) finds the cause without reading a traceback.
"""
from __future__ import annotations

from blueprint import artifacts, storage
from blueprint.config import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, storage.StorageError, artifacts.ArtifactError,
                                                ValueError, FileNotFoundError, PermissionError)
TASK_ERROR_PREFIX = "blueprint task error: "


class NonFiniteLoss(ValueError):
    """Training diverged (a loss became inf or NaN); the message names the setting to look at. Nothing is
    committed: the stage fails before its output is written."""


def check_finite_loss(value: float, where: str, setting: str, current: object) -> None:
    """Raise NonFiniteLoss when `value` is inf or NaN."""
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteLoss(f"{where}: the loss became {value}: training diverged; lower {setting!r} "
                            f"(now {current}) or check the data")


class TaskFailed(Exception):
    """A pipeline task failed; `user` says whether its cause was a user error (exit 2) or a bug (exit 1)."""

    def __init__(self, message: str, user: bool):
        super().__init__(message)
        self.user = user
