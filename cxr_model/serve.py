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

Under abuse (see docs/SECURITY.md): the body limit holds while the body streams in, raw or
multipart (413 at the first byte over it, nothing buffered beyond); headers over 16 KiB get 431;
a request that takes over --request-timeout-s is cut off by Ray Serve's proxy; requests beyond what
the replicas run and --max-queued wait for get 503 at once; FastAPI's /docs and /openapi.json are off.
With --token (or CXR_SERVE_TOKEN) every request but GET /healthz needs `Authorization: Bearer TOKEN`;
listening beyond loopback needs a token or an explicit --insecure.

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
import hmac
import ipaddress
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_datasets.errors import ConfigError, CxrError, ImageRejected
from cxr_model.export import MODEL_FILE, load_model, read_card, sha256_file, verify_model_file

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
    token: str | None = None       # bearer token every request but /healthz must carry
    insecure: bool = False         # allow a non-loopback --host without a token
    request_timeout_s: float = 30.0  # Ray Serve's proxy cuts off a request after this long
    max_queued: int | None = None  # requests waiting for a replica; more get 503 (None: 8 x batch size)
    docs: bool = False             # FastAPI's /docs and /openapi.json

    def __post_init__(self):
        for name in ("replicas", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_upload_mb <= 0 or self.batch_wait_ms < 0:
            raise ConfigError("--max-upload-mb must be > 0 and --batch-wait-ms >= 0")
        if self.request_timeout_s <= 0 or (self.max_queued is not None and self.max_queued < 1):
            raise ConfigError("--request-timeout-s must be > 0 and --max-queued at least 1")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("--token must be at least 16 characters (e.g. python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))')")
        if not self.token and not self.insecure and not is_loopback(self.host):
            raise ConfigError(f"--host {self.host} listens beyond this machine: give --token (or CXR_SERVE_TOKEN), "
                              "or --insecure to serve without one on a network you trust")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_queued_requests(self) -> int:
        return self.max_queued or 8 * self.max_batch_size


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


# ----------------------------------------------------------------------------- the request guard

MAX_HEADER_BYTES = 16 * 1024  # all header names and values of one request together


class RequestGuard:
    """ASGI middleware in front of the app, in the replica: the bearer token (every path but
    /healthz), the header size, and the body limit, enforced while the body streams in (raw or
    multipart: 413 at the first chunk over it, before a handler has buffered the body).

    Kept here rather than in Ray Serve's proxy: proxy middlewares are deprecated in Ray Serve
    (HTTPOptions.middlewares raises), and its FastAPI integration is the documented place. The
    body limit is ours, not FastAPI's `max_body_size`: that one answers a declared oversize
    Content-Length in plain text, and every error of this API is JSON {"error": reason}.
    """

    def __init__(self, app, *, token: str | None, max_body: int, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app, self.max_body, self.max_header_bytes = app, max_body, max_header_bytes
        self.token = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        if sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            return await _json_reply(send, 431, f"request headers over {self.max_header_bytes} bytes")
        values = dict(headers)
        if self.token is not None and scope.get("path") != "/healthz":
            if not hmac.compare_digest(values.get(b"authorization", b""), self.token):
                return await _json_reply(send, 401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                         [(b"www-authenticate", b"Bearer")])
        declared = values.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _json_reply(send, 413, f"upload of {int(declared)} bytes is over the "
                                     f"{self.max_body}-byte limit (--max-upload-mb)")
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # raised in the handler's read: answered as a 413
                    raise body_too_large(self.max_body)
            return message

        await self.app(scope, capped_receive, send)


def body_too_large(limit: int):
    """The 413 a handler's read raises; the app's HTTPException handler answers it as JSON."""
    from starlette.exceptions import HTTPException

    return HTTPException(413, f"upload is over the {limit}-byte limit (--max-upload-mb)")


async def _json_reply(send, status: int, reason: str, extra_headers=()) -> None:
    body = json.dumps({"error": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- the deployment


def new_app(cfg: ServeConfig):
    """The FastAPI app the deployment serves, before its routes: the body limit, the guard, 4xx
    answers as JSON {"error": reason}, and no /docs unless asked."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="cxr-tune", description="P(PNEUMONIA) for a chest X-ray image",
                  docs_url="/docs" if cfg.docs else None, redoc_url="/redoc" if cfg.docs else None,
                  openapi_url="/openapi.json" if cfg.docs else None)
    app.add_middleware(RequestGuard, token=cfg.token, max_body=cfg.max_upload_bytes)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    return app


def _make_deployment(cfg: ServeConfig):
    """The Ray Serve deployment class (built on first use: Ray Serve and FastAPI load only here)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from ray import serve

    app = new_app(cfg)

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
            self.cfg = cfg
            self.model, self.card = load_model(cfg.model_dir, verify=cfg.verify)
            self.spec = self.card["input"]
            self.sha256 = self.card.get("model_sha256") or _sha256_of(cfg.model_dir)
            # serve.batch's typing hides the setters its wrapper has
            self.predict_batch.set_max_batch_size(cfg.max_batch_size)  # type: ignore[attr-defined]
            self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)  # type: ignore[attr-defined]
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
            """(file content, file name or "") from a raw body or the first file of a multipart form.
            RequestGuard has capped the body's size while it streamed in."""
            limit = self.cfg.max_upload_bytes
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                data, name = await _read_multipart(request, BadInput)
            else:
                data = await request.body()
                name = request.query_params.get("filename", "")
                if "dicom" in content_type and not name:
                    name = "upload.dcm"  # a DICOM without its 128-byte preamble is known by this hint
            if len(data) > limit:
                raise BadInput(413, f"upload of {len(data)} bytes is over the {limit}-byte limit")
            if not data:
                raise BadInput(400, "empty upload: send the image file as the request body or a multipart file")
            return data, name

    return CxrModel


async def _read_multipart(request, bad_input) -> tuple[bytes, str]:
    from starlette.exceptions import HTTPException

    try:
        form = await request.form(max_files=1, max_fields=16)
    except HTTPException:  # the body limit's 413, raised while the form streams in
        raise
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
    return sha256_file(Path(model_dir) / MODEL_FILE)


# ----------------------------------------------------------------------------- running it


def build_app(cfg: ServeConfig):
    """The Ray Serve application: `cfg.replicas` replicas of the model deployment."""
    deployment = _make_deployment(cfg).options(
        num_replicas=cfg.replicas,
        # enough requests in flight per replica to fill a batch, and the next one while it runs
        max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
        # beyond that, a bounded wait in the proxy: once full, new requests get 503 at once
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica},
    )
    return deployment.bind(cfg)


def check_export(cfg: ServeConfig) -> None:
    """A wrong folder or a swapped model file fails here in one line, not inside a replica."""

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
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s},
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
    p.add_argument("--token", help="bearer token every request but /healthz must carry (default: "
                   "$CXR_SERVE_TOKEN; prefer it or --token-file: a command line is visible to other users)")
    p.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE")
    p.add_argument("--insecure", action="store_true", help="allow a --host beyond loopback without a token")
    p.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s,
                   help="cut a request off after this long (default: 30)")
    p.add_argument("--max-queued", type=int, help="requests waiting for a replica; more get 503 "
                   "(default: 8 x --max-batch-size)")
    p.add_argument("--docs", action="store_true", help="turn on FastAPI's /docs and /openapi.json")
    p.set_defaults(func=_handle)


def _handle(args) -> int:
    token = args.token or os.environ.get("CXR_SERVE_TOKEN") or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CxrError(f"--token-file {args.token_file}: {exc.strerror}") from None
    fields = {f.name for f in dataclasses.fields(ServeConfig)} - {"token", "verify"}
    cfg = ServeConfig(**{k: v for k, v in vars(args).items() if k in fields}, token=token,
                      verify=not args.no_verify)
    return serve_forever(cfg)
