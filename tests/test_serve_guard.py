"""`cxr serve`'s request guard as plain ASGI (no Ray): the bearer token, the header cap, and the
body limit held while the body streams in, raw or multipart. And the config's rules for --host
beyond loopback. The real server's side of these is in tests/test_serve.py."""
from __future__ import annotations

import asyncio

import pytest
from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here

from cxr_datasets.errors import CxrError
from cxr_model.serve import ServeConfig

TOKEN = "t0ken-" + "x" * 20
LIMIT = 1 << 20


def _inner_app(token=TOKEN):
    """The deployment's app (`new_app`: body limit, guard, JSON errors) with routes that read the
    body the way the deployment does (raw, or a multipart form)."""
    from cxr_model.serve import _read_multipart, new_app

    class Bad(Exception):
        def __init__(self, status, reason):
            super().__init__(reason)

    app = new_app(ServeConfig(model_dir="m", token=token, max_upload_mb=LIMIT / 2**20))
    seen: dict = {}

    @app.post("/predict")
    async def predict(request: Request):
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, _ = await _read_multipart(request, Bad)
        else:
            data = await request.body()
        seen["bytes"] = len(data)
        return {"n": len(data)}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app, seen


def _call(app, path="/predict", method="POST", headers=(), chunks=()):
    """Drive `app` with one request whose body comes from the lazy iterator `chunks`; returns
    (status, body bytes, how many chunks the app pulled)."""
    chunks = iter(chunks)
    pulled = 0
    sent: list = []

    async def receive():
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, pulled


AUTH = ("authorization", f"Bearer {TOKEN}")


def test_every_path_but_healthz_needs_the_bearer_token():
    app, _ = _inner_app()
    assert _call(app, headers=[], chunks=[b"abc"])[0] == 401
    assert _call(app, headers=[("authorization", "Bearer wrong-token-wrong-token")], chunks=[b"abc"])[0] == 401
    assert _call(app, headers=[("authorization", TOKEN)], chunks=[b"abc"])[0] == 401  # no "Bearer "
    status, body, _ = _call(app, headers=[AUTH], chunks=[b"abc"])
    assert status == 200 and body == b'{"n":3}'
    assert _call(app, path="/healthz", method="GET", headers=[])[0] == 200
    assert _call(_inner_app(token=None)[0], headers=[], chunks=[b"abc"])[0] == 200  # no token configured


def test_headers_over_16_kib_get_431():
    app, seen = _inner_app()
    status, _, _ = _call(app, headers=[AUTH, ("x-pad", "a" * 17_000)], chunks=[b"abc"])
    assert status == 431 and not seen


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    app, seen = _inner_app()
    status, body, pulled = _call(app, headers=[AUTH, ("content-length", str(LIMIT + 1))], chunks=[b"x" * 100] * 5)
    assert status == 413 and pulled == 0 and not seen and b"limit" in body


@pytest.mark.parametrize("kind", ["raw", "multipart"])
def test_a_chunked_body_is_cut_at_the_limit_while_it_streams(kind):
    """A 1 GiB body (never materialised) is refused after about LIMIT bytes have been read."""
    app, seen = _inner_app()
    chunk = b"z" * (64 << 10)
    headers = [AUTH]
    if kind == "multipart":
        headers.append(("content-type", "multipart/form-data; boundary=BOUND"))
        head = b'--BOUND\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n' \
               b"Content-Type: image/jpeg\r\n\r\n"
        body = (c for c in [head, *(chunk for _ in range((1 << 30) // len(chunk)))])
    else:
        body = (chunk for _ in range((1 << 30) // len(chunk)))
    status, reply, pulled = _call(app, headers=headers, chunks=body)
    assert status == 413, reply
    assert b"limit" in reply
    assert pulled * len(chunk) <= LIMIT + 2 * len(chunk)
    assert not seen


def test_a_body_within_the_limit_passes_whole():
    app, seen = _inner_app()
    status, _, _ = _call(app, headers=[AUTH], chunks=[b"y" * 1000] * 100)
    assert status == 200 and seen["bytes"] == 100_000


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_a_host_beyond_loopback_needs_a_token_or_insecure(host):
    with pytest.raises(CxrError, match="--token"):
        ServeConfig(model_dir="m", host=host)
    assert ServeConfig(model_dir="m", host=host, token=TOKEN).token == TOKEN
    assert ServeConfig(model_dir="m", host=host, insecure=True).insecure


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host):
    assert ServeConfig(model_dir="m", host=host).token is None


def test_a_short_token_is_refused():
    with pytest.raises(CxrError, match="at least 16"):
        ServeConfig(model_dir="m", token="short")


def test_cli_reads_the_token_from_a_file_or_the_environment(tmp_path, monkeypatch):
    import argparse

    from cxr_model import serve

    seen = []
    monkeypatch.setattr(serve, "serve_forever", lambda cfg: seen.append(cfg) or 0)
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    args = parser.parse_args(["serve", "m", "--host", "0.0.0.0", "--token-file", str(token_file)])
    assert args.func(args) == 0 and seen[-1].token == TOKEN
    monkeypatch.setenv("CXR_SERVE_TOKEN", TOKEN)
    args = parser.parse_args(["serve", "m", "--host", "0.0.0.0"])
    assert args.func(args) == 0 and seen[-1].token == TOKEN
    monkeypatch.delenv("CXR_SERVE_TOKEN")
    args = parser.parse_args(["serve", "m", "--host", "0.0.0.0"])
    with pytest.raises(CxrError, match="--insecure"):
        args.func(args)
