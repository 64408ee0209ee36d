"""Readers of the Parquet shards of (code, summary) pairs that the `shard` stage commits.

Layout of a committed `shard` artifact (blueprint.stages.shard builds it; blueprint.data.shard_writer holds SCHEMA
and the writer):

    train/part-00000-of-0000N.parquet ... eval/part-00000-of-0000N.parquet   (zstd, N = num_shards per split)
    _MANIFEST.json                                                          (files, config, metrics)

Schema (one row per function):
    id            string   32 hex chars of sha256(whitespace-collapsed code): unique within an artifact
    code          string   the function's source, docstring removed, dedented
    summary       string   first paragraph of its docstring (or the dataset's summary column)
    name          string   qualified name, e.g. "Class.method" (may be empty for dataset rows)
    language      string   "python"
    source        string   the source spec, e.g. "stdlib", "dir:src", "hf:codeparrot/github-code"
    path          string   file path inside the source
    license       string?  license of the file when the source knows it (stdlib: PSF-2.0), else null
    n_code_chars  int32
    n_code_lines  int32
    tests         string?  a task file's row: its task with tests as JSON (blueprint.data.tasks), else null

Readers, each file checked against its manifest sha256 before it is used, streaming (memory bounded by one row
group, never by the corpus):
- `read_pairs`: the first rows of a split, in shard then row order;
- `sample_pairs`: the rows at drawn indices of a split, read by row group, without materialising the split. A PPO
  round draws its codes this way, so its memory does not grow with the corpus.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from blueprint.store import artifacts, storage

SPLITS = ("train", "eval")


def shard_files(manifest: dict[str, Any], split: str) -> list[str]:
    """The committed Parquet files of `split`, in order (relative paths)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return sorted(rel for rel in manifest["files"] if rel.startswith(f"{split}/") and rel.endswith(".parquet"))


@contextlib.contextmanager
def open_shard(uri: str, rel: str, manifest: dict[str, Any], verify: bool = True) -> Iterator[pq.ParquetFile]:
    """One shard file for random access (row groups read on demand), verified first unless `verify` is False
    (footers only: which rows live where; no row of an unverified file is ever returned)."""
    if verify:
        artifacts.verify_file(uri, rel, manifest)
    fs, path = storage.filesystem(storage.join(uri, rel))
    with fs.open_input_file(path) as f:
        try:
            shard = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise artifacts.ArtifactError(f"input {uri}: {rel} is not a readable Parquet file: {exc}") from None
        yield shard


def read_pairs(
    uri: str, split: str = "train", limit: int | None = None, columns: list[str] | None = None
) -> list[dict[str, Any]]:
    """Up to `limit` rows of `split` as dicts, in shard then row order (the same list on every call)."""
    manifest = artifacts.read_manifest(uri, verify="sizes")
    rows: list[dict[str, Any]] = []
    for rel in shard_files(manifest, split):
        with open_shard(uri, rel, manifest) as shard:
            for batch in shard.iter_batches(batch_size=1024, columns=columns, use_threads=False):
                rows.extend(batch.to_pylist())
                if limit is not None and len(rows) >= limit:
                    return rows[:limit]
    return rows


def sample_pairs(
    uri: str, split: str, pick: Callable[[Sequence[int]], list[int]], columns: list[str] | None = None
) -> list[dict[str, Any]]:
    """The rows of `split` at the indices `pick(range(n_rows))` returns (in that order, repeats allowed), where
    row i is the i-th row `read_pairs` would list. `pick(range(n))` draws exactly what `pick(list_of_n_rows)`
    would, for random.sample/choice, so a sample equals one taken from the materialised split.

    Only the footers of every file and the row groups holding a picked row are read: memory is the picked rows plus
    one row group."""
    manifest = artifacts.read_manifest(uri, verify="sizes")
    groups: list[tuple[str, int, int]] = []  # (file, row group, first row index of the group)
    total = 0
    for rel in shard_files(manifest, split):
        with open_shard(uri, rel, manifest, verify=False) as shard:
            for g in range(shard.metadata.num_row_groups):
                groups.append((rel, g, total))
                total += shard.metadata.row_group(g).num_rows
    picked = pick(range(total))
    starts = [start for *_, start in groups]
    wanted: dict[str, dict[tuple[int, int], set[int]]] = {}  # file -> (row group, its first row) -> rows
    for index in dict.fromkeys(picked):
        rel, g, first = groups[bisect.bisect_right(starts, index) - 1]
        wanted.setdefault(rel, {}).setdefault((g, first), set()).add(index)
    found: dict[int, dict[str, Any]] = {}
    for rel, by_group in wanted.items():
        with open_shard(uri, rel, manifest) as shard:
            for g, first in sorted(by_group):
                table = shard.read_row_group(g, columns=columns, use_threads=False)
                for index in by_group[(g, first)]:
                    found[index] = table.slice(index - first, 1).to_pylist()[0]
    return [found[i] for i in picked]
