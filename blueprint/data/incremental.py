"""Incremental sharding: what every input of a shard run produced, kept beside its shards, so a re-shard of a grown
or changed source parses only the new and changed inputs and takes the rest from the previous run.

A shard output of a tree source holds `index/inputs.parquet` (one row per input: path, identity = size and
mtime or ETag, and its counts) and `index/pairs.parquet` (every pair each input gave, before de-duplication, so
that deleting the input that held the first copy of a function brings its later copy back). The stage then
de-duplicates, splits and shards as always, so the result equals a full re-shard, byte for byte. Both previous
files are read in input order beside the current inputs (a merge on the sorted paths): memory is one batch.
"""
from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from blueprint.data.extract import Result
from blueprint.store import artifacts, storage

INDEX_VERSION = "blueprint-shard-index/2"  # 2: local identity = size + sha256
INPUTS_FILE, PAIRS_FILE = "index/inputs.parquet", "index/pairs.parquet"
INPUT_SCHEMA = pa.schema([("ordinal", pa.int64()), ("path", pa.string()), ("identity", pa.string()),
                          ("n_bytes", pa.int64()), ("file_drop", pa.string()), ("functions", pa.int64()),
                          ("dropped", pa.string())], metadata={"blueprint.schema": INDEX_VERSION})
PAIR_SCHEMA = pa.schema([("ordinal", pa.int64()), ("digest", pa.binary()), ("name", pa.string()),
                         ("code", pa.string()), ("summary", pa.string()), ("path", pa.string()),
                         ("license", pa.string())], metadata={"blueprint.schema": INDEX_VERSION})
BATCH = 4096


class IndexWriter:
    """Writes each input's Result as it is taken (parsed or reused), in input order."""

    def __init__(self, out_dir: Path) -> None:
        (out_dir / "index").mkdir(parents=True, exist_ok=True)
        self._inputs = pq.ParquetWriter(out_dir / INPUTS_FILE, INPUT_SCHEMA, compression="zstd")
        self._pairs = pq.ParquetWriter(out_dir / PAIRS_FILE, PAIR_SCHEMA, compression="zstd")
        self._input_rows: list[dict] = []
        self._pair_rows: list[dict] = []
        self.count = 0

    def add(self, identity: str, result: Result) -> None:
        self._input_rows.append({"ordinal": self.count, "path": result.path, "identity": identity,
                                 "n_bytes": result.n_bytes, "file_drop": result.file_drop,
                                 "functions": result.functions, "dropped": json.dumps(dict(result.dropped))})
        self._pair_rows += [{"ordinal": self.count, "digest": d, "name": n, "code": c, "summary": s, "path": p,
                             "license": lic} for d, n, c, s, p, lic in result.pairs]
        self.count += 1
        if len(self._pair_rows) >= BATCH or len(self._input_rows) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._input_rows:
            self._inputs.write_table(pa.Table.from_pylist(self._input_rows, INPUT_SCHEMA))
        if self._pair_rows:
            self._pairs.write_table(pa.Table.from_pylist(self._pair_rows, PAIR_SCHEMA))
        self._input_rows, self._pair_rows = [], []

    def close(self) -> None:
        self._flush()
        self._inputs.close()
        self._pairs.close()


NEW_ROWS = "new_rows"  # a metric, not a file: which rows are new is history, not content (identity stays the same)


def new_rows(uri: str, split: str) -> list[int] | None:
    """The new rows of `split` in the shard output `uri` (read order), or None when it did not build on an earlier
    run: `metrics.new_rows` of its manifest, which the dataset's identity leaves out."""
    rows = artifacts.read_manifest(uri, verify="sizes").get("metrics", {}).get(NEW_ROWS)
    return None if rows is None else list(rows[split])


def extraction_key(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what an input gives (not how pairs are split or sharded): two shard runs whose keys
    agree may share inputs' results."""
    ignored = {"num_shards", "eval_fraction", "split_salt", "max_pairs", "row_group_rows", "workers",
               "source_fingerprint", "incremental", "partitions", "partition"}
    return {"index": INDEX_VERSION, **{k: v for k, v in config.items() if k not in ignored}}


def find_previous(root: str, key: dict[str, Any], exclude: str | None = None) -> str | None:
    """The newest committed shard output under `root` with an index and the same extraction key, or None. A whole
    dataset (every input) comes before a fan-out part (one partition's inputs)."""
    rows = [r for r in artifacts.cached_outputs(root) if r["stage"] in ("shard", "shard-part")
            and (exclude is None or storage.normalize(r["uri"]) != storage.normalize(exclude))]  # not itself (force)
    for row in sorted(rows, key=lambda r: (r["stage"] == "shard", r["created"]), reverse=True):
        manifest = storage.read_json(artifacts.manifest_uri(row["uri"]))
        if INPUTS_FILE in manifest.get("files", {}) and extraction_key(manifest.get("config", {})) == key:
            return row["uri"]
    return None


class PreviousIndex:
    """The previous run's per-input results: which inputs are unchanged, and their Results streamed in path order."""

    def __init__(self, uri: str) -> None:
        self.uri, self._manifest = uri, artifacts.read_manifest(uri, verify="sizes")
        for rel in (INPUTS_FILE, PAIRS_FILE):  # both checked now: a damaged index fails before any work
            artifacts.verify_file(uri, rel, self._manifest)

    def _rows(self, rel: str, columns: list[str] | None = None) -> Iterator[dict]:
        from blueprint.data.readers import open_shard

        with open_shard(self.uri, rel, self._manifest, verify=False) as f:  # verified when opened
            for batch in f.iter_batches(batch_size=1024, columns=columns, use_threads=False):
                yield from batch.to_pylist()

    def unchanged(self, identities: dict[str, str]) -> set[str]:
        """The paths whose identity is the one recorded (inputs that are new, changed or gone are not)."""
        return {r["path"] for r in self._rows(INPUTS_FILE, ["path", "identity", "file_drop"])
                if identities.get(r["path"]) == r["identity"] and r["file_drop"] != "unreadable"}  # re-read those

    def inputs(self) -> Iterator[dict]:
        """Every recorded input's path and identity, in order."""
        return self._rows(INPUTS_FILE, ["path", "identity"])

    def all_results(self) -> Iterator[tuple[str, Result]]:
        """(identity, Result) of every recorded input, in order."""
        return self._recorded(None)

    def results(self, paths: set[str]) -> Iterator[Result]:
        """The recorded Result of each path in `paths`, in the recorded (path) order."""
        return (result for _, result in self._recorded(paths))

    def _recorded(self, paths: set[str] | None) -> Iterator[tuple[str, Result]]:
        """(identity, Result) of each path in `paths` (None: every input): one pass over each index file."""
        pairs = self._rows(PAIRS_FILE)
        pair = next(pairs, None)
        for row in self._rows(INPUTS_FILE):
            taken = []
            while pair is not None and pair["ordinal"] <= row["ordinal"]:
                if pair["ordinal"] == row["ordinal"] and (paths is None or row["path"] in paths):
                    taken.append(tuple(pair[k] for k in ("digest", "name", "code", "summary", "path", "license")))
                pair = next(pairs, None)
            if paths is None or row["path"] in paths:
                yield row["identity"], Result(path=row["path"], n_bytes=row["n_bytes"], file_drop=row["file_drop"],
                                              functions=row["functions"], pairs=taken,
                                              dropped=collections.Counter(json.loads(row["dropped"])), reused=True)


def merged_results(units: list[tuple], identities: dict[str, str], previous: PreviousIndex | None,
                   parse: Callable[[list[tuple]], Iterator[Result]], counts: collections.Counter
                   ) -> Iterator[tuple[str, Result]]:
    """(identity, Result) of every unit in order: unchanged inputs from `previous`, the rest from `parse` (which
    gets only those, in order). `counts` tallies inputs_parsed and inputs_reused."""
    reused = previous.unchanged(identities) if previous is not None else set()
    fresh = parse([u for u in units if u[2] not in reused])
    old = previous.results(reused) if previous is not None else iter(())
    try:
        for unit in units:
            path = unit[2]
            if path in reused:
                counts["inputs_reused"] += 1
                yield identities[path], next(old)
            else:
                counts["inputs_parsed"] += 1
                yield identities[path], next(fresh)
    finally:
        close = getattr(fresh, "close", None)
        if close:
            close()
