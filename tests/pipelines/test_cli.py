"""The `blueprint` command: bad input gives one line naming it and exit 2; nothing complete-looking is left."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blueprint.store import artifacts, storage


def blueprint(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blueprint.pipelines.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_shard_of_an_empty_directory_names_it_and_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    out = blueprint("shard", "--source", f"dir:{tmp_path / 'empty'}", "--out", f"file://{tmp_path}/o", "--quiet")
    assert out.returncode == 2
    assert "empty" in out.stderr and "Traceback" not in out.stderr
    assert not storage.exists(f"file://{tmp_path}/o/{artifacts.MANIFEST_NAME}")


def test_shard_to_a_nonexistent_bucket_names_it_and_exits_2(s3_env, tmp_path):
    import os

    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text(
        'def add_one(value):\n    """Return the value plus one, always."""\n    result = value + 1\n    return result\n'
    )
    out = blueprint(
        "shard", "--source", f"dir:{src}", "--out", "s3://no-such-bucket-cli/x", "--quiet", env=dict(os.environ)
    )
    assert out.returncode == 2
    assert "no-such-bucket-cli" in out.stderr and "does not exist" in out.stderr


def test_stage_with_a_missing_input_is_refused_before_any_work(tmp_path):
    out = blueprint("stage", "warmup", "--input", f"shards=file://{tmp_path}/none", "--artifact-root", str(tmp_path))
    assert out.returncode == 2 and "base" in out.stderr


def test_stage_reading_an_incomplete_input_names_it(tmp_path):
    storage.write_text(f"{tmp_path}/half/train/part.parquet", "x")
    out = blueprint(
        "stage", "bootstrap", "--input", f"shards=file://{tmp_path}/half", "--artifact-root", str(tmp_path / "a")
    )
    assert out.returncode == 2 and "half" in out.stderr and "partial" in out.stderr


@pytest.mark.parametrize("setting, name", [("steps=-3", "steps"), ("nope=1", "nope"), ("lr=abc", "lr")])
def test_bad_stage_settings_name_the_setting(setting, name, tmp_path):
    out = blueprint(
        "stage",
        "warmup",
        "--input",
        "shards=x",
        "--input",
        "base=y",
        "--artifact-root",
        str(tmp_path),
        "--set",
        setting,
    )
    assert out.returncode == 2 and name in out.stderr and "Traceback" not in out.stderr


def test_ls_lists_committed_outputs_with_key_metrics(smoke_chain):
    out = blueprint("ls", smoke_chain["root"])
    assert out.returncode == 0
    for stage in ("shard", "bootstrap", "warmup"):
        assert stage in out.stdout


def test_run_with_the_docker_runner_and_no_engine_says_how_to_start_one_without_a_traceback(tmp_path):
    import os

    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    done = blueprint(
        "run", "--profile", "smoke", "--runner", "docker", "--artifact-root", str(tmp_path / "art"), env=env
    )
    assert done.returncode == 2
    assert f"no container engine answers at unix://{tmp_path}/no-engine.sock" in done.stderr
    assert "podman system service" in done.stderr and "Traceback" not in done.stderr


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch, tmp_path):
    """One error model: only UserError (settings, inputs, storage) is one line and exit 2; a bug keeps its
    traceback (here a plain ValueError raised inside `blueprint ls`)."""
    from blueprint.errors import UserError
    from blueprint.pipelines.cli import main
    from blueprint.store import artifacts

    def broken(root):
        raise ValueError("a bug, not the user's fault")

    monkeypatch.setattr(artifacts, "cached_outputs", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["ls", str(tmp_path)])
    monkeypatch.setattr(artifacts, "cached_outputs", lambda root: (_ for _ in ()).throw(UserError("fix it")))
    assert main(["ls", str(tmp_path)]) == 2


@pytest.mark.parametrize(
    "kind, broken",
    [
        ("csv", 'code,summary\n"def f():\n    return 1",ok\na,b,c,d\n'),  # a row with more fields than the header
        ("jsonl", '{"code": "def f():\\n    return 1", "summary": "ok"}\n{"code": \n'),  # a line cut short
    ],
)
def test_a_malformed_data_file_is_one_line_naming_the_file_and_exit_2(tmp_path, kind, broken):
    good = (
        'code,summary\n"def g():\n    return 2",fine\n'
        if kind == "csv"
        else '{"code": "def g():\\n    return 2", "summary": "fine"}\n'
    )
    (tmp_path / f"a.{kind}").write_text(good)
    (tmp_path / f"b.{kind}").write_text(broken)
    out = blueprint(
        "shard", "--source", f"{kind}:{tmp_path}/*.{kind}", "--out", f"file://{tmp_path}/o", "--quiet", "--workers", "1"
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(
        f"blueprint shard: error: source {kind}:{tmp_path}/*.{kind}: cannot read {tmp_path}/b.{kind} as {kind}: "
    )
    assert not storage.exists(f"file://{tmp_path}/o/{artifacts.MANIFEST_NAME}")
