"""The `cxr` command line: one entry point, a subcommand per stage.

    cxr synth data/synth                       # a synthetic Kaggle-layout data set
    cxr prepare data/synth runs/prepared       # Ray Data: decode, grayscale, resize, shard
    cxr train runs/prepared --out runs/model   # one configuration, evaluated and exported
    cxr search runs/prepared --out runs/sweep  # Ray Tune + Optuna sweep, best model on test
    cxr predict runs/sweep/best x.jpeg         # P(PNEUMONIA) at the model card's threshold

Each package registers its own subcommands; this module only wires them and turns a `CxrError`
into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from importlib import metadata

from cxr_datasets import cli as data_cli
from cxr_datasets.errors import CxrError
from cxr_model import cli as model_cli
from cxr_model.quiet import init_tensorflow_quietly
from cxr_search import cli as search_cli

EXAMPLES = __doc__.split("\n\n")[1]
# Commands that never import Keras, or (search) only late: a sweep's driver starts TensorFlow for
# the best model's export (search/run.py) or to check --weights, and holds ~0.6 GB less meanwhile.
NO_TENSORFLOW = {"synth", "prepare", "search"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr",
        description="Distributed hyperparameter search for pneumonia classification on chest X-rays.",
        epilog="examples:\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_cli.register(sub)
    model_cli.register(sub)
    search_cli.register(sub)
    return parser


def _version() -> str:
    try:
        return metadata.version("cxr-tune")
    except metadata.PackageNotFoundError:  # run from a checkout that was not pip-installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    # Quiets TensorFlow's C++ logging once it is set up; the lines it prints before that, at
    # import and device start-up, are dropped by init_tensorflow_quietly (cxr_model/quiet.py).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    if args.command not in NO_TENSORFLOW:
        init_tensorflow_quietly()
    try:
        return int(args.func(args) or 0)
    except CxrError as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The `cxr` program (the console script, `python -m cxr_search.main`): `main`, then a quick
    exit. Python's final garbage collection walks every object of the ~1,700 modules that a
    `cxr prepare` has loaded by then (Ray, pandas, pyarrow, matplotlib): ~0.3 s of a ~5 s command,
    measured. Nothing here relies on it (files are closed and Ray is shut down by then, and the
    finalizers of cyclic garbage are not guaranteed to run at exit anyway), so what is alive now
    is frozen out of it. Not part of `main`, which tests call in their own process."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
