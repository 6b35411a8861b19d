"""Benchmark: `cxr prepare` (Ray Data, streaming; JPEG draft mode) against a naive one-process loop.

    .venv/bin/python bench/prepare.py                   # 5,856 real originals (the Kaggle set's size)
    .venv/bin/python bench/prepare.py --n 1264          # the smaller size the target is stated for
    .venv/bin/python bench/prepare.py --synthetic       # synthetic 1-3 MP chest X-rays instead
    .venv/bin/python bench/prepare.py --n 100           # a quick check that it runs
    .venv/bin/python bench/prepare.py --warm-ray        # joins a running Ray, as on a cluster
    .venv/bin/python bench/prepare.py --n 1264 --originals ~/data/chest_xray   # your own originals

Real originals (the default): the ten real Kermany et al. images in tests/data/chest_xray/, each
copied N/10 times with distinct bytes appended after the JPEG end marker (decoders stop at the
marker, so the pixels are the real ones, but every copy has its own sha256 and is no duplicate)
and a real-style name of its own (person<N>_bacteria_<k>.jpeg, IM-<N>-0001.jpeg,
NORMAL2-IM-<N>-0001.jpeg), in the Kaggle layout with ~11% of the patients in test/. Generated
once under bench/out/. These ten average 0.85 MP, the real set 1.79 MP: the naive loop is faster
on them, and the ratio lower, than on the real data. With `--originals DIR` (e.g. the Kaggle
download) the JPEGs under DIR are the originals instead, each in a NORMAL or PNEUMONIA folder. Both sides start from the same files and end with 224 px grayscale images
on disk:
- naive: one process; for each file Pillow open -> convert("L") -> resize -> save PNG;
- prepare: the `cxr prepare` command end to end, in its own process: Python start and imports,
  Ray start-up and shut-down, hashing, splits, shards, manifest and EDA plots included, on a local
  Ray instance with `--cpus` CPUs (with --warm-ray an instance is started before the clock and
  the command joins it through RAY_ADDRESS, as under `ray job submit` on a cluster).
Targets on a 2-core machine, on real originals: >= 3x at 5,856 files and >= 2x at 1,264. The line
before the ratio splits `cxr prepare`'s time into its stages (manifest `stage_s`). The last line
is the end-to-end ratio.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import synthetic_source  # bench/common.py, beside this script
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent / "out"
REAL_SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "chest_xray"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = cached_images(args.n, args.seed) if args.synthetic else \
        real_copies(args.n, args.originals)
    files = sorted(source.rglob("*.jpeg"))
    megapixels = sum(_pixels(f) for f in files) / len(files) / 1e6
    kind = "synthetic" if args.synthetic else "real-original"
    print(f"{len(files)} {kind} JPEGs, mean {megapixels:.2f} MP, {args.cpus} CPUs, "
          f"{args.image_size} px")

    naive_s = time_naive(files, BENCH_DIR / "naive_out", args.image_size)
    print(f"naive img/s:     {len(files) / naive_s:7.1f}  ({naive_s:.1f} s)")
    # Untimed: the naive loop's PNGs still in the page cache are written back now, not while
    # `cxr prepare` runs (neither side's clock includes writing its output to the disk).
    os.sync()
    address = None
    if args.warm_ray:
        import ray

        address = ray.init(num_cpus=args.cpus, include_dashboard=False,
                           logging_level="warning").address_info["address"]
    prepare_s, manifest = time_prepare(source, BENCH_DIR / "prepared", args.image_size, args.cpus,
                                       address)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in manifest["stage_s"].items())
    print(amortisation(len(files), naive_s, prepare_s, manifest["stage_s"]["decode_and_write"]))
    print(f"cxr stages (s):  {stages}")
    print(f"cxr img/s:       {len(files) / prepare_s:7.1f}  ({prepare_s:.1f} s end to end)")
    print(f"speed-up: {naive_s / prepare_s:.2f}x")
    return 0


def amortisation(n: int, naive_s: float, prepare_s: float, decode_s: float) -> str:
    """What the end-to-end figure is made of: the time outside the decode-and-write stage
    (process start, Ray start, the hashing pass, EDA, ...) and that stage's own rate (its
    streaming pass reads, decodes and writes the shards). It also holds the start of Ray Data's
    execution, so at small N its rate understates the per-image speed; compare runs at several N
    (README) rather than extrapolating from one."""
    fixed_s = prepare_s - decode_s
    per_image = (n / decode_s) / (n / naive_s) if decode_s > 0 else float("nan")
    return (f"outside the decode-and-write stage: {fixed_s:.1f} s; that stage: {n} files at "
            f"{n / max(decode_s, 1e-9):.1f} img/s = {per_image:.2f}x the naive loop per image")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5856,
                        help="number of images (default: 5856, the Kaggle set's size)")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic 1-3 MP chest X-rays instead of copies of the real originals")
    parser.add_argument("--originals", type=Path, default=REAL_SAMPLES,
                        help="folder whose JPEGs are copied (default: the ten real samples in "
                             "tests/data/chest_xray)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray (default: 2)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-ray", action="store_true",
                        help="start Ray before timing (prepare then reuses it)")
    return parser.parse_args(argv)


def cached_images(n: int, seed: int) -> Path:
    """Synthetic chest X-rays of 1-3 MP in the Kaggle layout, generated on first use only."""
    from cxr_datasets.synth import SynthConfig

    big = SynthConfig(normal_height=(950, 1450), pneumonia_height=(950, 1400),
                      aspect=(1.1, 1.45), max_side=2100)  # ~1-3 MP, like the real set
    return synthetic_source(BENCH_DIR / f"images-n{n}-seed{seed}", n, seed, config=big)


def real_copies(n: int, source: Path = REAL_SAMPLES) -> Path:
    """`n` copies of the originals under `source` (see the module docstring), made on first
    use."""
    source = source.expanduser().resolve()
    tag = "" if source == REAL_SAMPLES.resolve() else \
        "-" + hashlib.sha256(str(source).encode()).hexdigest()[:8]
    folder = BENCH_DIR / f"real-n{n}{tag}"
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    originals = sorted(p for p in source.rglob("*.jpeg")
                       if p.parent.name in ("NORMAL", "PNEUMONIA") and not p.name.startswith("."))
    if not originals:
        raise SystemExit(f"no JPEGs in NORMAL or PNEUMONIA folders under {source}")
    print(f"copying {len(originals)} real originals to {n} files in {folder} (once) ...", flush=True)
    for number in range(n):
        original = originals[number % len(originals)]
        label = original.parent.name
        split = "test" if number % 9 == 0 else "train"  # each copy is its own patient: ~11% test
        name = _real_style_name(number, label, original.name)
        target = folder / "chest_xray" / split / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # After the end-of-image marker: ignored by every decoder, different sha256 per copy.
        target.write_bytes(original.read_bytes() + f"cxr-bench-copy-{number}".encode())
    done.touch()
    return folder


def _real_style_name(number: int, label: str, original: str) -> str:
    if label == "PNEUMONIA":
        kind = "virus" if "virus" in original else "bacteria"
        return f"person{number + 1}_{kind}_{number + 1}.jpeg"
    prefix = "NORMAL2-IM" if original.startswith("NORMAL2") else "IM"
    return f"{prefix}-{number + 1:04d}-0001.jpeg"


def time_naive(files: list[Path], out: Path, image_size: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    for number, path in enumerate(files):
        with Image.open(path) as image:
            image.convert("L").resize((image_size, image_size)).save(out / f"{number:06d}.png")
    return time.perf_counter() - start


def time_prepare(source: Path, out: Path, image_size: int, cpus: int,
                 address: str | None = None) -> tuple[float, dict]:
    """`cxr prepare` as a user runs it: a new process, its imports included. With `address`, it
    joins that Ray instance (RAY_ADDRESS, as under `ray job submit`) instead of starting one."""
    command = [sys.executable, "-m", "cxr_search.main", "prepare", str(source), str(out), "--overwrite",
               "--quiet", "--image-size", str(image_size), "--num-cpus", str(cpus)]
    env = dict(os.environ, RAY_ADDRESS=address) if address else \
        {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cxr prepare failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed, json.loads((out / "manifest.json").read_text())


def _pixels(path: Path) -> int:
    with Image.open(path) as image:
        return image.size[0] * image.size[1]


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    sys.exit(main())
