"""Benchmark: the `cxr prepare` driver's peak memory does not grow with the data.

    .venv/bin/python bench/prepare_memory.py                 # 2,000 vs 8,000 synthetic images
    .venv/bin/python bench/prepare_memory.py --small 200 --large 800   # a quick check

Each size runs `cxr_datasets.prepare` (224 px, the default) in a fresh process on a local Ray instance
and reads that process's own peak resident memory (`ru_maxrss`; Ray's workers and object store are
other processes, and hold the pixels). The synthetic images (the small default `cxr synth` kind:
the decode cost is not what this measures) are generated once under bench/out/. Goal: the large
run's peak is less than 10% above the small one's, though it has 4x the images (~400 MB of
decoded pixels at 8,000; a driver that gathered them would grow by that much). Prints both
peaks and, last, their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import synthetic_source  # bench/common.py, beside this script

BENCH_DIR = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys
import cxr_datasets
manifest = cxr_datasets.prepare(sys.argv[1], sys.argv[2], overwrite=True, verbose=False,
                            num_cpus=int(sys.argv[3]))
accepted = sum(sum(c.values()) for c in manifest["counts"].values())
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "accepted": accepted, "elapsed_s": manifest["elapsed_s"]}))
"""


def peak_rss(n: int, cpus: int) -> dict:
    source = synthetic_source(BENCH_DIR / f"synth-n{n}-seed0", n)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(BENCH_DIR / f"mem-out-{n}"),
                           str(cpus)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"prepare of {n} images failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=8000)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args(argv)
    small = peak_rss(args.small, args.cpus)
    large = peak_rss(args.large, args.cpus)
    for n, run in ((args.small, small), (args.large, large)):
        print(f"{n} images: driver peak RSS {run['peak_mib']:.0f} MiB "
              f"({run['accepted']} accepted, {run['elapsed_s']:.1f} s)")
    print(f"peak RSS ratio {args.large}/{args.small}: {large['peak_mib'] / small['peak_mib']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
