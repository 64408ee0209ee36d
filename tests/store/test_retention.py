"""Retention: only what no promoted model and none of the last K runs reaches goes, files first, manifest last."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from blueprint.errors import InputError
from blueprint.store import artifacts, retention, runs, storage

LATER = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)


def output(root: str, stage: str, name: str, tmp_path: Path, **inputs: str) -> str:
    local = tmp_path / f"{stage}-{name}"
    local.mkdir()
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
