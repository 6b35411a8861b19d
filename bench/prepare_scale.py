"""Benchmark: `cxr prepare` at scale, 20,000 and 200,000 small JPEGs, on this machine.

    .venv/bin/python bench/prepare_scale.py                        # 20,000 and 200,000 files
    .venv/bin/python bench/prepare_scale.py --sizes 20000          # one size
    .venv/bin/python bench/prepare_scale.py --sizes 2000 --baseline 500   # a quick check
    .venv/bin/python bench/prepare_scale.py --labels               # the same files, labelled by a CSV

Sources: the ten real samples of tests/data/chest_xray, each scaled to 224 px on its long side
and re-encoded once, then copied N/10 times with distinct bytes after the JPEG end marker (the
pixels are the samples', every copy its own sha256 and patient) in the Kaggle layout with every
9th file in test/. Written once under bench/out/ (git-ignored) and reused. `--labels`: prepare
reads the labels from a label file instead of the folders (`--labels`, the path of the NIH- and
CheXpert-size archives): a generic CSV `path,label,patient_id,split` written once beside the
images (`labels.csv`), the same labels, patients and splits as the folders say.

Per size, `cxr_datasets.prepare` runs at 64 px in a fresh process (its imports included) that
joins a Ray instance this script starts first with `ray start --head` (RAY_ADDRESS, as under
`ray job submit`; Ray's start is outside the clock, ~4 s at this size of machine). Printed:
- wall time of that process and images/s (files / wall);
- the driver's peak RSS: the process's own `ru_maxrss` (Ray's workers and object store are other
  processes);
- the object store's peak use, sampled every SAMPLE_S (2 s) during the run from the node's
  Prometheus metrics (Ray's public metrics endpoint, `--metrics-export-port`, reported as often
  here: RAY_metrics_report_interval_ms): the gauge `ray_object_store_memory`, summed over its
  locations in memory (spilled bytes are reported apart). `ray memory --stats-only` gives the same
  figure, but costs a second of CPU a call on a 2-core machine. The sampling is not free either:
  every 0.5 s it took ~1.8 CPU-seconds in 20 s of Ray's processes and this one (measured on an
  idle head, 2026-12-07), ~4.5% of the 2 CPUs that prepare runs on; every 2 s, ~0.4 (1%);
- every file is read once before each run, untimed (page cache warm, as for the baseline);
- Pillow's single-process rate on the same kind of work: `image.read_file_bytes` and
  `image.preprocess_bytes` (read, decode with JPEG draft, grayscale, resize to 64 px, what
  prepare does per file) on the first `--baseline` files in one process, page cache warm, the
  better of two passes, measured before and after the runs: the ratios use the higher rate.
- CPU-seconds of the driver and of the Ray processes during the run (each Ray process read every
  SAMPLE_S, as its workers exit with the job): on a shared machine the wall time counts other
  users' work too, the CPU time does not;
Last, the ratios: images per CPU-second against Pillow's rate (the wall ratio on CPUs of its
own), images/s against CPUs x Pillow's rate (goal at 200,000: >= 0.6, aiming at
0.8); the driver's peak RSS growth per image from the smallest size to the largest (goal <=
0.5 KB); the object store's peak, largest over smallest size (goal: no growth with the archive).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from io import BytesIO
from pathlib import Path

from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "chest_xray"
VENV_BIN = Path(sys.executable).parent
SAMPLE_S = 2.0  # how often the object store and the CPU times are read during a run (see above)

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
import cxr_datasets
manifest = cxr_datasets.prepare(sys.argv[1], sys.argv[2], image_size=64, overwrite=True,
                                verbose=False, labels=sys.argv[3] if len(sys.argv) > 3 else None)
accepted = sum(sum(c.values()) for c in manifest["counts"].values())
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"peak_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "accepted": accepted, "rejected": len(manifest["rejected"]),
                  "stage_s": manifest["stage_s"], "in_process_s": time.perf_counter() - start}))
"""


def small_originals() -> list[tuple[str, str, bytes]]:
    """(label, original name, JPEG bytes at 224 px on the long side) of the ten samples."""
    found = []
    for path in sorted(SAMPLES.glob("train/*/*.jpeg")):
        with Image.open(path) as image:
            image.thumbnail((224, 224), Image.Resampling.LANCZOS)
            buffer = BytesIO()
            image.save(buffer, format="JPEG", quality=90)
        found.append((path.parent.name, path.name, buffer.getvalue()))
    return found


def source(n: int) -> Path:
    folder = BENCH_DIR / f"scale-n{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"writing {n} JPEGs of 224 px to {folder} (once) ...", flush=True)
    originals = small_originals()
    for number in range(n):
        label, name, data = originals[number % len(originals)]
        split = "test" if number % 9 == 0 else "train"
        kind = "virus" if "virus" in name else "bacteria"
        file = f"person{number + 1}_{kind}_{number + 1}.jpeg" if label == "PNEUMONIA" else \
            f"IM-{number + 1:06d}-0001.jpeg"
        target = folder / "chest_xray" / split / label / file
        if number < len(originals) * 4:
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data + f"cxr-scale-copy-{number}".encode())
    done.touch()
    return folder


def label_file(folder: Path) -> Path:
    """`labels.csv` in `folder`: one row per image of the folder layout, written once."""
    from cxr_datasets.discover import patient_id

    target = folder / "labels.csv"
    if target.exists():
        return target
    rows = []
    for split in ("train", "val", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            below = folder / "chest_xray" / split / label
            if below.is_dir():
                rows += [f"chest_xray/{split}/{label}/{e.name},{label},{patient_id(e.name)},{split}\n"
                         for e in os.scandir(below)]
    partial = target.with_suffix(".partial")
    partial.write_text("path,label,patient_id,split\n" + "".join(sorted(rows)))
    partial.rename(target)
    return target


def pillow_rate(folder: Path, n: int) -> float:
    """Files per second of prepare's per-file work in one process, the better of two passes."""
    from cxr_datasets.image import preprocess_bytes, read_file_bytes

    files = sorted(folder.rglob("*.jpeg"))[:n]
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for path in files:
            preprocess_bytes(read_file_bytes(path), 64, "pad", name=str(path))
        best = max(best, len(files) / (time.perf_counter() - start))
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """`ray start --head --block` with its metrics on a port of its own; stopped by its pid."""

    def __init__(self, cpus: int):
        self.temp_dir = tempfile.mkdtemp(prefix="cxrb-", dir="/tmp")
        self.port, self.metrics_port = free_port(), free_port()
        log = Path(self.temp_dir) / "head.log"
        env = dict(os.environ, RAY_metrics_report_interval_ms=str(int(SAMPLE_S * 1000)),
                   RAY_AUTH_MODE="disabled",
                   PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
             "--num-cpus", str(cpus), "--port", str(self.port), "--temp-dir", self.temp_dir,
             "--include-dashboard", "false", "--metrics-export-port", str(self.metrics_port),
             "--dashboard-agent-listen-port", str(free_port()),
             "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()),
             "--ray-client-server-port", str(free_port())],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"ray start failed:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        self.address = f"127.0.0.1:{self.port}"

    def object_store_bytes(self) -> float | None:
        """ray_object_store_memory summed over its in-memory locations (not SPILLED)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("ray_object_store_memory{") and 'Location="SPILLED"' not in line:
                total += float(line.rsplit(" ", 1)[1])
                found = True
        return total if found else None

    def cpu_seconds(self, seen: dict[int, float]) -> float:
        """CPU time of this Ray's processes (raylet, GCS, workers: the head's descendants) so
        far. `seen`: each process's CPU time at its last call, updated here: Ray's workers exit
        with their job, and their time is then gone (the raylet does not collect its children's
        times), so this is called every SAMPLE_S during a run and a process counts with its last
        reading."""
        import ray  # noqa: F401  puts Ray's bundled psutil on sys.path

        psutil = importlib.import_module("psutil")
        try:
            head = psutil.Process(self.proc.pid)
            procs = [head, *head.children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                times = proc.cpu_times()
                seen[proc.pid] = times.user + times.system
            except psutil.Error:
                pass
        return sum(seen.values())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def warm_page_cache(folder: Path) -> None:
    """Read every file once, untimed: prepare then starts from a warm page cache, as the Pillow
    baseline does (a cold first pass measures the disk, not prepare)."""
    for path in folder.rglob("*.jpeg"):
        path.read_bytes()


def run_prepare(folder: Path, head: LocalHead, labels: Path | None = None) -> dict:
    samples: list[float] = []
    stop = threading.Event()

    cpu: dict[int, float] = {}

    def sample() -> None:
        while not stop.is_set():
            used = head.object_store_bytes()
            if used is not None:
                samples.append(used)
            head.cpu_seconds(cpu)
            stop.wait(SAMPLE_S)

    out = BENCH_DIR / f"{folder.name}-prepared"
    env = dict(os.environ, RAY_ADDRESS=head.address, RAY_AUTH_MODE="disabled")
    before = head.cpu_seconds(cpu)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out),
                           *([str(labels)] if labels else [])], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    ray_cpu = head.cpu_seconds(cpu) - before
    if done.returncode != 0:
        raise SystemExit(f"prepare failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(wall_s=wall, store_peak=max(samples, default=float("nan")), samples=len(samples),
                  ray_cpu_s=ray_cpu)
    shutil.rmtree(out, ignore_errors=True)  # 64 px shards of 200,000 files: ~0.5 GB
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--labels", action="store_true",
                        help="labels from a CSV label file (labels.csv beside the images), not the folders")
    parser.add_argument("--baseline", type=int, default=5000,
                        help="files of Pillow's single-process baseline (default 5000)")
    args = parser.parse_args(argv)
    folders = {n: source(n) for n in args.sizes}
    warm_page_cache(folders[max(args.sizes)])
    rate = pillow_rate(folders[max(args.sizes)], args.baseline)
    print(f"labels from {'labels.csv (--labels)' if args.labels else 'the folders'}", flush=True)
    print(f"{args.cpus} CPUs; Pillow single-process (prepare's per-file work, 64 px): "
          f"{rate:.0f} img/s on {args.baseline} files", flush=True)
    head = LocalHead(args.cpus)
    runs = {}
    try:
        for n in args.sizes:
            warm_page_cache(folders[n])
            run = runs[n] = run_prepare(folders[n], head,
                                        label_file(folders[n]) if args.labels else None)
            stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stage_s"].items())
            print(f"{n} files: {run['wall_s']:.1f} s, {n / run['wall_s']:.0f} img/s, driver peak "
                  f"RSS {run['peak_mib']:.0f} MiB, object store peak "
                  f"{run['store_peak'] / 2**20:.0f} MiB ({run['samples']} samples), "
                  f"{run['accepted']} accepted, {run['rejected']} rejected; CPU-s: driver "
                  f"{run['cpu_s']:.1f}, Ray's processes {run['ray_cpu_s']:.1f}; stages (s): {stages}",
                  flush=True)
    finally:
        head.stop()
    # Measured again after the runs, and the better rate kept: this VM's speed drifts by up to
    # ~25% between minutes, and the higher baseline is the harder one to reach.
    again = pillow_rate(folders[max(args.sizes)], args.baseline)
    print(f"Pillow single-process again, after the runs: {again:.0f} img/s; the ratios use "
          f"{max(rate, again):.0f}", flush=True)
    rate = max(rate, again)
    small, large = min(runs), max(runs)
    cpu = runs[large]["cpu_s"] + runs[large]["ray_cpu_s"]
    print(f"ratio images per CPU-second at {large} / Pillow's (what the wall ratio would be on "
          f"CPUs of its own): {large / cpu / rate:.2f}")
    print(f"ratio images/s at {large} / ({args.cpus} CPUs x Pillow): "
          f"{large / runs[large]['wall_s'] / (args.cpus * rate):.2f}")
    if large != small:
        growth = (runs[large]["peak_mib"] - runs[small]["peak_mib"]) * 1024 / (large - small)
        print(f"driver peak RSS growth {small} -> {large}: {growth:.3f} KB per image")
        print(f"object store peak {large} / {small}: "
              f"{runs[large]['store_peak'] / runs[small]['store_peak']:.2f} "
              f"({runs[large]['store_peak'] / 2**20:.1f} / {runs[small]['store_peak'] / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    sys.exit(main())
