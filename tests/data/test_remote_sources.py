"""Sources read where they are on S3 (the loopback moto server, real boto3/pyarrow clients): the same rows as the
same files read locally, fingerprints that follow the content, and errors that name the source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY

from blueprint.config import parse
from blueprint.data import remote, sources
from blueprint.data.readers import read_pairs
from blueprint.data.sources import Source, SourceError
from blueprint.stages import shard
from blueprint.store import storage

# The GitHub Code dataset's columns (codeparrot/github-code), in its order.
GITHUB_CODE = pa.schema(
    [
        ("code", pa.string()),
        ("repo_name", pa.string()),
        ("path", pa.string()),
        ("language", pa.string()),
        ("license", pa.string()),
        ("size", pa.int32()),
    ]
)


def stdlib_files(n: int = 18) -> list[Path]:
    """Real source files: the first `n` stdlib modules between 2 and 40 KB, by name."""
    files = sorted(p for p in sources.stdlib_root().glob("*.py") if 2_000 < p.stat().st_size < 40_000)
    return files[:n]


def github_code_parquet(folder: Path, n_files: int = 3) -> Path:
    """Stdlib modules as GitHub Code rows in `n_files` Parquet files (several row groups each), plus rows in other
    languages whose code is Python with docstrings: they would give pairs if the language filter let them in."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "code": p.read_text(encoding="utf-8"),
            "repo_name": "python/cpython",
            "path": f"Lib/{p.name}",
            "language": "Python",
            "license": "psf-2.0",
            "size": p.stat().st_size,
        }
        for p in stdlib_files()
    ]
    rows += [
        {
            "code": f'def other_{i}(x):\n    """Return x doubled, in a file labelled {lang}."""\n    return 2 * x\n',
            "repo_name": "someone/else",
            "path": f"src/other_{i}.txt",
            "language": lang,
            "license": "mit",
            "size": 80,
        }
        for i, lang in enumerate(["JavaScript", "Ruby", "C"])
    ]
    for i in range(n_files):
        table = pa.Table.from_pylist(rows[i::n_files], schema=GITHUB_CODE)
        pq.write_table(table, folder / f"train-{i:05d}-of-{n_files:05d}.parquet", row_group_size=2)
    return folder


def python_tree(root: Path) -> Path:
    """A source tree of real modules, with the directories and files a tree source skips."""
    files = stdlib_files(12)
    for i, path in enumerate(files):
        where = ["pkg", "pkg/sub", ""][i % 3]
        (root / where).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / where / path.name)
    for skipped in [".hidden/mod.py", "__pycache__/mod.py", "node_modules/mod.py", "tests/mod.py", "pkg/test_mod.py"]:
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[0], root / skipped)
    (root / "pkg" / "notes.txt").write_text("not Python")
    return root


def sharded(tmp_path: Path, source: str, name: str, **settings) -> shard.artifacts.StageOutput:
    config = parse(
        shard.ShardConfig,
        {"source": source, "num_shards": 2, "eval_fraction": 0.2, "workers": 1, "min_code_lines": 1, **settings},
    )
    return shard.run(config, artifact_root=str(tmp_path / name), progress=False)


def committed_rows(out) -> set[tuple[str, str]]:
    """(id, split) of every committed row."""
    return {(row["id"], split) for split in shard.SPLITS for row in read_pairs(out.uri, split, columns=["id"])}


@pytest.mark.parametrize("where", ["github-code/", "github-code/*.parquet"])
def test_parquet_on_s3_shards_the_same_rows_as_the_same_files_from_a_local_glob(tmp_path, s3_bucket, where):
    local = github_code_parquet(tmp_path / "x")
    storage.upload_dir(local, f"{s3_bucket}/github-code")
    storage.write_text(f"{s3_bucket}/github-code/README.md", "not a Parquet file: a bare prefix lists .parquet only")
    on_s3 = sharded(tmp_path, f"parquet:{s3_bucket}/{where}", "s3")
    from_disk = sharded(tmp_path, f"parquet:{local}/*.parquet", "local")
    assert committed_rows(on_s3) == committed_rows(from_disk) and len(committed_rows(on_s3)) > 50
    for key in ("pairs", "rows", "files_seen", "files_dropped", "pairs_dropped", "source_bytes"):
        assert on_s3.metrics[key] == from_disk.metrics[key], key


def test_rows_in_other_languages_are_skipped_on_s3(tmp_path, s3_bucket):
    storage.upload_dir(github_code_parquet(tmp_path / "x", n_files=1), f"{s3_bucket}/gc")
    out = sharded(tmp_path, f"parquet:{s3_bucket}/gc", "out", eval_fraction=0.0)
    rows = read_pairs(out.uri, "train", columns=["path", "license"])
    assert out.metrics["files_dropped"]["other_language"] == 3
    assert {r["path"] for r in rows} <= {f"Lib/{p.name}" for p in stdlib_files()} and rows
    assert {r["license"] for r in rows} == {"psf-2.0"}


def test_parquet_on_s3_is_read_in_bounded_batches_across_row_groups(tmp_path, s3_bucket, monkeypatch):
    storage.upload_dir(github_code_parquet(tmp_path / "x"), f"{s3_bucket}/gc")
    source = Source(f"parquet:{s3_bucket}/gc/")
    whole = list(source._rows())
    monkeypatch.setattr(remote, "BATCH_ROWS", 1)
    assert list(Source(f"parquet:{s3_bucket}/gc/")._rows()) == whole
    assert len(whole) == len(stdlib_files()) + 3
    assert set(whole[0]) == {"code", "path", "language", "license"}  # only the columns the source uses


def test_dir_on_s3_shards_the_same_rows_as_the_same_local_tree(tmp_path, s3_bucket):
    tree = python_tree(tmp_path / "tree")
    storage.upload_dir(tree, f"{s3_bucket}/tree")
    on_s3 = sharded(tmp_path, f"dir:{s3_bucket}/tree", "s3", workers=2)  # the workers read the objects
    from_disk = sharded(tmp_path, f"dir:{tree}", "local")
    assert committed_rows(on_s3) == committed_rows(from_disk) and len(committed_rows(on_s3)) > 50
    assert on_s3.metrics["files_seen"] == from_disk.metrics["files_seen"] == 12
    paths = {r["path"] for r in read_pairs(on_s3.uri, "train", columns=["path"])}
    assert paths == {r["path"] for r in read_pairs(from_disk.uri, "train", columns=["path"])}
    assert sharded(tmp_path, f"dir:{s3_bucket}/tree", "s3").cached


def _object_to_change(kind: str, tmp_path: Path, bucket: str) -> tuple[str, str]:
    """(source spec, key of one of its objects) after uploading a `kind` source."""
    if kind == "dir":
        storage.upload_dir(python_tree(tmp_path / "tree"), f"{bucket}/src")
        return f"dir:{bucket}/src", f"{bucket}/src/pkg/{stdlib_files(12)[0].name}"
    storage.upload_dir(github_code_parquet(tmp_path / "x"), f"{bucket}/gc")
    return f"parquet:{bucket}/gc/", f"{bucket}/gc/train-00001-of-00003.parquet"


@pytest.mark.parametrize("kind", ["dir", "parquet"])
def test_s3_fingerprint_changes_when_one_object_changes_and_not_otherwise(tmp_path, s3_bucket, kind):
    spec, key = _object_to_change(kind, tmp_path, s3_bucket)
    before = Source(spec).fingerprint()
    assert Source(spec).fingerprint() == before
    original = storage.read_bytes(key)
    storage.write_bytes(key, original)  # the same bytes again: a new upload, the same content
    assert Source(spec).fingerprint() == before
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 1  # one bit, so the size alone could not tell
    storage.write_bytes(key, bytes(changed))
    after = Source(spec).fingerprint()
    assert after != before and json.dumps(after).count(TEST_SECRET_KEY) == 0


@pytest.mark.parametrize("spec", ["parquet:{b}/empty/", "dir:{b}/empty", "jsonl:{b}/data/*.jsonl", "csv:{b}/data/"])
def test_an_s3_prefix_with_no_files_is_a_one_line_source_error_naming_the_source(tmp_path, s3_bucket, spec):
    storage.write_text(f"{s3_bucket}/data/rows.parquet", "a file of another kind")
    spec = spec.format(b=s3_bucket)
    with pytest.raises(SourceError) as err:
        sharded(tmp_path, spec, "out")
    message = str(err.value)
    assert message.startswith(f"source {spec}") and "\n" not in message and "no " in message
    assert not (tmp_path / "out").exists()


def test_a_missing_bucket_is_a_source_error_with_storage_reason_and_no_credentials(tmp_path, s3_env):
    with pytest.raises(SourceError, match="source parquet:s3://bp-no-such-bucket/data/: .*does not exist") as err:
        sharded(tmp_path, "parquet:s3://bp-no-such-bucket/data/", "out")
    assert TEST_SECRET_KEY not in str(err.value) and TEST_ACCESS_KEY not in str(err.value)


@pytest.mark.parametrize("make", [Source, lambda spec: shard.ShardConfig(source=spec)])
def test_credentials_in_an_s3_source_are_refused_without_repeating_them(make):
    with pytest.raises(storage.StorageError, match="credentials in a URI are refused") as err:
        make(f"parquet:s3://{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}@bucket/data/")
    assert TEST_SECRET_KEY not in str(err.value) and TEST_ACCESS_KEY not in str(err.value)


def test_s3_parquet_without_the_code_column_names_the_columns(tmp_path, s3_bucket):
    pq.write_table(pa.table({"content": ["def f():\n    return 1\n"], "path": ["f.py"]}), tmp_path / "a.parquet")
    storage.upload_dir(tmp_path, f"{s3_bucket}/t")
    with pytest.raises(SourceError, match=r"no column 'code' \(columns: content, path\)"):
        sharded(tmp_path, f"parquet:{s3_bucket}/t/", "out")


def test_jsonl_and_csv_on_s3_give_the_rows_the_local_files_give(tmp_path, s3_bucket):
    import csv

    rows = [
        {
            "code": p.read_text(encoding="utf-8"),
            "path": f"Lib/{p.name}",
            "language": "Python",
            "license": "" if i % 2 else "psf-2.0",
        }
        for i, p in enumerate(stdlib_files(8))
    ]
    rows.append(
        {
            "code": 'def js(x):\n    """Labelled as another language."""\n    return x\n',
            "path": "a.js",
            "language": "JavaScript",
            "license": "mit",
        }
    )
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "d" / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    storage.upload_dir(tmp_path / "d", f"{s3_bucket}/d")
    for kind in ("jsonl", "csv"):
        on_s3 = sharded(tmp_path, f"{kind}:{s3_bucket}/d/", f"{kind}-s3")
        from_disk = sharded(tmp_path, f"{kind}:{tmp_path / 'd' / f'rows.{kind}'}", f"{kind}-local")
        assert committed_rows(on_s3) == committed_rows(from_disk) and committed_rows(on_s3), kind
        licenses = {r["license"] for r in read_pairs(on_s3.uri, "train", columns=["license"])}
        assert licenses == {r["license"] for r in read_pairs(from_disk.uri, "train", columns=["license"])}, kind
        assert on_s3.metrics["files_dropped"] == from_disk.metrics["files_dropped"] == {"other_language": 1}


def test_hub_files_url_pins_the_revision_as_the_hub_parses_it():
    from huggingface_hub.utils import parse_hf_uri

    for revision in ("0123abcd", "refs/convert/parquet", "my/branch"):
        url = sources.hub_files_url("codeparrot/github-code", "data/train-*.parquet", revision)
        parsed = parse_hf_uri(url)
        assert (parsed.id, parsed.revision, parsed.path_in_repo) == (
            "codeparrot/github-code",
            revision,
            "data/train-*.parquet",
        )
    assert sources.hub_files_url("a/b", "data/*.parquet", None) == "hf://datasets/a/b/data/*.parquet"


def test_hub_data_files_stream_at_the_pinned_revision_and_other_languages_are_skipped(tmp_path, monkeypatch):
    import datasets

    calls = []
    code = 'def {0}(x):\n    """Return x, from a row labelled {1}."""\n    return x\n'
    hub_rows = [
        {"code": code.format("py_row", "Python"), "path": "a.py", "language": "Python", "license": "mit"},
        {"code": code.format("java_row", "Java"), "path": "A.java", "language": "Java", "license": "mit"},
    ]

    def load_dataset(builder, **kwargs):
        calls.append((builder, kwargs))
        return iter(hub_rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = sharded(
        tmp_path,
        "hf:codeparrot/github-code",
        "out",
        hf_data_files="data/train-*.parquet",
        hf_revision="0123abcd",
        eval_fraction=0.0,
        min_code_chars=10,
    )
    assert calls == [
        (
            "parquet",
            {
                "data_files": "hf://datasets/codeparrot/github-code@0123abcd/data/train-*.parquet",
                "streaming": True,
                "split": "train",
            },
        )
    ]
    assert [r["name"] for r in read_pairs(out.uri, "train")] == ["py_row"]
    assert out.metrics["files_dropped"] == {"other_language": 1}
    assert out.metrics["source_fingerprint"]["revision"] == "0123abcd"


def _listed_then_replaced(tmp_path: Path, bucket: str) -> tuple[shard.ShardConfig, Source, str, bytes]:
    """A dir source on S3 whose listing is taken, then one of its objects replaced (a new function appended)."""
    storage.upload_dir(python_tree(tmp_path / "tree"), f"{bucket}/src")
    config = parse(
        shard.ShardConfig, {"source": f"dir:{bucket}/src", "num_shards": 2, "workers": 1, "eval_fraction": 0.0}
    )
    source = config.make_source()
    source.fingerprint()  # the listing: each object's size and ETag
    uri = f"{bucket}/src/pkg/{stdlib_files(12)[0].name}"
    new = storage.read_bytes(uri) + (
        b'\n\ndef replaced_after_listing(x):\n    """Return x, added after the listing."""\n    return x + 0\n'
    )
    storage.write_bytes(uri, new)
    return config, source, uri, new


def test_an_object_replaced_after_the_listing_is_read_as_it_is_now_and_indexed_by_its_new_etag(tmp_path, s3_bucket):
    import boto3

    config, source, uri, new = _listed_then_replaced(tmp_path, s3_bucket)
    out = tmp_path / "out"
    shard.compute(config, out, source=source, progress=False)
    names = {
        n for f in (out / "train").glob("*.parquet") for n in pq.read_table(f, columns=["name"])["name"].to_pylist()
    }
    assert "replaced_after_listing" in names
    bucket, key = storage.split_s3(uri)
    etag = boto3.client("s3").head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    index = pq.read_table(out / "index" / "inputs.parquet").to_pylist()
    row = next(r for r in index if r["path"] == key.split("/", 1)[1])
    assert row["identity"] == f"{len(new)}:{etag}" and row["n_bytes"] == len(new)


def test_an_object_that_changes_at_every_read_is_a_one_line_error_naming_it(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setattr(remote, "READ_ATTEMPTS", 1)  # one read: the listed ETag is already stale
    config, source, uri, _ = _listed_then_replaced(tmp_path, s3_bucket)
    with pytest.raises(storage.StorageError) as err:
        shard.compute(config, tmp_path / "out", source=source, progress=False)
    assert str(err.value).startswith(f"cannot read {uri}: it was replaced") and "\n" not in str(err.value)


def test_an_object_replaced_by_one_past_the_size_limit_is_read_no_further_than_the_limit(tmp_path, s3_bucket):
    config, source, uri, _ = _listed_then_replaced(tmp_path, s3_bucket)
    storage.write_bytes(uri, b"x = 1\n" * 400_000)  # 2.4 MB, listed at its old size: only a read can tell
    out = tmp_path / "out"
    shard.compute(config, out, source=source, progress=False)
    index = pq.read_table(out / "index" / "inputs.parquet").to_pylist()
    row = next(r for r in index if uri.endswith(r["path"]))
    assert (row["file_drop"], row["n_bytes"]) == ("too_large", config.max_file_bytes + 1)
