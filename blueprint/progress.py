"""Progress of a stage's long loop: a tqdm bar in a terminal, plain lines everywhere else.

kfp.local streams a task's output line by line and `kubectl logs` shows a pod's, so outside a terminal a
`\\r` bar shows nothing until the stage ends. There a stage prints `<task>: step i/N <figures> eta <s>` at a
bounded rate: whenever another tenth of the work is done or `every_seconds` have passed, and at the last step;
a loop that is over within `quiet_seconds` prints its last step only (a 2-second shard needs no ten lines).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """True when `stream` (stderr by default, where tqdm draws) is a terminal."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def format_figure(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def progress_line(
    task: str, done: int, total: int | None, figures: dict[str, Any], eta: float | None, unit: str = "step"
) -> str:
    """`ppo-round-1: step 4/16 reward 0.031 kl 0.020 eta 48s` (figures in the order given; no /N when unknown)."""
    parts = [f"{task}: {unit} {done}" + (f"/{total}" if total is not None else "")]
    parts += [f"{k} {format_figure(v)}" for k, v in figures.items()]
    if eta is not None:
        parts.append(f"eta {eta:.0f}s")
    return " ".join(parts)


class Progress:
    """Report `total` steps of `task` (None: not known ahead); `update(done, **figures)` after each.

    Off when `enabled` is False; a tqdm bar when `bar` (default: stderr is a terminal), else lines.
    """

    def __init__(  # noqa: PLR0913 - display options, keyword-only with defaults
        self,
        task: str,
        total: int | None,
        enabled: bool = True,
        *,
        start: int = 0,
        unit: str = "step",
        every_seconds: float = 30.0,
        quiet_seconds: float = 3.0,
        bar: bool | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.task, self.enabled, self.unit, self.quiet_seconds = task, enabled, unit, quiet_seconds
        self.total = None if total is None else max(int(total), 0)
        self.stream, self.clock, self.every_seconds = stream or sys.stdout, clock, every_seconds
        self.start_step, self.started = start, clock()
        self.last_time, self.next_milestone = self.started, self._milestone_after(start)
        self.bar = None
        if enabled and (interactive() if bar is None else bar):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=start, desc=task, unit=unit)

    def _milestone_after(self, done: int) -> float:
        if self.total is None:
            return float("inf")
        tenth = max(1, -(-self.total // 10))
        return (done // tenth + 1) * tenth

    def eta(self, done: int, now: float) -> float | None:
        rate_steps = done - self.start_step
        return (
            None if rate_steps <= 0 or self.total is None else (now - self.started) / rate_steps * (self.total - done)
        )

    def update(self, done: int, **figures: Any) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix({k: format_figure(v) for k, v in figures.items()}, refresh=False)
            return
        now = self.clock()
        last = self.total is not None and done >= self.total
        due = done >= self.next_milestone and now - self.started >= self.quiet_seconds
        if due or last or now - self.last_time >= self.every_seconds:
            line = progress_line(self.task, done, self.total, figures, self.eta(done, now), self.unit)
            print(line, file=self.stream, flush=True)
            self.last_time, self.next_milestone = now, self._milestone_after(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def note(task: str, message: str, enabled: bool = True) -> None:
    """One plain line about a phase of a stage (`bootstrap: tokenizer trained, 512 tokens`)."""
    if enabled:
        print(f"{task}: {message}", flush=True)


def trainer_progress_callback(task: str) -> Any:
    """A transformers TrainerCallback printing progress lines (training loss) for trl/transformers trainers."""
    from transformers import TrainerCallback

    class LineProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(task, state.max_steps, bar=False)

        def on_step_end(self, args, state, control, **kwargs):
            losses = [row["loss"] for row in state.log_history if "loss" in row]
            self.progress.update(state.global_step, **({"loss": float(losses[-1])} if losses else {}))

    return LineProgress()
