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
logging who asked for what. Request and response bodies are streamed through unchanged,
headers included (SuperNode authentication signs a timestamp header; the SuperLink checks
it as before). Node registration stays on the server machine: the Fleet API's own
`register-node` is refused by the SuperLink whenever node authentication is on.

Run as `python -m fedml.deploy.front --host H --port P --backend URL [--certfile F
--keyfile F --cafile F]`; `fedml server` starts it as a child process.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

import httpx
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
    }
)  # fmt: skip
REFUSED = (
    "fedml server exposes only the Fleet API (what data sites use) on this address. "
    "The Control and Runtime APIs answer on the server machine only.\n"
)

log = logging.getLogger("fedml.front")


def fleet_paths() -> frozenset[str]:
    """The Fleet API's routes, as Flower's own Fleet router declares them."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset(route.path for route in router.routes)  # type: ignore[attr-defined]


def make_front(backend: str, verify: ssl.SSLContext | bool, tls: bool) -> Starlette:
    """The ASGI app: `GET /health`, the Fleet API's routes forwarded to `backend` (the
    SuperLink's private address), 403 for everything else."""
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
        if request.method != "POST" or path not in allowed or request.url.query:
            client_host = request.client.host if request.client else "?"
            log.warning("refused %s %s from %s", request.method, path, client_host)
            return PlainTextResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = await request.body()  # Fleet calls are unary: one protobuf each way
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
    args = parser.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    tls = args.certfile is not None
    verify: ssl.SSLContext | bool = False
    if args.cafile:
        verify = ssl.create_default_context(cafile=args.cafile)
    uvicorn.run(
        make_front(args.backend, verify, tls),
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
