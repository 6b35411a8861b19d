"""`cxr search` and `cxr demo`: argument parsing and printing only; the work is in search.run.

    cxr search runs/prepared --out runs/sweep --trials 32 --max-epochs 20 --gpus-per-trial 0.25
    cxr search runs/prepared --out runs/sweep --resume          # after Ctrl-C or a killed driver
    cxr demo --out runs/demo --overwrite                        # synthetic data, end to end, CPU
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from search.config import CONFIG_FILE, SearchConfig

SEARCH_EPILOG = """examples:
  cxr search runs/prepared --out runs/sweep --trials 32 --max-epochs 20
  cxr search runs/prepared --out runs/sweep --resume         # continue an interrupted sweep
  cxr search runs/prepared --out runs/s1 --resume --storage s3://bucket/cxr/s1  # on a new head
  cxr search runs/prepared --out runs/smoke --smoke          # 2 tiny trials, random weights
  cxr search /data/prepared --out runs/s1 --address auto --storage s3://bucket/cxr/s1  # on a cluster

Trials sample the space of search/space.py (override it with --space FILE, YAML or JSON), Optuna's
TPE proposes them, ASHA stops the weak ones early. The best trial by validation AUC is evaluated
once on the test split at a threshold chosen on validation, and exported to RUN/best/ with
RUN/report.md. The Optuna study is in RUN/optuna.db: `optuna-dashboard sqlite:///RUN/optuna.db`."""

DEMO_EPILOG = """example:
  cxr demo --out runs/demo --overwrite

Synthetic chest X-rays (600) -> prepare (64 px) -> a 12-trial search (random-init VGG16, frozen,
cached features, on the CPU) -> test evaluation -> export -> report, in 1-3 minutes on 2 cores.
Prints where the report and the model are, and the test AUC."""

# The --smoke sizes: enough to run every stage once, nothing more.
SMOKE = dict(trials=2, max_epochs=2, grace_period=1, concurrency=2, weights=None, n_boot=100, patience=2)


def register(subparsers) -> None:
    _add_search(subparsers)
    _add_demo(subparsers)


def _add_search(subparsers) -> None:
    from cxr_model.pipeline import THRESHOLD_METHODS

    p = subparsers.add_parser("search", help="hyperparameter sweep (Ray Tune + Optuna + ASHA), best model on test",
                              epilog=SEARCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", metavar="PREPARED", help="folder written by `cxr prepare`")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (results, report, best model)")
    budget = p.add_argument_group("budget")
    budget.add_argument("--trials", type=int, help=_default("trials to run", "trials"))
    budget.add_argument("--max-epochs", type=int, help=_default("epochs of a trial never stopped", "max_epochs"))
    budget.add_argument("--grace-period", type=int,
                        help=_default("epochs before ASHA may stop a trial", "grace_period"))
    budget.add_argument("--reduction-factor", type=int, help=_default("ASHA keeps 1/R per rung", "reduction_factor"))
    budget.add_argument("--patience", type=int, help=_default("epochs without improvement before fit stops",
                                                              "patience"))
    budget.add_argument("--smoke", action="store_true",
                        help="tiny everything (2 trials, 2 epochs, random weights) for a quick check")
    res = p.add_argument_group("resources")
    res.add_argument("--concurrency", type=int, help=_default("trials at once", "concurrency"))
    res.add_argument("--gpus-per-trial", type=float, metavar="F",
                     help="GPU share per trial, e.g. 0.25 = four per GPU (default: 0.25 with GPUs, else 0)")
    res.add_argument("--cpus-per-trial", type=float, metavar="C", help=_default("CPUs per trial", "cpus_per_trial"))
    res.add_argument("--address", metavar="auto|ray://HOST:10001", help="Ray cluster to join (default: a local Ray)")
    res.add_argument("--max-failures", type=int, metavar="K",
                     help=_default("retries of a trial whose worker died, from its checkpoint", "max_failures"))
    model = p.add_argument_group("model and search")
    model.add_argument("--weights", metavar="imagenet|none|PATH", help="VGG16 base weights (default: imagenet)")
    model.add_argument("--space", metavar="FILE", help="YAML/JSON overriding entries of the search space")
    model.add_argument("--seed", type=int, help="TPE's and every trial's seed (default: 0)")
    model.add_argument("--threshold-method", choices=THRESHOLD_METHODS,
                       help="decision threshold chosen on validation (default: youden)")
    store = p.add_argument_group("storage")
    store.add_argument("--storage", metavar="PATH|s3://...", help="Tune state and checkpoints (default: RUN)")
    store.add_argument("--optuna-storage", metavar="URL", help="Optuna study in a database (default: saved with Tune's state in the storage; "
                       "a SQLite copy in RUN/optuna.db)")
    store.add_argument("--resume", action="store_true", help="continue the interrupted sweep in RUN, or the one in --storage (a new head, an empty RUN)")
    p.add_argument("--quiet", action="store_true", help="no live Tune status table")
    p.set_defaults(func=handle_search)


def _default(text: str, field: str) -> str:
    return f"{text} (default: {SearchConfig.__dataclass_fields__[field].default:g})"


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="synthetic data -> prepare -> search -> test -> export, on the CPU",
                              epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="demo folder (default: runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in DIR")
    p.set_defaults(func=handle_demo)


# ----------------------------------------------------------------------------- handlers


def handle_search(args) -> int:
    from search.run import run_search

    cfg, resume = config_from_args(args)
    print(f"cxr search: {cfg.trials} trials, up to {cfg.max_epochs} epochs each, run folder {cfg.run_dir}"
          + (" (resuming)" if resume else ""))
    summary = run_search(cfg, resume=resume)
    return print_summary(cfg, summary)


def config_from_args(args) -> tuple[SearchConfig, bool]:
    """SearchConfig from the flags; on --resume, the saved one (a resumed sweep keeps its settings)."""
    from datasets.errors import CxrError
    from search.space import SpaceError, load_space

    run_dir = Path(args.out)
    given = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None}
    if args.resume:
        cfg = _saved_config(run_dir, args.storage)
        ignored = sorted(k for k in given if k != "address" and given[k] != getattr(cfg, k))
        if ignored:
            print(f"cxr search: resuming with the sweep's saved settings; ignoring --{', --'.join(ignored)}"
                  .replace("_", "-"))
        return dataclasses.replace(cfg, address=given.get("address", cfg.address)), True
    if (run_dir / CONFIG_FILE).is_file():
        raise CxrError(f"{run_dir} already holds a sweep: add --resume to continue it, or choose another --out")
    _check_prepared(args.prepared)
    values: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    values.update(given)
    try:
        space = load_space(args.space)
    except SpaceError as exc:
        raise CxrError(str(exc)) from None
    cfg = SearchConfig(prepared=str(Path(args.prepared).resolve()), out=str(run_dir), space=space,
                       verbose=0 if args.quiet else 1, **values)
    return _checked(cfg), False


def _saved_config(run_dir: Path, storage: str | None) -> SearchConfig:
    """The sweep's saved config: from RUN, else from --storage (a new head, an empty RUN)."""
    import dataclasses

    from datasets.errors import CxrError

    if (run_dir / CONFIG_FILE).is_file():
        return SearchConfig.load(run_dir)
    if storage:
        cfg = SearchConfig.load_from_storage(storage)
        if cfg is None:
            raise CxrError(f"nothing to resume: no {CONFIG_FILE} in {storage}")
        # this machine's run folder; the state (experiment, study, results) stays in the storage
        return dataclasses.replace(cfg, out=str(run_dir))
    raise CxrError(f"nothing to resume: {run_dir / CONFIG_FILE} not found (give --storage to resume "
                   "a sweep from its storage)")


# argparse dest -> SearchConfig field (the same names)
_FLAG_FIELDS = ("trials", "max_epochs", "grace_period", "reduction_factor", "patience", "concurrency",
                "gpus_per_trial", "cpus_per_trial", "address", "max_failures", "weights", "seed",
                "threshold_method", "storage", "optuna_storage")


def _checked(cfg: SearchConfig) -> SearchConfig:
    from datasets.errors import CxrError

    for name in ("trials", "max_epochs", "grace_period", "reduction_factor", "concurrency"):
        if getattr(cfg, name) < 1 or (name == "reduction_factor" and cfg.reduction_factor < 2):
            raise CxrError(f"--{name.replace('_', '-')} must be at least {2 if name == 'reduction_factor' else 1}")
    if cfg.gpus_per_trial is not None and cfg.gpus_per_trial < 0:
        raise CxrError("--gpus-per-trial must be >= 0")
    if cfg.address and cfg.address.startswith("ray://"):
        # Ray Client runs Tune (and the Optuna searcher) on the cluster, while this machine reads
        # the results: both sides must reach the storage and the study.
        if not (cfg.storage and "://" in cfg.storage) or not cfg.optuna_storage:
            raise CxrError("with --address ray://... give --storage s3://... and --optuna-storage URL that the "
                           "cluster and this machine both reach (or submit the command with `ray job submit`)")
    return cfg


def _check_prepared(prepared: str) -> None:
    from datasets.errors import CxrError

    if not (Path(prepared) / "manifest.json").is_file():
        raise CxrError(f"{prepared} is not a prepared data set (no manifest.json): run `cxr prepare` first")


def print_summary(cfg: SearchConfig, summary: dict[str, Any]) -> int:
    from cxr_model.evaluate import DISPLAY_ORDER

    table = summary["table"]
    print()
    print(_top_trials(table))
    if not summary["finished"]:
        print(f"\nThe sweep was interrupted ({len(table)} of {cfg.trials} trials so far). Continue it with:\n"
              f"  cxr search {cfg.prepared} --out {cfg.out} --resume")
        return 130
    best = summary["best"]
    test = best["metrics"]["test"]
    print(f"\nBest trial {best['trial_id']}: validation AUC {best['val_auc']:.4f}; "
          f"threshold {best['threshold']:.3f} (chosen on validation)")
    print("Test split, evaluated once (95% bootstrap intervals):")
    for name in DISPLAY_ORDER:
        m = test[name]
        print(f"  {name:<12} {m['value']:.4f}  [{m['ci_low']:.4f}, {m['ci_high']:.4f}]")
    print(f"\nModel:   {best['model_dir']}\nReport:  {summary['report']}\n"
          f"Results: {cfg.run_dir / 'results.csv'}\nOptuna:  optuna-dashboard {cfg.optuna_url}")
    return 0


def _top_trials(table, n: int = 10) -> str:
    cols = ["trial_id", "val_auc", "epochs_run", "stopped_by", "head_units", "dropout", "lr", "aug_strength",
            "trainable_blocks", "batch_size", "head_pooling"]
    shown = table[[c for c in cols if c in table]].head(n)
    return f"Top {len(shown)} of {len(table)} trials by validation AUC:\n" + shown.to_string(
        index=False, float_format=lambda v: f"{v:.4g}")


def handle_demo(args) -> int:
    from search.demo import run_demo

    return run_demo(Path(args.out), overwrite=args.overwrite)
