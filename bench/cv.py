"""Does selection hold? The same trials scored by one validation split and by `--cv 5`, on
synthetic data whose test split is shifted from train (lower contrast, more noise).

    python bench/cv.py                              # 10 trials, 64 px, 600 images (~6 min, 2 cores)
    python bench/cv.py --seeds 0,1,2,3,4            # five seeds and a summary over them (~30 min)
    python bench/cv.py --trials 6 --epochs 3 --n 300 --image-size 32   # a quick check

Both sweeps use the same space (frozen base, no augmentation), the same seed and TPE, so they try
the same configurations (TPE's first 10 are seeded random draws; checked below), and ASHA is off
in both so every trial is complete and has a test AUC. For every trial its selection score (the
single split's best validation AUC; the CV mean over 5 patient-grouped folds of train + val) is
set against the test AUC of the model that trial would export (its checkpoint; the mean of its 5
fold models), and the Spearman correlation over the trials is printed for each, with the test AUC
of each sweep's exported model (the trial its score ranks first) and the trial-epochs each used.
Goal: --cv 5 ranks higher and exports the better model. The ratio printed last is the CV sweep's
Spearman over the single split's. With several --seeds (each seed: TPE's, the trials' and the
folds'; the data stay the same), a summary line per sweep follows: the mean Spearman, the mean
test AUC of the exported model, and in how many seeds --cv ranked higher and exported the better one.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from common import synthetic_source, timed_run_sweep  # noqa: E402  (bench/common.py, beside this script)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SPACE_OVERRIDES = {"trainable_blocks": 0, "augment": False}  # cached features: cheap enough for CV on CPUs
CONTRAST, NOISE = 0.6, 18.0  # the test split's shift: gray levels squeezed about 128, Gaussian noise added


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10, help="at most 10: TPE's seeded random start-up trials")
    p.add_argument("--epochs", type=int, default=6, help="max epochs per trial (per fold with --cv)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n", type=int, default=600, help="synthetic images")
    p.add_argument("--weights", default="none", help="none (offline) or imagenet")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seeds", default="0", help="comma-separated: TPE's and the trials' seed, and the folds'")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "cv"))
    return p.parse_args(argv)


def shift_test_split(source: Path, seed: int = 0) -> None:
    """Rewrite the test images of a synthetic folder: lower contrast and extra noise, once."""
    import numpy as np
    from PIL import Image

    done = source / ".test-shifted"
    if done.exists():
        return
    rng = np.random.default_rng(seed)
    for path in sorted((source / "chest_xray" / "test").rglob("*.jpeg")):
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float64)
        shifted = 128 + CONTRAST * (gray - 128) + rng.normal(0, NOISE, gray.shape)
        Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)).save(path, quality=90)
    done.touch()


def prepared_data(out: Path, n: int, image_size: int) -> Path:
    import cxr_datasets

    prepared = out / f"prepared_{n}_{image_size}_shifted"
    if not (prepared / "manifest.json").is_file():
        source = synthetic_source(out / f"synth_{n}", n)
        shift_test_split(source)
        cxr_datasets.prepare(source, prepared, image_size=image_size, seed=0, overwrite=True)
    return prepared


def sweep_config(args, seed: int, prepared: Path, run: Path, cv: int):
    from cxr_search.config import SearchConfig
    from cxr_search.space import load_space

    return SearchConfig(
        prepared=str(prepared), out=str(run), trials=args.trials, max_epochs=args.epochs, cv=cv,
        concurrency=args.concurrency, cpus_per_trial=1, seed=seed, max_failures=0, verbose=0, asha=False,
        weights=None if args.weights.lower() == "none" else args.weights,
        space={**load_space(None), **SPACE_OVERRIDES},
        feature_cache_dir=tempfile.mkdtemp(prefix="cxr-bench-cv-features-"),
    )


def trial_test_aucs(cfg, table, x_test, y_test) -> list[float]:
    """Each trial's test ROC AUC, of the model it would export."""
    from cxr_model.evaluate import roc_auc
    from cxr_model.model import ensemble_model, predict_proba
    from cxr_search.best import load_checkpoint, load_cv_checkpoint

    aucs = []
    for checkpoint in table["checkpoint"]:
        if cfg.cv:
            members, _, _ = load_cv_checkpoint(checkpoint)
            model = ensemble_model(members)
        else:
            model = load_checkpoint(checkpoint)[0]
        aucs.append(roc_auc(y_test, predict_proba(model, x_test)))
    return aucs


def run_seed(args, seed: int, prepared: Path, out: Path, x_test, y_test) -> dict:
    """Both sweeps with one seed: {sweep name: {"table", "wall_s", "epochs"}}."""
    from cxr_search.shared_data import sweep_data
    from cxr_search.tuner import connect

    results = {}
    for name, cv in (("single split", 0), (f"--cv {args.folds}", args.folds)):
        cfg = sweep_config(args, seed, prepared, out / f"seed{seed}" / ("cv" if cv else "single"), cv)
        print(f"seed {seed}, {name}: {args.trials} trials x up to {args.epochs} epochs"
              + (f" x {cv} folds" if cv else "") + " ...", flush=True)
        connect(cfg.address)
        grid, wall, table, _ = timed_run_sweep(cfg, sweep_data(cfg))
        assert grid.num_errors == 0, f"{grid.num_errors} trial(s) failed: see {cfg.out}"
        table = table.sort_values("trial_id").reset_index(drop=True)
        table["test_auc"] = trial_test_aucs(cfg, table, x_test, y_test)
        results[name] = {"table": table, "wall_s": wall, "epochs": int(table["epochs_run"].sum())}
    return results


def print_seed(args, seed: int, results: dict) -> dict:
    """The seed's table; returns {sweep name: (Spearman, exported model's test AUC)}."""
    import pandas as pd

    configs = [tuple(r["table"].sort_values("lr")["lr"].round(12)) for r in results.values()]
    print(f"\nseed {seed}: same configurations tried: {configs[0] == configs[1]}")
    print(f"{'sweep':<14}{'wall (s)':>9}{'trial-epochs':>14}{'Spearman(score, test AUC)':>27}"
          f"{'exported: score':>17}{'test AUC':>10}{'best test AUC':>15}")
    figures = {}
    for name, r in results.items():
        t = r["table"]
        rho = float(pd.Series(t["val_auc"]).corr(t["test_auc"], method="spearman"))
        chosen = t.loc[t["val_auc"].idxmax()]
        figures[name] = (rho, float(chosen["test_auc"]))
        print(f"{name:<14}{r['wall_s']:>9.0f}{r['epochs']:>14d}{rho:>27.3f}"
              f"{chosen['val_auc']:>17.4f}{chosen['test_auc']:>10.4f}{t['test_auc'].max():>15.4f}")
    (single, _), (cv, _) = figures.values()
    print(f"Spearman ratio (--cv {args.folds} / single split): {cv / single if single else float('nan'):.2f}")
    return figures


def main(argv=None) -> int:
    import platform

    import numpy as np
    import ray

    import cxr_datasets
    from cxr_model.quiet import init_tensorflow_quietly

    init_tensorflow_quietly()  # this process scores every trial's model on test
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.trials > 10:
        raise SystemExit("--trials must be at most 10: beyond TPE's random start-up the two sweeps diverge")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    per_seed = {}
    try:
        prepared = prepared_data(out, args.n, args.image_size)
        x_test, y_test, _ = cxr_datasets.load(prepared, "test")
        for seed in seeds:
            per_seed[seed] = run_seed(args, seed, prepared, out, x_test, y_test)
    finally:
        ray.shutdown()
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, {args.n} synthetic images at {args.image_size} px, "
          f"test shifted (contrast x{CONTRAST}, noise sd {NOISE:g}), {args.trials} trials, seeds {args.seeds}, "
          f"weights {args.weights}")
    figures = {seed: print_seed(args, seed, results) for seed, results in per_seed.items()}
    if len(seeds) > 1:
        names = list(next(iter(figures.values())))
        print(f"\nover {len(seeds)} seeds:")
        for name in names:
            rhos, aucs = zip(*(f[name] for f in figures.values()))
            print(f"{name:<14} mean Spearman {np.mean(rhos):.3f}   mean exported test AUC {np.mean(aucs):.4f}")
        single, cv = names
        ranked = sum(f[cv][0] > f[single][0] for f in figures.values())
        exported = sum(f[cv][1] > f[single][1] for f in figures.values())
        print(f"{cv} ranked higher in {ranked} of {len(seeds)} seeds and exported the better model in "
              f"{exported} of {len(seeds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
