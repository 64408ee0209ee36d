"""Retention: only what no promoted model and none of the last K runs reaches goes, files first, manifest last."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from blueprint.errors import InputError
from blueprint.store import artifacts, retention, runs, storage

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)


def output(root: str, stage: str, name: str, tmp_path: Path, **inputs: str) -> str:
    local = tmp_path / f"{stage}-{name}"
    local.mkdir(parents=True)
    (local / "data.bin").write_bytes(name.encode() * 100)
    uri = f"{root}/{stage}/{name}"
    artifacts.commit(local, uri, stage=stage, config={}, inputs=inputs, metrics={}, key=name)
    return uri


@pytest.fixture()
def store(tmp_path):
    """shards <- warmup <- round-a (run 1) and round-b (run 2), both rounds on the same warmup."""
    root = f"file://{tmp_path}/art"
    shards = output(root, "shard", "s", tmp_path)
    warm = output(root, "warmup", "w", tmp_path, shards=shards)
    a = output(root, "ppo-round", "a", tmp_path, adapters=warm, shards=shards)
    b = output(root, "ppo-round", "b", tmp_path, adapters=warm, shards=shards)
    runs.write_record(root, "run-1", {"adapters": a})
    runs.write_record(root, "run-2", {"adapters": b})
    return dict(root=root, shards=shards, warm=warm, a=a, b=b)


def test_the_last_runs_keep_their_whole_chain_and_the_rest_goes(store):
    found = retention.plan(store["root"], keep_runs=1, grace_seconds=3600, now=LATER)
    assert [o["uri"] for o in found.doomed] == [store["a"]]  # run-1's own round; its warmup is run-2's too
    assert found.kept == 3 and found.records == [runs.record_uri(store["root"], "run-1")]
    retention.collect(found)
    assert not storage.exists(store["a"]) and storage.exists(artifacts.manifest_uri(store["b"]))
    assert [r["run"] for r in runs.list_records(store["root"])] == ["run-2"]


def test_nothing_younger_than_the_grace_period_is_deleted(store):
    found = retention.plan(store["root"], keep_runs=0, grace_seconds=7 * 86_400, now=LATER)
    assert found.doomed == [] and found.young == 4 and found.records == []


def test_a_root_without_run_records_is_refused_and_nothing_is_deleted(tmp_path):
    root = f"file://{tmp_path}/art"
    output(root, "shard", "s", tmp_path)
    with pytest.raises(InputError, match="holds no run records: gc cannot tell"):
        retention.plan(root, keep_runs=1, grace_seconds=0, now=LATER)
    assert storage.exists(f"{root}/shard/s/{artifacts.MANIFEST_NAME}")


def test_an_output_loses_its_manifest_first_so_an_interrupted_gc_leaves_a_partial_prefix(store, monkeypatch):
    order: list[str] = []
    real = storage.delete_file

    def delete_then_die(uri: str) -> None:
        order.append(uri.rsplit("/", 1)[-1])
        real(uri)
        if len(order) == 1:
            raise KeyboardInterrupt  # gc killed right after its first delete

    monkeypatch.setattr(storage, "delete_file", delete_then_die)
    with pytest.raises(KeyboardInterrupt):
        retention.delete_output(store["a"])
    assert order == [artifacts.MANIFEST_NAME]
    assert storage.local_path(store["a"] + "/data.bin").exists()  # files still there, but no manifest: partial
    assert store["a"] not in [o["uri"] for o in artifacts.cached_outputs(store["root"])]
    monkeypatch.setattr(storage, "delete_file", real)
    retention.delete_output(store["a"])
    assert not storage.local_path(store["a"]).exists()


def test_a_copied_root_keeps_what_its_records_reach(store, tmp_path):
    import shutil

    shutil.copytree(storage.local_path(store["root"]), tmp_path / "copy")
    found = retention.plan(f"file://{tmp_path}/copy", keep_runs=1, grace_seconds=3600, now=LATER)
    assert [o["uri"].rsplit("/", 2)[-2:] for o in found.doomed] == [["ppo-round", "a"]] and found.kept == 3


def test_a_promoted_pointer_keeps_its_chain_with_no_run_kept(store):
    from blueprint.store import promotion

    pointer = {k: "" for k in promotion.REQUIRED} | {"name": "blueprint", "adapters": store["a"], "metrics": {}}
    promotion.write_pointer(store["root"], "blueprint", pointer, None)
    found = retention.plan(store["root"], keep_runs=0, grace_seconds=0, now=LATER)
    assert [o["uri"] for o in found.doomed] == [store["b"]]
    assert json.loads(storage.read_text(promotion.pointer_uri(store["root"], "blueprint")))["adapters"] == "ppo-round/a"


def backdate(uri: str, days: float) -> None:
    """Rewrite an output's `created` as if it was committed `days` ago (its identity leaves the time out)."""
    muri = artifacts.manifest_uri(uri)
    manifest = storage.read_json(muri)
    manifest["created"] = (dt.datetime.now(dt.UTC) - dt.timedelta(days=days)).isoformat(timespec="seconds")
    storage.write_json(muri, manifest)


def writes(text: str):
    def compute(local: Path) -> dict:
        (local / "data.txt").write_text(text)
        return {}

    return compute


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/art"
    return f"file://{tmp_path}/art"


def test_an_old_output_a_running_pipeline_took_as_a_cache_hit_is_not_collected_under_it(root):
    from blueprint.pipelines import cli

    shards = artifacts.reuse_or_commit("shard", {"rows": 1}, {}, writes("rows"), artifact_root=root).uri
    finished = artifacts.reuse_or_commit("shard", {"rows": 2}, {}, writes("other rows"), artifact_root=root).uri
    runs.write_record(root, "finished", {"shards": finished})
    backdate(shards, days=10)
    hit = artifacts.reuse_or_commit("shard", {"rows": 1}, {}, writes("never computed"), artifact_root=root)  # a new run
    assert hit.cached and hit.uri == shards
    assert cli.main(["gc", root, "--keep-runs", "1", "--older-than", "1d", "--yes"]) == 0
    adapters = artifacts.reuse_or_commit("warmup", {}, {"shards": shards}, writes("adapters"), artifact_root=root)
    assert not adapters.cached  # the run's next stage still reads its input


def test_an_output_a_run_takes_between_gc_plan_and_delete_is_spared(root):
    shards = artifacts.reuse_or_commit("shard", {"rows": 1}, {}, writes("rows"), artifact_root=root).uri
    runs.write_record(root, "finished", {})
    backdate(shards, days=10)
    found = retention.plan(root, keep_runs=1, grace_seconds=86_400)
    assert [o["uri"] for o in found.doomed] == [shards]
    # a run starts
    assert artifacts.reuse_or_commit("shard", {"rows": 1}, {}, writes("rows"), artifact_root=root).cached
    retention.collect(found)
    assert artifacts.read_manifest(shards)["key"] == shards.rsplit("/", 1)[1]


def test_what_an_output_used_within_the_grace_period_reads_stays_with_it(store, tmp_path):
    for name in ("shards", "warm", "a", "b"):
        backdate(store[name], days=10)
    output(store["root"], "evaluate", "e", tmp_path, adapters=store["a"])  # a run still going: no record yet
    found = retention.plan(store["root"], keep_runs=0, grace_seconds=86_400)
    assert [o["uri"] for o in found.doomed] == [store["b"]] and found.young == 4


def test_a_manifest_created_without_a_timezone_is_read_as_utc(store):
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    for name, created in (("a", "2020-01-01T00:00:00"), ("b", an_hour_ago.strftime("%Y-%m-%dT%H:%M:%S"))):
        muri = artifacts.manifest_uri(store[name])
        storage.write_json(muri, storage.read_json(muri) | {"created": created})
    found = retention.plan(store["root"], keep_runs=0, grace_seconds=86_400)
    assert [o["uri"] for o in found.doomed] == [store["a"]]  # a is six years old; b an hour, as UTC


def test_gc_collects_partial_prefixes_past_the_grace_period_that_no_live_writer_holds(root, tmp_path):
    from blueprint.store import commit_lock

    finished = output(root, "shard", "s", tmp_path)
    runs.write_record(root, "r", {"shards": finished})
    interrupted = output(root, "ppo-round", "0123456789abcdef", tmp_path)
    storage.delete_file(artifacts.manifest_uri(interrupted))  # a gc killed right after deleting the manifest
    failed = f"{root}/warmup/0123456789abcdef"  # a commit killed mid-upload, in a stage folder with no output yet
    held = f"{root}/warmup/fedcba9876543210"  # a live writer uploading now
    dead = f"{root}/merge/00000000000000aa"  # its writer died holding the lock
    for uri in (failed, held, dead):
        storage.write_text(f"{uri}/adapters/part.bin", "half")
    commit_lock.create_only(commit_lock.lock_uri(held), json.dumps(commit_lock.writer_identity()).encode())
    storage.write_json(commit_lock.lock_uri(dead), {"host": "elsewhere", "pid": 1, "writer": "w", "time": 0})
    storage.write_text(f"{root}/notes/drafts/todo.txt", "the user's own file under the root")
    nested = output(root, "exports", "00000000000000cc/v1", tmp_path)  # a committed output deeper down: not partial

    assert retention.plan(root, keep_runs=1, grace_seconds=3600).partial == []  # all written just now
    found = retention.plan(root, keep_runs=1, grace_seconds=3600, now=LATER)
    assert sorted(p["uri"] for p in found.partial) == sorted([interrupted, failed, dead])
    assert found.bytes == sum(p["bytes"] for p in found.partial)
    retention.collect(found)
    assert [storage.list_files(u) for u in (interrupted, failed, dead)] == [{}, {}, {}]
    assert not storage.exists(commit_lock.lock_uri(dead))
    assert storage.list_files(held) == {"adapters/part.bin": 4} and storage.exists(commit_lock.lock_uri(held))
    assert storage.exists(f"{root}/notes/drafts/todo.txt") and storage.exists(artifacts.manifest_uri(finished))
    assert storage.exists(artifacts.manifest_uri(nested))
