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
headers again (and that the node id a call names is the signer's). Bodies pass through
unchanged, headers too, except the per-connection ones and forwarding claims
(`X-Forwarded-*`, `Forwarded`), which an outsider could forge. Node registration stays on
the server machine: the Fleet API's own `register-node` is refused by the SuperLink
whenever node authentication is on.

A site speaks only for itself: Flower 1.42's SuperLink stores a pushed message whose
source is the SuperLink (node 1) and that replies to nothing as an instruction to its
destination, so a registered site could make another site train. The front therefore
lets through only pushed messages that are replies from the pushing node to the
SuperLink (`not_a_reply_from`).

What one caller may cost is bounded (fedml.deploy.front_guard): a request head within
10 s, 64 connections per address, a body of at most `MAX_BODY_BYTES` (Flower sends
arrays in 5 MiB chunks) that keeps arriving (`BODY_IDLE_TIMEOUT`, `MIN_BODY_RATE`), and
bodies held at once within `IN_FLIGHT_BYTES` in all and `IN_FLIGHT_PER_SENDER` per site.
Every refusal closes its connection.

Run as `python -m fedml.deploy.front --host H --port P --backend URL [--certfile F
--keyfile F --cafile F --node-keys DIR]`; `fedml server` starts it as a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from flwr.common.constant import SUPERLINK_NODE_ID, SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.supercore.error.base import ApiErrorCode, FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
from flwr.superlink.routers.fleet.router import router
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fedml.deploy.front_guard import (
    HEAD_LIMIT_BYTES,
    HEAD_TIMEOUT,
    QUIET,
    Budget,
    raise_open_files_limit,
    with_head_timeout,
)

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
PUSH_MESSAGES_PATH = "/v1/fleet/push-messages"  # where a SuperNode sends its replies
MAX_BODY_BYTES = 64 << 20  # one Fleet call: a message or one object (arrays: 5 MiB chunks)
BODY_IDLE_TIMEOUT = 30.0  # seconds a request body may pause before the call is dropped
MIN_BODY_RATE = 64 * 1024  # bytes/s a body must average (plus BODY_IDLE_TIMEOUT of grace)
IN_FLIGHT_BYTES = 1 << 30  # request bodies the front holds at once, all senders together
IN_FLIGHT_PER_SENDER = 128 << 20  # ... and per site (a SuperNode pushes 2 objects at once)
MAX_CONNECTIONS = 4096  # open connections beyond this are answered 503 (sites retry)
CLOSE = {"connection": "close"}  # refused calls end their connection
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
        return PlainTextResponse(UNAUTHENTICATED, status_code=401, headers=CLOSE)
    spec = API_ERROR_MAP[ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED]
    error = FlowerError(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, "key not registered")
    return JSONResponse(
        error.to_json(spec.public_message), status_code=spec.http_status_code, headers=CLOSE
    )


def not_a_reply_from(body: bytes) -> str | None:
    """Why a push-messages call is not what a site may push (its own replies to the
    SuperLink), or None when it is. The SuperLink checks that the call's node is the
    signer; this checks that each message is that node's reply."""
    try:
        request = PushMessagesRequest.FromString(body)
    except Exception:  # any bytes: the SuperLink answers what it cannot parse itself
        return None
    node = request.node.node_id
    for message in request.messages_list:
        meta = message.metadata
        if meta.src_node_id != node:
            return f"node {node} pushed a message from node {meta.src_node_id}"
        if meta.dst_node_id != SUPERLINK_NODE_ID:
            return f"node {node} pushed a message to node {meta.dst_node_id}"
        if not meta.reply_to_message_id:
            return f"node {node} pushed a message that replies to nothing"
    return None


def make_front(
    backend: str,
    verify: ssl.SSLContext | bool,
    tls: bool,
    node_keys: frozenset[bytes] | None = None,
    body_idle_timeout: float = BODY_IDLE_TIMEOUT,
) -> Starlette:
    """The ASGI app: `GET /health`, the Fleet API's routes forwarded to `backend` (the
    SuperLink's private address), 403 for everything else. With `node_keys`, a Fleet call
    must also be signed by one of them (refused otherwise, as the SuperLink would). A
    body that pauses for `body_idle_timeout` seconds, or averages under `MIN_BODY_RATE`,
    ends its call (503: sites retry)."""
    allowed = fleet_paths()
    budget = Budget(IN_FLIGHT_BYTES, IN_FLIGHT_PER_SENDER)
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
            return PlainTextResponse(REFUSED, status_code=403, headers=CLOSE)
        sender = client_host
        if node_keys is not None:
            signer = node_signature(dict(request.headers))
            if signer is None:
                log.warning("refused %r from %s: no valid site signature", path, client_host)
                return PlainTextResponse(UNAUTHENTICATED, status_code=401, headers=CLOSE)
            if signer not in node_keys:
                log.warning("refused %r from %s: the key is not registered", path, client_host)
                return _unregistered(path)
            sender = signer.decode("ascii", errors="replace")
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            return PlainTextResponse("a Content-Length is required\n", 411, headers=CLOSE)
        size = int(declared)
        if size > MAX_BODY_BYTES:
            return PlainTextResponse("request body too large\n", 413, headers=CLOSE)
        if not budget.take(sender, size):
            QUIET.warn("busy", client_host, "busy: %s sent a call while at its share", client_host)
            return PlainTextResponse("busy, retry\n", 503, headers={**CLOSE, "retry-after": "1"})
        try:
            return await _pass_on(request, path, size, client_host)
        finally:
            budget.give(sender, size)

    async def _pass_on(request: Request, path: str, size: int, client_host: str) -> Response:
        """Read the body, check a pushed message's source, forward to the SuperLink."""
        try:
            body = await _read_body(request, size, body_idle_timeout)
        except TimeoutError:  # 503, not 408: Flower's SuperNode retries a 503
            log.warning("dropped %r from %s: its body stalled", path, client_host)
            return PlainTextResponse("request body stalled, retry\n", 503, headers=CLOSE)
        if body is None:
            return PlainTextResponse("body and Content-Length differ\n", 400, headers=CLOSE)
        if path == PUSH_MESSAGES_PATH and (reason := not_a_reply_from(body)):
            log.warning("refused %r from %s: %s", path, client_host, reason)
            answer = f"a site may push only its own replies ({reason})\n"
            return PlainTextResponse(answer, 403, headers=CLOSE)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream = client.build_request("POST", path, headers=headers, content=body)
        del body  # the request holds it until sent; the budget covers that
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


async def _read_body(request: Request, size: int, idle_timeout: float) -> bytes | None:
    """The request's body (Fleet calls are unary: one protobuf each way), or None when it
    is not `size` bytes long or the caller went away. TimeoutError when it pauses for
    `idle_timeout` seconds, or arrives slower than `MIN_BODY_RATE` overall (a trickle
    would hold its share of the budget for ever)."""
    body = bytearray()
    stream = request.stream().__aiter__()
    try:
        async with asyncio.timeout(idle_timeout + size / MIN_BODY_RATE):
            while True:
                try:
                    async with asyncio.timeout(idle_timeout):
                        chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
                body += chunk
                if len(body) > size:
                    return None
    except ClientDisconnect:
        return None
    return bytes(body) if len(body) == size else None


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
    parser.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT, help="seconds")
    parser.add_argument("--body-timeout", type=float, default=BODY_IDLE_TIMEOUT, help="seconds")
    args = parser.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    tls = args.certfile is not None
    verify: ssl.SSLContext | bool = False
    if args.cafile:
        verify = ssl.create_default_context(cafile=args.cafile)
    keys = registered_keys(args.node_keys) if args.node_keys else None
    raise_open_files_limit()
    uvicorn.run(
        make_front(args.backend, verify, tls, keys, args.body_timeout),
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,
        http=with_head_timeout(args.head_timeout),
        ws="none",  # no WebSocket upgrade: the Fleet API has none, and it would leave the guard
        h11_max_incomplete_event_size=HEAD_LIMIT_BYTES,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
