"""The Ray side of `cxr prepare`: two Ray Data passes, streaming.

Pass 1 (`hash_files`): the paths discovery accepted (read by `raydata.PlanSource`, see there why
not `from_items`), read and hashed in `map_batches` (workers.hash_batch; nothing is decoded).
The driver keeps a few bytes per file (`HashColumns`) and decides duplicates and the
patient splits from them: every file is seen before any row is final.

Pass 2 (`write_pass`): the rows that survived the rules, sorted by split and path, are cut into
chunks of `shard_size` rows of one split (`shard_chunks`: the cut depends on the rows and the
image size, not on the machine), and each chunk is read again, decoded, converted and resized in `map_batches`
(workers.decode_batch) and written as one shard by `raydata.ShardSink`, a Datasink of ours. Ray
Data fuses the three into one task per chunk: a file's pixels reach its shard in the task that
decoded them and never enter the object store, whatever the archive's size; the three splits
run in one execution. The driver holds metadata only; Ray Data retries tasks lost with a node
(the written names do not depend on which attempt wrote them).

Where this keeps code of its own instead of Ray Data's: the source of the passes' rows and the
sink (shard names, bytes, sha256 and the manifest's entries; both in raydata.py), the renaming
of the written blocks to their shard numbers and the check that every accepted row is in
exactly one shard (`_finish`), and the rejection files of pass 2 (workers.py: the stream then
carries only shard rows).

`LocalRay` (what `prepare` uses) joins the running Ray (a cluster, a test session, the search
driver) or starts a local one for the command. On a multi-node cluster the tasks open SOURCE and
write OUT themselves: both must be on storage that every node sees (a shared file system or a
pyarrow.fs URI such as s3://).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import SPLITS, PrepareConfig, label_names
from .errors import CxrError, first_line
from .storage import list_files
from .workers import decode_batch, hash_batch

SHARD_PIXEL_BYTES = 64 * 2**20  # the most decoded pixels of a default shard (see shard_size)
REJECTED = ".rejected"  # pass 2's rejection files, under the staging folder (removed at the end)
PLAN = ".plan"  # the passes' input rows (raydata.PlanSource), under the staging folder too
# The shard columns pass 2 takes as input (the rest are decoded): PARQUET_SCHEMA's other names.
INPUT_COLUMNS = ("height", "width", "label", "label_name", "patient_id", "split", "source_path",
                 "source_sha256")
INPUT_SCHEMA = pa.schema([("pos", pa.int64()), ("path", pa.string()), ("height", pa.int32()),
                          ("width", pa.int32()), ("label", pa.int64()),
                          *((name, pa.string()) for name in INPUT_COLUMNS[3:])])


def hash_files(paths: Sequence[str], cfg: PrepareConfig, work, fs=None,
               verbose: bool = True) -> HashColumns:
    """Pass 1: every path's sha256, or why it cannot be read, and the node that tried it (see
    `HashColumns`). `work`: a storage.Location every node sees (the staging folder). Needs a
    running Ray (see `LocalRay`)."""
    import ray

    from .raydata import PlanSource, write_plan

    columns = HashColumns(len(paths))
    if not paths:
        return columns
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Reading and hashing costs ~25 us a file: thousands of files amortise a task.
    size = _chunk_size(len(paths), cfg.files_per_task, cpus)
    schema = pa.schema([("idx", pa.int64()), ("path", pa.string())])
    work.child(PLAN).mkdir()
    plan = work.child(PLAN, "files.arrow")
    rows = write_plan(plan, (pa.record_batch(
        [pa.array(range(start, min(start + size, len(paths))), pa.int64()),
         pa.array(paths[start:start + size], pa.string())], schema=schema)
        for start in range(0, len(paths), size)), schema)
    with data_context(verbose):
        ds = ray.data.read_datasource(PlanSource(plan, rows, schema),
                                      override_num_blocks=len(rows)).map_batches(
            hash_batch, batch_size=None, batch_format="pyarrow", fn_kwargs={"fs": fs})
        with ray_failures_are_one_line("reading the files"):
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                columns.add(cast(pa.Table, batch))
    work.child(PLAN).remove_tree()
    columns.check()
    return columns


@dataclass
class Written:
    """What pass 2 did: the shards' manifest entries (split, format and shard order), and per
    row position of its input: accepted rows' original sizes and modes, rejected rows' reasons."""

    shards: list[dict]
    pos: np.ndarray  # positions of the accepted rows, ascending
    orig_width: np.ndarray
    orig_height: np.ndarray
    orig_mode: pd.Categorical  # a byte per row: an archive has a handful of modes
    rejected: list[dict] = field(default_factory=list)  # {"pos", "reason", "node"}
    samples: dict[int, bytes] = field(default_factory=dict)  # pos -> raw pixels


def write_pass(rows: pd.DataFrame, paths: Sequence[str], hashes: HashColumns, out,
               cfg: PrepareConfig, fs=None, sample_positions: Iterable[int] = (),
               verbose: bool = True) -> Written:
    """Pass 2: decode the files of `rows` (sorted by split, then path; columns `source_path`,
    `label`, `patient_id`, `split` and `file`, the index of its path in `paths` and of its sha256
    in `hashes`) and write OUT/<split>/part-NNNNN.<format> (`out`: a storage.Location). A row's
    position is its row number in `rows`."""
    import ray

    from .raydata import PENDING, PlanSource, ShardSink, write_plan

    formats = ["parquet", "tfrecord"] if cfg.format == "both" else [cfg.format]
    rejected = out.child(REJECTED)
    for folder in (rejected, out.child(PENDING), out.child(PLAN)):
        folder.mkdir()
    chunks = shard_chunks(rows["split"].to_numpy(),
                          shard_size(len(rows), cfg.image_size, cfg.rows_per_shard))
    for split in dict.fromkeys(rows["split"]):
        out.child(split).mkdir()
    starts = np.array([where[0] for where in chunks], np.int64)
    sink = ShardSink(out, formats, sample_positions, starts)
    if chunks:
        plan = out.child(PLAN, "rows.arrow")
        counts = write_plan(plan, (_input_batch(rows, paths, hashes, where, cfg.image_size)
                                   for where in chunks), INPUT_SCHEMA)
        with data_context(verbose):
            dataset = ray.data.read_datasource(
                PlanSource(plan, counts, INPUT_SCHEMA), override_num_blocks=len(counts),
            ).map_batches(decode_batch, batch_size=None, batch_format="pyarrow", fn_kwargs={
                "fs": fs, "image_size": cfg.image_size, "resize": cfg.resize,
                "max_pixels": cfg.max_pixels, "min_size": cfg.min_size, "rejected": rejected})
            with ray_failures_are_one_line("decoding and writing the shards"):
                dataset.write_datasink(sink)
    out.child(PLAN).remove_tree()
    return _finish(sink.results, _read_rejections(rejected), rows, starts, out, formats)


def shard_size(n_rows: int, image_size: int, rows_per_shard: int | None) -> int:
    """The most rows of a shard: `rows_per_shard` if given. Else 1024, fewer for an archive of
    under ~65,000 rows so that it still makes at least 64 shards (of at least 128 rows), and
    fewer for large images so that a shard's pixels stay under SHARD_PIXEL_BYTES (64 MiB: 1024
    rows up to 256 px, 256 at 512 px; at least 16). Pass 2 runs one task per shard and holds its
    pixels: a Kaggle-size archive then spreads over 48 tasks, not 7, and a task's memory does
    not grow with the image size. Depends on the rows and the size alone, so the same input
    gives the same shards on any machine."""
    if rows_per_shard:
        return rows_per_shard
    rows = min(1024, max(128, math.ceil(n_rows / 64)))
    return min(rows, max(16, SHARD_PIXEL_BYTES // image_size**2))


def shard_chunks(split_of: np.ndarray, rows_per_shard: int) -> list[np.ndarray]:
    """The row positions of each shard-to-be: `rows_per_shard` consecutive rows of one split (the
    last of a split fewer), splits in the order of `split_of` (rows sorted by split). Each is one
    task of pass 2 and one shard (less its rejected files)."""
    chunks = []
    for split in dict.fromkeys(split_of):
        where = np.flatnonzero(split_of == split)
        chunks += [where[i:i + rows_per_shard] for i in range(0, len(where), rows_per_shard)]
    return chunks


def _input_batch(rows: pd.DataFrame, paths: Sequence[str], hashes: HashColumns,
                 where: np.ndarray, image_size: int) -> pa.RecordBatch:
    """Pass 2's input rows `where` of `rows`, with the shard columns the driver keeps no column
    for (they are made here, a batch at a time): the prepared size, the label's name, the hex
    sha256."""
    part = rows.iloc[where]
    files = part["file"].to_numpy()
    n = len(where)
    columns = {
        "pos": pa.array(where, pa.int64()),
        "path": pa.array([paths[i] for i in files], pa.string()),
        "height": pa.array(np.full(n, image_size, np.int32)),
        "width": pa.array(np.full(n, image_size, np.int32)),
        "label": pa.array(part["label"].to_numpy(np.int64)),
        "label_name": pa.array(label_names(part["label"].to_numpy()), pa.string()),
        "source_sha256": pa.array([hashes.hex(i) for i in files], pa.string()),
        **{name: pa.array(part[name].to_numpy(), pa.string())
           for name in ("patient_id", "split", "source_path")},
    }
    return pa.record_batch([columns[f.name] for f in INPUT_SCHEMA], schema=INPUT_SCHEMA)


def _read_rejections(folder) -> list[dict]:
    """Pass 2's rejections: one small file per batch (see workers.decode_batch), read a few at a
    time (on an object store each is a request)."""
    names = [rel for rel, _, is_dir in list_files(folder) if not is_dir and rel.endswith(".json")]
    found = [row for data in _a_few_at_a_time(lambda rel: folder.child(rel).read_bytes(), names)
             for row in json.loads(data)]
    folder.remove_tree()
    return found


def _a_few_at_a_time(read, items: list) -> list:
    """`read` of each item, 8 at a time: small files on OUT's storage, where on an object store
    each is a request."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(read, items))


def _finish(results: list[dict], rejected: list[dict], rows: pd.DataFrame, starts: np.ndarray,
            out, formats: list[str]) -> Written:
    """Check that every row is in exactly one shard or rejected and that each chunk (`starts`:
    their first rows, see `shard_chunks`; ShardSink groups rows by it) is at most one shard of
    ascending rows, then rename the written blocks to their shard numbers (a chunk whose every
    file was rejected leaves no shard and no gap); the shards' entries in split, format and
    shard order."""
    from .raydata import PENDING, chunk_index, read_row_meta

    results = sorted(results, key=lambda r: r["first"])
    # each shard's rows, from the file its write task left beside it
    for result, meta in zip(results, _a_few_at_a_time(lambda r: read_row_meta(out, r), results)):
        if meta.num_rows != result["rows"]:
            raise RuntimeError(f"shard {result['split']}-{result['first']} lists {meta.num_rows} "
                               f"rows, not {result['rows']}")
        result.update(pos=meta.column("pos").to_numpy(),
                      orig_width=meta.column("orig_width").to_numpy(),
                      orig_height=meta.column("orig_height").to_numpy(),
                      # the modes as codes into the shard's few distinct ones: no object per row
                      orig_mode=meta.column("orig_mode").combine_chunks().dictionary_encode())
    written = chunk_index(starts, np.array([r["first"] for r in results], np.int64))
    if len(np.unique(written)) != len(results):
        raise RuntimeError("a chunk of rows was written as more than one shard")
    seen = np.zeros(len(rows), np.int32)
    for result in results:
        np.add.at(seen, result["pos"], 1)
    if rejected:
        np.add.at(seen, np.array([r["pos"] for r in rejected], np.int64), 1)
    if not (seen == 1).all():
        # Callers join results to their rows by position: never let a lost or repeated row through.
        raise RuntimeError(f"prepare wrote or rejected {int(seen.sum())} rows for {len(rows)} "
                           f"({int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated)")
    shards = []
    for split in SPLITS:
        mine = [r for r in results if r["split"] == split]
        if not mine:  # no rows, or every one rejected in pass 2: no empty folder in OUT
            out.child(split).remove_tree()
        for number, result in enumerate(mine):
            if (number and result["pos"][0] <= mine[number - 1]["pos"][-1]) or \
                    (np.diff(result["pos"]) <= 0).any():
                raise RuntimeError(f"shards of {split} are out of order")
        for fmt in formats:
            for number, result in enumerate(mine):
                entry = next(f for f in result["files"] if f["format"] == fmt)
                rel = f"{split}/part-{number:05d}.{fmt}"
                out.fs.move(out.child(entry["pending"]).path, out.child(rel).path)
                shards.append({**{k: v for k, v in entry.items() if k != "pending"}, "path": rel})
    out.child(PENDING).remove_tree()  # the row files, and whatever a lost attempt left behind
    pos = np.concatenate([r["pos"] for r in results]) if results else np.empty(0, np.int64)
    order = np.argsort(pos, kind="stable")
    pick = lambda name: np.concatenate([r[name] for r in results])[order] if results \
        else np.empty(0, np.int64)  # noqa: E731
    names = sorted({mode for r in results for mode in r["orig_mode"].dictionary.to_pylist()})
    codes = np.concatenate([_mode_codes(r["orig_mode"], names) for r in results]) if results \
        else np.empty(0, np.int8)
    return Written(shards=shards, pos=pos[order], orig_width=pick("orig_width"),
                   orig_height=pick("orig_height"), orig_mode=pd.Categorical.from_codes(codes[order], categories=names),
                   rejected=sorted(rejected, key=lambda r: r["pos"]),
                   samples={p: b for r in results for p, b in r["samples"].items()})


def _mode_codes(encoded: pa.DictionaryArray, names: list[str]) -> np.ndarray:
    """A block's image modes (dictionary-encoded; accepted rows: never null) as codes into
    `names`."""
    index = np.array([names.index(m) for m in encoded.dictionary.to_pylist()], np.int8)
    return index[encoded.indices.to_numpy(zero_copy_only=False)]


@contextlib.contextmanager
def ray_failures_are_one_line(stage: str) -> Iterator[None]:
    """What Ray could not retry (a task failed on every attempt, a node and the objects only it
    held were lost) is a CxrError: one line; the staging folder goes, OUT is left as it was. Our
    own functions never raise for a file (each failure is that file's reason), so this is the
    cluster, not the data."""
    from ray.exceptions import RayError

    try:
        yield
    except RayError as exc:
        raise CxrError(f"Ray failed while {stage} ({type(exc).__name__}: {first_line(exc)}); "
                       "nothing was written to OUT: run the command again") from None


@contextlib.contextmanager
def data_context(verbose: bool) -> Iterator[None]:
    """Ray Data's settings for prepare, restored afterwards: progress bars and Ray Data's
    start-of-execution lines only when `verbose`. The streams need no order: pass 1's rows carry
    their file's index, pass 2's shards are cut by chunk before the stream."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.op_resource_reservation_enabled)
    logger = logging.getLogger("ray.data")
    level = logger.level
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    # No per-operator reservation: Ray Data's reservation held the pass's one operator (read,
    # decode and write fused) to 1 of 2 CPUs on this machine, as it held the decode of earlier
    # designs. Nothing decoded waits in the object store for it to bound: each pass is one
    # operator, whose outputs are file names and hashes.
    ctx.op_resource_reservation_enabled = False
    if not verbose:  # quiet: also its warning that no CPU is free while the last pass's tasks end
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, \
            ctx.op_resource_reservation_enabled = saved
        logger.setLevel(level)


class HashColumns:
    """Pass 1's results, indexed by file and written in place as each batch arrives: why a file
    cannot be read (`reason`, None if it can), the node that read it (`node`, one interned string
    per node) and its sha256 as 32 raw bytes (`digest`, an [n, 32] uint8 array). The driver keeps
    this for every file of the archive, so no object per file where an array does: the digests
    are 32 bytes each (a hex string object was 113, and every table copy held a pointer to it)."""

    def __init__(self, n_files: int):
        self.seen = np.zeros(n_files, np.int32)
        self.reason = np.full(n_files, None, object)
        self.node = np.full(n_files, None, object)
        self.digest = np.zeros((n_files, 32), np.uint8)

    def __len__(self) -> int:
        return len(self.seen)

    def add(self, batch: pa.Table) -> int:
        """Store one batch of workers.HASH_SCHEMA rows; returns its number of files."""
        idx = batch.column("idx").to_numpy()
        np.add.at(self.seen, idx, 1)
        reasons = batch.column("reason")
        if reasons.null_count < len(reasons):
            self.reason[idx] = reasons.to_pylist()
        self.node[idx] = [sys.intern(n) for n in batch.column("node").to_pylist()]
        digests = batch.column("sha256").combine_chunks().fill_null(bytes(32))
        raw = np.frombuffer(digests.buffers()[1], np.uint8)
        self.digest[idx] = raw[digests.offset * 32:(digests.offset + len(digests)) * 32].reshape(-1, 32)
        return len(idx)

    def check(self) -> None:
        if not (self.seen == 1).all():
            # Callers join results to their file list by position: never let a lost or repeated
            # row shift every label after it.
            raise RuntimeError(f"reading returned {int(self.seen.sum())} rows for "
                               f"{len(self.seen)} files")

    def hex(self, file: int) -> str:
        """The sha256 of file number `file`, as the manifest and the shards write it."""
        return self.digest[file].tobytes().hex()

    def same_content(self) -> np.ndarray:
        """Per file, the number of the first file with the same sha256 (itself if none before it
        has): equal numbers, equal bytes. An int64 per file for the duplicate rule."""
        if not len(self):
            return np.empty(0, np.int64)
        _, first, inverse = np.unique(self.digest.view("V32").ravel(), return_index=True,
                                      return_inverse=True)
        return first[inverse.ravel()].astype(np.int64)

    def table(self) -> pd.DataFrame:
        """`reason`, `node` (object columns: filtering and sorting copy 8-byte pointers, not every
        string's bytes) and `content` (see `same_content`), one row per file."""
        return pd.DataFrame({"reason": pd.Series(self.reason, dtype=object, copy=False),
                             "node": pd.Series(self.node, dtype=object, copy=False),
                             "content": self.same_content()})


def _chunk_size(n_files: int, files_per_task: int, cpus: int) -> int:
    """Enough files per task to amortise its overhead, and at least 4 tasks per CPU so that no
    core idles while the last slow chunk finishes."""
    return max(1, min(files_per_task, math.ceil(n_files / (4 * max(cpus, 1)))))


class LocalRay:
    """The running Ray instance, or a quiet local one started for one command.

    `stop()` shuts down only an instance that `start()` started; one that was already running (a
    cluster, a test session, the search driver) is left alone. It returns at once: Ray's
    shut-down (~1.3 s, nearly all of it waiting for its processes to exit) overlaps with writing
    plots and the manifest. `join()` waits for it; call it before anything may start Ray again.
    """

    def __init__(self, num_cpus: int | None = None):
        self.num_cpus = num_cpus
        self.started = False
        self._stopper: threading.Thread | None = None
        self._stop_error: BaseException | None = None

    def start(self) -> None:
        import ray

        if ray.is_initialized():
            return
        joining = _joins_cluster()
        try:
            self._init(ray, None if joining else self.num_cpus)
        except ValueError as exc:
            if self.num_cpus is None or "existing cluster" not in str(exc):
                raise
            # No RAY_ADDRESS, but Ray found a cluster of `ray start --head` on this machine
            # and joined it: the same case, so --num-cpus is ignored here too.
            self._init(ray, None)
        self.started = True  # stop() then disconnects from a joined cluster, leaving it running

    @staticmethod
    def _init(ray, num_cpus: int | None) -> None:
        # Ray's notices while it starts (e.g. that token authentication is on) are noise for an
        # instance that lives for one command: its "ray" logger says errors only until it is up,
        # then warnings again.
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        logging.getLogger("ray").setLevel(logging.WARNING)

    def stop(self) -> None:
        """Start shutting down (in a thread) a Ray instance that `start()` started."""
        if not self.started:
            return
        import ray

        self.started = False
        # Free every Ray object reference now, while the core worker is alive: one collected
        # later by this thread, in the middle of the shut-down, kills the process.
        gc.collect()
        self._stop_error = None

        def shutdown() -> None:
            try:
                ray.shutdown()
            except BaseException as exc:  # reported by join(), not lost in a thread's traceback
                self._stop_error = exc

        self._stopper = threading.Thread(target=shutdown, name="ray-shutdown", daemon=True)
        self._stopper.start()

    def join(self, timeout_s: float = 60.0) -> None:
        """Wait for a background shut-down. A failed or stuck one is a warning on stderr, not an
        error: the command's output is complete by then and stays."""
        if self._stopper is None:
            return
        stopper, self._stopper = self._stopper, None
        stopper.join(timeout_s)
        if stopper.is_alive():
            print(f"warning: Ray is still shutting down after {timeout_s:.0f} s; if Ray processes "
                  "remain, stop them with `ray stop`", file=sys.stderr, flush=True)
        elif self._stop_error is not None:
            error = str(self._stop_error).strip().splitlines()
            print(f"warning: Ray's shut-down failed ({type(self._stop_error).__name__}: "
                  f"{error[0] if error else ''}); if Ray processes remain, stop them with "
                  "`ray stop`", file=sys.stderr, flush=True)


def _joins_cluster() -> bool:
    """RAY_ADDRESS (set by `ray job submit`, or by hand) joins that cluster: its CPUs are what
    they are, and Ray refuses num_cpus there. RAY_ADDRESS=local starts an instance."""
    address = os.environ.get("RAY_ADDRESS", "")
    return bool(address) and address != "local"
