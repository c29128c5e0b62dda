"""What an outsider's connections may cost the front: bounded time, count and memory.

uvicorn's HTTP protocol bounds neither how long a connection may take to send its first
request (an idle TLS connection is held forever) nor how long a request head may take,
nor how many connections one address holds. `GuardedH11Protocol` is uvicorn's h11
protocol (h11 caps an unfinished request head at `HEAD_LIMIT_BYTES`, answering 400, where
httptools kept reading a header that never ends) plus three guards:

- a request head must be complete within `HEAD_TIMEOUT` seconds of the connection being
  made or of its first byte (slow or idle connections are closed, not held);
- one address (an IPv6 /64) holds at most `MAX_CONNECTIONS_PER_IP` connections (more
  are closed at once, before they cost anything);
- a caller that is still sending a body after its answer (a refusal) is cut off;
- `Budget`: request bodies held at once are bounded in all and per sender, so neither
  many connections nor a registered site's large calls can balloon the server's memory
  (the front answers 503, which Flower's SuperNodes retry).

TLS handshakes happen before a connection reaches this protocol; asyncio bounds them
(60 s). Run through `uvicorn.run(..., http=GuardedH11Protocol)`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
from collections import Counter

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT = 10.0  # seconds for a request line and its headers (a few KB)
HEAD_LIMIT_BYTES = 16 * 1024  # an unfinished request head larger than this is a 400
MAX_CONNECTIONS_PER_IP = 64  # a SuperNode uses about 5; sites behind one NAT share it
OPEN_FILES = 65536  # the front asks for this many descriptors (or the hard limit)
LOG_EVERY = 10.0  # seconds: at most one warning per address and kind in this time

log = logging.getLogger("fedml.front")


class Quiet:
    """Rate-limited warnings: an attacker's thousand connections make a few lines."""

    REMEMBERED = 10_000  # addresses; then it starts over (a few repeated lines at most)

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}

    def warn(self, kind: str, address: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get((kind, address), -LOG_EVERY) >= LOG_EVERY:
            if len(self.last) >= self.REMEMBERED:
                self.last.clear()
            self.last[(kind, address)] = now
            log.warning(message, *args)


def holder(address: str) -> str:
    """Who holds an address, for the per-address limit: the address itself for IPv4,
    its /64 for IPv6 (one host is given a whole /64 and may use any address in it)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:  # IPv4 over an IPv6 socket
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


QUIET = Quiet()
OPEN_PER_IP: Counter[str] = Counter()  # this front process's open connections by address


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a time limit on request heads and a connection limit
    per address (see the module's docstring)."""

    head_timeout = HEAD_TIMEOUT  # `with_head_timeout` makes a class with another
    head_timer: asyncio.TimerHandle | None = None
    address = "?"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = holder(self.client[0]) if self.client else "?"
        OPEN_PER_IP[self.address] += 1
        if OPEN_PER_IP[self.address] > MAX_CONNECTIONS_PER_IP:
            QUIET.warn(
                "connections", self.address,
                "closed a connection from %s: it already holds %d", self.address,
                MAX_CONNECTIONS_PER_IP,
            )  # fmt: skip
            transport.abort()
            return
        self._arm_head_timer()  # uvicorn would wait forever for a first request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        OPEN_PER_IP[self.address] -= 1
        if OPEN_PER_IP[self.address] <= 0:
            del OPEN_PER_IP[self.address]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self.head_timer is None:
            self._arm_head_timer()  # the first byte of a new request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()  # the head is complete: the app takes over

    def on_response_complete(self) -> None:
        """After an answer: a caller still sending a body it was refused (an early 401,
        403, 413, 503) is cut off, so no leftover body holds the connection open."""
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self.head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_too_slow(self) -> None:
        self.head_timer = None
        QUIET.warn(
            "slow", self.address,
            "closed a connection from %s: no complete request within %.0f s", self.address,
            self.head_timeout,
        )  # fmt: skip
        self.transport.abort()


def with_head_timeout(seconds: float) -> type[GuardedH11Protocol]:
    """The protocol class with another time limit on request heads (uvicorn takes a
    class, not an instance)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"head_timeout": seconds})


class Budget:
    """Bytes of request bodies the front may hold at once: `total` across all senders and
    `per_sender` for each (a sender: the site's key with node authentication, else the
    address). The front is one event loop, so no lock is needed."""

    def __init__(self, total: int, per_sender: int) -> None:
        self.total, self.per_sender = total, per_sender
        self.held: Counter[str] = Counter()

    def take(self, sender: str, size: int) -> bool:
        """Reserve `size` bytes for `sender`, or False when that would exceed a bound."""
        if self.held.total() + size > self.total or self.held[sender] + size > self.per_sender:
            return False
        self.held[sender] += size
        return True

    def give(self, sender: str, size: int) -> None:
        """Return bytes reserved with `take`."""
        self.held[sender] -= size
        if self.held[sender] <= 0:
            del self.held[sender]


def raise_open_files_limit() -> int:
    """Let the front hold many connections (each TLS handshake in progress is a
    descriptor before any guard sees it): the soft limit up to `OPEN_FILES`, within the
    hard limit. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft
