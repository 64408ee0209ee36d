"""Progress you can watch: plain `<task>: step i/N ... eta` lines at a bounded rate outside a terminal, and
`blueprint run` condensed to a line per task with the stages' own progress and one-line errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import micro_qwen2_base, stdlib_texts

from blueprint.progress import Progress, progress_line

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_has_the_task_step_figures_and_eta():
    line = progress_line("ppo-round-1", 4, 16, {"reward": 0.0314, "kl": 0.02}, 48.2)
    assert line == "ppo-round-1: step 4/16 reward 0.031 kl 0.020 eta 48s"
    assert progress_line("shard", 120, None, {"pairs": 7}, None, unit="row") == "shard: row 120 pairs 7"


def test_lines_come_every_tenth_of_the_work_and_at_the_end():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("warmup", 100, bar=False, stream=out, clock=clock)
    for i in range(1, 101):
        clock.now += 0.5
        p.update(i, loss=1.0)
    steps = [int(line.split()[2].split("/")[0]) for line in out.getvalue().splitlines()]
    assert steps == list(range(10, 101, 10))


def test_a_loop_over_within_seconds_prints_only_its_last_step():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("shard", 734, bar=False, stream=out, clock=clock, unit="file")
    for i in range(1, 735):
        clock.now += 0.002
        p.update(i, pairs=i)
    assert out.getvalue().splitlines() == ["shard: file 734/734 pairs 734 eta 0s"]


def test_a_slow_stage_prints_at_least_every_30_seconds_between_tenths():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("bootstrap", 1000, bar=False, stream=out, clock=clock)
    for i in range(1, 60):  # 59 steps of 1 s: no tenth (100 steps) reached, so time decides
        clock.now += 1.0
        p.update(i)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["30/1000"]
    assert lines[0].endswith("eta 970s")


def test_a_resumed_loop_counts_from_where_it_resumed_and_off_means_silent():
    out, clock = io.StringIO(), FakeClock()
    p = Progress("ppo-round-2", 100, bar=False, start=50, stream=out, clock=clock, quiet_seconds=0)
    clock.now = 5.0
    p.update(55)
    assert out.getvalue() == ""
    clock.now = 10.0
    p.update(60)
    assert out.getvalue() == "ppo-round-2: step 60/100 eta 40s\n"  # 10 steps in 10 s since the resume
    off = io.StringIO()
    quiet = Progress("x", 10, enabled=False, bar=False, stream=off)
    for i in range(1, 11):
        quiet.update(i)
    assert off.getvalue() == ""


def _blueprint(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blueprint.pipelines.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_run_with_a_relative_root_and_a_coder_base_prints_a_line_per_task_and_each_rounds_progress(tmp_path):
    """`make run`'s path through kfp.local: the lines it prints, and the pipeline's coder_base reaching every model
    stage (the tiny base is built for the summarizer; the coder trains and is merged on a Qwen2 of its own)."""
    from transformers import AutoConfig

    from blueprint.models.tiny import train_bpe_tokenizer

    coder = micro_qwen2_base(tmp_path / "coder-base", train_bpe_tokenizer(stdlib_texts(30), vocab_size=384))
    # the lines and the plumbing are what this shows, not the models: a short pre-training and warmup keep it quick
    quick = ("--coder-base", coder, "--set", "bootstrap.max_tokens=16384", "--set", "warmup.steps=4")
    done = _blueprint("run", "--profile", "smoke", "--artifact-root", "./rel", *quick, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) <= 90, done.stdout  # about 60 task and progress lines, then the end-of-run summary (~22)
    (merged,) = (tmp_path / "rel" / "merge").iterdir()
    types = {role: AutoConfig.from_pretrained(merged / role).model_type for role in ("summarizer", "coder")}
    assert types == {"summarizer": "llama", "coder": "qwen2"}
    for task in (
        "shard",
        "bootstrap",
        "warmup",
        "evaluate-0",
        "ppo-round-1",
        "evaluate-1",
        "ppo-round-2",
        "evaluate-2",
        "merge",
    ):
        assert f"{task}: started" in lines
        assert any(line.startswith(f"{task}: finished in ") for line in lines), task
    for round_index in (1, 2):
        assert f"ppo-round-{round_index}: step 2/2" in done.stdout
    assert "executor_input" not in done.stdout and "custom or non-Python" not in done.stderr
    assert all(not line.startswith(" ") for line in lines), "kfp's indentation leaked"
    assert "How good the models are" in done.stdout and "warning: " in done.stdout  # the smoke model's flaws

    # a rerun where only the gate has work (another floor): it runs in its own process, the rest are cache hits
    quick += ("--set", "gate.floor=0.01")
    again = _blueprint("run", "--profile", "smoke", "--artifact-root", "./rel", *quick, "--verbose", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Got executor_input" in again.stdout and '"cached": true' in again.stdout


@pytest.mark.slow
def test_a_task_failing_on_bad_input_exits_2_with_its_own_one_line_error_and_the_log_path(tmp_path):
    (tmp_path / "empty").mkdir()
    failed = _blueprint(
        "run",
        "--profile",
        "smoke",
        "--epochs",
        "1",
        "--artifact-root",
        "./art",
        "--source",
        "dir:./empty",
        cwd=tmp_path,
    )
    assert failed.returncode == 2, failed.stdout + failed.stderr
    error = failed.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("blueprint run: error: task shard-plan failed: source dir:")
    assert "has no Python files" in error[0] and "Traceback" not in failed.stdout + failed.stderr
    log = Path(error[0].rsplit("full log: ", 1)[1].rstrip(")"))
    assert "Got executor_input" in log.read_text()
