"""Readers of the Parquet shards of (code, summary) pairs that the `shard` stage commits.

Layout of a committed `shard` artifact (blueprint.stages.shard builds it and holds SCHEMA and the writer):

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

Reader: `read_pairs`, a deterministic list of rows, each file verified against its manifest as it is read.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from blueprint.store import artifacts

SPLITS = ("train", "eval")


def shard_files(manifest: dict[str, Any], split: str) -> list[str]:
    """The committed Parquet files of `split`, in order (relative paths)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return sorted(rel for rel in manifest["files"] if rel.startswith(f"{split}/") and rel.endswith(".parquet"))


def _open(uri: str, rel: str, manifest: dict[str, Any]) -> pq.ParquetFile:
    """One shard file, verified against its manifest sha256 as it is read, then decoded from memory."""
    data = artifacts.read_verified(uri, rel, manifest)
    try:
        return pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise artifacts.ArtifactError(f"input {uri}: {rel} is not a readable Parquet file: {exc}") from None


def read_pairs(uri: str, split: str = "train", limit: int | None = None,
               columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Up to `limit` rows of `split` as dicts, in shard then row order (the same list on every call).

    Every stage that reads pairs reads them here, into memory (the corpus issue brings a streaming sample).
    """
    manifest = artifacts.read_manifest(uri, verify="sizes")
    rows: list[dict[str, Any]] = []
    for rel in shard_files(manifest, split):
        for batch in _open(uri, rel, manifest).iter_batches(batch_size=1024, columns=columns, use_threads=False):
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
    return rows
