"""The public face of `fedml server`: a small TLS front that lets through only what data
sites need, the Fleet API.

Flower 1.42's SuperLink serves three APIs on one HTTP host:port: the Fleet API
(`/v1/fleet/...`, what SuperNodes use), the Control API (`/v1/control/...`: `flwr run`,
`flwr stop`, `flwr ls`, `flwr supernode register|ls`) and the Runtime API
(`/v1/runtime/...`, what the ServerApp process uses). The open-source build has no
account authentication on the Control API, so anyone who could reach that port and held
the (public) `ca.crt` could run their own app on the server and at every site.

`fedml server` therefore binds the SuperLink to 127.0.0.1 on a private port and runs this
front on the public HOST:PORT. The front forwards exactly the Fleet API's routes (read
from Flower's own Fleet router, so it follows Flower) as POST requests, answers `GET
/health` itself, and refuses everything else with 403 before it reaches the SuperLink,
logging who asked for what. With node authentication on, the front also checks each
Fleet call's SuperNode signature (Flower's headers: the node's public key, a timestamp and
its signature) against the registered site keys (`PKI/nodes/*.pub`) before it reads the
body, so an outsider's bytes never reach the SuperLink; the SuperLink checks the same
headers again. Bodies pass through unchanged (at most `MAX_BODY_BYTES`), headers too,
except the per-connection ones and forwarding claims (`X-Forwarded-*`, `Forwarded`),
which an outsider could forge. Node registration stays on the server machine: the Fleet
API's own `register-node` is refused by the SuperLink whenever node authentication is on.

Run as `python -m fedml.deploy.front --host H --port P --backend URL [--certfile F
--keyfile F --cafile F --node-keys DIR]`; `fedml server` starts it as a child process.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE
from flwr.supercore.error.base import ApiErrorCode, FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
from flwr.superlink.routers.fleet.router import router
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

HEALTH_PATH = "/health"
SERVICE = "fedml-server"
# Per-connection headers that a proxy must not pass on (RFC 9110, 7.6.1), plus the
# ones httpx and uvicorn set for their own hop.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length",
        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
        "x-forwarded-port", "x-real-ip",
    }
)  # fmt: skip
UNAUTHENTICATED = "Invalid SuperNode authentication\n"  # Flower's words for a 401
ACTIVATE_PATH = "/v1/fleet/activate-node"  # where a SuperNode joins
MAX_BODY_BYTES = 1 << 30  # one Fleet call: a message or one object of it (a model array)
MAX_CONNECTIONS = 1024  # open connections beyond this are answered 503 (sites retry)
REFUSED = (
    "fedml server exposes only the Fleet API (what data sites use) on this address. "
    "The Control and Runtime APIs answer on the server machine only.\n"
)

log = logging.getLogger("fedml.front")


def fleet_paths() -> frozenset[str]:
    """The Fleet API's routes, as Flower's own Fleet router declares them."""
    return frozenset(route.path for route in router.routes)  # type: ignore[attr-defined]


def registered_keys(folder: Path) -> frozenset[bytes]:
    """The site keys in `folder` (`PKI/nodes/*.pub`, OpenSSH) as Flower's SuperNodes
    present them in their `flwr-public-key` header (PEM SubjectPublicKeyInfo)."""
    keys = set()
    for path in sorted(folder.glob("*.pub")):
        key = serialization.load_ssh_public_key(path.read_bytes())
        keys.add(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return frozenset(keys)


def node_signature(headers: dict[str, str]) -> bytes | None:
    """The public key a Fleet call is freshly and validly signed with (the check Flower's
    SuperLink makes, done here before the body is read), or None."""
    try:
        public_key = base64.b64decode(headers["flwr-public-key"], validate=True)
        signature = base64.b64decode(headers["flwr-signature"], validate=True)
        timestamp = headers["flwr-timestamp"]
        signed_at = dt.datetime.fromisoformat(timestamp)
        age = (dt.datetime.now(dt.timezone.utc) - signed_at).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return None
        key = bytes_to_public_key(public_key)
        return public_key if verify_signature(key, timestamp.encode(), signature) else None
    except Exception:  # an outsider's headers: any key type, any bytes, never a 500
        return None


def _unregistered(path: str) -> Response:
    """What the SuperLink answers a site whose key is not registered: Flower's "Failed
    to activate SuperNode" when it tries to join (the site then says its key was
    refused), Flower's 401 for any other call."""
    if path != ACTIVATE_PATH:
        return PlainTextResponse(UNAUTHENTICATED, status_code=401)
    spec = API_ERROR_MAP[ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED]
    error = FlowerError(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, "key not registered")
    return JSONResponse(error.to_json(spec.public_message), status_code=spec.http_status_code)


def make_front(
    backend: str,
    verify: ssl.SSLContext | bool,
    tls: bool,
    node_keys: frozenset[bytes] | None = None,
) -> Starlette:
    """The ASGI app: `GET /health`, the Fleet API's routes forwarded to `backend` (the
    SuperLink's private address), 403 for everything else. With `node_keys`, a Fleet call
    must also be signed by one of them (refused otherwise, as the SuperLink would)."""
    allowed = fleet_paths()
    client = httpx.AsyncClient(
        base_url=backend,
        verify=verify,
        timeout=httpx.Timeout(None, connect=10.0),  # Flower sets its own call deadlines
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )

    async def health(request: Request) -> Response:
        return JSONResponse({"service": SERVICE, "tls": tls})

    async def forward(request: Request) -> Response:
        path = request.url.path
        client_host = request.client.host if request.client else "?"
        if request.method != "POST" or path not in allowed or request.url.query:
            log.warning("refused %s %r from %s", request.method, path, client_host)
            return PlainTextResponse(REFUSED, status_code=403)
        if node_keys is not None:
            signer = node_signature(dict(request.headers))
            if signer is None:
                log.warning("refused %r from %s: no valid site signature", path, client_host)
                return PlainTextResponse(UNAUTHENTICATED, status_code=401)
            if signer not in node_keys:
                log.warning("refused %r from %s: the key is not registered", path, client_host)
                return _unregistered(path)
        body = await _read_body(request)
        if body is None:
            return PlainTextResponse("request body too large\n", status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream = client.build_request("POST", path, headers=headers, content=body)
        try:
            reply = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            log.warning("the SuperLink did not answer %s: %s", path, exc)
            return PlainTextResponse("the SuperLink is not reachable\n", status_code=502)
        reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            _body(reply),
            status_code=reply.status_code,
            headers=reply_headers,
            background=BackgroundTask(reply.aclose),
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route(HEALTH_PATH, health, methods=["GET"]),
            Route("/{path:path}", forward, methods=methods),
        ],
        lifespan=lambda app: _closing(client),
    )


@contextlib.asynccontextmanager
async def _closing(client: httpx.AsyncClient) -> AsyncIterator[None]:
    yield
    await client.aclose()


async def _read_body(request: Request) -> bytes | None:
    """The request's body (Fleet calls are unary: one protobuf each way), or None when
    it is larger than `MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _body(reply: httpx.Response) -> AsyncIterator[bytes]:
    async for chunk in reply.aiter_raw():
        yield chunk


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="the SuperLink's private URL")
    parser.add_argument("--certfile", help="the public TLS certificate (server.crt)")
    parser.add_argument("--keyfile", help="its key (server.key)")
    parser.add_argument("--cafile", help="the CA that signed the SuperLink's certificate")
    parser.add_argument("--node-keys", type=Path, help="PKI/nodes: accept only these sites")
    args = parser.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    tls = args.certfile is not None
    verify: ssl.SSLContext | bool = False
    if args.cafile:
        verify = ssl.create_default_context(cafile=args.cafile)
    keys = registered_keys(args.node_keys) if args.node_keys else None
    uvicorn.run(
        make_front(args.backend, verify, tls, keys),
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
