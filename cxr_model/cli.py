"""`cxr train`, `cxr evaluate` and `cxr predict`: one model, from prepared data to predictions on files.

    cxr train runs/prepared --out runs/model --head-units 512,128 --epochs 10
    cxr evaluate runs/model runs/prepared --split test
    cxr predict runs/model scans/ --out preds.csv --gradcam heatmaps/

`search/main.py` calls `register(subparsers)`; each handler returns the exit code. The work itself is
in `cxr_model.finalize` and `cxr_model.predict`, so the search reuses it instead of this module.
Each handler imports its own work (pandas, and Keras in turn): every `cxr` command builds the
whole parser, and `cxr prepare` should not load what `cxr train` needs (see search/main.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from cxr_datasets import read_manifest
from cxr_datasets.cli import given, with_default
from cxr_datasets.errors import CxrError
from cxr_model.config import (
    EXPORT_FORMATS,
    HEAD_POOLINGS,
    THRESHOLD_METHODS,
    VGG16_BLOCKS,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    check_formats,
)
from cxr_model.evaluate import format_metrics
from cxr_model.export import json_safe

TRAIN_EPILOG = """example:
  cxr train runs/prepared --out runs/model --head-units 512,128 --dropout 0.3 --epochs 10
  cxr train runs/prepared --out runs/tiny --weights none --epochs 2 --threshold-method sensitivity

Trains one configuration on train, stops early on validation AUC, chooses the decision threshold
on validation, evaluates once on test at that threshold, and exports model.keras, model_card.json,
metrics.json and plots/ to --out."""
EVALUATE_EPILOG = """example:
  cxr evaluate runs/model runs/prepared --split test

Scores an exported model at the threshold stored in its model card (never re-tuned)."""
PREDICT_EPILOG = """example:
  cxr predict runs/model scans/ extra.dcm --out preds.csv --gradcam heatmaps/

Folders are searched recursively for .jpeg .jpg .png .dcm files. Each file is preprocessed exactly
as `cxr prepare` did for training. CSV columns, one row per file:
  path         the file
  p_pneumonia  P(PNEUMONIA) from the model, in [0, 1] (empty when the file could not be read)
  label        PNEUMONIA when p_pneumonia >= threshold, else NORMAL
  threshold    the model card's decision threshold (chosen on validation at export)
  error        why the file could not be read (empty when it was)
  gradcam      the heatmap overlay PNG (with --gradcam only)
A file that cannot be read gets a row with its error and the others go on (exit 0); when no file
could be read at all, the table is still written and the exit code is 2."""


def register(subparsers) -> None:
    from cxr_model.serve import register as add_serve  # `cxr serve` lives with its server

    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_predict(subparsers)
    add_serve(subparsers)


# ----------------------------------------------------------------------------- parsers


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train, evaluate and export one configuration",
                              epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", metavar="PREPARED",
                   help="folder written by `cxr prepare`, or its pyarrow.fs URI (s3://, gs://, file://)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="export folder to create")
    m = p.add_argument_group("model")
    m.add_argument("--head-units", type=_int_list, metavar="N[,N...]",
                   help=with_default("dense layers of the head, e.g. 256 or 512,128", ModelConfig, "head_units"))
    m.add_argument("--head-pooling", choices=HEAD_POOLINGS,
                   help=with_default("how the base's feature map enters the head", ModelConfig, "head_pooling"))
    m.add_argument("--dropout", type=float, help=with_default("dropout after each dense layer", ModelConfig, "dropout"))
    m.add_argument("--aug-strength", type=float,
                   help=with_default("augmentation strength in [0, 1]; 0 disables it", ModelConfig, "aug_strength"))
    m.add_argument("--hflip", action="store_true", default=None,
                   help="also flip horizontally (off by default: a mirrored chest puts the heart on the right)")
    m.add_argument("--trainable-blocks", type=int, choices=range(VGG16_BLOCKS + 1), metavar=f"0-{VGG16_BLOCKS}",
                   help=with_default("VGG16 conv blocks to fine-tune, from the top; 0 = frozen base", ModelConfig,
                                     "trainable_blocks"))
    m.add_argument("--weights", metavar="imagenet|none|PATH",
                   help=with_default("VGG16 base weights: ImageNet (downloaded once), none (random), or a local file",
                                     ModelConfig, "weights"))
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, help=with_default("Adam learning rate", TrainConfig, "lr"))
    t.add_argument("--epochs", type=int, help=with_default("maximum epochs", TrainConfig, "epochs"))
    t.add_argument("--batch-size", type=int, help=with_default("images per step", TrainConfig, "batch_size"))
    t.add_argument("--patience", type=int,
                   help=with_default("epochs without val AUC gain before stopping", TrainConfig, "patience"))
    t.add_argument("--label-smoothing", type=float,
                   help=with_default("cross-entropy target smoothing in [0, 0.5)", TrainConfig, "label_smoothing"))
    t.add_argument("--seed", type=int, help=with_default("weights, batch order, dropout", TrainConfig, "seed"))
    e = p.add_argument_group("threshold and export")
    _add_eval_options(e, threshold=True)
    e.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    add_formats_option(e)
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.set_defaults(func=_train)


def add_formats_option(group) -> None:
    """--formats, for `cxr train` and `cxr search`."""
    group.add_argument("--formats", metavar="LIST",
                       help="model files to export, comma-separated: keras (always; what cxr predict, serve "
                            "and evaluate load), saved_model, onnx; `keras` alone skips the ~20 s TensorFlow "
                            f"conversion (default: {','.join(EXPORT_FORMATS)})")


def _add_eval_options(group, threshold: bool) -> None:
    if threshold:
        group.add_argument("--threshold-method", choices=THRESHOLD_METHODS,
                           help=with_default("on validation: Youden's J, or the best specificity at "
                                             "--target-sensitivity", EvalConfig, "threshold_method"))
        group.add_argument("--target-sensitivity", type=float,
                           help=with_default("for --threshold-method sensitivity", EvalConfig, "target_sensitivity"))
    group.add_argument("--n-boot", type=int,
                       help=with_default("bootstrap resamples for the 95% intervals", EvalConfig, "n_boot"))


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="metrics of an exported model on a prepared split",
                              epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="export folder (cxr train / cxr search)")
    p.add_argument("prepared", metavar="PREPARED",
                   help="folder written by `cxr prepare`, or its pyarrow.fs URI (s3://, gs://, file://)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="(default: test)")
    _add_eval_options(p, threshold=False)
    p.add_argument("--json", action="store_true",
                   help="print the metrics as JSON (value, ci_low, ci_high per metric; n, threshold, "
                        "confusion_matrix) instead of a table")
    p.add_argument("--no-verify", action="store_true",
                   help="use model.keras even if its sha256 is not the one in model_card.json")
    p.set_defaults(func=_evaluate)


def _add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="P(PNEUMONIA) for image files, at the model card's threshold",
                              epilog=PREDICT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="export folder (cxr train / cxr search)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", metavar="CSV", help="write the table here (default: print it)")
    p.add_argument("--gradcam", metavar="DIR", help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="(default: 32)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines (files done / total, rate, ETA) on stderr")
    p.add_argument("--no-verify", action="store_true",
                   help="use model.keras even if its sha256 is not the one in model_card.json")
    p.set_defaults(func=_predict)


# ----------------------------------------------------------------------------- handlers


def _train(args) -> int:
    from cxr_model.finalize import train_and_export
    from cxr_model.train import EpochProgress  # Keras: loaded here, as the training needs it anyway

    cfg = _train_config(args)
    ev = EvalConfig(**given(args, EvalConfig))
    formats = check_formats(args.formats or EXPORT_FORMATS)  # before training, not after
    progress = [] if args.quiet else [EpochProgress(cfg.epochs)]
    result = train_and_export(cfg, args.prepared, args.out, threshold_method=ev.threshold_method,
                              target_sensitivity=ev.target_sensitivity, n_boot=ev.n_boot,
                              overwrite=args.overwrite, formats=formats, callbacks=progress)
    print(format_metrics(result["metrics"]))
    print(f"threshold {result['threshold']:.4f} ({ev.threshold_method}, chosen on val); "
          f"exported to {result['model_dir']}")
    return 0


def _evaluate(args) -> int:
    from cxr_model.finalize import evaluate_export

    result = evaluate_export(args.model_dir, args.prepared, split=args.split,
                             n_boot=EvalConfig(**given(args, EvalConfig)).n_boot, verify=not args.no_verify)
    if args.json:
        print(json.dumps({args.split: json_safe(result["metrics"])}, indent=2, allow_nan=False))
    else:
        print(format_metrics({args.split: result["metrics"]}))
    if not result["same_data"]:
        print(f"note: {args.prepared} is not the prepared data this model was exported with "
              "(manifest hash differs)", file=sys.stderr)
    return 0


def _predict(args) -> int:
    from cxr_model.predict import FileProgress, predict_paths

    table = predict_paths(args.model_dir, args.paths, batch_size=args.batch_size, gradcam_dir=args.gradcam,
                          progress=None if args.quiet else FileProgress(), verify=not args.no_verify)
    if args.out:
        table.to_csv(args.out, index=False)
    else:
        table.to_csv(sys.stdout, index=False)
    n_bad = int(table["error"].notna().sum())
    where = f" -> {args.out}" if args.out else ""
    if len(table) and n_bad == len(table):
        raise CxrError(f"none of the {n_bad} input file(s) could be read (see the error column{where})")
    print(f"{len(table) - n_bad} predicted, {n_bad} unreadable{where}", file=sys.stderr)
    return 0


def _train_config(args) -> TrainConfig:
    """TrainConfig from the flags given, at the prepared data's image size (ConfigError if bad)."""
    image_size = int(read_manifest(args.prepared)["options"]["image_size"])
    model = ModelConfig(**{**given(args, ModelConfig), "image_size": image_size})
    return TrainConfig(**{**given(args, TrainConfig), "model": model})


def _int_list(text: str) -> tuple[int, ...]:
    try:
        units = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        units = ()
    if not units or min(units) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return units


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
