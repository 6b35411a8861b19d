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

    python bench/serve.py --abuse                # normal requests while the server is abused

--abuse (64 px only): the same server with a token, --max-upload-mb 8 and --request-timeout-s 10.
First --requests normal requests alone (the baseline p99), then the same count again while 50
slow clients (25 send their headers a line a second, 25 declare a 1 MB body and send a byte a
second) and 10 oversized uploads (256 MiB each, chunked, no Content-Length, one after another)
run. Prints both p99s and their ratio, the errors, how the oversized uploads were answered and how
fast, and how many slow clients the server had cut off when the abuse ended.

Every mode is bounded (a fixed count, and --timeout seconds per size; the abuse stops after
--abuse-seconds) and only ever talks to 127.0.0.1. Run it alone on the machine: the server and
the client share the CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--abuse", action="store_true", help="normal requests under slow clients and huge uploads")
    parser.add_argument("--abuse-seconds", type=float, default=60, help="how long the abuse runs at most")
    args = parser.parse_args()
    files = sorted(SAMPLES.rglob("*.jpeg"))
    payloads = [f.read_bytes() for f in files]
    if args.abuse:
        with tempfile.TemporaryDirectory(prefix="cxr-bench-serve-") as tmp:
            abuse(export_model(Path(tmp) / "model64", 64), payloads, args)
        return
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
    with served(model_dir, ["--max-batch-size", str(args.max_batch_size)]) as (url, headers):
        with _client(url, headers, args.workers) as client:
            return _timed_burst(client, payloads, args)


@contextlib.contextmanager
def served(model_dir: Path, options: list[str], token: str | None = None):
    """(url, auth headers) of a warm `cxr serve` on a free 127.0.0.1 port; SIGINT after."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "import sys; from cxr_search.main import main; sys.exit(main())", "serve",
           str(model_dir), "--port", str(port), *options]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if token:
        env["CXR_SERVE_TOKEN"] = token
    log = open(model_dir.parent / f"serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        _wait_healthy(url, proc, timeout=300)
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            for sample in sorted(SAMPLES.rglob("*.jpeg")):  # warm-up: trace the batch shapes, fill caches
                client.post("/predict", content=sample.read_bytes())
        yield url, headers
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _client(url: str, headers: dict, workers: int):
    import httpx

    return httpx.Client(base_url=url, timeout=120, headers=headers, limits=httpx.Limits(max_connections=workers))


def abuse(model_dir: Path, payloads: list[bytes], args) -> None:
    """Normal requests alone, then under 50 slow clients and 10 oversized uploads."""
    import secrets

    port_options = ["--max-batch-size", str(args.max_batch_size), "--max-upload-mb", "8", "--request-timeout-s", "10"]
    with served(model_dir, port_options, token=secrets.token_urlsafe(24)) as (url, headers):
        with _client(url, headers, args.workers) as client:
            alone = _timed_burst(client, payloads, args)
        stop = threading.Event()
        deadline = time.perf_counter() + args.abuse_seconds
        host, port = url.removeprefix("http://").split(":")
        slow = [threading.Thread(target=_slow_client, args=(host, int(port), kind, stop, deadline), daemon=True)
                for kind in ("headers", "body") for _ in range(25)]
        oversized: list[tuple[int | str, float]] = []
        big = threading.Thread(target=_oversized_uploads, args=(url, headers, 10, stop, deadline, oversized),
                               daemon=True)
        for thread in [*slow, big]:
            thread.start()
        time.sleep(2)  # the slow clients are connected and the first upload is streaming
        with _client(url, headers, args.workers) as client:
            under = _timed_burst(client, payloads, args)
        stop.set()
        cut_off = {kind: sum(1 for thread in slow[i * 25:(i + 1) * 25] if thread.cut)  # type: ignore[attr-defined]
                   for i, kind in enumerate(("headers", "body"))}
        big.join(timeout=30)
    print(f"alone: {alone['rate']:.1f} req/s, p99 {alone['p99']:.0f} ms, {alone['errors']} errors", flush=True)
    print(f"under abuse (50 slow clients, 10 x 256 MiB uploads): {under['rate']:.1f} req/s, "
          f"p99 {under['p99']:.0f} ms, {under['errors']} errors", flush=True)
    answers = ", ".join(f"{status} in {seconds:.2f} s" for status, seconds in oversized)
    print(f"oversized uploads: {answers}", flush=True)
    print(f"slow clients cut off by the server before the abuse ended: {cut_off['headers']} of 25 sending "
          f"headers slowly, {cut_off['body']} of 25 sending a body slowly", flush=True)
    print(f"ratio p99 under abuse / alone: {under['p99'] / alone['p99']:.2f}x")


def _slow_client(host: str, port: int, kind: str, stop: threading.Event, deadline: float) -> None:
    """One connection that sends its request a line (or a body byte) a second until the server
    closes it, `stop` is set or the deadline passes. Marks its thread `.cut` if the server closed it."""
    me = threading.current_thread()
    me.cut = False  # type: ignore[attr-defined]
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError:
        return
    with sock:
        try:
            if kind == "headers":
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
                parts = (f"X-Slow-{i}: {'a' * 20}\r\n".encode() for i in range(10_000))
            else:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
                parts = (b"\xff" for _ in range(1_000_000))
            for part in parts:
                if stop.is_set() or time.perf_counter() > deadline:
                    return
                sock.sendall(part)
                sock.settimeout(1.0)
                try:
                    sock.recv(1, socket.MSG_PEEK)  # b"" (closed) or an answer (408, 413...): cut off
                    me.cut = True  # type: ignore[attr-defined]
                    return
                except (socket.timeout, BlockingIOError):
                    pass
        except OSError:  # reset by the server
            me.cut = True  # type: ignore[attr-defined]


def _oversized_uploads(url: str, headers: dict, count: int, stop: threading.Event, deadline: float,
                       out: list) -> None:
    import httpx

    def body():
        chunk = b"\xff" * (1 << 20)
        for _ in range(256):
            if stop.is_set():
                return
            yield chunk

    with httpx.Client(base_url=url, timeout=60, headers={**headers, "content-type": "application/octet-stream"}) as client:
        for _ in range(count):
            if stop.is_set() or time.perf_counter() > deadline:
                return
            started = time.perf_counter()
            try:
                status: int | str = client.post("/predict", content=body()).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            out.append((status, time.perf_counter() - started))


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
