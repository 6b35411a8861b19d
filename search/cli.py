"""`cxr search` and `cxr demo`: argument parsing and printing only; the work is in cxr_search.run
(imported by the handlers, so that other `cxr` commands do not load it).

    cxr search runs/prepared --out runs/sweep --trials 32 --max-epochs 20 --gpus-per-trial 0.25
    cxr search runs/prepared --out runs/sweep --resume          # after Ctrl-C or a killed driver
    cxr search s3://bucket/prepared --out runs/sweep            # PREPARED at any pyarrow.fs URI
    cxr demo --out runs/demo --overwrite                        # synthetic data, end to end, CPU
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from cxr_datasets.cli import given, with_default
from cxr_datasets.errors import CxrError
from cxr_datasets.storage import Location
from cxr_model.cli import add_formats_option
from cxr_model.config import THRESHOLD_METHODS, check_formats
from cxr_search.config import CONFIG_FILE, SearchConfig
from cxr_search.space import load_space

SEARCH_EPILOG = """examples:
  cxr search runs/prepared --out runs/sweep --trials 32 --max-epochs 20
  cxr search runs/prepared --out runs/sweep --resume         # continue an interrupted sweep
  cxr search runs/prepared --out runs/s1 --resume --storage s3://bucket/cxr/s1  # on a new head
  cxr search runs/prepared --out runs/smoke --smoke          # 2 tiny trials, random weights
  cxr search runs/prepared --out runs/cv --cv 5              # 5-fold CV per trial, the fold ensemble exported
  cxr search s3://bucket/prepared --out runs/sweep           # prepared data in a bucket (gs://, file://)
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
    p = subparsers.add_parser("search", help="hyperparameter sweep (Ray Tune + Optuna + ASHA), best model on test",
                              epilog=SEARCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", metavar="PREPARED",
                   help="folder written by `cxr prepare`, or its pyarrow.fs URI (s3://, gs://, file://)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (results, report, best model)")
    budget = p.add_argument_group("budget")
    budget.add_argument("--trials", type=int, help=_default("trials to run", "trials"))
    budget.add_argument("--max-epochs", type=int, help=_default("epochs of a trial never stopped", "max_epochs"))
    budget.add_argument("--grace-period", type=int,
                        help=_default("epochs before ASHA may stop a trial", "grace_period"))
    budget.add_argument("--reduction-factor", type=int, help=_default("ASHA keeps 1/R per rung", "reduction_factor"))
    budget.add_argument("--patience", type=int, help=_default("epochs without improvement before fit stops",
                                                              "patience"))
    budget.add_argument("--cv", type=int, metavar="K",
                        help=_default("K >= 2: patient-grouped K-fold cross-validation of train + val in every trial, "
                                      "ASHA judging fold 1 first; the best configuration's K fold models are "
                                      "exported as one ensemble (0: one validation split)", "cv"))
    budget.add_argument("--refit", action="store_true", default=None,
                        help="with --cv: export the best configuration retrained once on all of train + val, "
                             "for the median of its folds' best epochs, instead of the fold ensemble")
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
    model.add_argument("--weights", metavar="imagenet|none|PATH", help=_default("VGG16 base weights", "weights"))
    model.add_argument("--space", metavar="FILE", help="YAML/JSON overriding entries of the search space")
    model.add_argument("--seed", type=int, help=_default("TPE's and every trial's seed", "seed"))
    model.add_argument("--threshold-method", choices=THRESHOLD_METHODS,
                       help=_default("decision threshold chosen on validation", "threshold_method"))
    model.add_argument("--n-boot", type=int, help=_default("bootstrap resamples for the test metrics' 95%% intervals",
                                                           "n_boot"))
    store = p.add_argument_group("storage")
    store.add_argument("--storage", metavar="PATH|s3://...", help="Tune state and checkpoints (default: RUN)")
    store.add_argument("--optuna-storage", metavar="URL", help="Optuna study in a database (default: saved with Tune's state in the storage; "
                       "a SQLite copy in RUN/optuna.db)")
    store.add_argument("--resume", action="store_true", help="continue the interrupted sweep in RUN, or the one in --storage (a new head, an empty RUN)")
    store.add_argument("--mlflow", metavar="URI", help="also log every trial to this MLflow tracking URI, e.g. "
                       "sqlite:///abs/mlflow.db or http://host:5000 (needs pip install 'cxr-tune[mlflow]')")
    add_formats_option(store)
    p.add_argument("--quiet", action="store_true", help="no live Tune status table")
    p.set_defaults(func=handle_search)


def _default(text: str, field: str) -> str:
    return with_default(text, SearchConfig, field)


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="synthetic data -> prepare -> search -> test -> export, on the CPU",
                              epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="demo folder (default: runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in DIR")
    p.set_defaults(func=handle_demo)


# ----------------------------------------------------------------------------- handlers


def handle_search(args) -> int:
    # The work's modules (pandas, matplotlib, then Ray and Keras) load only for this command.
    from cxr_search.run import run_search
    from cxr_search.summary import print_summary

    cfg, resume = config_from_args(args)
    folds = f", {cfg.cv}-fold cross-validation" if cfg.cv else ""
    print(f"cxr search: {cfg.trials} trials, up to {cfg.max_epochs} epochs each{' fold' if cfg.cv else ''}{folds}, "
          f"run folder {cfg.run_dir}"
          + (" (resuming)" if resume else ""))
    summary = run_search(cfg, resume=resume)
    return print_summary(cfg, summary)


def config_from_args(args) -> tuple[SearchConfig, bool]:
    """SearchConfig from the flags; on --resume, the saved one (a resumed sweep keeps its settings)."""
    run_dir = Path(args.out)
    # --space is a file, read below; PREPARED and --out are not settings a resume may change
    flags = {k: v for k, v in given(args, SearchConfig).items() if k not in ("prepared", "out", "space")}
    if "formats" in flags:
        flags["formats"] = check_formats(flags["formats"])  # "keras,onnx" as the saved config has it
    if args.resume:
        cfg = _saved_config(run_dir, args.storage)
        ignored = sorted(k for k in flags if k != "address" and flags[k] != getattr(cfg, k))
        if ignored:
            print(f"cxr search: resuming with the sweep's saved settings; ignoring --{', --'.join(ignored)}"
                  .replace("_", "-"))
        return dataclasses.replace(cfg, address=flags.get("address", cfg.address)), True
    if (run_dir / CONFIG_FILE).is_file():
        raise CxrError(f"{run_dir} already holds a sweep: add --resume to continue it, or choose another --out")
    prepared = _checked_prepared(args.prepared)
    values: dict[str, Any] = {**(SMOKE if args.smoke else {}), **flags}
    cfg = SearchConfig(prepared=prepared, out=str(run_dir), space=load_space(args.space),
                       verbose=0 if args.quiet else 1, **values)
    return cfg, False


def _saved_config(run_dir: Path, storage: str | None) -> SearchConfig:
    """The sweep's saved config: from RUN, else from --storage (a new head, an empty RUN)."""
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


def _checked_prepared(prepared: str) -> str:
    """PREPARED as the sweep records it: a folder's absolute path, or the URI as given (s3://,
    gs://, file://); CxrError if it holds no manifest.json."""
    from cxr_datasets.shards import MANIFEST

    where = Location.of(prepared)
    if where.child(MANIFEST).kind() != "file":
        raise CxrError(f"{prepared} is not a prepared data set (no {MANIFEST}): run `cxr prepare` first")
    return where.uri if where.is_uri else str(Path(prepared).resolve())


def handle_demo(args) -> int:
    from cxr_search.demo import run_demo

    return run_demo(Path(args.out), overwrite=args.overwrite)
