"""Parallel decode + grayscale + resize of many files with Ray Data.

One Ray task handles a block of `files_per_task` paths (a single Ray task costs milliseconds;
an image costs ~5-30 ms, so a few dozen per task keep the overhead near 1%). Each task reads the
file, hashes it (duplicate detection), and runs `image.preprocess_bytes`, the same function
`cxr predict` uses. A file that cannot be used comes back as a row with `reason` set: errors are
caught inside the task and never fail the dataset.

`decode_files` runs on the Ray instance the caller has: `LocalRay` (what `prepare` uses) joins the
running one (a cluster, a test session, the search driver) or starts a local one for the command.
On a multi-node cluster, SOURCE must be on storage every node can read (the tasks open the paths
themselves).

The decoded images (S*S bytes each: ~300 MB for the real set at 224 px) come back to the driver,
which needs them all anyway to apply the duplicate and split rules and write sorted shards.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator

import pandas as pd

from .config import PrepareConfig
from .errors import ImageRejected
from .image import preprocess_bytes, read_file_bytes

RESULT_COLUMNS = ("idx", "reason", "sha256", "image", "orig_width", "orig_height", "orig_mode")


def decode_files(paths: list[str], cfg: PrepareConfig, verbose: bool = True) -> pd.DataFrame:
    """One row per path, in input order: idx, reason (None = accepted), sha256, image (raw uint8
    bytes of [S, S], None if rejected), orig_width, orig_height, orig_mode. Needs a running Ray
    (see `LocalRay`)."""
    import ray

    items = [{"idx": i, "path": p} for i, p in enumerate(paths)]
    with decoding_data_context():
        blocks = _block_count(len(items), cfg.files_per_task, ray.cluster_resources().get("CPU", 1))
        dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            decode_batch,
            batch_size=None,  # a whole block per call: one task per `files_per_task` files
            batch_format="pandas",
            fn_kwargs=_decode_kwargs(cfg),
        )
        progress = Progress("decoding", len(items), enabled=verbose)
        parts = []
        for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            parts.append(batch)
            progress.update(len(batch))
        progress.done()
    results = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=RESULT_COLUMNS)
    results = _owned(results.sort_values("idx").reset_index(drop=True))
    if not results["idx"].astype(int).tolist() == list(range(len(paths))):
        # Callers join results to their file list by position: never let a lost or repeated row
        # shift every label after it.
        raise RuntimeError(f"decoding returned {len(results)} rows for {len(paths)} files")
    return results


def _owned(results: pd.DataFrame) -> pd.DataFrame:
    """The same rows in this process's own memory. Ray Data hands back Arrow-backed columns whose
    buffers lie in Ray's shared-memory object store, and pandas' copies of them stay views (Arrow
    arrays are immutable); that memory belongs to a Ray instance we may shut down next. Each
    column is rebuilt from Python objects (pandas may store text columns as Arrow strings again,
    now in this process's memory): ~6,000 rows cost milliseconds. Missing values are None/NaN;
    `orig_width`/`orig_height` may come back as floats and are cast where rows are selected."""
    return pd.DataFrame({
        name: results[name].to_numpy(dtype=object, na_value=None) if name != "idx"
        else results[name].to_numpy(dtype="int64", copy=True)
        for name in RESULT_COLUMNS
    })


def _block_count(n_files: int, files_per_task: int, cpus: float) -> int:
    """Enough tasks to amortise their overhead, and at least 4 per CPU so that no core idles
    while the last slow block finishes."""
    return max(1, min(n_files, max(math.ceil(n_files / files_per_task), 4 * int(cpus))))


def decode_batch(
    batch: pd.DataFrame, image_size: int, resize: str, max_pixels: int, min_size: int
) -> pd.DataFrame:
    """Ray task body: decode every file of the batch; a failure becomes that row's `reason`."""
    rows = [
        _decode_one(idx, path, image_size, resize, max_pixels, min_size)
        for idx, path in zip(batch["idx"], batch["path"])
    ]
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def _decode_one(idx, path, image_size, resize, max_pixels, min_size) -> tuple:
    sha = None
    try:
        data = read_file_bytes(path)
        sha = hashlib.sha256(data).hexdigest()
        image, meta = preprocess_bytes(
            data, image_size, resize, name=path, max_pixels=max_pixels, min_size=min_size
        )
    except ImageRejected as exc:
        return (int(idx), exc.reason, sha, None, None, None, None)
    except Exception as exc:  # a bug or a library surprise must not lose the other files
        reason = f"unexpected error: {type(exc).__name__}: {exc}"[:300]
        return (int(idx), reason, sha, None, None, None, None)
    return (int(idx), None, sha, image.tobytes(), meta["orig_width"], meta["orig_height"],
            meta["orig_mode"])


def _decode_kwargs(cfg: PrepareConfig) -> dict:
    return {"image_size": cfg.image_size, "resize": cfg.resize, "max_pixels": cfg.max_pixels,
            "min_size": cfg.min_size}


class LocalRay:
    """The running Ray instance, or a quiet local one started for one command.

    `stop()` shuts down only an instance that `start()` started; one that was already running (a
    cluster, a test session, the search driver) is left alone. It returns at once: Ray's
    shut-down is ~1.3 s, nearly all of it waiting for its processes to exit, which `cxr prepare`
    overlaps with writing shards and plots (work that needs no Ray). `join()` waits for it; call
    it before anything may start Ray again.
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
        # RAY_ADDRESS (set by `ray job submit`, or by hand) joins that cluster: its CPUs are
        # what they are, and Ray refuses num_cpus there. RAY_ADDRESS=local starts one.
        address = os.environ.get("RAY_ADDRESS", "")
        joining = bool(address) and address != "local"
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


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def decoding_data_context() -> Iterator[None]:
    """Ray Data settings for the decode, restored afterwards.

    - Progress bars and start-of-execution lines off: they flood non-interactive logs (one line
      per refresh in CI); we print our own rate-limited progress instead.
    - Operator resource reservation off: it holds back part of the CPUs for operators downstream
      of the current one, and this pipeline has a single CPU-bound operator. With it on, decoding
      1,000 1-3 MP JPEGs on 2 CPUs ran at ~274 img/s; off, ~370 img/s (plain Ray tasks: ~470).
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in
             ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start",
              "op_resource_reservation_enabled")}
    for name in saved:
        setattr(ctx, name, False)
    try:
        # INFO lines per execution, and a warning that the bars are off (we know).
        with _logger_level("ray.data", logging.WARNING), \
                _logger_level("ray.data._internal.progress", logging.ERROR):
            yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


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
