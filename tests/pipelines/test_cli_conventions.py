"""Command-line conventions: a reader that closes the pipe ends the command quietly; a mistyped setting or stage
name is answered with the closest known one, in the one error line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from blueprint.store import storage


def test_output_into_a_closed_pipe_ends_quietly_without_a_traceback(tmp_path):
    """What `blueprint ls --json ROOT | head -0` does: the reader is gone before the first byte is written."""
    storage.write_json(f"file://{tmp_path}/warmup/abc/_MANIFEST.json", {"stage": "warmup", "files": {}})
    read, write = os.pipe()
    os.close(read)  # the reader has already exited: every write is EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "blueprint.pipelines.cli", "ls", "--json", str(tmp_path)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == ""
    assert done.returncode == 141


def test_output_into_a_pipe_the_reader_closes_after_one_line_ends_quietly(tmp_path):
    """`blueprint ... | head -1` through a real shell pipe: head's line arrives, nothing on stderr."""
    for n in range(400):  # more output than a pipe buffer holds, so the writer meets the closed pipe mid-way
        storage.write_json(f"file://{tmp_path}/warmup/k{n:04d}/_MANIFEST.json", {"stage": "warmup", "files": {}})
    done = subprocess.run(
        f"{sys.executable} -m blueprint.pipelines.cli ls --json {tmp_path} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "[\n"
    assert done.stderr == "", done.stderr


@pytest.mark.parametrize(
    "flags, suggestion",
    [
        (["--set", "ppo-round.lrr=1"], "unknown setting(s) lrr for PPORoundConfig (did you mean lr?); known: "),
        (["--set", "ppo-rund.lr=1"], "unknown stage(s) in settings: ppo-rund (did you mean ppo-round?); stages: "),
        (["--config", "{config}"], "unknown setting(s) stepz for WarmupConfig (did you mean steps?); known: "),
    ],
)
def test_a_mistyped_setting_or_stage_is_answered_with_the_closest_name(flags, suggestion, tmp_path, capsys):
    from blueprint.pipelines.cli import main

    (tmp_path / "run.yaml").write_text("warmup:\n  stepz: 3\n")
    flags = [f.format(config=tmp_path / "run.yaml") for f in flags]
    assert main(["run", "--profile", "smoke", "--artifact-root", str(tmp_path / "art"), *flags]) == 2
    err = capsys.readouterr().err
    assert suggestion in err and err.count("\n") == 1, err


def test_a_name_close_to_none_gets_no_suggestion():
    from blueprint.config import did_you_mean

    assert did_you_mean(["zzzqq"], ["lr", "steps", "batch_size"]) == ""
    assert did_you_mean(["lrr", "setps"], ["lr", "steps", "batch_size"]) == " (did you mean lr or steps?)"
