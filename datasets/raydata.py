"""Ray Data's two ends for `cxr prepare`: `PlanSource`, the rows a pass reads, and `ShardSink`,
the writer of the shards. Imported only inside decode.py's functions (it loads Ray Data).

`PlanSource`: the driver writes a pass's input rows (paths, and for pass 2 the shard columns) to
an Arrow IPC file under the staging folder, one record batch per block, and each read task reads
its one batch. Not `from_items`/`from_arrow`: those put every row into the object store for the
whole pass (~0.1-0.3 KB a file), which grows with the archive; a read task here is a file name
and a number, and the rows come in as the stream needs them. The file is on OUT's storage, which
every node sees.

`ShardSink`, our own sink rather than `Dataset.write_parquet`: the shards keep their names
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
numbers once every block is written (`decode._finish`; a rename inside the staging folder, on an
object store a copy, as the staging folder's own rename to OUT is).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

PENDING = ".pending"


def write_plan(plan, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> list[int]:
    """Write `batches` to `plan` (a storage.Location) as an Arrow IPC file, one at a time (the
    driver holds one batch); returns their numbers of rows."""
    rows = []
    with plan.fs.open_output_stream(plan.path) as stream, pa.ipc.new_file(stream, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows.append(batch.num_rows)
    return rows


class PlanSource(Datasource):
    """The batches of a plan file (`write_plan`), one read task and one block each, in order."""

    def __init__(self, plan, rows: list[int], schema: pa.Schema):
        self.plan, self.rows, self.schema = plan, list(rows), schema

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # One task per batch, whatever `parallelism` says: the driver sized the batches.
        return [ReadTask(functools.partial(_read_plan_batch, self.plan, number),
                         BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None,
                                       input_files=None),
                         schema=self.schema, per_task_row_limit=per_task_row_limit)
                for number, rows in enumerate(self.rows)]


def _read_plan_batch(plan, number: int) -> list[pa.Table]:
    with plan.fs.open_input_file(plan.path) as handle:
        return [pa.Table.from_batches([pa.ipc.open_file(handle).get_batch(number)])]


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
