"""Shard stage: a source corpus -> de-duplicated (code, summary) pairs in train/eval Parquet shards.

Flow, with memory bounded whatever the corpus size:
    source units (files in sorted order, or streamed dataset rows)
      -> parsed on `workers` fresh-interpreter processes (ordered map over batches, a bounded window in flight)
      -> exact de-duplication on whitespace-collapsed code (only 16-byte hashes are kept)
      -> split by hash(split_salt, code) < eval_fraction, shard = hash(code) % num_shards
      -> ShardWriter (row groups of bounded size) -> committed via artifacts.run_stage.

Determinism: results come back in input order, so the same input and config give byte-identical shards for any
`workers`; that is why `workers` is left out of the cache key. The source fingerprint goes in instead.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from blueprint import artifacts
from blueprint.config import ConfigError, require
from blueprint.extract import Limits, process_many
from blueprint.progress import Progress
from blueprint.sources import Source, SourceError, parse_source
from blueprint.workers import WorkerPool

STAGE = "shard"
LANGUAGE = "python"
SPLITS = ("train", "eval")
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("code", pa.string(), nullable=False),
        pa.field("summary", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("language", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("license", pa.string(), nullable=True),
        pa.field("n_code_chars", pa.int32(), nullable=False),
        pa.field("n_code_lines", pa.int32(), nullable=False),
    ],
    metadata={"blueprint.schema": "code-summary-pairs/1"},
)  # the columns are described in blueprint.data, where the readers live
COMPRESSION = "zstd"


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}/part-{index:05d}-of-{num_shards:05d}.parquet"


class ShardWriter:
    """Routes rows to `num_shards` Parquet files per split as they arrive.

    Memory is bounded: each file buffers at most one row group (`row_group_rows` rows or `row_group_bytes` of
    text, whichever comes first) before it is written. Row-group boundaries depend only on the rows, so the same
    rows in the same order give byte-identical files.
    """

    def __init__(self, out_dir: Path, num_shards: int, row_group_rows: int = 2048, row_group_bytes: int = 8 << 20):
        self.out_dir, self.num_shards = Path(out_dir), num_shards
        self.row_group_rows, self.row_group_bytes = row_group_rows, row_group_bytes
        self._buffers: dict[str, list[tuple]] = {}
        self._buffer_bytes: dict[str, int] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self.rows: dict[str, int] = {shard_name(s, i, num_shards): 0 for s in SPLITS for i in range(num_shards)}

    def add(self, split: str, shard: int, row: tuple) -> None:
        """`row` holds the SCHEMA columns in order."""
        name = shard_name(split, shard, self.num_shards)
        buf = self._buffers.setdefault(name, [])
        buf.append(row)
        self._buffer_bytes[name] = self._buffer_bytes.get(name, 0) + len(row[1]) + len(row[2])
        self.rows[name] += 1
        if len(buf) >= self.row_group_rows or self._buffer_bytes[name] >= self.row_group_bytes:
            self._flush(name)

    def _flush(self, name: str) -> None:
        rows = self._buffers.pop(name, [])
        self._buffer_bytes.pop(name, None)
        if name not in self._writers:
            path = self.out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writers[name] = pq.ParquetWriter(path, SCHEMA, compression=COMPRESSION)
        if rows:
            columns = list(zip(*rows))
            table = pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, SCHEMA)],
                                         schema=SCHEMA)
            self._writers[name].write_table(table, row_group_size=len(rows))

    def close(self) -> dict[str, int]:
        """Flush everything; every shard file exists afterwards (an empty one holds the schema). Rows per file."""
        for name in self.rows:
            if self._buffers.get(name) or name not in self._writers:
                self._flush(name)
            self._writers.pop(name).close()
        return dict(self.rows)


@dataclasses.dataclass
class ShardConfig:
    source: str = "stdlib"                 # stdlib | dir:PATH | hf:ID[:CONFIG] | jsonl:/parquet:/csv:PATH
    num_shards: int = 4                    # files per split
    eval_fraction: float = 0.05
    split_salt: str = "blueprint"          # changes which pairs go to eval
    max_pairs: int | None = None           # stop after this many kept pairs (smoke runs)
    max_source_mb: float | None = None     # read only the first MB of the source (smoke runs, benchmarks)
    min_summary_chars: int = 10
    max_summary_chars: int = 500
    min_code_chars: int = 30
    max_code_chars: int = 4000
    min_code_lines: int = 2
    max_code_lines: int = 150
    max_file_bytes: int = 1_000_000        # larger files are skipped unread (generated tables, vendored blobs)
    skip_tests: bool = True                # skip test dirs/files in stdlib and dir sources
    code_column: str = "code"              # dataset sources: the column with source code
    summary_column: str | None = "summary"  # when present in a row, used as the summary directly
    language_column: str = "language"
    languages: tuple[str, ...] = ("python",)  # rows whose language column is another language are skipped
    path_column: str = "path"
    license_column: str = "license"
    hf_revision: str | None = None         # pin for a reproducible cache key
    hf_data_files: str | None = None       # glob inside the hub repo, e.g. "data/*.parquet"
    row_group_rows: int = 2048
    workers: int = 0                       # parsing processes; 0 = os.cpu_count(). Not in the cache key.

    def __post_init__(self) -> None:
        try:
            parse_source(self.source)
        except ValueError as exc:
            raise ConfigError(f"source: {exc}") from None
        require(self.num_shards >= 1, "num_shards", "must be at least 1")
        require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        require(self.max_pairs is None or self.max_pairs >= 1, "max_pairs", "must be positive (or None)")
        require(self.max_source_mb is None or self.max_source_mb > 0, "max_source_mb", "must be positive (or None)")
        require(0 <= self.min_summary_chars <= self.max_summary_chars, "max_summary_chars",
                "must be >= min_summary_chars >= 0")
        require(0 <= self.min_code_chars <= self.max_code_chars, "max_code_chars", "must be >= min_code_chars >= 0")
        require(1 <= self.min_code_lines <= self.max_code_lines, "max_code_lines", "must be >= min_code_lines >= 1")
        require(self.max_file_bytes >= 1, "max_file_bytes", "must be positive")
        require(bool(self.code_column), "code_column", "must name a column")
        require(self.row_group_rows >= 1, "row_group_rows", "must be positive")
        require(self.workers >= 0, "workers", "must be >= 0 (0 = all cores)")
        langs = self.languages.split(",") if isinstance(self.languages, str) else self.languages
        self.languages = tuple(lang.strip().lower() for lang in langs if lang.strip())

    def limits(self) -> Limits:
        """The pair filters, by field name (the two classes share these names; a new filter needs both)."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def make_source(self) -> Source:
        return Source(self.source, skip_tests=self.skip_tests, max_file_bytes=self.max_file_bytes,
                      max_source_mb=self.max_source_mb, code_column=self.code_column,
                      summary_column=self.summary_column, language_column=self.language_column,
                      languages=self.languages, path_column=self.path_column, license_column=self.license_column,
                      hf_revision=self.hf_revision, hf_data_files=self.hf_data_files)

    def resolved_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


def key_config(config: ShardConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What identifies the output: every setting except `workers`, plus the source fingerprint."""
    material = dataclasses.asdict(config)
    material.pop("workers")
    material["languages"] = list(config.languages)  # as JSON reads it back: the manifest in memory == on disk
    material["source_fingerprint"] = fingerprint
    return material


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_map(fn: Callable[[list[Any]], list[Any]], items: Iterable[Any], workers: int, batch: int = 8,
                window: int = 4) -> Iterator[Any]:
    """fn over batches of `items` on `workers` processes, results in input order, at most workers*window batches
    in flight (Pool.imap would drain a streamed dataset into its task queue). The input is iterated in this thread,
    so a source error surfaces here. Closing the iterator early terminates the workers.

    The workers are fresh interpreters (blueprint.workers), not forks: the caller (the Python API) already runs
    threads, and a fork can inherit one of their locks held forever; nor multiprocessing spawn, which would re-run
    a user's unguarded script in each worker. `fn` must be importable by reference (here extract.process_many)."""
    if workers <= 1:
        for chunk in _batched(items, batch):
            yield from fn(chunk)
        return
    with WorkerPool(fn, workers) as pool:
        for results in pool.map_ordered(_batched(items, batch), window):
            yield from results


def _eval_draw(salt: bytes, digest: bytes) -> float:
    return int.from_bytes(hashlib.sha256(salt + digest).digest()[:8], "big") / 2.0**64


def build(config: ShardConfig, out_dir: Path, source: Source | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the shards of `config.source` into `out_dir`; the metrics. Raises SourceError when nothing is kept."""
    start = time.time()
    source = source or config.make_source()
    fingerprint = source.fingerprint()
    batch = 8 if source.total else 16  # files, or streamed rows (each up to max_file_bytes: bounds memory in flight)
    workers = config.resolved_workers()
    if source.total:  # no more processes than batches (a small tree is done before a big pool has started)
        workers = max(1, min(workers, -(-source.total // batch)))
    writer = ShardWriter(out_dir, config.num_shards, config.row_group_rows)
    salt = config.split_salt.encode("utf-8")
    seen: set[bytes] = set()  # 16-byte prefixes of code hashes: the only per-pair state kept for the whole run
    files_dropped: collections.Counter = collections.Counter()
    pairs_dropped: collections.Counter = collections.Counter()
    files = functions = source_bytes = kept = 0
    stopped = False
    fn = functools.partial(process_many, limits=config.limits())
    bar = Progress(STAGE, source.total or None, progress, unit="file" if source.total else "row")
    results = ordered_map(fn, source.units(), workers, batch=batch)
    try:
        for result in results:
            files += 1
            bar.update(files, pairs=kept)
            source_bytes += result.n_bytes
            if result.file_drop:
                files_dropped[result.file_drop] += 1
                continue
            functions += result.functions
            pairs_dropped.update(result.dropped)
            for digest, name, code, summary, path, license in result.pairs:
                if digest[:16] in seen:
                    pairs_dropped["duplicate"] += 1
                    continue
                seen.add(digest[:16])
                split = "eval" if _eval_draw(salt, digest) < config.eval_fraction else "train"
                shard = int.from_bytes(digest[:8], "big") % config.num_shards
                writer.add(split, shard, (digest.hex()[:32], code, summary, name, LANGUAGE, source.name, path,
                                          license, len(code), code.count("\n") + 1))
                kept += 1
                if config.max_pairs is not None and kept >= config.max_pairs:
                    stopped = True
                    break
            if stopped:
                break
    finally:
        results.close()  # terminates the worker pool when we stopped early or failed
        bar.close()
    rows_per_shard = writer.close()
    files_dropped.update(source.skipped)  # rows the source filtered itself (other languages)
    files += sum(source.skipped.values())
    if kept == 0:
        raise SourceError(f"source {source.name} gave no (code, summary) pairs from {files} file(s)/row(s): "
                          f"files dropped {dict(files_dropped) or 'none'}, pairs dropped {dict(pairs_dropped) or 'none'}")
    seconds = time.time() - start
    rows = {s: sum(n for rel, n in rows_per_shard.items() if rel.startswith(f"{s}/")) for s in ("train", "eval")}
    written = sum(p.stat().st_size for p in Path(out_dir).rglob("*.parquet"))
    return {
        "source": source.name,
        "source_fingerprint": fingerprint,
        "pairs": kept,
        "rows": rows,
        "rows_per_shard": rows_per_shard,
        "num_shards": config.num_shards,
        "files_seen": files,
        "files_dropped": dict(sorted(files_dropped.items())),
        "functions_seen": functions,
        "pairs_dropped": dict(sorted(pairs_dropped.items())),
        "stopped_at_max_pairs": stopped,
        "source_bytes": source_bytes,
        "bytes_written": written,
        "seconds": round(seconds, 2),
        "mb_per_s": round(source_bytes / 1e6 / max(seconds, 1e-9), 2),
        "workers": workers,
    }


def run(config: ShardConfig, *, artifact_root: str | None = None, out_uri: str | None = None, force: bool = False,
        progress: bool = True) -> artifacts.StageOutput:
    """Committed shards of `config.source` (cache hit when the same source content and settings were sharded).

    An empty or unusable source raises SourceError (a ValueError) naming it, and no manifest is written.
    """
    source = config.make_source()
    fingerprint = source.fingerprint()  # fails fast (missing dir, no Python files) before any output exists
    return artifacts.run_stage(STAGE, key_config(config, fingerprint), {},
                               lambda out_dir: build(config, out_dir, source, progress),
                               artifact_root=artifact_root, out_uri=out_uri, force=force)


def summary_line(out: artifacts.StageOutput | dict[str, Any]) -> str:
    """One line for the CLI: pairs kept by split, drops by reason, shards, bytes, seconds."""
    m = out.metrics if isinstance(out, artifacts.StageOutput) else out
    rows = m.get("rows", {})
    dropped = {**m.get("pairs_dropped", {})}
    dropped.pop("no_docstring", None)  # not a loss: those functions never were pairs
    top = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
    files_dropped = ", ".join(f"{k} {v}" for k, v in sorted(m.get("files_dropped", {}).items(), key=lambda kv: -kv[1]))
    cached = " (cache hit)" if isinstance(out, artifacts.StageOutput) and out.cached else ""
    return (f"shard {m.get('source', '?')}: {m.get('pairs', 0)} pairs kept (train {rows.get('train', 0)}, "
            f"eval {rows.get('eval', 0)}) from {m.get('files_seen', 0)} files; "
            f"pairs dropped: {sum(dropped.values())}{f' ({top})' if top else ''}; "
            f"files dropped: {sum(m.get('files_dropped', {}).values())}{f' ({files_dropped})' if files_dropped else ''}; "
            f"{m.get('num_shards', '?')} shards/split, {m.get('bytes_written', 0) / 1e6:.2f} MB, "
            f"{m.get('seconds', 0):.1f} s{cached}")
