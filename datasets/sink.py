"""The shard writer of `cxr prepare`: a Ray Data `Datasink` that writes each block it is given as
one shard (Parquet, TFRecord or both) and reports what it wrote.

Our own sink rather than `Dataset.write_parquet`: the shards keep their names
(`<split>/part-NNNNN.<format>`), their bytes (the schema of shards.py, no pandas or Ray
metadata, zstd) and a manifest entry with the sha256 of exactly the bytes written, on any
pyarrow file system; TFRecords come out of the same rows; and the sink hands back, as metadata,
what the driver needs of each row (its position, original size and mode; the pixels of the few
rows the EDA's sample grid shows).

Each block reaching the sink is one shard: `Dataset.repartition(rows_per_shard, strict=True)`
cuts the ordered stream of one split into blocks of exactly `rows_per_shard` rows (the last one
smaller). A write task does not know a block's shard number (it depends on every rejection
before it), so the block is written under a name of its own, `.pending/<split>-<first pos>.<fmt>`
(the same name when a lost task is retried), and the driver renames the files to their shard
numbers once every block is written (`decode.write_pass`).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

PENDING = ".pending"


class ShardSink(Datasink):
    """Writes blocks of shard rows (see workers.decode_batch) under `out`/.pending/; after the
    write, `results` holds one dict per written block (see `_write_block`)."""

    def __init__(self, out, formats: list[str], sample_positions: Iterable[int]):
        self.out = out  # a storage.Location
        self.formats = list(formats)
        self.samples = frozenset(int(p) for p in sample_positions)
        self.results: list[dict] = []

    def write(self, blocks, ctx) -> list[dict]:
        return [self._write_block(BlockAccessor.for_block(block).to_arrow())
                for block in blocks if BlockAccessor.for_block(block).num_rows()]

    def _write_block(self, table: pa.Table) -> dict:
        from .shards import PARQUET_SCHEMA, parquet_table_bytes, shard_entry, tfrecord_bytes

        positions = table.column("pos").to_numpy()
        split = table.column("split")[0].as_py()
        rows = table.select(PARQUET_SCHEMA.names).cast(PARQUET_SCHEMA).combine_chunks()
        files = []
        for fmt in self.formats:
            data = parquet_table_bytes(rows) if fmt == "parquet" else tfrecord_bytes(rows.to_pandas())
            pending = f"{PENDING}/{split}-{int(positions[0]):012d}.{fmt}"
            self.out.child(pending).write_bytes(data)
            files.append({"pending": pending, **shard_entry("", split, len(positions), fmt, data)})
        picked = [i for i, p in enumerate(positions) if int(p) in self.samples]
        images = table.column("image")
        return {
            "split": split, "first": int(positions[0]), "files": files,
            "pos": positions.astype(np.int64),
            "orig_width": table.column("orig_width").to_numpy(),
            "orig_height": table.column("orig_height").to_numpy(),
            # the modes as codes into the block's few distinct ones: no string object per row
            "orig_mode": table.column("orig_mode").combine_chunks().dictionary_encode(),
            "samples": {int(positions[i]): images[i].as_py() for i in picked},
        }

    def on_write_complete(self, write_result) -> None:
        self.results = [block for returned in write_result.write_returns for block in returned]
