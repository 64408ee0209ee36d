"""A store you can trust: nothing in a bucket runs code, nothing that is not a stage's own output is replaced,
inputs are verified as they are read, and settings that cannot be are refused (file:// and loopback S3)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from conftest import SMOKE_PPO

from blueprint.config import parse
from blueprint.stages import ppo_round
from blueprint.store import artifacts, storage


class Planted:
    """A pickle that, if ever loaded, leaves a marker file (what `os.system` would do for an attacker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def _plant_checkpoint(chain, tmp_path: Path, out_uri: str, name: str) -> Path:
    """Commit, as a bucket writer could, a ppo-round checkpoint whose trainer state is a code-running pickle."""
    cfg = parse(ppo_round.PPORoundConfig, SMOKE_PPO)
    real = ppo_round.run(
        cfg,
        shards=chain["shards"],
        base=chain["base"],
        adapters=chain["adapters"],
        artifact_root=chain["root"],
        progress=False,
    )
    local, _ = artifacts.download_artifact(real.uri, tmp_path / "copy")
    marker = tmp_path / "marker"
    for f in local.glob("trainer_state.*"):
        f.unlink()
    (local / name).write_bytes(pickle.dumps(Planted(marker)))
    artifacts.commit(
        local,
        storage.join(out_uri, ppo_round.CHECKPOINT),
        stage="ppo-round-checkpoint",
        config={},
        inputs={},
        metrics={},
    )
    return marker


@pytest.mark.parametrize("name", ["trainer_state.safetensors", "trainer_state.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_not_executed(smoke_chain, tmp_path, name):
    out_uri = f"file://{tmp_path}/round"
    marker = _plant_checkpoint(smoke_chain, tmp_path, out_uri, name)
    cfg = parse(ppo_round.PPORoundConfig, SMOKE_PPO)
    with pytest.raises(artifacts.ArtifactError, match="pickle|not a valid training state"):
        ppo_round.run(
            cfg,
            shards=smoke_chain["shards"],
            base=smoke_chain["base"],
            adapters=smoke_chain["adapters"],
            out_uri=out_uri,
            progress=False,
        )
    assert not marker.exists(), "the planted pickle ran"
    assert not storage.exists(artifacts.manifest_uri(out_uri)), "a round from a planted state was committed"


def test_no_pickle_loading_and_no_remote_code_anywhere_in_the_package():
    """The one pickle.loads is blueprint/data/workers.py's: frames on the pipes to its own child processes, never
    bytes from the store."""
    root = Path(__file__).resolve().parents[2]
    for package in ("blueprint", "components", "pipelines"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            for needle in ("weights_only=False", "pickle.load", "torch.load(", "trust_remote_code=True"):
                if path.name == "workers.py" and needle == "pickle.load":
                    assert "storage" not in text, "workers.py must stay a pipe protocol, nothing read from storage"
                    continue
                assert needle not in text, f"{path.relative_to(root)} uses {needle}"


@pytest.mark.parametrize(
    "setting, value",
    [
        ("warmup.lr", "inf"),
        ("warmup.lr", "nan"),
        ("warmup.steps", "1e9999"),
        ("ppo-round.seed", str(2**64)),
        ("shard.eval_fraction", "-inf"),
    ],
)
def test_numbers_that_cannot_be_are_refused_naming_the_setting(setting, value, tmp_path, capsys):
    from blueprint.pipelines.cli import main

    assert main(["run", "--profile", "smoke", "--artifact-root", str(tmp_path), "--set", f"{setting}={value}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and repr(setting.split(".")[1]) in error


def test_a_diverging_warmup_fails_naming_lr_and_commits_nothing(smoke_chain, tmp_path):
    from conftest import SMOKE_WARMUP

    from blueprint.errors import NonFiniteLoss
    from blueprint.stages import warmup

    cfg = parse(warmup.WarmupConfig, {**SMOKE_WARMUP, "lr": 1e38})
    with pytest.raises(NonFiniteLoss, match="lower 'lr'"):
        warmup.run(
            cfg,
            shards=smoke_chain["shards"],
            base=smoke_chain["base"],
            artifact_root=f"file://{tmp_path}",
            progress=False,
        )
    assert artifacts.cached_outputs(f"file://{tmp_path}") == []


def _copy_artifact(uri: str, target: str, tmp_path: Path) -> str:
    local, _ = artifacts.download_artifact(uri, tmp_path / "dl")
    storage.upload_dir(local, target)
    storage.write_bytes(artifacts.manifest_uri(target), storage.read_bytes(artifacts.manifest_uri(uri)))
    return target


@pytest.mark.parametrize("store", ["file", "s3"])
@pytest.mark.parametrize("where", ["middle", "footer"])
def test_a_same_size_bit_flip_in_a_shard_fails_naming_the_file_and_nothing_trains_on_it(
    smoke_chain, tmp_path, request, store, where
):
    from conftest import SMOKE_WARMUP

    from blueprint.data.readers import read_pairs
    from blueprint.stages import warmup

    root = f"file://{tmp_path}/root" if store == "file" else request.getfixturevalue("s3_bucket") + "/root"
    shards = _copy_artifact(smoke_chain["shards"], storage.join(root, "shard", "copy"), tmp_path)
    rel = sorted(r for r in artifacts.read_manifest(shards)["files"] if r.startswith("train/"))[0]
    data = bytearray(storage.read_bytes(storage.join(shards, rel)))
    at = len(data) // 2 if where == "middle" else len(data) - 12  # the footer's metadata sits just before its length
    data[at] ^= 0x01
    storage.write_bytes(storage.join(shards, rel), bytes(data))
    with pytest.raises(artifacts.ArtifactError, match=f"{shards} is damaged: {rel} does not match its sha256"):
        read_pairs(shards, "train")
    cfg = parse(warmup.WarmupConfig, SMOKE_WARMUP)
    with pytest.raises(artifacts.ArtifactError, match=rel):
        warmup.run(cfg, shards=shards, base=smoke_chain["base"], artifact_root=root, force=True, progress=False)
    assert [r["stage"] for r in artifacts.cached_outputs(root)] == ["shard"], "a stage committed from damaged input"


@pytest.mark.parametrize(
    "base, offline, says",
    [
        ("/nonexistent/model", False, "no such directory"),
        ("./not-here", False, "no such directory"),
        ("org/not-cached-model", True, "HF_HUB_OFFLINE"),
    ],
)
def test_a_base_that_cannot_load_is_refused_before_the_first_stage(base, offline, says, tmp_path, capsys, monkeypatch):
    from blueprint.pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["run", "--profile", "smoke", "--artifact-root", "./art", "--base", base]) == 2
    error = capsys.readouterr().err
    assert "parameter base" in error and says in error
    assert not (tmp_path / ".kfp-local").exists() and artifacts.cached_outputs(f"file://{tmp_path}/art") == []


def _chain(root: str) -> dict[str, artifacts.StageOutput]:
    """shard -> bootstrap -> warmup -> ppo-round -> evaluate -> merge with the smoke settings, under `root`."""
    from conftest import SMOKE_BOOTSTRAP, SMOKE_SHARD, SMOKE_WARMUP

    from blueprint.stages import bootstrap, evaluate, merge, shard, warmup

    kw = dict(artifact_root=root, progress=False)
    out = {"shard": shard.run(parse(shard.ShardConfig, SMOKE_SHARD), **kw)}
    s = out["shard"].uri
    out["bootstrap"] = bootstrap.run(parse(bootstrap.BootstrapConfig, SMOKE_BOOTSTRAP), shards=s, **kw)
    b = out["bootstrap"].uri
    out["warmup"] = warmup.run(parse(warmup.WarmupConfig, SMOKE_WARMUP), shards=s, base=b, **kw)
    out["ppo-round"] = ppo_round.run(
        parse(ppo_round.PPORoundConfig, SMOKE_PPO), shards=s, base=b, adapters=out["warmup"].uri, **kw
    )
    out["evaluate"] = evaluate.run(
        parse(evaluate.EvaluateConfig, {"max_examples": 8, "max_new_tokens": 8}),
        shards=s,
        base=b,
        adapters=out["ppo-round"].uri,
        **kw,
    )
    out["merge"] = merge.run(
        parse(merge.MergeConfig, {}), base=b, adapters=out["ppo-round"].uri, evaluation=out["evaluate"].uri, **kw
    )
    return out


@pytest.mark.slow
def test_a_copied_root_keeps_every_cache_hit_even_where_outputs_are_recomputed(tmp_path):
    first = _chain(f"file://{tmp_path}/a")
    for out in first.values():
        for rel in out.manifest["files"]:
            if rel.endswith((".json", ".jsonl", ".md")):
                assert str(tmp_path) not in storage.read_text(storage.join(out.uri, rel)), f"{rel} names the root"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert all(out.cached for out in _chain(f"file://{tmp_path}/b").values())
    for stage in ("warmup", "ppo-round"):  # recomputed in the copy: same bytes, so what follows stays a hit
        shutil.rmtree(storage.local_path(first[stage].uri.replace(f"{tmp_path}/a", f"{tmp_path}/b")))
    again = _chain(f"file://{tmp_path}/b")
    assert {s: o.cached for s, o in again.items()} == {
        "shard": True,
        "bootstrap": True,
        "warmup": False,
        "ppo-round": False,
        "evaluate": True,
        "merge": True,
    }


def test_training_state_round_trips_without_name_clashes_and_refuses_a_foreign_json(tmp_path):
    import json

    import torch

    from blueprint.store.tensor_state import StateFileError, load_state, save_state

    state = {"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}, 7: {"step": torch.tensor(4)}, "betas": (0.9, 0.95)}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert torch.equal(back["a.b"], torch.ones(2)) and torch.equal(back["a"]["b"], torch.zeros(3))
    assert int(back[7]["step"]) == 4 and back["betas"] == (0.9, 0.95)
    (tmp_path / "s.json").write_text(json.dumps({"__items__": [1, 2, 3]}))
    with pytest.raises(StateFileError, match="not a training state"):
        load_state(tmp_path, "s")


@pytest.mark.parametrize("store", ["file", "s3"])
def test_a_lock_left_by_a_dead_writer_or_holding_garbage_is_broken_and_a_live_one_is_kept(store, tmp_path, request):
    import json
    import os

    from blueprint.store import commit_lock

    root = f"file://{tmp_path}" if store == "file" else request.getfixturevalue("s3_bucket")
    prefix = storage.join(root, "stage", "key")
    lock = commit_lock.lock_uri(prefix)
    for dead in (
        {**commit_lock.writer_identity(), "pid": 2**22 + 17},  # same host and pid namespace, pid gone
        "{half a lock",
    ):
        storage.write_text(lock, dead if isinstance(dead, str) else json.dumps(dead))
        with commit_lock.held(prefix, done=lambda: False, wait_seconds=5) as refresh:
            assert refresh is not None
            refresh()
        assert not storage.exists(lock)
    live = {**commit_lock.writer_identity(), "pid": os.getpid(), "pidns": "pid:[another namespace]"}
    storage.write_text(lock, json.dumps(live))  # a container on this host: its pid means nothing here
    with pytest.raises(commit_lock.LockTimeout):
        with commit_lock.held(prefix, done=lambda: False, wait_seconds=1):
            pass
    assert json.loads(storage.read_text(lock))["writer"] == live["writer"]


def test_a_failed_forced_rebuild_leaves_the_committed_output_as_it_was(tmp_path):
    def writer(local: Path) -> dict:
        (local / "x.txt").write_text("one")
        return {}

    def broken(local: Path) -> dict:
        raise ValueError("boom")

    out = artifacts.reuse_or_commit("demo", {}, {}, writer, out_uri=f"file://{tmp_path}/o")
    with pytest.raises(ValueError, match="boom"):
        artifacts.reuse_or_commit("demo", {}, {}, broken, out_uri=out.uri, force=True)
    assert set(storage.list_files(out.uri)) == {"x.txt", artifacts.MANIFEST_NAME}
    artifacts.read_manifest(out.uri, verify="full")


def test_a_bug_in_a_task_surfaces_its_traceback_and_counts_as_a_bug():
    import io

    from blueprint.pipelines.run_log import TaskLogFilter

    out = io.StringIO()
    log = TaskLogFilter(out)
    log.write("12:00:00.000 - INFO - Executing task 'warmup'\n12:00:00.001 - INFO - Streamed logs:\n")
    log.write("    Traceback (most recent call last):\n      File \"x.py\", line 1, in f\n    KeyError: 'oops'\n")
    log.write("12:00:01.000 - ERROR - Task 'warmup' finished with status FAILURE\n")
    failed = log.task_failed()
    assert failed is not None and not failed.user
    assert "task warmup failed with a bug" in str(failed) and "KeyError: 'oops'" in str(failed)
    assert "Traceback" not in out.getvalue() and "warmup: failed after" in out.getvalue()
