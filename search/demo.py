"""`cxr demo`: the whole system on synthetic data, on a laptop CPU, in a few minutes.

    cxr demo --out runs/demo
    # runs/demo/report.md, runs/demo/best/ (the model), runs/demo/data/, runs/demo/prepared/

Steps: synth (600 images) -> prepare (64 px) -> a 12-trial search -> test evaluation -> export ->
report. The demo has no network, so VGG16 starts from random weights; fine-tuning a random VGG16
on a CPU costs ~100x a trial on cached features, so the demo searches what can be searched on
cached features (head, learning rate, dropout, batch size, pooling) with the base frozen and no
augmentation. With ImageNet weights on GPUs, `cxr search` searches the full space.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cxr_datasets
from cxr_datasets.errors import CxrError
from cxr_search.config import SearchConfig
from cxr_search.run import run_search
from cxr_search.summary import print_summary
from cxr_search.tuner import connect

MARKER = "demo.json"  # written by a finished demo; --overwrite only deletes folders that have it
IMAGE_SIZE = 64       # at 64 px VGG16's last feature map is 2x2, which "flatten" can still use
N_IMAGES = 600
TARGET_TEST_AUC = 0.90

# Only what differs from search/space.py's defaults (SearchConfig completes the rest): a smaller
# head and learning-rate range for 600 images at 64 px, and the base frozen without augmentation,
# so that every trial trains on cached features.
DEMO_SPACE = {
    "head_layers": {"low": 1, "high": 2},
    "head_units": {"low": 64, "high": 512, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
    "lr": {"low": 3e-4, "high": 3e-3, "log": True},
    "augment": False,
    "trainable_blocks": 0,
}


def demo_config(run_dir: Path) -> SearchConfig:
    return SearchConfig(
        prepared=str((run_dir / "prepared").resolve()), out=str(run_dir),
        trials=12, max_epochs=20, grace_period=4, reduction_factor=3, concurrency=2, cpus_per_trial=1,
        weights=None, seed=0, patience=6, space=DEMO_SPACE, max_failures=1,
        feature_cache_dir=str((run_dir / "feature_cache").resolve()),
    )


def run_demo(run_dir: Path, *, overwrite: bool = False) -> int:
    demo_config(run_dir)  # a bad DEMO_SPACE fails here, before anything is deleted
    _clear(run_dir, overwrite)
    start = time.perf_counter()
    connect(None)  # one local Ray for prepare and search
    print(f"cxr demo: 1/3 synthetic data ({N_IMAGES} images) -> {run_dir / 'data'}")
    cxr_datasets.synth(run_dir / "data", n=N_IMAGES, seed=0)
    print(f"cxr demo: 2/3 prepare at {IMAGE_SIZE} px -> {run_dir / 'prepared'}")
    cxr_datasets.prepare(run_dir / "data", run_dir / "prepared", image_size=IMAGE_SIZE, seed=0)
    cfg = demo_config(run_dir)
    print(f"cxr demo: 3/3 search: {cfg.trials} trials, up to {cfg.max_epochs} epochs, random-init VGG16 "
          "(frozen, cached features)")
    summary = run_search(cfg)
    code = print_summary(cfg, summary)
    if code != 0:
        return code
    test_auc = summary["best"]["metrics"]["test"]["roc_auc"]["value"]
    elapsed = time.perf_counter() - start
    (run_dir / MARKER).write_text(json.dumps({"test_auc": test_auc, "elapsed_s": elapsed}, indent=2) + "\n")
    print(f"\ncxr demo: done in {elapsed / 60:.1f} min. Test AUC {test_auc:.3f}"
          f" (target >= {TARGET_TEST_AUC}).\n  report: {summary['report']}\n  model:  {summary['best']['model_dir']}"
          f"\n  try:    cxr predict {summary['best']['model_dir']} {run_dir / 'data' / 'chest_xray' / 'test'}")
    if test_auc < TARGET_TEST_AUC:
        print(f"cxr demo: warning: test AUC {test_auc:.3f} is below {TARGET_TEST_AUC}")
        return 1
    return 0


def _clear(run_dir: Path, overwrite: bool) -> None:
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise CxrError(f"{run_dir} is not empty: add --overwrite to replace the earlier demo")
    if not (run_dir / MARKER).is_file() and not (run_dir / "search_config.json").is_file():
        raise CxrError(f"{run_dir} does not look like a demo folder (no {MARKER}); not deleting it")
    shutil.rmtree(run_dir)
