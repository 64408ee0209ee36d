"""The shard files of a dataset: the schema and the writer that routes rows to `num_shards` files per split.

The columns are described in blueprint.data.readers, where the readers live.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
        pa.field("tests", pa.string(), nullable=True),
    ],
    metadata={"blueprint.schema": "code-summary-pairs/2"},  # 2: the tests column
)  # the columns are described in blueprint.data.readers, where the readers live
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
        self.new: dict[str, list[int]] = {name: [] for name in self.rows}  # positions of rows marked new
        self._names = {(s, i): shard_name(s, i, num_shards) for s in SPLITS for i in range(num_shards)}

    def add(self, split: str, shard: int, row: tuple, new: bool = False) -> None:
        """`row` holds the SCHEMA columns in order; `new`: it comes from an input that changed since the last run."""
        name = self._names[split, shard]
        if new:
            self.new[name].append(self.rows[name])
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = []
        buf.append(row)
        size = self._buffer_bytes[name] = self._buffer_bytes.get(name, 0) + len(row[1]) + len(row[2])
        self.rows[name] += 1
        if len(buf) >= self.row_group_rows or size >= self.row_group_bytes:
            self._flush(name)

    def _flush(self, name: str) -> None:
        rows = self._buffers.pop(name, [])
        self._buffer_bytes.pop(name, None)
        if name not in self._writers:
            path = self.out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writers[name] = pq.ParquetWriter(path, SCHEMA, compression=COMPRESSION)
        if rows:
            columns = list(zip(*rows, strict=True))
            table = pa.Table.from_arrays(
                [pa.array(col, type=f.type) for col, f in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
            )
            self._writers[name].write_table(table, row_group_size=len(rows))

    def new_rows(self) -> dict[str, list[int]]:
        """{split: indices of the new rows in read order (file by file, as the readers list them)}."""
        out: dict[str, list[int]] = {s: [] for s in SPLITS}
        offsets = {s: 0 for s in SPLITS}
        for name in sorted(self.rows):
            split = name.split("/", 1)[0]
            out[split] += [offsets[split] + i for i in self.new[name]]
            offsets[split] += self.rows[name]
        return out

    def close(self) -> dict[str, int]:
        """Flush everything; every shard file exists afterwards (an empty one holds the schema). Rows per file."""
        for name in self.rows:
            if self._buffers.get(name) or name not in self._writers:
                self._flush(name)
            self._writers.pop(name).close()
        return dict(self.rows)
