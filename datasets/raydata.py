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

One chunk of pass 2's input is one shard: `decode.shard_size` consecutive rows of one split
(decode.shard_chunks), less the files rejected while decoding. Ray Data fuses the read, the decode
and the write into one task per chunk, so the decoded pixels go from the decode straight to the
shard file, never through the object store. A write task does not know its shard's number (a
chunk whose every file is rejected leaves none), so the shard is written under a name of its own,
`.pending/<split>-<first pos>.<fmt>` (the same name when a lost task is retried), and the driver
renames the files to their shard numbers once every chunk is written (`decode._finish`; a rename
inside the staging folder, on an object store a copy, as the staging folder's own rename to OUT
is).
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
    """Writes shard rows (see workers.decode_batch) under `out`/.pending/, one file per chunk of
    rows (`chunk_starts`: the first row position of each chunk, ascending); after the write,
    `results` holds one dict per written shard (see `_write_block`)."""

    def __init__(self, out, formats: list[str], sample_positions: Iterable[int],
                 chunk_starts: np.ndarray):
        self.out = out  # a storage.Location
        self.formats = list(formats)
        self.samples = frozenset(int(p) for p in sample_positions)
        self.starts = np.asarray(chunk_starts, np.int64)
        self.results: list[dict] = []

    def write(self, blocks, ctx) -> list[dict]:
        # Fused with the decode, a call gets one chunk's rows (in one block, or a few where Ray
        # Data cut a large one); grouped by chunk all the same, so that a chunk is one shard
        # however the blocks arrive.
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        chunk = chunk_index(self.starts, table.column("pos").to_numpy())
        numbers = np.unique(chunk)
        if len(numbers) == 1:  # the fused case: no copy of the pixels
            return [self._write_block(table)]
        return [self._write_block(table.filter(pa.array(chunk == number))) for number in numbers]

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
        # What the driver needs of each row (position, original size and mode) goes to a small
        # file beside the shard, not into the task's return value: Ray Data holds every write
        # task's return in the object store until the pass ends, ~20 bytes a row that grew
        # with the archive. Returned: a few numbers a shard, and the EDA's few sample pixels.
        meta = pa.table({"pos": pa.array(positions.astype(np.int64)),
                         **{name: table.column(name) for name in ROW_META[1:]}})
        write_plan(self.out.child(_rows_name(split, int(positions[0]))), iter(meta.to_batches()),
                   meta.schema)
        picked = [i for i, p in enumerate(positions) if int(p) in self.samples]
        images = table.column("image")
        return {"split": split, "first": int(positions[0]), "rows": len(positions), "files": files,
                "samples": {int(positions[i]): images[i].as_py() for i in picked}}

    def on_write_complete(self, write_result) -> None:
        self.results = [block for returned in write_result.write_returns for block in returned]


ROW_META = ("pos", "orig_width", "orig_height", "orig_mode")


def read_row_meta(out, result: dict) -> pa.Table:
    """The `ROW_META` columns of the shard `result` (a `ShardSink.results` entry) that its write
    task left beside it under .pending/."""
    rows = out.child(_rows_name(result["split"], result["first"]))
    with rows.fs.open_input_file(rows.path) as handle:
        return pa.ipc.open_file(handle).read_all()


def chunk_index(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The chunk of each row position, chunks given by their first positions (ascending)."""
    return np.searchsorted(starts, positions, side="right") - 1


def _rows_name(split: str, first: int) -> str:
    return f"{PENDING}/{split}-{first:012d}.rows.arrow"
