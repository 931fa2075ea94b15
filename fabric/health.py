"""Every service's HTTP endpoint for load balancers, orchestrators and Prometheus:

- `/healthz`: 200 while the process's event loop answers (a liveness probe: restart it if not);
- `/readyz`: 200 once the service does its job and while it can (its `ready` check: connected
  to NATS, registered, its view of etcd fresh...), else 503 with the reason as the body;
- `/metrics` (and `/`): the Prometheus text of `fabric.metrics`.

HTTP/1.1 with `Connection: close`, one request per connection, a request head of at most
MAX_HEAD bytes read within 5 s: a probe from anywhere costs the service nothing it must bound."""

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from fabric import metrics
from fabric.fatal import Fatal

if TYPE_CHECKING:
    from fabric.connection import Connection
    from fabric.leased import LeasedKey

MAX_HEAD = 8192
Check = Callable[[], str | None]  # None: ready; else why not


class Readiness:
    """What `/readyz` asks; a service sets its check when it starts serving."""

    def __init__(self) -> None:
        self.check: Check = lambda: "starting"

    def reason(self) -> str | None:
        try:
            return self.check()
        except Exception as exc:  # a check that fails says so; the endpoint stays up
            return f"readiness check failed: {exc}"


READINESS = Readiness()  # one per process, like the metrics registry


def unready(nc: "Connection", registration: "LeasedKey | None" = None) -> str | None:
    """The common part of a service's check: its NATS connection, and its registration if it has one."""
    if not nc.is_connected:
        return "not connected to NATS"
    if registration is not None and not registration.held:
        return "not registered in etcd (its lease is lost; registering again)"
    return None


def respond(path: str, readiness: Readiness, registry: metrics.Registry) -> tuple[int, str, bytes]:
    """(status, content type, body) for a GET of `path`. Pure but for the check."""
    path = path.split("?", 1)[0]
    if path in ("/", "/metrics"):
        return 200, "text/plain; version=0.0.4; charset=utf-8", registry.prometheus().encode()
    if path == "/healthz":
        return 200, "text/plain", b"ok\n"
    if path == "/readyz":
        why = readiness.reason()
        return (200, "text/plain", b"ready\n") if why is None else (503, "text/plain", why.encode() + b"\n")
    return 404, "text/plain", b"not found: /metrics, /healthz and /readyz are\n"


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


async def serve(
    listen: str, readiness: Readiness = READINESS, registry: metrics.Registry = metrics.REGISTRY
) -> asyncio.Server:
    host, _, port = listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = head.decode("latin-1").partition(" ")
            status, kind, body = respond(rest.partition(" ")[0], readiness, registry)
            if method not in ("GET", "HEAD"):
                status, kind, body = 400, "text/plain", b"GET or HEAD only\n"
            lines = f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {kind}\r\n"
            lines += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(lines.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, host or "127.0.0.1", int(port), limit=MAX_HEAD)
    except OSError as exc:  # another process has the port (a second copy of this service?)
        raise ListenError(f"cannot serve /healthz and /metrics on {listen}: {exc.strerror}") from None


class ListenError(Fatal, OSError):
    """The service cannot start: said in one line (fabric.runner), no traceback."""
