"""Benchmark: the export of a 224 px model, its time and memory, in the process that exports
(a sweep's driver, `cxr train`) and in the child that writes the SavedModel and ONNX.

    .venv/bin/python bench/export.py                 # 224 px, every format
    .venv/bin/python bench/export.py --size 64 --formats keras

A VGG16 model of `--size` px (weights none, head 256 units: the default head) is built in this
process and exported with `cxr_model.export.export`, as `cxr train` and a sweep's best trial are
(the metrics are made up: the bench measures the export, not a model). Printed: the wall time
of the export; the RSS of this process before and at its peak during the export; and the peak
RSS of its child processes (the conversion on TensorFlow: cxr_model/export_formats.py), sampled
every 0.05 s from /proc.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import rss_mib  # noqa: E402  (bench/common.py, beside this script)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found + [g for c in found for g in children(c)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--formats", default="keras,saved_model,onnx")
    args = parser.parse_args(argv)

    import numpy as np

    from cxr_model.quiet import init_tensorflow_quietly

    init_tensorflow_quietly()
    from cxr_model.config import ModelConfig, TrainConfig
    from cxr_model.evaluate import metrics_from_probs
    from cxr_model.export import export
    from cxr_model.model import build_model

    cfg = TrainConfig(model=ModelConfig(image_size=args.size, weights=None))
    model = build_model(cfg.model, seed=0)
    rng = np.random.default_rng(0)
    labels = np.r_[0, 1, rng.integers(0, 2, 98)]
    probs = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 100), 0, 1)
    metrics = {split: metrics_from_probs(labels, probs, threshold=0.5, n_boot=100) for split in ("val", "test")}
    out = Path(tempfile.mkdtemp(prefix="cxr-bench-export-")) / "model"
    peaks = {"self": 0.0, "child": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["self"] = max(peaks["self"], rss_mib())
            for child in children(os.getpid()):
                try:
                    peaks["child"] = max(peaks["child"], rss_mib(child))
                except OSError:
                    pass
            time.sleep(0.05)

    before = rss_mib()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    export(model, out, train_cfg=cfg, threshold=0.5, metrics=metrics, threshold_method="youden",
           formats=tuple(args.formats.split(",")))
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    sizes = {p.name: p.stat().st_size / 2**20 for p in out.iterdir() if p.is_file()}
    print(f"{args.size} px, formats {args.formats}: export {wall:.1f} s; this process {before:.0f} MiB "
          f"before, peak {peaks['self']:.0f} MiB (+{peaks['self'] - before:.0f}); the conversion child's "
          f"peak {peaks['child']:.0f} MiB; files (MiB): "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(sizes.items()) if v >= 1))
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
