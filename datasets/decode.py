"""The Ray side of `cxr prepare`: a pool of plain Ray tasks that decode files, then write shards.

Decode: one task per chunk of `files_per_task` paths (a Ray task costs ~1 ms; an image 5-30 ms),
and at least 4 chunks per CPU so that no core idles while the last chunk finishes. Each task reads
its files, hashes them (duplicate detection) and runs `image.preprocess_bytes`, the same function
`cxr predict` uses; a file that cannot be used comes back as a row with `reason` set and the node
that tried it. Plain tasks rather than Ray Data: on 2 CPUs Ray Data's executor start and its
scheduling cost ~2 s and a fifth of the decode rate (see the profile in README.md), and this is
one map over a list with no operator to stream into.

The pixels stay where they were decoded: each decode task returns its metadata (to the driver)
and its images as one array that remains in Ray's object store (see workers.py). When the rules
have seen every file, one task per shard gathers its rows' images and writes the shard to OUT
itself. The driver holds metadata only, so its memory does not grow with the images.

`LocalRay` (what `prepare` uses) joins the running Ray (a cluster, a test session, the search
driver) or starts a local one for the command. On a multi-node cluster the tasks open SOURCE and
write OUT themselves: both must be on storage that every node sees (a shared file system or a
pyarrow.fs URI such as s3://).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd

from .config import SPLITS, PrepareConfig
from .workers import decode_task, pick_images, write_shard


def decode_files(paths: list[str], cfg: PrepareConfig, fs=None,
                 verbose: bool = True) -> tuple[pd.DataFrame, list]:
    """(one metadata row per path, in input order: META_COLUMNS but `idx`, plus `node` and
    `chunk`; the object refs of the decoded chunks). An accepted row's image is row `pos` of chunk
    `chunk`. Needs a running Ray (see `LocalRay`)."""
    import ray

    progress = Progress("decoding", len(paths), enabled=verbose)
    columns = DecodedColumns(len(paths))
    pixels: list = []
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = _chunk_size(len(paths), cfg.files_per_task, cpus)
    task = ray.remote(num_cpus=1, num_returns=2, max_retries=1)(decode_task)
    chunk_of = {}
    for start in range(0, len(paths), size):
        meta, images = task.remote(_items(paths, start, size), fs, cfg.image_size, cfg.resize,
                                   cfg.max_pixels, cfg.min_size)
        chunk_of[meta] = len(pixels)
        pixels.append(images)
    pending = list(chunk_of)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=None)
        for ref in done:
            progress.update(columns.add(ray.get(ref), chunk_of.pop(ref)))
    progress.done()
    return columns.table(), pixels


class DecodedColumns:
    """The decode tasks' metadata, written in place as each chunk arrives: one preallocated array
    per column, indexed by file. No tuple per file and no sort, so the driver's share is a few
    dozen bytes per file; the strings are the ones the tasks sent (a node address and an image
    mode are one shared object each)."""

    NUMBERS = ("orig_width", "orig_height", "pos", "chunk")
    STRINGS = ("reason", "sha256", "orig_mode", "node")

    def __init__(self, n_files: int):
        self.seen = np.zeros(n_files, np.int32)
        self.numbers = {name: np.full(n_files, -1, np.int64) for name in self.NUMBERS}
        self.strings = {name: np.full(n_files, None, object) for name in self.STRINGS}

    def add(self, meta: dict, chunk: int) -> int:
        """Store one task's metadata (see `decode_chunk`); returns its number of files."""
        idx = np.asarray(meta["idx"], np.int64)
        np.add.at(self.seen, idx, 1)
        for name in ("orig_width", "orig_height", "pos"):
            self.numbers[name][idx] = meta[name]
        self.numbers["chunk"][idx] = chunk
        for name in ("reason", "sha256"):
            self.strings[name][idx] = meta[name]
        self.strings["orig_mode"][idx] = [None if m is None else sys.intern(m)
                                          for m in meta["orig_mode"]]
        self.strings["node"][idx] = sys.intern(meta["node"])
        return len(idx)

    def table(self) -> pd.DataFrame:
        if not (self.seen == 1).all():
            # Callers join results to their file list by position: never let a lost or repeated
            # row shift every label after it.
            raise RuntimeError(f"decoding returned {int(self.seen.sum())} rows for "
                               f"{len(self.seen)} files")
        # object columns, not pandas' Arrow-backed default strings: filtering and sorting then
        # copy 8-byte pointers instead of every string's bytes.
        return pd.DataFrame({
            **{name: pd.Series(self.strings[name], dtype=object, copy=False)
               for name in self.STRINGS},
            **self.numbers,
        })


def write_shards(rows: pd.DataFrame, pixels: list, out, cfg: PrepareConfig) -> list[dict]:
    """One Ray task per shard writes OUT/<split>/part-NNNNN.<format> (`out`: a storage.Location);
    returns the shards' manifest entries in split, format and shard order. `rows`: the shard
    columns but `image`, plus `chunk` and `pos` (where each row's image lies in `pixels`)."""
    import ray

    from .shards import PARQUET_SCHEMA

    task = ray.remote(num_cpus=1, max_retries=1)(write_shard)
    columns = [name for name in PARQUET_SCHEMA.names if name != "image"]
    formats = ["parquet", "tfrecord"] if cfg.format == "both" else [cfg.format]
    # At most two shards per CPU in flight: each submitted shard's row table is serialised in the
    # driver until its task ends, so submitting all at once would grow the driver with the data.
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    refs: list = []
    in_flight: list = []
    for split in SPLITS:
        part = rows[rows["split"] == split]
        if len(part):
            out.child(split).mkdir()
        for fmt in formats:
            for number, begin in enumerate(range(0, len(part), cfg.rows_per_shard)):
                if len(in_flight) >= window:
                    _, in_flight = ray.wait(in_flight, num_returns=1)
                shard = part.iloc[begin:begin + cfg.rows_per_shard]
                needed = sorted(set(shard["chunk"]))
                local = {chunk: i for i, chunk in enumerate(needed)}
                spec = shard[columns].assign(_chunk=shard["chunk"].map(local).to_numpy(),
                                             _pos=shard["pos"].to_numpy())
                rel = f"{split}/part-{number:05d}.{fmt}"
                refs.append(task.remote(spec, out, rel, split, fmt, *[pixels[c] for c in needed]))
                in_flight.append(refs[-1])
                del spec, shard
    return ray.get(refs)


def fetch_images(rows: pd.DataFrame, pixels: list) -> list[bytes]:
    """The images of a few rows (columns `chunk`, `pos`), in row order: a small task per chunk
    hands back only those images, never a whole chunk."""
    import ray

    task = ray.remote(num_cpus=1)(pick_images)
    wanted: dict = {}
    for order, (chunk, pos) in enumerate(zip(rows["chunk"], rows["pos"])):
        wanted.setdefault(int(chunk), []).append((order, int(pos)))
    calls = {chunk: task.remote([p for _, p in items], pixels[chunk])
             for chunk, items in wanted.items()}
    images: list[bytes] = [b""] * len(rows)
    for chunk, items in wanted.items():
        for (order, _), data in zip(items, ray.get(calls[chunk])):  # type: ignore[arg-type]  # ray stubs: ObjectRef invariant
            images[order] = data
    return images


def _items(paths: list[str], start: int, size: int) -> list[tuple[int, str]]:
    """(index, path) of up to `size` paths from `start`: what `decode_chunk` takes."""
    return [(i, paths[i]) for i in range(start, min(start + size, len(paths)))]


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
        with _logger_level("ray._private.authentication.authentication_token_setup", logging.ERROR):
            # A local instance that lives for one command: its auth-token notice is only noise.
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
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)

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


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


class Progress:
    """`stage: done/total (pct), rate img/s` on stderr, at most every `every_s` seconds."""

    def __init__(self, stage: str, total: int, enabled: bool = True, every_s: float = 2.0):
        self.stage, self.total, self.enabled, self.every_s = stage, total, enabled, every_s
        self.done_count = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done_count += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def done(self) -> None:
        self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        if not self.enabled:
            return
        elapsed = max(now - self.start, 1e-9)
        pct = 100.0 * self.done_count / max(self.total, 1)
        print(f"{self.stage}: {self.done_count}/{self.total} images ({pct:.0f}%), "
              f"{self.done_count / elapsed:.0f} img/s", file=sys.stderr, flush=True)
