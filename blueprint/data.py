"""Readers of the Parquet shards of (code, summary) pairs that the `shard` stage commits.

Layout of a committed `shard` artifact (blueprint.stages.shard builds it and holds SCHEMA and the writer; they
live there so that sharding never imports torch, which this module needs):

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

Readers: `read_pairs` (a small deterministic in-memory batch) and `StreamingCodeDataset` (a torch IterableDataset
that splits shards across DataLoader workers and distributed ranks and never loads a whole shard).
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from blueprint import artifacts, storage

SPLITS = ("train", "eval")


# ---------------------------------------------------------------------------------------------------- readers
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

    For stages that want a small batch in memory (bootstrap, evaluation samples); training streams instead.
    """
    manifest = artifacts.read_manifest(uri, verify="sizes")
    rows: list[dict[str, Any]] = []
    for rel in shard_files(manifest, split):
        for batch in _open(uri, rel, manifest).iter_batches(batch_size=1024, columns=columns, use_threads=False):
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
    return rows


def reader_slot() -> tuple[int, int]:
    """(index, count) of this reader among all DataLoader workers of all distributed ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class StreamingCodeDataset(IterableDataset):
    """The rows of one split of a committed shard artifact, streamed from file:// or s3:// in row-group batches.

    Each (rank, DataLoader worker) reader takes every n-th shard, so together they see every row exactly once;
    when there are more readers than shards the unit becomes (shard, row group). With a tokenizer, each row also
    gets `code_ids` and `summary_ids` (no special tokens, truncated to `max_length`).
    """

    def __init__(self, uri: str, split: str = "train", tokenizer: Any = None, max_length: int | None = None,
                 shuffle_shards: bool = False, seed: int = 0, columns: list[str] | None = None,
                 batch_rows: int = 256) -> None:
        super().__init__()
        self.uri = storage.normalize(uri)
        self.manifest = artifacts.read_manifest(self.uri, verify="sizes")
        self.files = shard_files(self.manifest, split)
        if not self.files:
            raise artifacts.ArtifactError(f"input {uri} has no {split} shards: is it a shard artifact?")
        self.split, self.tokenizer, self.max_length = split, tokenizer, max_length
        self.shuffle_shards, self.seed, self.epoch = shuffle_shards, seed, 0
        self.columns, self.batch_rows = columns, batch_rows
        per_shard = self.manifest.get("metrics", {}).get("rows_per_shard", {})
        self.num_rows = sum(int(per_shard.get(rel, 0)) for rel in self.files)

    def set_epoch(self, epoch: int) -> None:
        """A new shard order per epoch when shuffling (same on every reader, so the split stays exact)."""
        self.epoch = epoch

    def _units(self) -> list[tuple[str, int | None]]:
        files = list(self.files)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(files)
        index, count = reader_slot()
        if len(files) >= count:
            return [(rel, None) for rel in files[index::count]]
        groups = [(rel, g) for rel in files for g in range(_open(self.uri, rel, self.manifest).num_row_groups)]
        return groups[index::count]

    def _tokenize(self, rows: list[dict[str, Any]]) -> None:
        kwargs = dict(add_special_tokens=False, truncation=self.max_length is not None, max_length=self.max_length)
        for field in ("code", "summary"):
            if rows and field in rows[0]:
                ids = self.tokenizer([r[field] for r in rows], **kwargs)["input_ids"]
                for r, i in zip(rows, ids):
                    r[f"{field}_ids"] = i

    def __iter__(self) -> Iterator[dict[str, Any]]:
        by_file: dict[str, list[int | None]] = {}
        for rel, group in self._units():  # each file read (and verified) once, whatever row groups it serves
            by_file.setdefault(rel, []).append(group)
        for rel, picked in by_file.items():
            pf = _open(self.uri, rel, self.manifest)
            groups = None if picked == [None] else [g for g in picked if g is not None]
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=self.columns,
                                         use_threads=False):
                rows = batch.to_pylist()
                if self.tokenizer is not None:
                    self._tokenize(rows)
                yield from rows
