"""Per-step tracking: TensorBoard event files read back with tensorboard's own reader, a real MLflow tracking
server on loopback (sqlite backend), and a server that is down or dies mid-run."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from blueprint import tracking
from blueprint.config import parse
from blueprint.stages import ppo_round, warmup
from blueprint.store import storage
from tests.conftest import SMOKE_PPO, SMOKE_WARMUP
from tests.loopback import free_port, start_mlflow, stop_session


def scalar_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a sqlite backend on loopback; yields (uri, process)."""
    uri, proc = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield uri, proc
    stop_session(proc)


def test_a_tracking_uri_is_redacted_of_its_credentials():
    assert tracking.redact("https://alice:s3cret@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert tracking.redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_only_numbers_are_tracked_and_nested_settings_flatten_for_mlflow():
    assert tracking.scalars({"loss": 1, "lr": 0.5, "ok": True, "name": "x", "none": None}) == {"loss": 1.0, "lr": 0.5}
    assert tracking.flat_params({"a": 1, "b": {"c": "d"}}) == {"a": "1", "b.c": "d"}


def test_warmup_and_a_ppo_round_leave_one_point_per_step_in_tensorboard_and_mlflow(
    smoke_chain, tmp_path, mlflow_server, monkeypatch
):
    from mlflow.tracking import MlflowClient

    tracking_uri, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "stages")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    root = f"file://{tmp_path}"
    settings = {**SMOKE_WARMUP, "steps": 3, "coder_steps": 2}
    adapters = warmup.run(
        parse(warmup.WarmupConfig, settings),
        shards=smoke_chain["shards"],
        base=smoke_chain["base"],
        artifact_root=root,
        progress=False,
    ).uri
    out = storage.local_path(adapters) / "tensorboard"
    assert [s for s, _ in scalar_points(out / "summarizer")["loss"]] == [1, 2, 3]
    assert [s for s, _ in scalar_points(out / "coder")["loss"]] == [1, 2]
    assert "learning_rate" in scalar_points(out / "coder")

    cfg = parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, "round_index": 2})
    uri = ppo_round.run(
        cfg,
        shards=smoke_chain["shards"],
        base=smoke_chain["base"],
        adapters=adapters,
        artifact_root=root,
        progress=False,
    ).uri
    points = scalar_points(storage.local_path(uri) / "tensorboard" / "summarizer")
    first = cfg.ppo_steps + 1  # round 2 continues round 1's steps
    assert [s for s, _ in points["score/mean"]] == list(range(first, first + cfg.ppo_steps))
    for tag in ("kl", "entropy", "clipfrac", "rollout_tokens_per_s", "step_seconds"):
        assert len(points[tag]) == cfg.ppo_steps, tag
    coder = scalar_points(storage.local_path(uri) / "tensorboard" / "coder")
    assert [s for s, _ in coder["loss"]] == [cfg.supervised_steps + i for i in range(1, cfg.supervised_steps + 1)]

    client = MlflowClient(tracking_uri)  # one MLflow run per stage, each with its per-step histories
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("stages").experiment_id])}
    assert set(runs) == {"warmup", "ppo-round-2"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert len(client.get_metric_history(runs["warmup"].info.run_id, "summarizer/loss")) == 3
    kl = client.get_metric_history(runs["ppo-round-2"].info.run_id, "summarizer/kl")
    assert sorted(m.step for m in kl) == list(range(first, first + cfg.ppo_steps))
    assert runs["ppo-round-2"].data.params["ppo_steps"] == str(cfg.ppo_steps)
    assert runs["ppo-round-2"].data.tags["blueprint.output_key"] == uri.rstrip("/").rsplit("/", 1)[-1]


def test_a_stage_logs_its_settings_and_step_histories_to_mlflow_nested_under_the_task_run(
    mlflow_server, tmp_path, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    uri, _ = mlflow_server
    with_secret = uri.replace("http://", "http://alice:s3cret@")  # a server without auth ignores them
    client = MlflowClient(uri)
    experiment = client.create_experiment("kfp-pipeline")
    parent = client.create_run(experiment, run_name="task").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    monkeypatch.setenv("BLUEPRINT_PIPELINE_RUN", "run-42")
    with tracking.Tracker(
        "ppo-round-1",
        tmp_path,
        settings={"lr": 0.001, "nested": {"a": 1}},
        tags={"blueprint.output_key": "abc"},
        mlflow_uri=with_secret,
    ) as tracker:
        for step in range(1, 6):
            tracker.log("summarizer", step, {"kl": 0.1 * step, "skipped": 0.0})
    child = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(child) == 1
    run = child[0]
    assert run.info.run_name == "ppo-round-1" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "nested.a": "1"}
    assert run.data.tags["blueprint.stage"] == "ppo-round-1" and run.data.tags["blueprint.output_key"] == "abc"
    history = client.get_metric_history(run.info.run_id, "summarizer/kl")
    assert [(m.step, round(m.value, 6)) for m in sorted(history, key=lambda m: m.step)] == [
        (s, round(0.1 * s, 6)) for s in range(1, 6)
    ]
    printed = capsys.readouterr()
    assert "s3cret" not in printed.out + printed.err and f"MLflow run {run.info.run_id}" in printed.out
    assert not any("s3cret" in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])


def test_an_unreachable_tracking_server_is_one_warning_line_and_training_goes_on(tmp_path, capsys):
    dead = f"http://user:hunter2@127.0.0.1:{free_port()}"
    start = time.monotonic()
    with tracking.Tracker("warmup", tmp_path, settings={"lr": 1}, mlflow_uri=dead) as tracker:
        for step in range(1, 50):
            tracker.log("coder", step, {"loss": 1.0 / step})
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tracking:")]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "hunter2" not in err
    assert elapsed < 20  # bounded by the close wait, never the client's minutes of retries
    assert len(scalar_points(tmp_path / "tensorboard" / "coder")["loss"]) == 49


def test_a_server_stopped_mid_run_leaves_the_stage_running_and_warns_once(tmp_path, capsys):
    home = tmp_path / "mlflow"
    home.mkdir()
    uri, proc = start_mlflow(home)
    try:
        with tracking.Tracker("ppo-round-1", tmp_path, mlflow_uri=uri) as tracker:
            tracker.log("summarizer", 1, {"kl": 0.1})
            time.sleep(2)  # the run exists and the first point went through
            stop_session(proc, signal.SIGKILL)  # the server dies mid-run
            for step in range(2, 40):
                tracker.log("summarizer", step, {"kl": 0.1})
                time.sleep(0.05)
    finally:
        stop_session(proc, signal.SIGKILL)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tracking:")]
    assert len(lines) == 1, lines
    assert len(scalar_points(tmp_path / "tensorboard" / "summarizer")["kl"]) == 39


def test_without_a_tracking_uri_nothing_is_attempted(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = tracking.stage_tracker("warmup", tmp_path, {}, None)
    assert tracker.mlflow is None
    tracker.close()


def test_curves_are_copied_to_the_output_while_it_trains_and_never_into_a_committed_one(tmp_path):
    out = tmp_path / "out"
    live = f"file://{tmp_path}/root/ppo-round/k/tensorboard"
    manifest = tmp_path / "root" / "ppo-round" / "k" / "_MANIFEST.json"
    with tracking.Tracker(
        "ppo-round-1", out, live_uri=live, sync_seconds=0.0, committed_uri=manifest.as_uri()
    ) as tracker:
        tracker.log("summarizer", 1, {"kl": 0.1})
        copied = storage.local_path(live) / "summarizer"
        assert [p for p in copied.iterdir() if p.name.startswith("events.out.tfevents")]
        manifest.write_text("{}")  # another writer of the same key committed meanwhile
        before = {p: p.stat().st_mtime_ns for p in copied.iterdir()}
        for step in range(2, 5):
            tracker.log("summarizer", step, {"kl": 0.1})
        assert {p: p.stat().st_mtime_ns for p in copied.iterdir()} == before and tracker.live_uri is None
    assert len(scalar_points(out / "tensorboard" / "summarizer")["kl"]) == 4
