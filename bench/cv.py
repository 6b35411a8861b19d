"""Does selection hold? The same configurations swept with one validation split and with `--cv 5`,
on synthetic data whose test split comes from a second "scanner" (another tone curve, more noise).

    python bench/cv.py                              # seed 0: 20 configurations, 64 px, 600 images (~10 min, 2 cores)
    python bench/cv.py --seeds 1                    # each seed is saved (OUT/seedN/figures.json) ...
    python bench/cv.py --seeds 0,1,2,3,4 --report   # ... and the tables and summary are printed from the saved seeds
    python bench/cv.py --seeds 0,1,2,3,4            # or run them all in one command (~50 min)
    python bench/cv.py --trials 6 --epochs 3 --n 300 --image-size 32 --out /tmp/cv-quick   # a quick check
    python bench/cv.py --shift test-only            # the first design (2026-12-02/04): only test shifted
    python bench/cv.py --data per-seed --seeds 10   # a new data set per seed (the replication, seeds 10-19)
    python bench/cv.py --data any --seeds 0,1,10,11 --report   # saved seeds of both kinds of data, pooled

The data (`--shift mixed`, the default): a hospital archive from two machines. Every test image and
a share (`--share`, 25%) of each class's train + val images come from scanner B: tone curve
255 * (x / 255) ** 1.5 (darker, flatter shadows), gray levels squeezed x0.6 about 128, Gaussian
noise of sd 10 drawn on a grid of 64 cells along the longer side and scaled up with the image (so
the resize to --image-size keeps it; the first design's per-pixel noise, sd 18 at 600-2,000 px,
was ~1-2 gray levels after the resize to 64 px). Which scanner took an image is independent of its
class (the share is per class). A selection score computed on more held-out images sees more
scanner-B images: the single split's val holds ~10% of train + val, CV's out-of-fold pool all of
it. `--shift test-only` is the first design: contrast x0.6 and per-pixel noise of sd 18 on the test
images only. The data are generated and prepared once per setting (seed 0) and shared by all seeds;
with `--data per-seed`, once per seed from that seed (the synthetic images, which of them scanner B
took, the prepared splits), so the seeds also vary the data.

The configurations: for each seed, --trials configurations are drawn once from the space (Optuna's
RandomSampler seeded by the seed; frozen base, no augmentation) and both sweeps run exactly these
(SearchConfig.points_to_evaluate), checked below. The seed also seeds the trials' training and the
folds. ASHA is off in both sweeps, so every trial is complete and has a test AUC.

What is printed: for every trial its selection score (the single split's best validation AUC; the
CV mean over 5 patient-grouped folds of train + val) is set against the test AUC of the model that
trial would export (its checkpoint; the mean of its 5 fold models). Per seed and sweep: the
Spearman correlation of score and test AUC over the trials, the score and test AUC of the exported
model (the trial the sweep ranks first), the best and the mean test AUC of all trials, wall and
trial-epochs; the ratio of the Spearmans (--cv over single split) last. Over several seeds: per
sweep the means, the paired differences (--cv minus single split: mean and standard error over the
seeds), and in how many seeds --cv ranked higher and exported the better model.
Goal: --cv 5 ranks higher and exports the better model. This design was fixed before its results
were seen (docs/CV.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from common import synthetic_source, timed_run_sweep  # noqa: E402  (bench/common.py, beside this script)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SPACE_OVERRIDES = {"trainable_blocks": 0, "augment": False}  # cached features: cheap enough for CV on CPUs
DATA_SEED = 0  # with --data fixed: the synthetic images, which of them scanner B took, the prepared splits


@dataclass(frozen=True)
class Scanner:
    """How scanner B's image differs from scanner A's (the synthetic images as generated)."""

    gamma: float           # tone curve: 255 * (x / 255) ** gamma
    contrast: float        # then gray levels squeezed about 128
    noise_sd: float        # Gaussian noise, in gray levels
    grain: int | None      # noise drawn on this many cells along the longer side, scaled up; None: per pixel


SHIFTS = {
    "mixed": Scanner(gamma=1.5, contrast=0.6, noise_sd=10.0, grain=64),
    "test-only": Scanner(gamma=1.0, contrast=0.6, noise_sd=18.0, grain=None),  # the first design
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="configurations per seed, the same in both sweeps")
    p.add_argument("--epochs", type=int, default=6, help="max epochs per trial (per fold with --cv)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n", type=int, default=600, help="synthetic images")
    p.add_argument("--shift", choices=tuple(SHIFTS), default="mixed",
                   help="mixed: test and --share of train + val from scanner B; test-only: the first design")
    p.add_argument("--share", type=float, default=0.25, help="with --shift mixed: train + val images from scanner B")
    p.add_argument("--data", choices=("fixed", "per-seed", "any"), default="fixed",
                   help="fixed: one data set (synthetic images, scanner B's images, splits) for every seed; "
                        "per-seed: a new one from each seed (the replication of 2026-12-08); "
                        "any (with --report): the saved seeds of both, pooled")
    p.add_argument("--weights", default="none", help="none (offline) or imagenet")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seeds", default="0", help="comma-separated: each draws its configurations, seeds the trials and folds")
    p.add_argument("--report", action="store_true", help="run nothing: print the saved --seeds from --out")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "cv"))
    args = p.parse_args(argv)
    if args.data == "any" and not args.report:
        p.error("--data any only pools saved seeds: use it with --report")
    if args.trials < 3:
        p.error("--trials must be at least 3 for a rank correlation")
    if not 0.0 <= args.share < 1.0:
        p.error("--share must be in [0, 1)")
    return args


def settings(args) -> dict:
    """What makes two seeds' figures comparable: a saved seed with other settings is refused."""
    share = args.share if args.shift == "mixed" else 0.0
    fixed = {"trials": args.trials, "epochs": args.epochs, "folds": args.folds, "image_size": args.image_size,
             "n": args.n, "shift": args.shift, "share": share, "scanner": asdict(SHIFTS[args.shift]),
             "weights": args.weights, "concurrency": args.concurrency}
    # the seeds saved before --data existed ran with fixed data and have no such key
    return fixed if args.data == "fixed" else {**fixed, "data": args.data}


def data_seed(args, seed: int) -> int:
    """The seed of the synthetic images, of which of them scanner B took and of the prepared splits."""
    return DATA_SEED if args.data == "fixed" else seed


# --- the data ------------------------------------------------------------------------------------

def second_scanner(gray, scanner: Scanner, rng):
    """A gray image (float array) as scanner B would have taken it."""
    import numpy as np
    from PIL import Image

    out = 128 + scanner.contrast * (255 * (gray / 255) ** scanner.gamma - 128)
    height, width = gray.shape
    if scanner.grain is None:
        noise = rng.normal(0, scanner.noise_sd, gray.shape)
    else:
        cell = max(height, width) / scanner.grain
        coarse = rng.normal(0, scanner.noise_sd, (max(1, round(height / cell)), max(1, round(width / cell))))
        noise = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(out + noise, 0, 255)


def scanner_b_files(root: Path, share: float, rng) -> list[Path]:
    """Every test image, and `share` of each class's train + val images (drawn by `rng`)."""
    chosen = sorted((root / "test").rglob("*.jpeg"))
    for label in sorted(p.name for p in (root / "train").iterdir() if p.is_dir()):
        pool = sorted([*(root / "train" / label).glob("*.jpeg"), *(root / "val" / label).glob("*.jpeg")])
        picked = rng.permutation(len(pool))[:round(share * len(pool))]
        chosen += [pool[i] for i in sorted(picked)]
    return chosen


def shifted_source(out: Path, n: int, shift: str, share: float, seed: int = DATA_SEED) -> Path:
    """A copy of the synthetic folder with scanner B's images rewritten, made once; its
    scanner_b.txt lists them (paths relative to the folder)."""
    import numpy as np
    from PIL import Image

    tag = "" if seed == DATA_SEED else f"_data{seed}"  # the fixed design's folders keep their names
    folder = out / (f"source_{n}_{shift}" + (f"{share:g}" if shift == "mixed" else "") + tag)
    if (folder / ".complete").exists():
        return folder
    pristine = synthetic_source(out / f"synth_{n}{tag}", n, seed=seed)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder, ignore=shutil.ignore_patterns(".complete"))
    rng = np.random.default_rng(seed)
    files = scanner_b_files(folder / "chest_xray", share if shift == "mixed" else 0.0, rng)
    for path in files:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float64)
        Image.fromarray(second_scanner(gray, SHIFTS[shift], rng).astype(np.uint8)).save(path, quality=90)
    (folder / "scanner_b.txt").write_text("".join(f"{p.relative_to(folder).as_posix()}\n" for p in files))
    (folder / ".complete").touch()
    return folder


def prepared_data(out: Path, args, seed: int = DATA_SEED) -> tuple[Path, dict]:
    """The prepared folder of data seed `seed`, and per split [scanner-B images, images]."""
    import cxr_datasets

    source = shifted_source(out, args.n, args.shift, args.share, seed)
    prepared = out / f"prepared_{args.image_size}_{source.name}"
    if not (prepared / "manifest.json").is_file():
        cxr_datasets.prepare(source, prepared, image_size=args.image_size, seed=seed, overwrite=True)
    scanner_b = set((source / "scanner_b.txt").read_text().split())
    counts = {}
    for split in ("train", "val", "test"):
        _, _, meta = cxr_datasets.load(prepared, split, verify=False)
        counts[split] = [int(meta["source_path"].isin(scanner_b).sum()), len(meta)]
    return prepared, counts


# --- the sweeps ----------------------------------------------------------------------------------

def draw_configurations(space: dict, n: int, seed: int) -> list[dict]:
    """`n` configurations drawn at random from `space`, as Optuna names their parameters."""
    import optuna

    from cxr_search.space import SpaceSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    sampler, points = SpaceSampler(space), []
    for _ in range(n):
        trial = study.ask()
        sampler(trial)  # suggests every searched parameter; the constants it returns are the space's
        points.append(dict(trial.params))
    return points


def sweep_config(args, seed: int, prepared: Path, run: Path, cv: int, points: list[dict], cache: str):
    from cxr_search.config import SearchConfig

    return SearchConfig(
        prepared=str(prepared), out=str(run), trials=len(points), max_epochs=args.epochs, cv=cv,
        concurrency=args.concurrency, cpus_per_trial=1, seed=seed, max_failures=0, verbose=0, asha=False,
        weights=None if args.weights.lower() == "none" else args.weights,
        space=SPACE_OVERRIDES, points_to_evaluate=points, feature_cache_dir=cache,
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


def config_key(row: dict) -> tuple:
    """A trial's configuration, comparable across sweeps (floats to 9 significant digits)."""
    from cxr_search.space import result_params

    return tuple(float(f"{row[c]:.9g}") if isinstance(row[c], float) else row[c] for c in result_params())


def run_seed(args, seed: int, prepared: Path, counts: dict, out: Path, x_test, y_test) -> dict:
    """Both sweeps with one seed's configurations; the figures saved as OUT/seedN/figures.json."""
    from cxr_search.shared_data import sweep_data
    from cxr_search.space import param_columns, resolve_space, result_params
    from cxr_search.tuner import connect

    space = resolve_space(SPACE_OVERRIDES)
    points = draw_configurations(space, args.trials, seed)
    constants = {k: v for k, v in space.items() if not isinstance(v, dict)}
    drawn = sorted(config_key(param_columns({**constants, **p})) for p in points)
    sweeps = {}
    for name, cv in (("single split", 0), (f"--cv {args.folds}", args.folds)):
        cache = tempfile.mkdtemp(prefix="cxr-bench-cv-features-")
        cfg = sweep_config(args, seed, prepared, out / f"seed{seed}" / ("cv" if cv else "single"), cv, points, cache)
        print(f"seed {seed}, {name}: {args.trials} trials x up to {args.epochs} epochs"
              + (f" x {cv} folds" if cv else "") + " ...", flush=True)
        connect(cfg.address)
        try:
            grid, wall, table, _ = timed_run_sweep(cfg, sweep_data(cfg))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        assert grid.num_errors == 0, f"{grid.num_errors} trial(s) failed: see {cfg.out}"
        table["test_auc"] = trial_test_aucs(cfg, table, x_test, y_test)
        columns = ["trial_id", "val_auc", "test_auc", "epochs_run", *(["cv_se"] if cv else []), *result_params()]
        trials = table[columns].to_dict("records")  # in the sweep's order: the first is what it exports
        sweeps[name] = {"wall_s": wall, "epochs": int(table["epochs_run"].sum()), "trials": trials,
                        "same_as_drawn": sorted(config_key(t) for t in trials) == drawn}
    figures = {"seed": seed, "data_seed": data_seed(args, seed), "node": platform.node(), "cpus": os.cpu_count(),
               "settings": settings(args), "scanner_b": counts, "sweeps": sweeps}
    path = out / f"seed{seed}" / "figures.json"
    path.write_text(json.dumps(figures, indent=1, default=_plain) + "\n")
    return figures


def _plain(value):
    """numpy scalars (pandas' records) as Python numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def load_seed(out: Path, seed: int, args) -> dict:
    path = out / f"seed{seed}" / "figures.json"
    if not path.is_file():
        raise SystemExit(f"no saved figures for seed {seed} at {path}: run `python bench/cv.py --seeds {seed}` first")
    figures = json.loads(path.read_text())
    saved, these = figures["settings"], settings(args)
    if args.data == "any":  # pooling: every setting but the data's must match
        saved, these = ({k: v for k, v in s.items() if k != "data"} for s in (saved, these))
    if saved != these:
        raise SystemExit(f"{path} was run with other settings: {figures['settings']} (these: {settings(args)})")
    return figures


# --- the report ----------------------------------------------------------------------------------

def seed_figures(figures: dict) -> dict:
    """{sweep name: {"rho", "exported", "best", "mean"}} of one seed."""
    import pandas as pd

    result = {}
    for name, sweep in figures["sweeps"].items():
        t = pd.DataFrame(sweep["trials"])
        result[name] = {"rho": float(t["val_auc"].corr(t["test_auc"], method="spearman")),
                        "score": float(t["val_auc"].iloc[0]), "exported": float(t["test_auc"].iloc[0]),
                        "best": float(t["test_auc"].max()), "mean": float(t["test_auc"].mean())}
    return result


def print_seed(figures: dict) -> dict:
    """The seed's table; returns its `seed_figures`."""
    seed, sweeps = figures["seed"], figures["sweeps"]
    (single_name, single), (cv_name, cv) = sweeps.items()
    same = single["same_as_drawn"] and cv["same_as_drawn"]
    print(f"\nseed {seed}: both sweeps tried the {len(single['trials'])} drawn configurations: {same}")
    if data_kind(figures) != "fixed":
        print(f"data seed {figures['data_seed']}; " + scanner_b_line(figures))
    print(f"{'sweep':<14}{'wall (s)':>9}{'trial-epochs':>14}{'Spearman(score, test AUC)':>27}"
          f"{'exported: score':>17}{'test AUC':>10}{'best test AUC':>15}{'mean test AUC':>15}")
    result = seed_figures(figures)
    for name, sweep in sweeps.items():
        f = result[name]
        print(f"{name:<14}{sweep['wall_s']:>9.0f}{sweep['epochs']:>14d}{f['rho']:>27.3f}"
              f"{f['score']:>17.4f}{f['exported']:>10.4f}{f['best']:>15.4f}{f['mean']:>15.4f}")
    rho_single, rho_cv = result[single_name]["rho"], result[cv_name]["rho"]
    print(f"Spearman ratio ({cv_name} / single split): {rho_cv / rho_single if rho_single else float('nan'):.2f}")
    return result


def print_summary(per_seed: dict) -> None:
    """Means per sweep, paired differences, and the counts of seeds where --cv did better."""
    import numpy as np

    names = list(next(iter(per_seed.values())))
    single, cv = names
    k = len(per_seed)
    print(f"\nover {k} seeds:")
    for name in names:
        mean = {key: np.mean([f[name][key] for f in per_seed.values()]) for key in ("rho", "exported", "mean")}
        print(f"{name:<14} mean Spearman {mean['rho']:.3f}   mean exported test AUC {mean['exported']:.4f}"
              f"   mean test AUC of all trials {mean['mean']:.4f}")
    print(f"paired, {cv} minus single split (per seed; mean +- standard error over the seeds):")
    for key, label in (("rho", "Spearman"), ("exported", "exported test AUC"), ("mean", "mean test AUC of all trials")):
        diffs = np.array([f[cv][key] - f[single][key] for f in per_seed.values()])
        se = diffs.std(ddof=1) / np.sqrt(k) if k > 1 else float("nan")
        print(f"  {label:<28}" + " ".join(f"{d:+.3f}" for d in diffs) + f"   mean {diffs.mean():+.3f} +- {se:.3f}")
    ranked = sum(f[cv]["rho"] > f[single]["rho"] for f in per_seed.values())
    exported = sum(f[cv]["exported"] > f[single]["exported"] for f in per_seed.values())
    print(f"{cv} ranked higher in {ranked} of {k} seeds and exported the better model in {exported} of {k}")


def data_kind(figures: dict) -> str:
    """"fixed" or "per-seed" (seeds saved before --data existed ran with fixed data)."""
    return figures["settings"].get("data", "fixed")


def scanner_b_line(figures: dict) -> str:
    return "scanner-B images per split (prepared): " + ", ".join(
        f"{split} {b} of {total}" for split, (b, total) in figures["scanner_b"].items())


def print_report(saved: list[dict]) -> None:
    s = saved[0]["settings"]
    scanner = s["scanner"]
    shift = (f"scanner B (tone curve gamma {scanner['gamma']:g}, contrast x{scanner['contrast']:g}, noise sd "
             f"{scanner['noise_sd']:g} on " + (f"{scanner['grain']} cells" if scanner["grain"] else "every pixel")
             + (f") took every test image and {s['share']:.0%} of train + val" if s["shift"] == "mixed"
                else ") took the test images only"))
    print(f"\n{saved[0]['node']}, {saved[0]['cpus']} CPUs, {s['n']} synthetic images at {s['image_size']} px; {shift}; "
          f"{s['trials']} configurations per seed x up to {s['epochs']} epochs; seeds "
          f"{','.join(str(f['seed']) for f in saved)}; weights {s['weights']}")
    if len({data_kind(f) for f in saved}) > 1:
        fixed = [str(f["seed"]) for f in saved if data_kind(f) == "fixed"]
        print(f"data: seeds {','.join(fixed)} share one data set (seed {DATA_SEED}), the others each have their own")
    elif data_kind(saved[0]) == "per-seed":
        print("data: a new data set per seed (synthetic images, scanner B's share, splits: seeded by the seed)")
    else:
        print(f"data: one data set (seed {DATA_SEED}) for every seed; " + scanner_b_line(saved[0]))
    per_seed = {f["seed"]: print_seed(f) for f in saved}
    if len(saved) > 1:
        print_summary(per_seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    if args.report:
        print_report([load_seed(out, seed, args) for seed in seeds])
        return 0

    import ray

    import cxr_datasets
    from cxr_model.quiet import init_tensorflow_quietly

    init_tensorflow_quietly()  # this process scores every trial's model on test
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    saved = []
    try:
        for seed in seeds:
            prepared, counts = prepared_data(out, args, data_seed(args, seed))
            x_test, y_test, _ = cxr_datasets.load(prepared, "test")
            saved.append(run_seed(args, seed, prepared, counts, out, x_test, y_test))
    finally:
        ray.shutdown()
    print_report(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
