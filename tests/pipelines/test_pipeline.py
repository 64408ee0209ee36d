"""The KFP pipeline: golden compiled YAML, the unrolled DAG, validation before any stage, and end-to-end runs
through kfp.local (the very same definition Kubeflow runs) to file:// and to a loopback S3 endpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from blueprint.config import ConfigError
from blueprint.eval.promotion_rule import missed_floors
from blueprint.pipelines import golden, local_run
from blueprint.store import artifacts, storage
from tests.loopback import stop_session

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(golden.CASES))
def test_compiled_pipeline_matches_golden_snapshot(name, tmp_path):
    # Compared as parsed documents: the SDK's header comments list dict defaults in hash order.
    fresh = yaml.safe_load(golden.compile_case(name, tmp_path).read_text())
    expected = yaml.safe_load((golden.GOLDEN_DIR / name).read_text())
    assert fresh == expected, (
        f"compiled pipeline differs from tests/golden/{name}: review the diff, then "
        "regenerate with `python -m blueprint.pipelines.golden`"
    )


def _dag(name: str) -> dict[str, list[str]]:
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(yaml.safe_load((golden.GOLDEN_DIR / name).read_text()), spec)
    return {task: sorted(t.dependent_tasks) for task, t in spec.root.dag.tasks.items()}


def test_dag_for_one_epoch():
    assert _dag("pipeline_epochs1.yaml") == {
        "shard-plan": [],
        "for-loop-1": ["shard-plan"],  # ParallelFor over the partitions: the shard-part tasks
        "shard": ["for-loop-1"],
        "bootstrap": ["shard"],
        "warmup": ["bootstrap", "shard"],
        "evaluate": ["bootstrap", "shard", "warmup"],
        "ppo-round": ["bootstrap", "shard", "warmup"],
        "evaluate-2": ["bootstrap", "evaluate", "ppo-round", "shard"],
        "merge": ["bootstrap", "evaluate-2", "ppo-round"],
        "gate": ["bootstrap", "evaluate-2", "merge", "ppo-round", "shard"],
        "condition-2": ["gate"],  # dsl.If(gate decision == "promote"): the promote task
    }


def test_dag_for_three_epochs_chains_rounds_and_runs_each_evaluation_beside_the_next_round():
    dag = _dag("pipeline_epochs3.yaml")
    assert sorted(dag) == sorted(
        [
            "shard-plan",
            "for-loop-1",
            "shard",
            "bootstrap",
            "warmup",
            "evaluate",
            "evaluate-2",
            "evaluate-3",
            "evaluate-4",
            "ppo-round",
            "ppo-round-2",
            "ppo-round-3",
            "merge",
            "gate",
            "condition-2",
        ]
    )
    assert "ppo-round" in dag["ppo-round-2"] and "ppo-round-2" in dag["ppo-round-3"]
    assert "ppo-round-2" in dag["evaluate-3"] and "evaluate-3" not in dag["ppo-round-3"]
    assert dag["merge"] == ["bootstrap", "evaluate-4", "ppo-round-3"]


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"epochs": 0}, "epochs"),
        ({"overrides": {"ppo-round": {"ppo_steps": -1}}}, "ppo_settings"),
        ({"overrides": {"warmup": {"stepz": 3}}}, "warmup_settings"),
        ({"source": "svn:nowhere"}, "source"),
        ({"source": "dir:/no/such/dir"}, "source"),
        ({"coder_base": "/no/such/model"}, "parameter coder_base"),
    ],
)
def test_invalid_parameters_are_rejected_before_any_stage_runs(kwargs, parameter, tmp_path):
    with pytest.raises(ConfigError, match=parameter):
        local_run.plan(profile="smoke", artifact_root=str(tmp_path / "a"), **kwargs)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_unwritable_artifact_root_fails_at_start(unwritable_dir):
    with pytest.raises(storage.StorageError, match="locked"):
        local_run.plan(profile="smoke", artifact_root=str(unwritable_dir / "art"))


def _manifests(root: str) -> dict[str, bytes]:
    return {
        rel: storage.read_bytes(storage.join(root, rel))
        for rel in storage.list_files(root)
        if rel.endswith(artifacts.MANIFEST_NAME)
    }


@pytest.mark.slow
def test_smoke_runs_racing_into_one_s3_root_agree_promote_rerun_from_cache_and_gc_frees_only_a_losers_outputs(
    s3_bucket, tmp_path, monkeypatch, capsys
):
    """The smoke pipeline end to end through kfp.local to a loopback S3 endpoint, twice at once: `blueprint run` in
    a process of its own and, half a second later, the same plan in this one. Every task races the other run's to
    commit; both succeed with the same models, which are promoted (the smoke model clears the sanity floors). Then
    a rerun that is all cache hits; a run with worse settings (no PPO learning: lr 1e-9) loses its gate, gc keeping
    no recent run frees the loser's own outputs, and the promoted run stays cached.
    (`make run`'s file:// root end to end: tests/test_progress.py.)"""
    monkeypatch.chdir(tmp_path)
    root = s3_bucket + "/art"
    (tmp_path / "race").mkdir()
    racer = subprocess.Popen(
        [sys.executable, "-m", "blueprint.pipelines.cli", "run", "--profile", "smoke", "--epochs", "1"]
        + ["--artifact-root", root],
        cwd=tmp_path / "race",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its task processes with it, for the kill below
    )
    try:
        time.sleep(0.5)
        plan = local_run.plan(profile="smoke", epochs=1, artifact_root=root)
        result = local_run.run(plan, local_root=tmp_path / "kfp")
        out, err = racer.communicate(timeout=900)
    finally:  # a failure here leaves no run writing into the bucket behind it
        stop_session(racer, signal.SIGKILL)
    assert racer.returncode == 0, out[-3000:] + err[-3000:]
    models = result["outputs"]["models"]
    assert f"merged models: {storage.join(models, 'summarizer')} and {storage.join(models, 'coder')}" in out
    from transformers import AutoModelForCausalLM

    local = storage.download_dir(storage.join(models, "coder"), tmp_path / "coder")
    assert AutoModelForCausalLM.from_pretrained(local).config.model_type == "llama"
    metrics = storage.read_json(storage.join(result["outputs"]["evaluation"], "metrics.json"))
    assert {"pairwise_accuracy", "reward_gen_mean", "code_parse_rate"} <= set(metrics)
    for rel in storage.list_files(root):
        assert not rel.endswith(".lock"), f"a lock was left behind: {rel}"
        if rel.endswith(artifacts.MANIFEST_NAME):  # nobody's files were replaced under a manifest
            artifacts.read_manifest(storage.join(root, rel.rsplit("/", 1)[0]), verify="full")
    before = _manifests(root)
    assert sorted({rel.split("/")[0] for rel in before}) == [
        "bootstrap",
        "evaluate",
        "gate",
        "merge",
        "ppo-round",
        "shard",
        "shard-part",
        "warmup",
    ]
    # The smoke profile is tuned so its model clears the sanity floors every profile keeps (issue 27): with no
    # champion yet, a gate promotes it and the pointer names `models`. Which run's gate did is the race's: both
    # judged with no champion (one gate output, the same for both), or one after the other's promotion (a second
    # gate output, "keep": a model does not beat itself). A rerun judges afresh only in the first case.
    assert not missed_floors(metrics)
    from blueprint.store import promotion

    assert promotion.read_pointer(root, "blueprint")[0]["models"] == models
    gates = [rel for rel in before if rel.startswith("gate/")]
    assert len(gates) in (1, 2) and result["outputs"]["decision"] in ("promote", "keep"), gates
    again = local_run.run(plan, local_root=tmp_path / "kfp2")

    def model_stages(manifests: dict) -> dict:
        return {k: v for k, v in manifests.items() if not k.startswith("gate/")}

    assert model_stages(_manifests(root)) == model_stages(before), "a rerun with nothing changed recomputed a stage"
    # the rerun's gate meets its own model as the champion: it does not beat itself, so nothing is promoted again
    assert again["outputs"] == {**result["outputs"], "decision": "keep"}
    assert_answered_without_a_task_process(again["log"], judged=len(gates) == 1)
    gc_frees_only_the_losing_run(plan, root, tmp_path, capsys)


def gc_frees_only_the_losing_run(promoted: local_run.RunPlan, root: str, tmp_path: Path, capsys) -> None:
    from blueprint.pipelines import cli

    worse = local_run.plan(
        profile="smoke", epochs=1, artifact_root=root, overrides={"ppo-round": {"lr": 1e-9, "coder_lr": 1e-9}}
    )
    assert local_run.run(worse, local_root=tmp_path / "kfp3")["outputs"]["decision"] == "keep"
    kept = _manifests(root)
    capsys.readouterr()
    assert cli.main(["gc", root, "--keep-runs", "0", "--older-than", "0s"]) == 0
    listed = capsys.readouterr().out
    assert "would delete ppo-round/" in listed and "would delete merge/" in listed and "dry run" in listed
    assert _manifests(root) == kept  # a dry run deletes nothing
    assert cli.main(["gc", root, "--keep-runs", "0", "--older-than", "0s", "--yes"]) == 0
    freed = capsys.readouterr().out
    # the loser's round, its evaluation, merge and gate, and the rerun's gate (the champion judged against itself)
    assert "freed" in freed and "in 5 outputs" in freed, freed
    remaining = _manifests(root)
    assert set(remaining) < set(kept)
    again = local_run.run(promoted, local_root=tmp_path / "kfp4")
    assert {k: v for k, v in _manifests(root).items() if not k.startswith("gate/")} == {
        k: v for k, v in remaining.items() if not k.startswith("gate/")
    }, "the promoted run was not all cache hits"
    assert_answered_without_a_task_process(again["log"], judged=True)


def assert_answered_without_a_task_process(log_uri: str, judged: bool = False) -> None:
    """A rerun's log: every task finished, each answered as a cache hit in `blueprint run`'s own process (a task's
    process starts with kfp's executor looking for its component, and that line is nowhere). `judged`: the gate
    alone runs again, as the champion it meets is the model the first run promoted."""
    log = storage.read_text(log_uri)
    tasks = log.count("Executing task")
    assert tasks == 10, log  # promote runs only on "promote"
    assert len(re.findall(r"Task .+ finished with status .*SUCCESS", log)) == tasks, log
    started = re.findall(r"Looking for component `([\w-]+)`", log)
    assert started == (["gate"] if judged else []), f"a cached task started its own process: {started}"
    assert log.count('"cached": true') == tasks - 1 - judged, log  # shard-plan has no output of its own


def test_sigkilled_stage_reruns_to_the_same_output_as_an_uninterrupted_run(smoke_chain, tmp_path):
    blueprint = [
        sys.executable,
        "-m",
        "blueprint.pipelines.cli",
        "stage",
        "ppo-round",
        "--quiet",
        "--input",
        f"shards={smoke_chain['shards']}",
        "--input",
        f"base={smoke_chain['base']}",
        "--input",
        f"adapters={smoke_chain['adapters']}",
    ]
    settings = [
        "--set",
        "ppo_steps=4",
        "--set",
        "checkpoint_every=1",
        "--set",
        "supervised_steps=1",
        "--set",
        "batch_size=4",
        "--set",
        "mini_batch_size=2",
        "--set",
        "ppo_epochs=1",
        "--set",
        "max_new_tokens=16",
        "--set",
        "max_code_tokens=128",
        "--set",
        "probe_size=4",
    ]
    straight = subprocess.run(
        blueprint + settings + ["--out", f"file://{tmp_path}/straight"], capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    victim_uri = f"file://{tmp_path}/victim"
    proc = subprocess.Popen(
        blueprint + settings + ["--out", victim_uri],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = Path(storage.local_path(victim_uri)) / "_checkpoint" / artifacts.MANIFEST_NAME
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the round never wrote a checkpoint before it was killed"
    assert not (Path(storage.local_path(victim_uri)) / artifacts.MANIFEST_NAME).exists()
    rerun = subprocess.run(blueprint + settings + ["--out", victim_uri], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    def pick(uri: str) -> dict[str, str]:
        return {k: v["sha256"] for k, v in artifacts.read_manifest(uri)["files"].items() if k.endswith(".safetensors")}

    assert pick(victim_uri) == pick(f"file://{tmp_path}/straight")


def test_deleting_one_evaluation_recomputes_only_it(smoke_chain):
    """A recomputed output with the same bytes keeps its identity, so what consumes it stays a cache hit."""
    from blueprint.config import parse
    from blueprint.stages import evaluate

    cfg = parse(evaluate.EvaluateConfig, {"max_examples": 4, "max_new_tokens": 8, "max_code_tokens": 64})
    args = dict(
        shards=smoke_chain["shards"],
        base=smoke_chain["base"],
        adapters=smoke_chain["adapters"],
        artifact_root=smoke_chain["root"],
        progress=False,
    )
    first = evaluate.run(cfg, **args)
    second = evaluate.run(parse(evaluate.EvaluateConfig, {**cfg.__dict__, "epoch": 1}), previous=first.uri, **args)
    storage.delete_prefix(first.uri)
    redone = evaluate.run(cfg, **args)
    assert not redone.cached and redone.uri == first.uri
    again = evaluate.run(parse(evaluate.EvaluateConfig, {**cfg.__dict__, "epoch": 1}), previous=redone.uri, **args)
    assert again.cached and again.uri == second.uri
