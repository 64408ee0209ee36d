"""Incremental sharding: a re-shard of a grown or changed tree parses only new and changed files, and equals a full
re-shard byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from blueprint.config import parse
from blueprint.data import incremental
from blueprint.data.readers import read_pairs
from blueprint.stages import shard
from blueprint.store import artifacts

FILES = sorted(Path(os.__file__).parent.glob("[a-m]*.py"))[:30]  # real stdlib modules


def tree(root: Path, files: list[Path]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, root / f.name)
    return root


def run(src: Path, root: Path, **settings) -> artifacts.StageOutput:
    cfg = parse(shard.ShardConfig, {"source": f"dir:{src}", "num_shards": 2, "workers": 1, **settings})
    return shard.run(cfg, artifact_root=f"file://{root}", progress=False)


def content(out: artifacts.StageOutput) -> dict[str, str]:
    """The sha256 of every file the output holds (its shards and its index)."""
    return {rel: meta["sha256"] for rel, meta in out.manifest["files"].items()}


def test_a_grown_and_changed_tree_parses_only_what_changed_and_equals_a_full_reshard(tmp_path):
    src = tree(tmp_path / "src", FILES[:24])
    first = run(src, tmp_path / "art")
    assert first.metrics["inputs_parsed"] == 24 and first.metrics["inputs_reused"] == 0
    tree(src, FILES[24:26])  # two new files
    (src / FILES[3].name).write_text(
        FILES[3].read_text() + '\n\ndef added(x):\n    """Return x doubled."""\n    return x * 2\n'
    )
    (src / FILES[5].name).unlink()  # one deleted: its rows must go
    again = run(src, tmp_path / "art")
    assert again.metrics["inputs_parsed"] == 3 and again.metrics["inputs_reused"] == 22
    full = run(src, tmp_path / "fresh", incremental=False)
    assert full.metrics["inputs_reused"] == 0
    assert content(again) == content(full) and again.manifest["key"] == full.manifest["key"]
    assert content(again) != content(first)  # the new, changed and deleted files show


def test_deleting_the_file_with_the_first_copy_of_a_function_brings_its_later_copy_back(tmp_path):
    src = tree(tmp_path / "src", FILES[:6])
    dup = 'def shared(a, b):\n    """Return the larger of two numbers."""\n    return a if a > b else b\n'
    (src / "aaa_first.py").write_text(dup)
    (src / "zzz_later.py").write_text("# another module\n" + dup)
    first = run(src, tmp_path / "art")
    assert first.metrics["pairs_dropped"].get("duplicate", 0) >= 1
    (src / "aaa_first.py").unlink()
    again = run(src, tmp_path / "art")
    assert again.metrics["inputs_parsed"] == 0 and again.metrics["inputs_reused"] == 7
    assert content(again) == content(run(src, tmp_path / "fresh", incremental=False))


def test_other_extraction_settings_reuse_nothing_and_other_split_settings_reuse_everything(tmp_path):
    src = tree(tmp_path / "src", FILES[:8])
    run(src, tmp_path / "art")
    assert run(src, tmp_path / "art", min_code_chars=40).metrics["inputs_reused"] == 0
    resplit = run(src, tmp_path / "art", eval_fraction=0.3, split_salt="other", num_shards=3)
    assert resplit.metrics["inputs_reused"] == 8  # the pairs a file gives do not depend on how they are split
    assert content(resplit) == content(
        run(src, tmp_path / "fresh", eval_fraction=0.3, split_salt="other", num_shards=3, incremental=False)
    )


@pytest.mark.parametrize("damage", ["index", "manifest-version"])
def test_a_previous_index_that_cannot_be_used_means_a_full_reshard(tmp_path, damage):
    src = tree(tmp_path / "src", FILES[:8])
    first = run(src, tmp_path / "art")
    inputs = artifacts.manifest_uri(first.uri)
    if damage == "index":  # a bit flip in the index: refused by its sha256, like any input file
        path = Path(first.uri[len("file://") :]) / "index" / "inputs.parquet"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        (src / FILES[0].name).write_text(FILES[0].read_text() + "\n# changed\n")
        again = run(src, tmp_path / "art")  # refused by its sha256, said in one line, and everything parsed
        assert again.metrics["inputs_reused"] == 0 and again.metrics["inputs_parsed"] == 8
    else:  # an index of another version is not found as a previous run
        import json

        manifest = json.loads(Path(inputs[len("file://") :]).read_text())
        manifest["config"]["min_code_chars"] = manifest["config"]["min_code_chars"] + 1
        Path(inputs[len("file://") :]).write_text(json.dumps(manifest))
        (src / FILES[0].name).write_text(FILES[0].read_text() + "\n# changed\n")
        assert run(src, tmp_path / "art").metrics["inputs_reused"] == 0


def test_a_file_changed_after_the_listing_is_indexed_by_the_bytes_read_and_then_reused(tmp_path):
    import pyarrow.parquet as pq

    from blueprint.data.extract import content_identity

    src = tree(tmp_path / "src", FILES[:4])
    config = parse(shard.ShardConfig, {"source": f"dir:{src}", "num_shards": 2, "workers": 1, "eval_fraction": 0.0})
    source = config.make_source()
    source.fingerprint()  # the listing: sizes and mtimes as they were
    changed = src / FILES[1].name
    changed.write_text(
        changed.read_text() + '\n\ndef added_after_listing(x):\n    """Return x, written after the '
        'listing."""\n    return x + 0\n'
    )
    out = tmp_path / "out"
    shard.compute(config, out, source=source, progress=False)
    names = {
        n for f in (out / "train").glob("*.parquet") for n in pq.read_table(f, columns=["name"])["name"].to_pylist()
    }
    row = next(r for r in pq.read_table(out / "index" / "inputs.parquet").to_pylist() if r["path"] == changed.name)
    assert "added_after_listing" in names
    assert (row["identity"], row["mtime_ns"]) == (content_identity(changed.read_bytes()), changed.stat().st_mtime_ns)


def test_a_touched_but_unchanged_file_is_hashed_and_reused_and_a_changed_one_of_the_same_size_is_parsed(tmp_path):
    src = tree(tmp_path / "src", FILES[:6])
    run(src, tmp_path / "art")
    touched, edited = src / FILES[1].name, src / FILES[2].name
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    data = bytearray(edited.read_bytes())
    data[data.index(b"def ") + 4 : data.index(b"def ") + 5] = b"Q"  # one byte: the same size, another function name
    edited.write_bytes(bytes(data))
    tree(src, FILES[6:7])
    again = run(src, tmp_path / "art")
    assert again.metrics["inputs_parsed"] == 2 and again.metrics["inputs_reused"] == 5
    assert content(again) == content(run(src, tmp_path / "fresh", incremental=False))


def test_the_rows_of_new_and_changed_files_are_marked_and_a_retrain_can_draw_them_first(tmp_path):
    from blueprint.stages import ppo_round

    src = tree(tmp_path / "src", FILES[:12])
    first = run(src, tmp_path / "art", eval_fraction=0.0)
    assert incremental.new_rows(first.uri, "train") is None  # nothing to be new against
    tree(src, FILES[12:14])
    grown = run(src, tmp_path / "art", eval_fraction=0.0)
    rows = read_pairs(grown.uri, "train")
    marked = incremental.new_rows(grown.uri, "train")
    added = {f.name for f in FILES[12:14]}
    assert marked and {rows[i]["path"] for i in marked} == added
    assert [i for i, r in enumerate(rows) if r["path"] in added] == marked
    cfg = parse(
        ppo_round.PPORoundConfig,
        {"ppo_steps": 1, "batch_size": 4, "samples_per_query": 1, "probe_size": 8, "new_data_fraction": 0.5},
    )
    batch = ppo_round.round_batch(grown.uri, cfg)
    assert len(batch) == 8 and sum(r["path"] in added for r in batch) >= 4
    uniform = ppo_round.round_batch(grown.uri, cfg.model_copy(update={"new_data_fraction": 0.0}))
    assert len(uniform) == 8
