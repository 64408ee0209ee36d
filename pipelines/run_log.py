"""What `blueprint run` shows: one line per task and the stages' own progress, not kfp.local's dump.

kfp.local prints everything through `sys.stdout`: its log records, each task's streamed output (the KFP
executor's own lines and the whole executor-input JSON) and the task's outputs. `TaskLogFilter` stands in
for stdout during a run and keeps, per task, a `started` line, the stage's own lines (progress, its one-line
error), and a `finished in 12.3s` line with the stage's key figures (or `cache hit`). A bug's traceback goes
to the run's log file only, which keeps every byte kfp printed; `verbose` shows everything as it comes.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any, TextIO

from blueprint.errors import TASK_ERROR_PREFIX, TaskFailed
from blueprint.stages import registry

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXECUTING = re.compile(r" - INFO - Executing task '(?P<task>[^']+)'")
FINISHED = re.compile(r" - (INFO|ERROR) - Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)")
KFP_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - ")
EXECUTOR_LINE = "[KFP Executor"
RESULT_PREFIX = '{"stage": '
TRACEBACK = "Traceback (most recent call last):"
STAGE_LINE = re.compile(r"^[A-Za-z][\w.\-\[\]]*: ")  # `warmup: step 3/4 ...`: what a stage prints itself


def figures_text(stage: str, metrics: dict[str, Any]) -> str:
    """`pairs 600 mb_per_s 2.9`: the registry's figures of `stage` that `metrics` has."""
    try:
        names = registry.get(stage).figures
    except ValueError:
        return ""
    shown = []
    for name in names:
        value = metrics.get(name)
        if isinstance(value, float):
            shown.append(f"{name} {value:.4g}")
        elif value is not None:
            shown.append(f"{name} {value}")
    return " ".join(shown)


class TaskLogFilter(io.TextIOBase):
    """A write-only text stream that condenses kfp.local's output into `out` (see the module docstring)."""

    def __init__(
        self,
        out: TextIO,
        labels: dict[str, str] | None = None,
        *,
        verbose: bool = False,
        log_path: Path | None = None,
        clock=time.monotonic,
    ):
        self.out, self.labels, self.verbose, self.clock = out, labels or {}, verbose, clock
        self.log_path = log_path
        self.log = open(log_path, "w", encoding="utf-8") if log_path else None
        self.pending = ""
        self.task: str | None = None
        self.started: dict[str, float] = {}
        self.json_indent = 0
        self.result: dict[str, Any] | None = None
        self.mode = "outside"  # outside | logs | executor_json | traceback
        self.failure: tuple[str, str, bool] | None = None  # (task, cause, user error?)
        self.cause: dict[str, tuple[str, bool]] = {}
        self.tracebacks: dict[str, list[str]] = {}

    def label(self, task: str) -> str:
        """The pipeline's display name of a kfp task (`evaluate-2` runs after round 1: `evaluate-1`)."""
        return self.labels.get(task, task)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.log:
            self.log.write(text)
        if self.verbose:
            self.out.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        if self.log:
            self.log.flush()
        self.out.flush()

    def close(self) -> None:
        if self.pending:
            self._line(ANSI.sub("", self.pending))
            self.pending = ""
        if self.log:
            self.log.close()
            self.log = None
        super().close()

    def _emit(self, line: str) -> None:
        # not print(): kfp.local swaps builtins.print for an indenting one while it streams a task's log
        if not self.verbose:
            self.out.write(line + "\n")
            self.out.flush()

    def _line(self, line: str) -> None:
        line = line.rstrip("\r")
        if self.mode == "executor_json" and not KFP_RECORD.match(line):
            if line.rstrip() == " " * self.json_indent + "}":  # the brace that closes it, at its own indentation
                self.mode = "logs"
        elif m := EXECUTING.search(line):
            self.task, self.result, self.mode = self.label(m["task"]), None, "outside"
            self.started[self.task] = self.clock()
            self._emit(f"{self.task}: started")
        elif m := FINISHED.search(line):
            self._finished(self.label(m["task"]), m["status"])
            self.mode = "outside"
        elif line.endswith(" - INFO - Streamed logs:"):
            self.mode = "logs"
        elif KFP_RECORD.match(line) or line.startswith("-----"):  # kfp's own (task output is indented)
            self.mode = "outside"
        elif self.mode == "logs" and line.lstrip().startswith(EXECUTOR_LINE) and "Got executor_input:" in line:
            self.mode, self.json_indent = "executor_json", len(line) - len(line.lstrip())
        elif self.mode in ("logs", "traceback"):
            self._task_line((line[4:] if line.startswith("    ") else line).rstrip())

    def _task_line(self, line: str) -> None:
        if self.mode != "traceback":  # tasks inside a ParallelFor are indented once more
            line = line.strip()
        if line.startswith(EXECUTOR_LINE):
            return
        if line.startswith(RESULT_PREFIX):
            try:
                self.result = json.loads(line)
                return
            except json.JSONDecodeError:
                pass
        if line.startswith(TASK_ERROR_PREFIX):
            stage_and_message = line[len(TASK_ERROR_PREFIX) :]
            self.cause[self.task or "?"] = (stage_and_message.partition(": ")[2] or stage_and_message, True)
            self._emit(f"{self.task}: error: {self.cause[self.task or '?'][0]}")
            return
        if line == TRACEBACK:
            self.mode = "traceback"
        if self.mode == "traceback":  # a bug: shown whole when the run ends (and kept in the log)
            self.tracebacks.setdefault(self.task or "?", []).append(line)
            if line.strip() and not line.startswith(" "):
                self.cause[self.task or "?"] = (line.strip(), False)
            return
        if STAGE_LINE.match(line):  # not the executor's JSON, which parallel tasks interleave
            self._emit(line)

    def _finished(self, task: str, status: str) -> None:
        seconds = self.clock() - self.started.get(task, self.clock())
        if status != "SUCCESS":
            cause, user = self.cause.get(task, ("the task's log has no error line", False))
            if self.failure is None:  # the first failure is the cause; later ones follow from it
                self.failure = (task, cause, user)
            self._emit(f"{task}: failed after {seconds:.1f}s")
            return
        result = self.result or {}
        if result.get("cached"):
            self._emit(f"{task}: cache hit -> {result.get('uri')}")
            return
        figures = figures_text(str(result.get("stage", "")), result.get("metrics", {}))
        self._emit(f"{task}: finished in {seconds:.1f}s" + (f" {figures}" if figures else ""))

    def task_failed(self) -> TaskFailed | None:
        """The first failed task as one error: its name, its own error line (or a bug's last line), the log."""
        if self.failure is None:
            return None
        task, cause, user = self.failure
        where = f" (full log: {self.log_path})" if self.log_path else ""
        if user:
            return TaskFailed(f"task {task} failed: {cause}{where}", user=True)
        trace = "\n".join(self.tracebacks.get(task, []))  # a bug: its traceback, as `blueprint stage` would show
        return TaskFailed(f"task {task} failed with a bug{where}:\n{trace}", user=False)
