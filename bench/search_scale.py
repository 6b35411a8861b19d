"""Benchmark: the memory of `cxr search`'s driver at scale, on this machine.

    .venv/bin/python bench/search_scale.py data      # 200,000 images at 64 px, 2 trials, 1 epoch
    .venv/bin/python bench/search_scale.py trials    # a 200-trial sweep of a tiny model
    .venv/bin/python bench/search_scale.py data --cxr /other/checkout/.venv/bin/cxr   # compare

`data`: `cxr search` (2 trials, 1 epoch, `--weights none`, frozen base) on bench/prepare_scale.py's
200,000 JPEGs prepared at 64 px (prepared once under bench/out/). The driver is the `cxr` process;
its RSS (resident pages: its heap, the libraries it loaded, and any object-store pages it
touched) is sampled every 0.2 s from /proc. The driver's work on the data (loading train + val and handing them to the trials) is done
before the first trial reports; the trials' VGG16 features of ~180,000 images take ~20 min a trial
on these 2 cores, so the run is stopped with SIGINT (Ctrl-C: the driver writes its results and
exits) `--seconds` after the trials started. Printed: the driver's peak RSS, its RSS before it read
the data (Ray and Tune started), the train + val pixels, and the ratio peak / pixels (goal <= ~1.5).

`trials`: 200 trials of 1 epoch on the demo's tiny data (120 synthetic images, 32 px, cached
features), 2 at a time, in this process; a Tune callback prints this driver's RSS after 20 and
after 200 completed trials, and the run folder's disk use. Goal: < 10% growth.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rss_mib  # noqa: E402
from prepare_scale import BENCH_DIR, source  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def du_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def prepared(n: int) -> Path:
    import cxr_datasets

    out = BENCH_DIR / f"search-n{n}-prepared"
    if not (out / "manifest.json").is_file():
        print(f"preparing {n} images at 64 px into {out} (once) ...", flush=True)
        cxr_datasets.prepare(source(n), out, image_size=64, overwrite=True, verbose=False)
    return out


def data_part(args) -> int:
    folder = prepared(args.n)
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = sum(s["rows"] for s in manifest["shards"] if s["split"] in ("train", "val")
               and s.get("format", "parquet") == "parquet")
    pixels_mib = rows * 64 * 64 / 2**20
    run = Path(tempfile.mkdtemp(prefix="cxr-search-scale-"))
    cmd = [args.cxr, "search", str(folder), "--out", str(run / "run"), "--trials", "2",
           "--max-epochs", "1", "--weights", "none", "--concurrency", "2", "--quiet"]
    print(f"{rows} train + val images at 64 px: {pixels_mib:.0f} MiB of pixels; {' '.join(cmd)}",
          flush=True)
    log = run / "cxr.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    peak, started, samples, at_start, stopped_at = 0.0, None, [], 0.0, None
    begin = time.monotonic()
    while proc.poll() is None:
        try:
            now = rss_mib(proc.pid)
        except OSError:
            break
        peak = max(peak, now)
        samples.append((time.monotonic() - begin, now))
        if started is None and list((run / "run" / "tune").glob("trial_*")):  # Tune made the trials
            started = time.monotonic()
            at_start = now
        if started is not None and time.monotonic() - started > args.seconds:
            proc.send_signal(signal.SIGINT)
            started, stopped_at = float("inf"), time.monotonic() - begin
        time.sleep(0.2)
    proc.wait()
    before_stop = max((r for t, r in samples if stopped_at is None or t < stopped_at), default=0.0)
    print(f"driver: peak RSS {peak:.0f} MiB ({before_stop:.0f} MiB before the SIGINT), "
          f"{at_start:.0f} MiB when the trials started; "
          f"{len(samples)} samples over {samples[-1][0] if samples else 0:.0f} s; exit {proc.returncode}")
    print("cxr's last lines: " + " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]))
    print(f"ratio driver peak RSS / train+val pixels: {peak / pixels_mib:.2f}")
    shutil.rmtree(run, ignore_errors=True)
    return 0


def trials_part(args) -> int:
    import resource

    from common import synthetic_source
    from ray import tune

    import cxr_datasets
    from cxr_model.quiet import init_tensorflow_quietly
    from cxr_search.config import SearchConfig
    from cxr_search.run import run_search

    folder = BENCH_DIR / "search-trials"
    data = folder / "prepared"
    if not (data / "manifest.json").is_file():
        cxr_datasets.prepare(synthetic_source(folder / "source", n=120), data, image_size=32,
                             overwrite=True, verbose=False)
    init_tensorflow_quietly()  # as `cxr search` does: this process exports the best model
    run = Path(tempfile.mkdtemp(prefix="cxr-search-trials-"))
    marks = sorted({1, 20, args.trials // 2, args.trials})
    seen: dict[int, float] = {}

    class Watch(tune.Callback):
        """In the driver: its RSS when the 1st, 20th, ... trial ended."""

        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            done = self.done
            if done in marks:
                seen[done] = rss_mib()
                print(f"  {done} trials done: driver RSS {seen[done]:.0f} MiB", flush=True)

    cfg = SearchConfig(prepared=str(data), out=str(run / "run"), trials=args.trials, max_epochs=1,
                       concurrency=2, cpus_per_trial=1, weights=None, seed=0, verbose=0)
    print(f"{args.trials} trials x 1 epoch, 32 px, 120 images, cached features, 2 at a time ...",
          flush=True)
    start = time.perf_counter()
    summary = run_search(cfg, callbacks=[Watch()])
    wall = time.perf_counter() - start
    table = summary["table"]
    after = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(table)} trials ({int((table['status'] == 'ERROR').sum())} errored) in {wall:.0f} s; "
          f"driver RSS after the export {after:.0f} MiB, peak {peak:.0f} MiB")
    disk = du_mib(run)
    print(f"disk: run folder {disk:.1f} MiB ({disk / len(table) * 1024:.0f} KiB a trial), "
          f"of which checkpoints {sum(du_mib(p) for p in run.rglob('checkpoint_*')):.1f} MiB in "
          f"{len(list(run.rglob('checkpoint_*')))} folders")
    first, last = min(m for m in seen if m >= 20), max(seen)
    print(f"ratio driver RSS after {last} / after {first} trials: {seen[last] / seen[first]:.3f} "
          f"(+{seen[last] - seen[first]:.0f} MiB, {(seen[last] - seen[first]) / (last - first) * 1024:.0f} "
          f"KiB a trial)")
    shutil.rmtree(run, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["data", "trials"])
    parser.add_argument("--n", type=int, default=200_000, help="images (data)")
    parser.add_argument("--seconds", type=float, default=60,
                        help="data: stop this long after the trials started")
    parser.add_argument("--cxr", default=str(VENV_BIN / "cxr"), help="data: the cxr program to run")
    parser.add_argument("--trials", type=int, default=200, help="trials (trials)")
    args = parser.parse_args(argv)
    return data_part(args) if args.part == "data" else trials_part(args)


if __name__ == "__main__":
    sys.exit(main())
