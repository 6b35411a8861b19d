"""`cxr synth` and `cxr prepare`: the data stage's subcommands (wired in by search/main.py), and the
one pattern all three CLIs use for options that set a config field.

    cxr synth data/synth --n 600 --seed 0
    cxr prepare data/synth runs/prepared --image-size 224 --format both

An option that sets a field of a config dataclass has that field's name as its `dest` and
`default=None` (not given); its help shows the dataclass's default (`with_default`); the handler
passes only the options given to the dataclass (`given`), which fills in the rest and validates.
The dataclass is thus the only place a default lives, and a `--resume` or `--smoke` can tell what
the user actually typed.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .config import FORMATS, LABEL_FORMATS, NEGATIVES, RESIZE_MODES, SPLIT_MODES, UNCERTAIN, VIEWS, PrepareConfig
from .synth import synth


def with_default(text: str, cls: type, name: str) -> str:
    """`text (default: D)`, D read from the field `name` of the dataclass `cls`."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[operator]  # no default: the field has a factory
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f"{text} (default: {'none' if value is None else value})".replace("%", "%%")


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of `args` that the user gave, for the fields of the dataclass `cls`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


SYNTH_EPILOG = """example:
  cxr synth data/synth --n 600 --seed 0      # ~5 s; Kaggle layout under data/synth/chest_xray/
  cxr prepare data/synth runs/prepared
"""

PREPARE_EPILOG = """examples:
  cxr prepare ~/Downloads/chest_xray runs/prepared                  # the unzipped Kaggle archive
  cxr prepare data/synth runs/prepared --image-size 64 --overwrite  # small, quick
  cxr prepare hospital_export runs/hosp --split random --test-fraction 0.2 --format both
  cxr prepare rsna runs/rsna --labels rsna/stage_2_train_labels.csv        # a labelled archive

SOURCE holds {train,val,test}/{NORMAL,PNEUMONIA}/ at any depth, or NORMAL/ and PNEUMONIA/ only;
with --labels FILE, the labels come from the archive's label file instead (docs/ARCHIVES.md).
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
    parser.add_argument("--image-size", type=int,
                        help=with_default("side of the square output images in pixels", PrepareConfig, "image_size"))
    parser.add_argument("--resize", choices=RESIZE_MODES,
                        help=with_default("pad: letterbox, keeps the aspect ratio; crop: centre crop; "
                                          "squash: stretch", PrepareConfig, "resize"))
    parser.add_argument("--split", choices=SPLIT_MODES,
                        help=with_default("official: keep the source's test split, carve val from train by "
                                          "patient; random: split all patients by fraction", PrepareConfig, "split"))
    parser.add_argument("--val-fraction", type=float,
                        help=with_default("share of train patients per class moved to val", PrepareConfig,
                                          "val_fraction"))
    parser.add_argument("--test-fraction", type=float,
                        help=with_default("share of patients per class for test when the source has no test "
                                          "split or with --split random", PrepareConfig, "test_fraction"))
    parser.add_argument("--seed", type=int,
                        help=with_default("seed of the patient shuffles", PrepareConfig, "seed"))
    parser.add_argument("--rows-per-shard", type=int,
                        help="the most rows of a split in a shard file, one task of the second pass "
                             "(default: 1024, fewer below ~65,000 images so that there are at least "
                             "64 shards of at least 128 rows, and above 256 px so that a shard holds "
                             "at most 64 MiB of pixels)")
    parser.add_argument("--format", choices=FORMATS,
                        help=with_default("shard format; tfrecord/both also write tf.train.Example files",
                                          PrepareConfig, "format"))
    parser.add_argument("--max-pixels", type=int,
                        help=with_default("reject larger images as decompression bombs", PrepareConfig,
                                          "max_pixels"))
    parser.add_argument("--min-size", type=int,
                        help=with_default("reject images whose shorter side is smaller", PrepareConfig,
                                          "min_size"))
    parser.add_argument("--num-cpus", type=int,
                        help="CPUs of the local Ray instance (default: all; ignored when joining "
                             "a running Ray: under `ray job submit` or with RAY_ADDRESS set)")
    parser.add_argument("--labels", metavar="FILE",
                        help="label file instead of NORMAL/PNEUMONIA folders: path,label[,patient_id]"
                             "[,split] CSV, RSNA, NIH ChestX-ray14 or CheXpert (docs/ARCHIVES.md)")
    parser.add_argument("--labels-format", choices=LABEL_FORMATS,
                        help="force the label file's format (default: detected from its header)")
    parser.add_argument("--negatives", choices=NEGATIVES,
                        help=with_default("all: images that are neither normal nor pneumonia "
                                          "(RSNA, NIH, CheXpert) count as NORMAL", PrepareConfig, "negatives"))
    parser.add_argument("--uncertain", choices=UNCERTAIN,
                        help=with_default("CheXpert's uncertain Pneumonia: ignore (excluded), zeros, "
                                          "ones", PrepareConfig, "uncertain"))
    parser.add_argument("--views", choices=VIEWS,
                        help=with_default("CheXpert views", PrepareConfig, "views"))
    parser.add_argument("--follow-links", action="store_true", default=None,
                        help=with_default("read symbolic links to files outside SOURCE (else rejected with a "
                                          "reason)", PrepareConfig, "follow_links"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=_run_prepare)


def _run_synth(args: argparse.Namespace) -> int:
    out = synth(args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.n} synthetic images to {out}/chest_xray (seed {args.seed})")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from .prepare_dataset import run, summary_line

    cfg = PrepareConfig(**given(args, PrepareConfig))
    manifest = run(args.source, args.out, cfg, overwrite=args.overwrite, verbose=not args.quiet)
    if args.quiet:  # the one-line summary is the result, not progress: always print it
        print(summary_line(manifest, args.out))
    return 0
