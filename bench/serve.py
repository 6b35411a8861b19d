"""Load benchmark of `cxr serve`: a bounded burst of concurrent HTTP requests on 127.0.0.1.

    python bench/serve.py                        # 500 requests, 16 workers, at 64 px and 224 px
    python bench/serve.py --sizes 64 --requests 200 --workers 8

For each image size: export a model (VGG16, random weights: the cost of a forward pass does not
depend on the weights' values), start the real `cxr serve` command on a free 127.0.0.1 port, wait
until it is healthy, warm it with a few requests, then send `--requests` POST /predict requests
(the ten real sample JPEGs of tests/data, in turn) from `--workers` threads with httpx, and stop the
server (SIGINT). Prints throughput, p50/p95/p99 latency and errors. Then the same number of files
through `cxr predict`'s own in-process path (preprocess + predict in chunks, the model already
loaded), and last the ratio served rate / in-process rate.

The burst is bounded (a fixed count, and --timeout seconds per size) and only ever talks to
127.0.0.1. Run it alone on the machine: the server and the client share the CPU cores.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "chest_xray"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,224", help="image sizes to serve (default: 64,224)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per size before the burst is cut")
    args = parser.parse_args()
    files = sorted(SAMPLES.rglob("*.jpeg"))
    payloads = [f.read_bytes() for f in files]
    ratios = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-serve-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            model_dir = export_model(Path(tmp) / f"model{size}", size)
            served = burst(model_dir, payloads, args)
            local = in_process(model_dir, files, args.requests)
            ratio = served["rate"] / local
            ratios.append((size, ratio))
            print(f"[{size} px] served {served['rate']:.1f} req/s (p50 {served['p50']:.0f} ms, "
                  f"p95 {served['p95']:.0f} ms, p99 {served['p99']:.0f} ms, {served['errors']} errors, "
                  f"largest batch {served['max_batch']}) vs in-process predict {local:.1f} img/s", flush=True)
    print(" ".join(f"ratio served/in-process at {size} px: {ratio:.2f}x" for size, ratio in ratios))


def export_model(out: Path, size: int) -> Path:
    from cxr_model import ModelConfig, TrainConfig, build_model, export
    from cxr_model.evaluate import metrics_from_probs

    cfg = TrainConfig(model=ModelConfig(image_size=size, weights=None, head_units=(256,), aug_strength=0.0))
    metrics = metrics_from_probs([0, 1, 0, 1], [0.2, 0.6, 0.4, 0.9], threshold=0.5, n_boot=20)
    return export(build_model(cfg.model, seed=0), out, train_cfg=cfg, threshold=0.5, metrics=metrics, resize="pad")


def burst(model_dir: Path, payloads: list[bytes], args) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "import sys; from cxr_search.cli import main; sys.exit(main())", "serve",
           str(model_dir), "--port", str(port), "--max-batch-size", str(args.max_batch_size)]
    log = open(model_dir.parent / f"serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        _wait_healthy(url, proc, timeout=300)
        limits = httpx.Limits(max_connections=args.workers)
        with httpx.Client(base_url=url, timeout=120, limits=limits) as client:
            for body in payloads:  # warm-up: trace the batch shapes, fill caches
                client.post("/predict", content=body)
            return _timed_burst(client, payloads, args)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _timed_burst(client, payloads: list[bytes], args) -> dict:
    latencies, errors, batches = [], [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + args.timeout

    def one(i: int) -> None:
        if time.perf_counter() > deadline:  # self-stopping: never runs past --timeout
            with lock:
                errors.append("skipped: timeout")
            return
        start = time.perf_counter()
        try:
            reply = client.post("/predict", content=payloads[i % len(payloads)])
            ok = reply.status_code == 200
            batch = reply.json().get("batch_size", 0) if ok else 0
        except Exception as exc:  # noqa: BLE001 - counted, the burst goes on
            ok, batch, reply = False, 0, exc
        with lock:
            if ok:
                latencies.append(time.perf_counter() - start)
                batches.append(batch)
            else:
                errors.append(str(reply)[:100])

    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - started
    q = statistics.quantiles([x * 1000 for x in latencies], n=100) if len(latencies) > 1 else [float("nan")] * 99
    if errors:
        print(f"errors (first 3 of {len(errors)}): {errors[:3]}", flush=True)
    return {"rate": len(latencies) / wall, "p50": q[49], "p95": q[94], "p99": q[98], "errors": len(errors),
            "max_batch": max(batches, default=0)}


def in_process(model_dir: Path, files: list[Path], n: int) -> float:
    """Images per second through `cxr predict`'s own path (files -> preprocess -> predict), model loaded."""
    from cxr_model.export import load_model
    from cxr_model.predict import CHUNK, _predict_chunk

    model, card = load_model(model_dir)
    paths = [files[i % len(files)] for i in range(n)]
    _predict_chunk(model, card, paths[:32], 32, None, 0)  # warm-up, as the server was warmed
    start = time.perf_counter()
    for first in range(0, n, CHUNK):
        _predict_chunk(model, card, paths[first:first + CHUNK], 32, None, first)
    return n / (time.perf_counter() - start)


def _wait_healthy(url: str, proc, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cxr serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"cxr serve was not healthy within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
