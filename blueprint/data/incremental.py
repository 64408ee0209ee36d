"""Incremental sharding: what every input of a shard run produced, kept beside its shards, so a re-shard of a grown
or changed source parses only the new and changed inputs and takes the rest from the previous run.

A shard output of a tree source holds `index/inputs.parquet` (one row per input, in order: path, identity = size
and sha256 of the bytes read, or the ETag on S3, the local mtime_ns, its counts and how many pairs it gave) and
`index/pairs.parquet` (those pairs, input after input, before de-duplication, so that deleting the input that held
the first copy of a function brings its later copy back). The stage then de-duplicates, splits and shards as
always, so the result equals a full re-shard, byte for byte. Both previous files are read in input order beside
the current inputs (a merge on the sorted paths): memory is one batch. A reused input's pairs are copied into the
new index as the Arrow slices they were read as, never rebuilt from Python objects.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from blueprint.data.extract import UNREAD, Result
from blueprint.data.file_reading import content_identity, read_regular
from blueprint.stages import registry
from blueprint.store import artifacts, storage

INDEX_VERSION = "blueprint-shard-index/4"  # 3: pairs by count per input, the local mtime_ns; 4: tests column
INPUTS_FILE, PAIRS_FILE = "index/inputs.parquet", "index/pairs.parquet"
INPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("identity", pa.string()),
        ("mtime_ns", pa.int64()),
        ("n_bytes", pa.int64()),
        ("file_drop", pa.string()),
        ("functions", pa.int64()),
        ("dropped", pa.string()),
        ("pairs", pa.int64()),
    ],
    metadata={"blueprint.schema": INDEX_VERSION},
)
PAIR_SCHEMA = pa.schema(
    [
        ("digest", pa.binary()),
        ("name", pa.string()),
        ("code", pa.string()),
        ("summary", pa.string()),
        ("path", pa.string()),
        ("license", pa.string()),
        ("tests", pa.string()),
    ],
    metadata={"blueprint.schema": INDEX_VERSION},
)
BATCH = 4096


class IndexWriter:
    """Writes each input's Result as it is taken (parsed or reused), in input order. Where a file's row groups end
    depends only on the inputs, never on which were reused, so the bytes equal a full re-shard's."""

    def __init__(self, out_dir: Path) -> None:
        (out_dir / "index").mkdir(parents=True, exist_ok=True)
        self._inputs = pq.ParquetWriter(out_dir / INPUTS_FILE, INPUT_SCHEMA, compression="zstd")
        self._pairs = pq.ParquetWriter(out_dir / PAIRS_FILE, PAIR_SCHEMA, compression="zstd")
        self._input_columns: dict[str, list] = {name: [] for name in INPUT_SCHEMA.names}
        self._parsed: list[tuple] = []  # pairs parsed now, not yet in a piece
        self._pieces: list[tuple[pa.RecordBatch, int, int]] = []  # (batch, offset, length), in order
        self._waiting = 0  # pairs not yet written
        self.count = 0

    def add(self, result: Result) -> None:
        row = (
            result.path,
            result.identity,
            result.mtime_ns,
            result.n_bytes,
            result.file_drop,
            result.functions,
            json.dumps(dict(result.dropped)),
            len(result.pairs),
        )
        for column, value in zip(self._input_columns.values(), row, strict=True):
            column.append(value)
        if result.arrow_pairs is None:
            self._parsed += result.pairs
        elif result.arrow_pairs:
            self._seal_parsed()
            for piece in result.arrow_pairs:
                self._pieces.append(
                    _joined(self._pieces.pop(), piece) if self._pieces and _adjacent(self._pieces[-1], piece) else piece
                )
        self._waiting += len(result.pairs)
        self.count += 1
        if self._waiting >= BATCH or len(self._input_columns["path"]) >= BATCH:
            self._flush()

    def _seal_parsed(self) -> None:
        if self._parsed:
            columns = [
                pa.array(col, type=field.type)
                for col, field in zip(zip(*self._parsed, strict=True), PAIR_SCHEMA, strict=True)
            ]
            batch = pa.RecordBatch.from_arrays(columns, schema=PAIR_SCHEMA)
            self._pieces.append((batch, 0, batch.num_rows))
            self._parsed = []

    def _flush(self) -> None:
        if self._input_columns["path"]:
            self._inputs.write_table(pa.Table.from_pydict(self._input_columns, schema=INPUT_SCHEMA))
            self._input_columns = {name: [] for name in INPUT_SCHEMA.names}
        self._seal_parsed()
        if self._pieces:  # one contiguous table: the same bytes however the rows were pieced together
            batches = [
                pa.RecordBatch.from_arrays(batch.slice(at, n).columns, schema=PAIR_SCHEMA)
                for batch, at, n in self._pieces
            ]
            self._pairs.write_table(pa.Table.from_batches(batches, schema=PAIR_SCHEMA).combine_chunks())
        self._pieces, self._waiting = [], 0

    def close(self) -> None:
        self._flush()
        self._inputs.close()
        self._pairs.close()


def _adjacent(first: tuple[pa.RecordBatch, int, int], then: tuple[pa.RecordBatch, int, int]) -> bool:
    return first[0] is then[0] and first[1] + first[2] == then[1]


def _joined(first: tuple[pa.RecordBatch, int, int], then: tuple[pa.RecordBatch, int, int]) -> tuple:
    return first[0], first[1], first[2] + then[2]


NEW_ROWS = "new_rows"  # a metric, not a file: which rows are new is history, not content (identity stays the same)


def new_rows(uri: str, split: str) -> list[int] | None:
    """The new rows of `split` in the shard output `uri` (read order), or None when it did not build on an earlier
    run: `metrics.new_rows` of its manifest, which the dataset's identity leaves out."""
    rows = artifacts.read_manifest(uri, verify="sizes").get("metrics", {}).get(NEW_ROWS)
    return None if rows is None else list(rows[split])


def extraction_key(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what an input gives (not how pairs are split or sharded): two shard runs whose keys
    agree may share inputs' results."""
    ignored = {
        "num_shards",
        "eval_fraction",
        "split_salt",
        "max_pairs",
        "row_group_rows",
        "workers",
        "source_fingerprint",
        "incremental",
        "partitions",
        "partition",
    }
    return {"index": INDEX_VERSION, **{k: v for k, v in config.items() if k not in ignored}}


def find_previous(root: str, key: dict[str, Any], exclude: str | None = None) -> str | None:
    """The newest committed shard output under `root` with an index and the same extraction key, or None. A whole
    dataset (every input) comes before a fan-out part (one partition's inputs)."""
    rows = [
        r
        for r in artifacts.cached_outputs(root)
        if r["stage"] in (registry.SHARD, registry.SHARD_PART)
        and (exclude is None or storage.normalize(r["uri"]) != storage.normalize(exclude))
    ]  # not itself (force)
    for row in sorted(rows, key=lambda r: (r["stage"] == registry.SHARD, r["created"]), reverse=True):
        manifest = storage.read_json(artifacts.manifest_uri(row["uri"]))
        if INPUTS_FILE in manifest.get("files", {}) and extraction_key(manifest.get("config", {})) == key:
            return row["uri"]
    return None


class _PairCursor:
    """The previous pairs file in order, `take(n)` rows at a time: as tuples (for the stage) and as slices of the
    record batches they were read in (copied into the next index as they are)."""

    def __init__(self, batches: Iterator[pa.RecordBatch], uri: str) -> None:
        self._batches, self._uri = batches, uri
        self._batch: pa.RecordBatch | None = None
        self._rows: list[tuple] | None = None
        self._at = 0

    def take(self, n: int, keep: bool) -> tuple[list[tuple], list[tuple[pa.RecordBatch, int, int]]]:
        rows: list[tuple] = []
        pieces: list[tuple[pa.RecordBatch, int, int]] = []
        while n:
            if self._batch is None or self._at == self._batch.num_rows:
                self._batch, self._rows, self._at = next(self._batches, None), None, 0
                if self._batch is None:
                    raise artifacts.ArtifactError(f"input {self._uri}: {PAIRS_FILE} ends before its inputs' pairs")
            k = min(n, self._batch.num_rows - self._at)
            if keep:
                if self._rows is None:  # column by column: far cheaper than a dict per row
                    self._rows = list(zip(*(column.to_pylist() for column in self._batch.columns), strict=True))
                rows += self._rows[self._at : self._at + k]
                pieces.append((self._batch, self._at, k))
            self._at, n = self._at + k, n - k
        return rows, pieces


class PreviousIndex:
    """The previous run's per-input results: what each input was, and their Results streamed in path order."""

    def __init__(self, uri: str) -> None:
        self.uri, self._manifest = uri, artifacts.read_manifest(uri, verify="sizes")
        for rel in (INPUTS_FILE, PAIRS_FILE):  # both checked now: a damaged or older index fails before any work
            artifacts.verify_file(uri, rel, self._manifest)
            if (version := self._version(rel)) != INDEX_VERSION:
                raise artifacts.ArtifactError(f"input {uri}: {rel} is a {version} index, not {INDEX_VERSION}")

    def _version(self, rel: str) -> str:
        from blueprint.data.readers import open_shard

        with open_shard(self.uri, rel, self._manifest, verify=False) as f:
            return (f.schema_arrow.metadata or {}).get(b"blueprint.schema", b"?").decode()

    def _batches(self, rel: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        from blueprint.data.readers import open_shard

        with open_shard(self.uri, rel, self._manifest, verify=False) as f:  # verified when opened
            yield from f.iter_batches(batch_size=BATCH, columns=columns, use_threads=False)

    def _rows(self, columns: list[str]) -> Iterator[tuple]:
        """The inputs' rows as tuples of `columns`, in order."""
        for batch in self._batches(INPUTS_FILE, columns):
            yield from zip(*(column.to_pylist() for column in batch.columns), strict=True)

    def recorded(self) -> dict[str, tuple[str, int | None]]:
        """{path: (identity, mtime_ns)} of every input that may be reused (not one that could not be read)."""
        return {
            path: (identity, mtime)
            for path, identity, mtime, drop in self._rows(["path", "identity", "mtime_ns", "file_drop"])
            if identity and drop != "unreadable"
        }

    def inputs(self) -> Iterator[tuple[str, str]]:
        """Every recorded input's (path, identity), in order."""
        return self._rows(["path", "identity"])

    def results(self, paths: set[str] | None = None) -> Iterator[Result]:
        """The recorded Result of each path in `paths` (None: every input), in the recorded (path) order: one pass
        over each index file."""
        pairs = _PairCursor(self._batches(PAIRS_FILE), self.uri)
        for path, identity, mtime, n_bytes, drop, functions, dropped, n in self._rows(INPUT_SCHEMA.names):
            keep = paths is None or path in paths
            taken, pieces = pairs.take(n, keep)
            if keep:
                yield Result(
                    path=path,
                    n_bytes=n_bytes,
                    file_drop=drop,
                    functions=functions,
                    pairs=taken,
                    dropped=collections.Counter(json.loads(dropped)),
                    reused=True,
                    identity=identity,
                    mtime_ns=mtime,
                    arrow_pairs=pieces,
                )


def current_identity(f: Any, on_s3: bool, recorded: tuple[str, int | None] | None) -> str | None:
    """The identity of the tree file `f` (a SourceFile or RemoteObject) now, where it could be the `recorded`
    (identity, mtime_ns), else None: a new file, or one of another size, is parsed whatever it holds (the worker
    records the identity of what it read). On S3 the listing says it (size and ETag). Locally, a file whose size
    and mtime_ns are the recorded ones is the recorded file (as for the source fingerprint, the cache key); one too
    large to read has the same result at the same size; any other is hashed, so a file touched but not changed is
    still reused."""
    if recorded is None or not recorded[0].startswith(f"{f.size}:"):
        return None
    if on_s3:
        return f"{f.size}:{f.etag}"
    if f.mtime_ns == recorded[1] or recorded[0] == f"{f.size}:{UNREAD}":
        return recorded[0]
    try:  # at most one byte more than the recorded size: a device or FIFO is never read, a grown file differs
        raw = read_regular(f.abs_path, f.size)
    except OSError:
        return None  # parsed (and dropped as unreadable) again
    return None if raw is None else content_identity(raw)


def reusable(source: Any, previous: PreviousIndex) -> dict[str, int | None]:
    """{path: mtime_ns now} of the source's files whose identity is the one `previous` recorded."""
    recorded = previous.recorded()
    return {
        f.rel_path: getattr(f, "mtime_ns", None)
        for f in source.files()
        if (now := current_identity(f, source.on_s3, recorded.get(f.rel_path))) is not None
        and now == recorded[f.rel_path][0]
    }


def merged_results(
    source: Any,
    previous: PreviousIndex | None,
    parse: Callable[[list[tuple]], Iterator[Result]],
    counts: collections.Counter,
) -> Iterator[Result]:
    """The Result of every unit of the tree `source` in order: unchanged inputs from `previous`, the rest from
    `parse` (which gets only those, in order). `counts` tallies inputs_parsed and inputs_reused."""
    units = list(source.units())
    reused = reusable(source, previous) if previous is not None else {}
    fresh = parse([u for u in units if u[2] not in reused])
    old = previous.results(set(reused)) if previous is not None else iter(())
    try:
        for unit in units:
            if unit[2] in reused:
                counts["inputs_reused"] += 1
                result = next(old)
                result.mtime_ns = reused[unit[2]]  # the same bytes as recorded, as the file is stamped now
                yield result
            else:
                counts["inputs_parsed"] += 1
                yield next(fresh)
    finally:
        close = getattr(fresh, "close", None)
        if close:
            close()
