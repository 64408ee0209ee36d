"""The shard stage fanned out: any number of partitions gives the dataset one task gives, byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blueprint.config import parse
from blueprint.data.partitions import balanced
from blueprint.errors import InputError
from blueprint.runtime import shard_fanout
from blueprint.stages import shard
from blueprint.store import artifacts

FILES = sorted(Path(os.__file__).parent.glob("[a-p]*.py"))[:40]


def shards_of(out: artifacts.StageOutput) -> dict[str, str]:
    return {rel: meta["sha256"] for rel, meta in out.manifest["files"].items()}


def fanned_out(cfg: shard.ShardConfig, root: str) -> artifacts.StageOutput:
    parts = [shard_fanout.run_part(cfg, p, artifact_root=root, progress=False).uri for p in shard_fanout.plan(cfg)]
    return shard_fanout.run_dataset(cfg, parts, artifact_root=root, progress=False)


def test_balanced_ranges_are_contiguous_non_empty_and_near_equal():
    assert balanced([10] * 10, 3) == [(0, 4), (4, 7), (7, 10)]  # a range ends with the input that crosses its share
    assert balanced([100, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert balanced([1, 1], 5) == [(0, 1), (1, 2)]  # never more ranges than inputs
    assert balanced([1000, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]  # one huge file cannot empty the others
    assert balanced([5], 1) == [(0, 1)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("fanout") / "src"
    src.mkdir()
    for f in FILES:
        shutil.copy2(f, src / f.name)
    return src


@pytest.mark.parametrize("count", [1, 2, 5])
def test_any_number_of_partitions_gives_the_dataset_of_one_task(tree, tmp_path, count):
    settings = {"source": f"dir:{tree}", "num_shards": 3, "workers": 1}
    single = shard.run(parse(shard.ShardConfig, settings), artifact_root=f"file://{tmp_path}/one", progress=False)
    cfg = parse(shard.ShardConfig, {**settings, "partitions": count})
    assert len(shard_fanout.plan(cfg)) == count
    out = fanned_out(cfg, f"file://{tmp_path}/many")
    assert shards_of(out) == shards_of(single)
    assert out.metrics["pairs"] == single.metrics["pairs"] and out.metrics["partitions"] == count
    assert out.metrics["files_seen"] == single.metrics["files_seen"] == len(FILES)


def test_a_smoke_cut_and_a_regrown_tree_fan_out_the_same_and_reuse_unchanged_files(tree, tmp_path):
    settings = {"source": f"dir:{tree}", "max_pairs": 50, "workers": 1, "partitions": 3}
    single = shard.run(
        parse(shard.ShardConfig, {**settings, "partitions": 1}), artifact_root=f"file://{tmp_path}/a", progress=False
    )
    assert shards_of(fanned_out(parse(shard.ShardConfig, settings), f"file://{tmp_path}/b")) == shards_of(single)
    grown = tmp_path / "grown"
    shutil.copytree(tree, grown)
    root = f"file://{tmp_path}/c"
    cfg = parse(shard.ShardConfig, {"source": f"dir:{grown}", "workers": 1, "partitions": 2})
    fanned_out(cfg, root)
    shutil.copy2(FILES[0].parent / "queue.py", grown / "queue.py")
    again = fanned_out(cfg, root)
    assert again.metrics["inputs_parsed"] == 1 and again.metrics["inputs_reused"] == len(FILES)


def test_parquet_files_fan_out_by_file(tmp_path):
    for i, chunk in enumerate((FILES[:10], FILES[10:14], FILES[14:30])):
        table = pa.table(
            {
                "code": [f.read_text() for f in chunk],
                "path": [f.name for f in chunk],
                "language": ["Python"] * len(chunk),
            }
        )
        pq.write_table(table, tmp_path / f"train-{i:05d}-of-00003.parquet")
    settings = {"source": f"parquet:{tmp_path}/*.parquet", "workers": 1, "num_shards": 2}
    single = shard.run(parse(shard.ShardConfig, settings), artifact_root=f"file://{tmp_path}/one", progress=False)
    cfg = parse(shard.ShardConfig, {**settings, "partitions": 2})
    plan = shard_fanout.plan(cfg)
    assert [("from" in p, "until" in p) for p in plan] == [(False, True), (True, False)]  # open at both ends
    assert shards_of(fanned_out(cfg, f"file://{tmp_path}/many")) == shards_of(single)


def test_the_dataset_task_refuses_a_missing_or_misordered_part_naming_it(tree, tmp_path):
    root = f"file://{tmp_path}/art"
    cfg = parse(shard.ShardConfig, {"source": f"dir:{tree}", "workers": 1, "partitions": 2})
    parts = [shard_fanout.run_part(cfg, p, artifact_root=root, progress=False).uri for p in shard_fanout.plan(cfg)]
    with pytest.raises(InputError, match=r"part 1 \(.*nowhere\) is missing or uncommitted"):
        shard_fanout.run_dataset(cfg, [parts[0], f"{root}/shard-part/nowhere"], artifact_root=root, progress=False)
    with pytest.raises(InputError, match=r"parts are partitions \[1, 0\] of plans of \[2\]"):
        shard_fanout.run_dataset(cfg, parts[::-1], artifact_root=root, progress=False)


def test_a_failing_part_exits_2_with_one_line_naming_its_partition(tree, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    settings = {"source": f"dir:{src}", "workers": 1, "partitions": 2}
    later = shard_fanout.plan(parse(shard.ShardConfig, settings))[1]
    for f in src.iterdir():
        if f.name >= later["from"]:
            f.unlink()  # the partition's files are gone by the time its task runs
    with pytest.raises(SystemExit) as exit_info:
        shard_fanout.part_task(settings, later, f"file://{tmp_path}/art")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert f"partition 1 (from {later['from']} until the end): source dir:" in err[0]


def test_planning_hub_files_offline_is_one_line_naming_the_source(monkeypatch):
    """The fan-out lists a hub dataset's files (`hf_data_files` at `hf_revision`) over the network; here there is
    none, and the plan says so instead of a traceback."""
    from blueprint.data.sources import SourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = parse(
        shard.ShardConfig,
        {
            "source": "hf:codeparrot/github-code",
            "hf_data_files": "data/*.parquet",
            "hf_revision": "main",
            "partitions": 4,
        },
    )
    with pytest.raises(
        SourceError,
        match=r"source hf:codeparrot/github-code: cannot list 'data/\*.parquet' at "
        r"revision main on the hub",
    ):
        shard_fanout.plan(cfg)
    assert shard_fanout.plan(cfg.model_copy(update={"hf_data_files": None})) == [{"index": 0, "of": 1}]
