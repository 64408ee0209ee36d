"""Shard stage: a source corpus -> de-duplicated (code, summary) pairs in train/eval Parquet shards.

Flow, with memory bounded whatever the corpus size:
    source units (files in sorted order, or streamed dataset rows)
      -> parsed on `workers` fresh-interpreter processes (ordered map over batches, a bounded window in flight)
      -> exact de-duplication on whitespace-collapsed code (only 16-byte hashes are kept)
      -> split by hash(split_salt, code) < eval_fraction, shard = hash(code) % num_shards
      -> ShardWriter (row groups of bounded size) -> committed via artifacts.reuse_or_commit.

Determinism: results come back in input order, so the same input and config give byte-identical shards for any
`workers`; that is why `workers` is left out of the cache key. The source fingerprint goes in instead.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from blueprint.config import ConfigError, Settings, setting
from blueprint.data import incremental
from blueprint.data.extract import Limits, Result, process_many
from blueprint.data.incremental import IndexWriter
from blueprint.data.shard_writer import SPLITS, ShardWriter
from blueprint.data.sources import Source, SourceError, parse_source
from blueprint.data.workers import WorkerPool
from blueprint.progress import Progress
from blueprint.stages import registry
from blueprint.store import artifacts, storage

STAGE = registry.SHARD
LANGUAGE = "python"
# SPLITS, SCHEMA and ShardWriter live in blueprint.data.shard_writer, beside the readers' description


class ShardConfig(Settings):
    """Which corpus to read, which (code, summary) pairs to keep, and how to lay out the shards."""

    source: str = setting(
        "stdlib",
        "stdlib | dir:PATH | hf:ID[:CONFIG] | jsonl:/parquet:/csv:PATH | tasks:PATH "
        "(code with tests, HumanEval/MBPP .jsonl[.gz]); PATH may be s3://bucket/prefix "
        "(or an s3:// glob on keys for data files; task files are local)",
    )
    num_shards: int = setting(4, "Parquet files per split", ge=1)
    eval_fraction: float = setting(0.05, "share of pairs held out for evaluation", ge=0, lt=1)
    split_salt: str = setting("blueprint", "changes which pairs go to eval")
    max_pairs: int | None = setting(None, "stop after this many kept pairs (smoke runs)", ge=1)
    max_source_mb: float | None = setting(None, "read only the first MB of the source (smoke runs, benchmarks)", gt=0)
    min_summary_chars: int = setting(10, "shorter summaries are dropped", ge=0)
    max_summary_chars: int = setting(500, "longer summaries are dropped")
    min_code_chars: int = setting(30, "shorter functions are dropped", ge=0)
    max_code_chars: int = setting(4000, "longer functions are dropped")
    min_code_lines: int = setting(2, "functions with fewer lines are dropped", ge=1)
    max_code_lines: int = setting(150, "functions with more lines are dropped")
    max_file_bytes: int = setting(1_000_000, "larger files are skipped unread (generated tables, vendored blobs)", ge=1)
    skip_tests: bool = setting(True, "skip test dirs/files in stdlib and dir sources")
    code_column: str = setting("code", "dataset sources: the column with source code", min_length=1)
    summary_column: str | None = setting("summary", "dataset sources: when present in a row, used as the summary")
    language_column: str = setting("language", "dataset sources: the column naming the language")
    languages: tuple[str, ...] = setting(
        ("python",), "rows whose language column is another language are skipped (comma-separated)"
    )
    path_column: str = setting("path", "dataset sources: the column with the file path")
    license_column: str = setting("license", "dataset sources: the column with the license")
    hf_revision: str | None = setting(None, "hub dataset revision: pin it for a reproducible cache key")
    hf_data_files: str | None = setting(None, 'glob inside the hub repo, e.g. "data/*.parquet"')
    row_group_rows: int = setting(2048, "rows per Parquet row group", ge=1)
    workers: int = setting(0, "parsing processes; 0 = all cores. Not in the cache key", ge=0)
    partitions: int = setting(
        1,
        "fan-out in the pipeline: shard tasks that parse the source in parallel (one pod "
        "each); the dataset is the same for any number. Not in the cache key",
        ge=1,
    )
    incremental: bool = setting(
        True,
        "tree sources: take unchanged files' pairs from the newest shard output of "
        "the same source and extraction settings under the artifact root, parse only "
        "new and changed files (the result equals a full re-shard). Not in the cache "
        "key",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        parse_source(source)
        return source

    @field_validator("languages")
    @classmethod
    def _lower(cls, languages: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(lang.strip().lower() for lang in languages if lang.strip())

    @model_validator(mode="after")
    def _ranges(self) -> ShardConfig:
        if self.max_summary_chars < self.min_summary_chars:
            raise ConfigError("max_summary_chars: must be >= min_summary_chars >= 0")
        if self.max_code_chars < self.min_code_chars:
            raise ConfigError("max_code_chars: must be >= min_code_chars >= 0")
        if self.max_code_lines < self.min_code_lines:
            raise ConfigError("max_code_lines: must be >= min_code_lines >= 1")
        return self

    def limits(self) -> Limits:
        """The pair filters, by field name (the two classes share these names; a new filter needs both)."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def make_source(self) -> Source:
        return Source(
            self.source,
            skip_tests=self.skip_tests,
            max_file_bytes=self.max_file_bytes,
            max_source_mb=self.max_source_mb,
            code_column=self.code_column,
            summary_column=self.summary_column,
            language_column=self.language_column,
            languages=self.languages,
            path_column=self.path_column,
            license_column=self.license_column,
            hf_revision=self.hf_revision,
            hf_data_files=self.hf_data_files,
        )

    def resolved_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


def key_config(config: ShardConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What identifies the output: every setting except how the work is spread (`workers`, `partitions`) and
    whether earlier results are reused (`incremental`), plus the source fingerprint."""
    material = config.to_dict()
    material.pop("workers")
    material.pop("incremental")
    material.pop("partitions")
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


def ordered_map(
    fn: Callable[[list[Any]], list[Any]], items: Iterable[Any], workers: int, batch: int = 8, window: int = 4
) -> Iterator[Any]:
    """fn over batches of `items` on `workers` processes, results in input order, at most workers*window batches
    in flight (Pool.imap would drain a streamed dataset into its task queue). The input is iterated in this thread,
    so a source error surfaces here. Closing the iterator early terminates the workers.

    The workers are fresh interpreters (blueprint.data.workers), not forks: the caller (the Python API) already runs
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


def write_new_pairs(
    pairs: list[tuple],
    seen: set[bytes],
    writer: ShardWriter,
    config: ShardConfig,
    source_name: str,
    dropped: collections.Counter,
    room: int | None,
    new: bool = False,
) -> int:
    """Write the pairs whose code was not seen before (exact dedupe on the code hash), at most `room` of them, each
    to its split (by salted hash) and shard (by hash); how many were written."""
    salt, kept = config.split_salt.encode("utf-8"), 0
    eval_fraction, num_shards = config.eval_fraction, config.num_shards
    for digest, name, code, summary, path, license, tests in pairs:
        if room is not None and kept >= room:
            break
        key = digest[:16]
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        split = "eval" if _eval_draw(salt, digest) < eval_fraction else "train"
        shard = int.from_bytes(digest[:8], "big") % num_shards
        writer.add(
            split,
            shard,
            (
                digest.hex()[:32],
                code,
                summary,
                name,
                LANGUAGE,
                source_name,
                path,
                license,
                len(code),
                code.count("\n") + 1,
                tests,
            ),
            new,
        )
        kept += 1
    return kept


@dataclasses.dataclass
class Tally:
    """What the units gave, as the metrics report it."""

    files: int = 0
    functions: int = 0
    source_bytes: int = 0
    kept: int = 0
    stopped: bool = False
    files_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    pairs_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def write_results(
    results: Iterable[Result], writer: ShardWriter, config: ShardConfig, source_name: str, bar: Progress
) -> Tally:
    """De-duplicate, split and shard the units' pairs in order, stopping at `max_pairs`."""
    seen: set[bytes] = set()  # 16-byte prefixes of code hashes: the only per-pair state kept for the whole run
    tally, room = Tally(), config.max_pairs
    for result in results:
        tally.files += 1
        bar.update(tally.files, pairs=tally.kept)
        tally.source_bytes += result.n_bytes
        if result.file_drop:
            tally.files_dropped[result.file_drop] += 1
            continue
        tally.functions += result.functions
        tally.pairs_dropped.update(result.dropped)
        tally.kept += write_new_pairs(
            result.pairs,
            seen,
            writer,
            config,
            source_name,
            tally.pairs_dropped,
            None if room is None else room - tally.kept,
            not result.reused,
        )
        if room is not None and tally.kept >= room:
            tally.stopped = True
            break
    return tally


def open_previous(uri: str) -> incremental.PreviousIndex | None:
    """The earlier run's index, or None (a full parse, said in one line) when it is damaged or gone."""
    try:
        return incremental.PreviousIndex(uri)
    except (artifacts.ArtifactError, storage.StorageError) as exc:
        print(f"{STAGE}: not reusing {uri} ({exc}): parsing every input", file=sys.stderr, flush=True)
        return None


def _unidentified(fresh: Iterator[Result], counts: collections.Counter) -> Iterator[Result]:
    try:
        for result in fresh:
            counts["inputs_parsed"] += 1
            yield result
    finally:
        fresh.close()


def source_results(
    source: Source,
    config: ShardConfig,
    out_dir: Path,
    previous: str | None,
    workers: int,
    batch: int,
    counts: collections.Counter,
    always_index: bool = False,
) -> tuple[Iterator[Result], IndexWriter | None]:
    """Every unit's Result in source order, and the index they are recorded in (tree sources, or any source with
    `always_index`: a fan-out part): with `previous`, unchanged files come from its index, only the rest is parsed."""
    parse = functools.partial(
        ordered_map, functools.partial(process_many, limits=config.limits()), workers=workers, batch=batch
    )
    if not source.is_tree and not always_index:
        return parse(source.units()), None
    index = IndexWriter(out_dir)
    old = open_previous(previous) if previous and source.is_tree else None
    merged = (
        incremental.merged_results(source, old, parse, counts)
        if source.is_tree
        else _unidentified(parse(source.units()), counts)
    )

    def recorded() -> Iterator[Result]:
        try:
            for result in merged:
                index.add(result)
                yield result
        finally:
            merged.close()

    return recorded(), index


def compute(
    config: ShardConfig, out_dir: Path, source: Source | None = None, progress: bool = True, previous: str | None = None
) -> dict[str, Any]:
    """Write the shards of `config.source` into `out_dir` (reusing the per-file results of the shard output
    `previous`); the metrics. Raises SourceError when nothing is kept."""
    start = time.time()
    source = source or config.make_source()
    fingerprint = source.fingerprint()
    batch = 8 if source.total else 16  # files, or streamed rows (each up to max_file_bytes: bounds memory in flight)
    workers = config.resolved_workers()
    if source.total:  # no more processes than batches (a small tree is done before a big pool has started)
        workers = max(1, min(workers, -(-source.total // batch)))
    writer = ShardWriter(out_dir, config.num_shards, config.row_group_rows)
    bar = Progress(STAGE, source.total or None, progress, unit="file" if source.total else "row")
    counts: collections.Counter = collections.Counter()
    results, index = source_results(source, config, out_dir, previous, workers, batch, counts)
    try:
        tally = write_results(results, writer, config, source.name, bar)
    finally:
        results.close()  # terminates the worker pool when we stopped early or failed
        bar.close()
        if index is not None:
            index.close()
    rows_per_shard = writer.close()
    tally.files_dropped.update(source.skipped)  # rows the source filtered itself (other languages)
    tally.files += sum(source.skipped.values())
    files, kept, files_dropped, pairs_dropped = tally.files, tally.kept, tally.files_dropped, tally.pairs_dropped
    if kept == 0:
        raise SourceError(
            f"source {source.name} gave no (code, summary) pairs from {files} file(s)/row(s): "
            f"files dropped {dict(files_dropped) or 'none'}, pairs dropped {dict(pairs_dropped) or 'none'}"
        )
    return dataset_metrics(tally, rows_per_shard, config, source.name, fingerprint, out_dir, start, workers) | {
        "inputs_parsed": counts["inputs_parsed"] if index is not None else files,
        "inputs_reused": counts["inputs_reused"],
        # against an earlier run: which rows are new (a retrain may draw them first)
        **(
            {"reused_from": artifacts.portable_name(previous), incremental.NEW_ROWS: writer.new_rows()}
            if previous and counts["inputs_reused"]
            else {}
        ),
    }


def dataset_metrics(
    tally: Tally,
    rows_per_shard: dict[str, int],
    config: ShardConfig,
    source_name: str,
    fingerprint: Any,
    out_dir: Path,
    start: float,
    workers: int,
) -> dict[str, Any]:
    """A dataset's figures (with `tally.files` already counting the rows the source filtered itself)."""
    files, functions, source_bytes, kept = tally.files, tally.functions, tally.source_bytes, tally.kept
    files_dropped, pairs_dropped, stopped = tally.files_dropped, tally.pairs_dropped, tally.stopped
    seconds = time.time() - start
    return {
        "source": source_name,
        "source_fingerprint": fingerprint,
        "pairs": kept,
        "rows": {s: sum(n for rel, n in rows_per_shard.items() if rel.startswith(f"{s}/")) for s in ("train", "eval")},
        "rows_per_shard": rows_per_shard,
        "num_shards": config.num_shards,
        "files_seen": files,
        "files_dropped": dict(sorted(files_dropped.items())),
        "functions_seen": functions,
        "pairs_dropped": dict(sorted(pairs_dropped.items())),
        "stopped_at_max_pairs": stopped,
        "source_bytes": source_bytes,
        "bytes_written": sum(p.stat().st_size for s in SPLITS for p in (Path(out_dir) / s).rglob("*.parquet")),
        "seconds": round(seconds, 2),
        "mb_per_s": round(source_bytes / 1e6 / max(seconds, 1e-9), 2),
        "workers": workers,
    }


def run(
    config: ShardConfig,
    *,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """Committed shards of `config.source` (cache hit when the same source content and settings were sharded).

    An empty or unusable source raises SourceError (a ValueError) naming it, and no manifest is written.
    """
    source = config.make_source()
    fingerprint = source.fingerprint()  # fails fast (missing dir, no Python files) before any output exists
    key = key_config(config, fingerprint)

    def build(out_dir: Path) -> dict[str, Any]:
        previous = None
        if config.incremental and artifact_root and source.is_tree:
            target = out_uri or artifacts.stage_uri(artifact_root, STAGE, artifacts.stage_key(STAGE, key, {}))
            previous = incremental.find_previous(artifact_root, incremental.extraction_key(key), exclude=target)
        return compute(config, out_dir, source, progress, previous)

    return artifacts.reuse_or_commit(STAGE, key, {}, build, artifact_root=artifact_root, out_uri=out_uri, force=force)


def summary_line(out: artifacts.StageOutput | dict[str, Any]) -> str:
    """One line for the CLI: pairs kept by split, drops by reason, shards, bytes, seconds."""
    m = out.metrics if isinstance(out, artifacts.StageOutput) else out
    rows = m.get("rows", {})
    dropped = {**m.get("pairs_dropped", {})}
    dropped.pop("no_docstring", None)  # not a loss: those functions never were pairs
    top = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
    files_dropped = ", ".join(f"{k} {v}" for k, v in sorted(m.get("files_dropped", {}).items(), key=lambda kv: -kv[1]))
    cached = " (cache hit)" if isinstance(out, artifacts.StageOutput) and out.cached else ""
    return (
        f"shard {m.get('source', '?')}: {m.get('pairs', 0)} pairs kept (train {rows.get('train', 0)}, "
        f"eval {rows.get('eval', 0)}) from {m.get('files_seen', 0)} files; "
        f"pairs dropped: {sum(dropped.values())}{f' ({top})' if top else ''}; "
        f"files dropped: {sum(m.get('files_dropped', {}).values())}{f' ({files_dropped})' if files_dropped else ''}; "
        f"{m.get('num_shards', '?')} shards/split, {m.get('bytes_written', 0) / 1e6:.2f} MB, "
        f"{m.get('seconds', 0):.1f} s{cached}"
    )
