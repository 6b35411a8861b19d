"""What the benchmarks share: synthetic data generated once per folder, a timed sweep, a process's
resident memory."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def synthetic_source(folder: Path, n: int, seed: int = 0, config=None) -> Path:
    """A Kaggle-layout folder of `n` synthetic images, generated on first use only. A marker file
    written last makes an interrupted generation start again instead of being reused half-done."""
    from cxr_datasets.synth import synth

    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {n} images in {folder} (once) ...", flush=True)
        synth(folder, n=n, seed=seed, config=config)
        done.touch()
    return folder


def timed_run_sweep(cfg, data):
    """(ResultGrid, wall seconds of `run_sweep`, results table, per-trial histories) of `cfg`."""
    from cxr_search.results import collect_results
    from cxr_search.tuner import run_sweep

    shutil.rmtree(cfg.out, ignore_errors=True)
    Path(cfg.out).mkdir(parents=True)
    start = time.perf_counter()
    grid = run_sweep(cfg, data=data)
    wall = time.perf_counter() - start
    table, histories = collect_results(cfg)
    return grid, wall, table, histories


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (this one by default) now, in MiB, from /proc."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
