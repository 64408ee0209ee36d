"""What checking every shard file against its manifest sha256 costs: `read_pairs` of a whole split, verified
(as the stages read it) vs. decoding the same Parquet files unverified. Prints seconds and MB/s.

    python benchmarks/verify_cost.py [SHARDS_URI]   (default: shards the stdlib into a temp dir first)
"""

from __future__ import annotations

import sys
import tempfile
import time

import pyarrow.parquet as pq

from blueprint.config import parse
from blueprint.data.readers import read_pairs, shard_files
from blueprint.stages import shard
from blueprint.store import artifacts, storage


def unverified(uri: str, split: str) -> int:
    rows = 0
    for rel in shard_files(artifacts.read_manifest(uri, verify="sizes"), split):
        fs, path = storage.filesystem(storage.join(uri, rel))
        rows += sum(len(b.to_pylist()) for b in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=1024))
    return rows


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else None
    if uri is None:
        root = tempfile.mkdtemp()
        uri = shard.run(
            parse(shard.ShardConfig, {"source": "stdlib", "num_shards": 4}), artifact_root=root, progress=False
        ).uri
    manifest = artifacts.read_manifest(uri, verify="sizes")
    mb = sum(manifest["files"][r]["size"] for r in shard_files(manifest, "train")) / 1e6
    for name, fn in (
        ("unverified decode", lambda: unverified(uri, "train")),
        ("verified read_pairs", lambda: len(read_pairs(uri, "train"))),
    ):
        start = time.perf_counter()
        rows = fn()
        seconds = time.perf_counter() - start
        print(f"{name:>20}: {rows} rows, {mb:.1f} MB in {seconds:.3f} s ({mb / seconds:.0f} MB/s)")


if __name__ == "__main__":
    main()
