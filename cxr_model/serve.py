"""`cxr serve MODEL_DIR`: an exported model behind HTTP, on Ray Serve, with dynamic batching.

    cxr serve runs/sweep/best --port 8000 --replicas 2 --max-batch-size 32
    curl -s --data-binary @chest.jpeg http://127.0.0.1:8000/predict
    curl -s -F file=@chest.dcm 'http://127.0.0.1:8000/predict?gradcam=1'

Endpoints:
    POST /predict   one image file (JPEG, PNG or DICOM) as the raw request body or as a multipart
                    upload (any field name). It goes through `cxr_datasets.preprocess_bytes` with the
                    card's image size and resize mode: the function `cxr prepare` and `cxr predict`
                    use. Returns JSON: p_pneumonia, label at the card's threshold, threshold,
                    model_sha256, batch_size (requests the model ran together). `?gradcam=1` adds
                    gradcam_png, a base64 PNG of the Grad-CAM overlay.
    GET /healthz    {"status": "ok", "model_sha256", "replica"} once the model is loaded and warm.
    GET /model      the model card's summary: threshold, operating points, input spec, test metrics,
                    the files with their sha256.
Bad input (empty, not an image, truncated, over --max-upload-mb, a multipart form without a file)
is a 4xx JSON {"error": reason}; the replica keeps serving.

Why Ray Serve: it is the serving layer of the Ray stack the search already runs on. Locally it
starts a Ray instance of its own; with --address it deploys the replicas onto a Ray cluster. The
HTTP proxy listens on 127.0.0.1 unless --host says otherwise. Requests that arrive together are
batched by `@serve.batch` into one model call per replica (up to --max-batch-size, waiting at most
--batch-wait-ms for the batch to fill).
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) as objects.

import argparse
import asyncio
import base64
import dataclasses
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

APP_NAME = "cxr"
SERVE_EPILOG = """examples:
  cxr serve runs/sweep/best                                   # http://127.0.0.1:8000
  cxr serve runs/sweep/best --port 9000 --replicas 2 --max-batch-size 16
  curl -s --data-binary @scan.jpeg http://127.0.0.1:8000/predict
  curl -s -F file=@scan.dcm 'http://127.0.0.1:8000/predict?gradcam=1'
  curl -s http://127.0.0.1:8000/model

Stops on Ctrl-C or SIGTERM (Ray Serve and the Ray instance it started are shut down)."""


@dataclass(frozen=True)
class ServeConfig:
    model_dir: str
    host: str = "127.0.0.1"        # local only by default: a model server is not exposed by accident
    port: int = 8000
    replicas: int = 1              # model copies; on a cluster Ray places them across nodes
    max_batch_size: int = 32       # requests per model call at most (@serve.batch)
    batch_wait_ms: float = 10.0    # how long a batch may wait to fill: latency paid for throughput
    max_upload_mb: float = 64.0    # larger bodies are refused with 413 before decoding
    cpus_per_replica: float = 1.0  # Ray's CPU reservation per replica
    address: str | None = None     # a Ray cluster to deploy onto; None: a local Ray of our own
    verify: bool = True            # refuse a model.keras whose sha256 is not the card's

    def __post_init__(self):
        from cxr_datasets.errors import CxrError

        for name in ("replicas", "max_batch_size"):
            if getattr(self, name) < 1:
                raise CxrError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.port < 65536:
            raise CxrError(f"--port must be in 1..65535, got {self.port}")
        if self.max_upload_mb <= 0 or self.batch_wait_ms < 0:
            raise CxrError("--max-upload-mb must be > 0 and --batch-wait-ms >= 0")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


# ----------------------------------------------------------------------------- the deployment


def _make_deployment():
    """The Ray Serve deployment class (built on first use: Ray Serve and FastAPI load only here)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    app = FastAPI(title="cxr-tune", description="P(PNEUMONIA) for a chest X-ray image")

    class BadInput(Exception):
        def __init__(self, status: int, reason: str):
            super().__init__(reason)
            self.status, self.reason = status, reason

    @app.exception_handler(BadInput)
    async def _bad_input(_request, exc: BadInput):
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @serve.deployment(name="CxrModel")
    @serve.ingress(app)
    class CxrModel:
        def __init__(self, cfg: ServeConfig):
            from cxr_model.export import load_model

            self.cfg = cfg
            self.model, self.card = load_model(cfg.model_dir, verify=cfg.verify)
            self.spec = self.card["input"]
            self.sha256 = self.card.get("model_sha256") or _sha256_of(cfg.model_dir)
            self.predict_batch.set_max_batch_size(cfg.max_batch_size)
            self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
            size = int(self.spec["image_size"])
            self._infer(np.zeros((1, size, size, 1), np.uint8))  # trace the graph before the first request

        @app.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "model_sha256": self.sha256, "replica": os.getpid()}

        @app.get("/model")
        async def model_info(self):
            return card_summary(self.card, self.sha256)

        @app.post("/predict")
        async def predict(self, request: Request, gradcam: bool = False):
            data, name = await self._read_upload(request)
            image = await asyncio.to_thread(self._preprocess, data, name)
            prob, batch_size = await self.predict_batch(image)
            threshold = float(self.card["threshold"])
            out = {"p_pneumonia": prob, "label": self.card["class_names"][int(prob >= threshold)],
                   "threshold": threshold, "model_sha256": self.sha256, "filename": name or None,
                   "batch_size": batch_size}
            if gradcam:
                out["gradcam_png"] = await asyncio.to_thread(self._gradcam_png, image)
            return out

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def predict_batch(self, images: list[np.ndarray]) -> list[tuple[float, int]]:
            batch = np.stack(images)[..., None]
            probs = await asyncio.to_thread(self._infer, batch)
            return [(float(p), len(images)) for p in probs]

        def _infer(self, batch: np.ndarray) -> np.ndarray:
            from cxr_model import predict_proba  # the function `cxr predict` uses

            return predict_proba(self.model, batch, batch_size=max(len(batch), 1))

        def _preprocess(self, data: bytes, name: str) -> np.ndarray:
            from cxr_datasets import preprocess_bytes
            from cxr_datasets.errors import ImageRejected

            try:
                image, _meta = preprocess_bytes(data, int(self.spec["image_size"]), self.spec["resize"], name=name)
            except ImageRejected as exc:
                raise BadInput(422, exc.reason) from None
            except Exception as exc:  # noqa: BLE001 - whatever a hostile file triggers is the file's fault
                raise BadInput(422, f"cannot decode the image ({type(exc).__name__}: {exc})"[:300]) from None
            return image

        def _gradcam_png(self, image: np.ndarray) -> str:
            from cxr_model.gradcam import gradcam_heatmaps, overlay_png

            batch = image[None, ..., None]
            return base64.b64encode(overlay_png(batch[0], gradcam_heatmaps(self.model, batch)[0])).decode()

        async def _read_upload(self, request: Request) -> tuple[bytes, str]:
            """(file content, file name or "") from a raw body or the first file of a multipart form."""
            limit = self.cfg.max_upload_bytes
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise BadInput(413, f"upload of {int(declared)} bytes is over the {limit}-byte limit")
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                data, name = await _read_multipart(request, BadInput)
            else:
                data = await _read_body(request, limit, BadInput)
                name = request.query_params.get("filename", "")
                if "dicom" in content_type and not name:
                    name = "upload.dcm"  # a DICOM without its 128-byte preamble is known by this hint
            if len(data) > limit:
                raise BadInput(413, f"upload of {len(data)} bytes is over the {limit}-byte limit")
            if not data:
                raise BadInput(400, "empty upload: send the image file as the request body or a multipart file")
            return data, name

    return CxrModel


async def _read_body(request, limit: int, bad_input) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads carry no content-length: stop reading at the limit
            raise bad_input(413, f"upload is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_multipart(request, bad_input) -> tuple[bytes, str]:
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # noqa: BLE001 - malformed multipart bodies
        raise bad_input(400, f"malformed multipart upload ({type(exc).__name__}: {exc})"[:300]) from None
    try:
        uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            raise bad_input(400, "multipart upload without a file part")
        return await uploads[0].read(), uploads[0].filename or ""
    finally:
        await form.close()


def card_summary(card: dict, sha256: str) -> dict:
    """What GET /model returns: the card's facts a client needs, without the training config."""
    test = card.get("metrics", {}).get("test", {})
    keys = ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "auprc", "brier")
    return {
        "model": card.get("model"), "created": card.get("created"), "model_sha256": sha256,
        "class_names": card.get("class_names"), "positive_class": card.get("positive_class"),
        "threshold": card.get("threshold"), "decision_rule": card.get("decision_rule"),
        "threshold_selection": card.get("threshold_selection"),
        "operating_points": card.get("operating_points", []),
        "input": card.get("input"), "input_spec": card.get("input_spec"), "output_spec": card.get("output_spec"),
        "test_metrics": {k: test[k] for k in keys if k in test} | {k: test[k] for k in ("n", "ece") if k in test},
        "backend": card.get("backend"), "files": card.get("files", {}).get("artifacts", []),
    }


def _sha256_of(model_dir) -> str:
    from pathlib import Path

    from cxr_model.export import MODEL_FILE, sha256_file

    return sha256_file(Path(model_dir) / MODEL_FILE)


# ----------------------------------------------------------------------------- running it


def build_app(cfg: ServeConfig):
    """The Ray Serve application: `cfg.replicas` replicas of the model deployment."""
    deployment = _make_deployment().options(
        num_replicas=cfg.replicas,
        # enough requests in flight per replica to fill a batch, and the next one while it runs
        max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
        ray_actor_options={"num_cpus": cfg.cpus_per_replica},
    )
    return deployment.bind(cfg)


def check_export(cfg: ServeConfig) -> None:
    """A wrong folder or a swapped model file fails here in one line, not inside a replica."""
    from cxr_model.export import read_card, verify_model_file

    card = read_card(cfg.model_dir)
    if cfg.verify:
        verify_model_file(cfg.model_dir, card)


def start(cfg: ServeConfig):
    """Start Ray (local unless cfg.address), Serve's HTTP proxy on cfg.host:cfg.port, and the app.

    Returns the Serve handle once every replica has loaded the model. `stop()` undoes it.
    """
    import ray
    from ray import serve

    check_export(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    return serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False,
                     logging_config={"log_level": "WARNING", "enable_access_log": False})


def stop() -> None:
    """Shut down Ray Serve and the Ray connection (a local Ray started by `start` stops with it)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(cfg: ServeConfig) -> int:
    """`cxr serve`: start, print where it listens, block until Ctrl-C / SIGTERM, shut down."""
    check_export(cfg)  # before Ray starts
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    started = time.perf_counter()
    try:
        start(cfg)
        print(f"serving {cfg.model_dir} at http://{cfg.host}:{cfg.port} ({cfg.replicas} replica(s), batches of "
              f"up to {cfg.max_batch_size}; ready in {time.perf_counter() - started:.1f} s); Ctrl-C stops",
              file=sys.stderr, flush=True)
        stopping.wait()
    finally:
        print("cxr serve: shutting down Ray Serve and Ray", file=sys.stderr, flush=True)
        stop()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an exported model over HTTP (Ray Serve, batched)",
                              epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="export folder (cxr train / cxr search)")
    defaults = ServeConfig(model_dir="")
    p.add_argument("--host", default=defaults.host, help="address to listen on (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=defaults.port, help="(default: 8000)")
    p.add_argument("--replicas", type=int, default=defaults.replicas, help="model replicas (default: 1)")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="requests per model call at most (default: 32)")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help="how long a batch waits to fill (default: 10)")
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_mb,
                   help="larger uploads get 413 (default: 64)")
    p.add_argument("--cpus-per-replica", type=float, default=defaults.cpus_per_replica, help="(default: 1)")
    p.add_argument("--address", metavar="auto|HOST:PORT", help="Ray cluster to deploy onto (default: a local Ray)")
    p.add_argument("--no-verify", action="store_true",
                   help="serve model.keras even if its sha256 is not the one in model_card.json")
    p.set_defaults(func=_handle)


def _handle(args) -> int:
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    cfg = ServeConfig(**{k: v for k, v in vars(args).items() if k in fields}, verify=not args.no_verify)
    return serve_forever(cfg)
