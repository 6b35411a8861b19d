"""What the feature cache and ASHA buy a sweep: the same seeded N-trial sweep, run twice.

    python bench/sweep.py                       # 6 trials, 8 epochs, 64 px synthetic data (~8 min, 2 cores)
    python bench/sweep.py --trials 4 --epochs 3 --image-size 32 --n 200   # a quick check

(a) naive: every trial runs the full VGG16 forward on every image in every epoch (no feature
    cache) and runs all its epochs (no ASHA, no patience);
(b) cxr search: frozen-base trials train on features computed once per node, ASHA stops the weak.
Both use the same space (frozen base, no augmentation: the case the cache is for), the same seed
and TPE, so they try the same configurations (TPE's first 10 are seeded random draws). Prints the
wall time and best validation AUC of each, and the speed-up LAST. Target: >= 5x at a best
validation AUC within 0.01 of the naive sweep's. Seen on the shared 2-core CPU box (2026-11-25,
defaults, weights none): naive 438 s, cxr search 24.5 s, both best val AUC 0.8703: 17.8x.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from common import synthetic_source, timed_run_sweep  # noqa: E402  (bench/common.py, beside this script)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

BENCH_SPACE_OVERRIDES = {"trainable_blocks": 0, "augment": False}  # the cacheable case


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=8, help="max epochs per trial")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n", type=int, default=600, help="synthetic images")
    p.add_argument("--weights", default="none", help="none (offline) or imagenet")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "sweep"))
    return p.parse_args(argv)


def prepared_data(out: Path, n: int, image_size: int) -> Path:
    """Synthetic data prepared once and reused across runs of the benchmark."""
    import cxr_datasets

    prepared = out / f"prepared_{n}_{image_size}"
    if not (prepared / "manifest.json").is_file():
        source = synthetic_source(out / f"synth_{n}", n)
        cxr_datasets.prepare(source, prepared, image_size=image_size, seed=0, overwrite=True)
    return prepared


def sweep_config(args, prepared: Path, run: Path, *, naive: bool):
    from cxr_search.config import SearchConfig
    from cxr_search.space import load_space

    space = {**load_space(None), **BENCH_SPACE_OVERRIDES}
    weights = None if args.weights.lower() == "none" else args.weights
    return SearchConfig(
        prepared=str(prepared), out=str(run), trials=args.trials, max_epochs=args.epochs,
        concurrency=args.concurrency, cpus_per_trial=1, weights=weights, seed=0, space=space,
        max_failures=0, verbose=0,
        # (a) runs every epoch of every trial on raw images; (b) is `cxr search`'s defaults
        feature_cache=not naive, asha=not naive, patience=args.epochs + 1 if naive else 5,
        # a fresh cache folder, so (b) pays for computing the features inside its timing
        feature_cache_dir=tempfile.mkdtemp(prefix="cxr-bench-features-"),
    )


def timed_sweep(cfg, data) -> dict:
    grid, wall, table, _ = timed_run_sweep(cfg, data)
    assert grid.num_errors == 0, f"{grid.num_errors} trial(s) failed: see {cfg.out}"
    assert len(table) == cfg.trials
    shutil.rmtree(cfg.feature_cache_dir, ignore_errors=True)
    return {"wall_s": wall, "best_val_auc": float(table["val_auc"].max()),
            "epochs": int(table["epochs_run"].sum()), "table": table}


def main(argv=None) -> int:
    import ray

    from cxr_model import Data

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        prepared = prepared_data(out, args.n, args.image_size)
        data = Data.from_prepared(prepared)
        results = {}
        for name, naive in (("naive", True), ("cxr search", False)):
            print(f"running {name}: {args.trials} trials x up to {args.epochs} epochs ...", flush=True)
            results[name] = timed_sweep(sweep_config(args, prepared, out / name.replace(" ", "_"), naive=naive), data)
    finally:
        ray.shutdown()
    naive, fast = results["naive"], results["cxr search"]
    same = [tuple(t.sort_values("trial_id")["lr"].round(12)) for t in (naive["table"], fast["table"])]
    print(f"\n{'sweep':<12}{'wall (s)':>10}{'epochs':>8}{'best val AUC':>14}")
    for name, r in results.items():
        print(f"{name:<12}{r['wall_s']:>10.1f}{r['epochs']:>8d}{r['best_val_auc']:>14.4f}")
    print(f"same configurations tried: {sorted(same[0]) == sorted(same[1])}")
    gap = fast["best_val_auc"] - naive["best_val_auc"]
    print(f"best val AUC difference (cxr - naive): {gap:+.4f} (target within 0.01)")
    print(f"speed-up: {naive['wall_s'] / fast['wall_s']:.1f}x (target >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
