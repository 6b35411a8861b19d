"""`cxr synth` and `cxr prepare`: the data stage's subcommands (wired in by search/cli.py).

    cxr synth data/synth --n 600 --seed 0
    cxr prepare data/synth runs/prepared --image-size 224 --format both
"""
from __future__ import annotations

import argparse

from .config import FORMATS, RESIZE_MODES, SPLIT_MODES, PrepareConfig

_DEFAULTS = PrepareConfig()

SYNTH_EPILOG = """example:
  cxr synth data/synth --n 600 --seed 0      # ~5 s; Kaggle layout under data/synth/chest_xray/
  cxr prepare data/synth runs/prepared
"""

PREPARE_EPILOG = """examples:
  cxr prepare ~/Downloads/chest_xray runs/prepared                  # the unzipped Kaggle archive
  cxr prepare data/synth runs/prepared --image-size 64 --overwrite  # small, quick
  cxr prepare hospital_export runs/hosp --split random --test-fraction 0.2 --format both

SOURCE holds {train,val,test}/{NORMAL,PNEUMONIA}/ at any depth, or NORMAL/ and PNEUMONIA/ only.
OUT gets <split>/part-*.parquet, manifest.json (counts, class weights, rejected files, checksums)
and eda/ (plots, summary.md). Bad files are rejected with a reason, never fatal.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_synth(subparsers)
    _add_prepare(subparsers)


def _add_synth(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="write a synthetic chest-X-ray-like data set (Kaggle layout)",
        description="Write synthetic chest-X-ray-like JPEGs in the Kaggle layout: real-like sizes "
                    "and names, ~1:3 NORMAL:PNEUMONIA, patchy opacities in PNEUMONIA lungs.",
        epilog=SYNTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT", help="folder to create (OUT/chest_xray/...)")
    parser.add_argument("--n", type=int, default=600, help="number of images (default: 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.set_defaults(func=_run_synth)


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="decode, split by patient and shard a chest X-ray folder (Ray Data)",
        description="Turn a chest X-ray folder into patient-split, checksummed Parquet/TFRecord "
                    "shards with a manifest and EDA plots, decoding in parallel with Ray Data.",
        epilog=PREPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="folder with the images")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--image-size", type=int, default=_DEFAULTS.image_size,
                        help="side of the square output images in pixels (default: %(default)s)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default=_DEFAULTS.resize,
                        help="pad: letterbox, keeps the aspect ratio (default); crop: centre "
                             "crop; squash: stretch")
    parser.add_argument("--split", choices=SPLIT_MODES, default=_DEFAULTS.split,
                        help="official: keep the source's test split, carve val from train by "
                             "patient (default); random: split all patients by fraction")
    parser.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction,
                        help="share of train patients per class moved to val (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=_DEFAULTS.test_fraction,
                        help="share of patients per class for test when the source has no test "
                             "split or with --split random (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed,
                        help="seed of the patient shuffles (default: %(default)s)")
    parser.add_argument("--rows-per-shard", type=int, default=_DEFAULTS.rows_per_shard,
                        help="images per shard file (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default=_DEFAULTS.format,
                        help="shard format; tfrecord/both also write tf.train.Example files "
                             "(default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=_DEFAULTS.max_pixels,
                        help="reject larger images as decompression bombs (default: %(default)s)")
    parser.add_argument("--min-size", type=int, default=_DEFAULTS.min_size,
                        help="reject images whose shorter side is smaller (default: %(default)s)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray instance (default: all; ignored when joining "
                             "a running Ray: under `ray job submit` or with RAY_ADDRESS set)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=_run_prepare)


def _run_synth(args: argparse.Namespace) -> int:
    from .synth import synth

    out = synth(args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.n} synthetic images to {out}/chest_xray (seed {args.seed})")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from .pipeline import run, summary_line

    cfg = PrepareConfig(
        image_size=args.image_size, resize=args.resize, split=args.split,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        rows_per_shard=args.rows_per_shard, format=args.format, max_pixels=args.max_pixels,
        min_size=args.min_size, num_cpus=args.num_cpus,
    )
    manifest = run(args.source, args.out, cfg, overwrite=args.overwrite, verbose=not args.quiet)
    if args.quiet:  # the one-line summary is the result, not progress: always print it
        print(summary_line(manifest, args.out))
    return 0
