"""`blueprint run` answers a task whose outputs are committed in its own process, without starting the task's.

kfp.local's SubprocessRunner starts an interpreter per task (importing torch, transformers and kfp: seconds each),
most of it, on a rerun, only for the task to find its output's manifest. Here each task first runs in this process,
from the very source the compiled component ships, through kfp's own executor, with the store in hits-only mode
(blueprint/store/hits_only.py): a task whose outputs are committed writes the same outputs, metrics, reports and
lines its process would have; a task with work to do (or one that fails) stops before any work, its lines are
dropped, and it runs in its own process as before. Only the subprocess runner is answered this way: a container
runs the image's code, which may differ from this process's.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
from collections.abc import Iterator
from typing import Any

from kfp.local import status, subprocess_task_handler

from blueprint.store import hits_only

EXECUTOR_INPUT, FUNCTION = "--executor_input", "--function_to_execute"
_ONE_AT_A_TIME = threading.Lock()  # a stage's code is not written for threads: answered tasks take turns


_CAPTURED = threading.local()  # .buffer: where this thread's output goes while its task is answered here


class ThreadCapture(io.TextIOBase):
    """Stands in for sys.stdout and sys.stderr during a run: what a thread writes while it is `capturing` goes to
    its own buffer (both streams into one, as a task's process merges them); every other thread (kfp.local runs a
    ParallelFor's tasks in threads) writes through."""

    def __init__(self, target: Any):
        self.target = target

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        buffer = getattr(_CAPTURED, "buffer", None)
        return (buffer if buffer is not None else self.target).write(text)

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def capturing() -> Iterator[io.StringIO]:
    _CAPTURED.buffer = io.StringIO()
    try:
        yield _CAPTURED.buffer
    finally:
        _CAPTURED.buffer = None


def component_call(full_command: list[str]) -> tuple[str, str, dict[str, Any]] | None:
    """(the component's source, its function's name, the executor input) of a lightweight component's command,
    None for anything else (which then runs as kfp.local would)."""
    if EXECUTOR_INPUT not in full_command or FUNCTION not in full_command:
        return None
    at = full_command.index(EXECUTOR_INPUT)
    name, source = full_command[full_command.index(FUNCTION) + 1], full_command[at - 1]
    if f"def {name}(" not in source:
        return None
    return source, name, json.loads(full_command[at + 1])


def answer_hit(full_command: list[str]) -> bool:
    """Run the task here in hits-only mode: True (its outputs written, its lines printed) when it needed no work."""
    from kfp.dsl.executor import Executor

    call = component_call(full_command)
    if call is None:
        return False
    source, name, executor_input = call
    with _ONE_AT_A_TIME, capturing() as lines:
        try:
            namespace: dict[str, Any] = {"__name__": "ephemeral_component"}
            # as kfp's executor loads it (dont_inherit: this module's `annotations` future would make types text)
            exec(compile(source, "ephemeral_component.py", "exec", dont_inherit=True), namespace)
            with hits_only.on():
                Executor(executor_input=executor_input, function_to_execute=namespace[name]).execute()
        # work to do, or any failure at all: the task's own process runs it and shows what went wrong
        except (hits_only.NotCached, Exception, SystemExit):  # noqa: BLE001
            return False
    for line in lines.getvalue().splitlines(keepends=True):
        print(line, end="")  # through kfp.local's print, as the task's own process's lines are
    return True


@contextlib.contextmanager
def answering_hits() -> Iterator[None]:
    """Inside: kfp.local's subprocess runner answers a cache hit in this process (see the module docstring).
    kfp.local (2.17) has no hook for this: it takes the handler class from this module attribute at each task."""
    original = subprocess_task_handler.SubprocessTaskHandler

    class HitFirstHandler(original):
        def run(self) -> status.Status:
            if answer_hit(self.full_command):
                return status.Status.SUCCESS
            return super().run()

    subprocess_task_handler.SubprocessTaskHandler = HitFirstHandler
    try:
        out, err = ThreadCapture(sys.stdout), ThreadCapture(sys.stderr)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        subprocess_task_handler.SubprocessTaskHandler = original
