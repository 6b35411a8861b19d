"""What the sweep benchmarks share: one sweep, timed, in an emptied run folder."""
from __future__ import annotations

import shutil
import time
from pathlib import Path


def timed_run_sweep(cfg, data):
    """(ResultGrid, wall seconds of `run_sweep`, results table, per-trial histories) of `cfg`."""
    from search.results import collect_results
    from search.tuner import run_sweep

    shutil.rmtree(cfg.out, ignore_errors=True)
    Path(cfg.out).mkdir(parents=True)
    start = time.perf_counter()
    grid = run_sweep(cfg, data=data)
    wall = time.perf_counter() - start
    table, histories = collect_results(cfg)
    return grid, wall, table, histories
