"""Sharing one GPU between trials: one trial alone vs four trials at 0.25 GPU each (Keras on JAX).

    KERAS_BACKEND=jax python bench/gpu_sweep.py --out $OUT/gpu_sweep   # on the GPU machine (~6 min)
    python bench/gpu_sweep.py --cpu                                     # tiny self-check on a CPU box

Runs the real sweep code (cxr_search.tuner.run_sweep: Tune, the trainable, reuse_actors) on random
uint8 images (throughput does not depend on content) with every hyperparameter fixed, for two
workloads:
  finetune  the top 2 VGG16 blocks + head trained end to end on raw images (GPU-bound)
  cached    frozen base: features computed once, the head trained on them (start-up-bound)
and two layouts: "alone" (1 GPU per trial, 2 trials one after another in one reused process)
and "shared" (0.25 GPU per trial, 8 trials 4 at a time). Reports per trial: steady img/s (epochs
after the first) and start-up (first epoch's wall time minus a steady epoch: process start,
imports, compilation), cold (a new process) and warm (a reused one); for the GPU: img/s over the
whole layout, start-up included, and trials per hour. The table is printed last; the script exits
non-zero if any trial failed or did not run all its epochs. Not yet run on a GPU; `--cpu` was run
on a 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import timed_run_sweep  # noqa: E402  (bench/common.py, beside this script)

os.environ.setdefault("KERAS_BACKEND", "jax")  # the GPU machine has no TensorFlow
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WORKLOADS = {
    "finetune": {"trainable_blocks": 2, "head_pooling": "avg"},
    "cached": {"trainable_blocks": 0, "head_pooling": "flatten"},
}
FIXED = {"head_layers": 1, "head_units": [256], "dropout": 0.3, "lr": 1e-4, "augment": False,
         "aug_strength": {"low": 0.05, "high": 1.0}, "batch_size": 64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes, no GPU: check that the script works")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n", type=int, default=2048, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--shared", type=int, default=4, help="trials sharing one GPU")
    p.add_argument("--workloads", default="finetune,cached")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "gpu_sweep"))
    args = p.parse_args(argv)
    if args.cpu:
        args.image_size, args.n, args.epochs, args.shared = 32, 64, 2, 2
    return args


def random_data(n: int, size: int):
    import numpy as np

    from cxr_model import Data

    rng = np.random.default_rng(0)
    images = lambda k: rng.integers(0, 256, size=(k, size, size, 1), dtype=np.uint8)  # noqa: E731
    labels = lambda k: rng.integers(0, 2, size=k)  # noqa: E731
    n_val = max(32, n // 8)
    return Data(images(n), labels(n), images(n_val), labels(n_val))


def layout_config(args, out: Path, workload: str, *, trials: int, concurrency: int, gpus: float):
    from cxr_search.config import SearchConfig
    from cxr_search.space import load_space

    space = {**load_space(None), **FIXED, **WORKLOADS[workload]}
    return SearchConfig(
        prepared="(random arrays)", out=str(out), trials=trials, max_epochs=args.epochs, concurrency=concurrency,
        gpus_per_trial=gpus, cpus_per_trial=1, weights=None, seed=0, space=space, max_failures=0, verbose=0,
        asha=False, patience=args.epochs + 1, feature_cache_dir=str(out / "features"),
    )


def run_layout(cfg, data) -> dict:
    grid, wall, table, histories = timed_run_sweep(cfg, data)
    problems = [f"{grid.num_errors} trial(s) failed"] if grid.num_errors else []
    problems += [f"trial {r.trial_id} ran {r.epochs_run}/{cfg.max_epochs} epochs"
                 for r in table.itertuples() if r.epochs_run != cfg.max_epochs]
    n = len(data.y_train)
    steady, startup = [], []
    for h in histories.values():
        epoch_s = h["epoch_time_s"].to_numpy()
        later = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
        median_epoch_s = float(sorted(later)[len(later) // 2])  # the median steady epoch
        steady.append(n / median_epoch_s)
        startup.append(float(h["time_this_iter_s"].iloc[0]) - median_epoch_s)
    return {
        "trials": len(table), "wall_s": wall, "problems": problems,
        "trial_img_s": sum(steady) / len(steady),
        # the first trial of each process starts cold; with reuse_actors later ones start warm
        "cold_startup_s": max(startup[:cfg.concurrency]),
        "warm_startup_s": (sum(startup[cfg.concurrency:]) / len(startup[cfg.concurrency:])
                           if len(startup) > cfg.concurrency else float("nan")),
        "gpu_img_s": n * cfg.max_epochs * len(table) / wall,
        "trials_per_hour": 3600 * len(table) / wall,
    }


def main(argv=None) -> int:
    import ray

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=4 if args.cpu else None, num_gpus=0 if args.cpu else None, include_dashboard=False,
             log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    if not args.cpu and gpus < 1:
        print("no GPU visible to Ray: run with --cpu for a self-check", file=sys.stderr)
        return 2
    share = 0.0 if args.cpu else 1.0 / args.shared
    rows = []
    try:
        data = random_data(args.n, args.image_size)
        for workload in args.workloads.split(","):
            # alone: two trials one after the other, so the second shows a reused (warm) process
            for layout, trials, concurrency, gpu in (("alone", 2, 1, 0.0 if args.cpu else 1.0),
                                                     ("shared", 2 * args.shared, args.shared, share)):
                print(f"{workload} / {layout}: {trials} trials x {args.epochs} epochs of {args.n} images "
                      f"at {args.image_size} px, {gpu:g} GPU each ...", flush=True)
                cfg = layout_config(args, out / f"{workload}_{layout}", workload, trials=trials,
                                    concurrency=concurrency, gpus=gpu)
                rows.append({"workload": workload, "layout": layout, "gpu_per_trial": gpu,
                             **run_layout(cfg, data)})
    finally:
        ray.shutdown()
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows, args, device="CPU (self-check)" if args.cpu else f"{gpus:g} GPU(s)")
    problems = [p for r in rows for p in r["problems"]]
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def print_table(rows, args, device: str) -> None:
    print(f"\n{device}, Keras backend {os.environ['KERAS_BACKEND']}, {args.image_size} px, "
          f"{args.n} images/epoch, {args.epochs} epochs/trial")
    header = f"{'workload':<10}{'layout':<8}{'GPU/trial':>10}{'trials':>7}{'img/s/trial':>13}" \
             f"{'GPU img/s':>11}{'cold start s':>13}{'warm start s':>13}{'trials/h':>10}"
    print(header)
    for r in rows:
        print(f"{r['workload']:<10}{r['layout']:<8}{r['gpu_per_trial']:>10g}{r['trials']:>7d}"
              f"{r['trial_img_s']:>13.0f}{r['gpu_img_s']:>11.0f}{r['cold_startup_s']:>13.1f}"
              f"{r['warm_startup_s']:>13.1f}{r['trials_per_hour']:>10.0f}")


if __name__ == "__main__":
    sys.exit(main())
