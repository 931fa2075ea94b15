"""What every service process shares: an async context manager whose start-up enters each
resource on an exit stack, so leaving it (or failing half-way) releases them in reverse order."""

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Protocol, Self

from fabric import bus, credentials, health, metrics, trace_stream
from fabric.connection import Connection
from fabric.fatal import Fatal
from fabric.span_export import http_writer, protocol_of
from fabric.store import Store
from fabric.tasks import TaskSet
from fabric.telemetry import setup_tracing
from schemas import subjects
from schemas.permissions import Role


class ServiceApp(contextlib.AbstractAsyncContextManager):
    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._failed: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Self:
        self._failed = asyncio.get_running_loop().create_future()
        try:
            await self._start(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        raise NotImplementedError

    async def serve_forever(self) -> None:
        """Run until cancelled (SIGTERM/SIGINT: see fabric.runner) or `fail`ed, then shut down
        in order (and raise what failed it)."""
        async with self:
            assert self._failed is not None
            await self._failed

    def fail(self, exc: Fatal) -> None:
        """The service cannot go on (its registration was taken over): stop serving."""
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)


class BusSettings(Protocol):
    """What every service's settings say about reaching NATS and reporting on itself."""

    @property
    def nats_url(self) -> str: ...
    @property
    def nats_creds(self) -> str: ...
    @property
    def nats_ca(self) -> str: ...
    @property
    def state_dir(self) -> str | None: ...
    @property
    def tracing(self) -> bool: ...
    @property
    def trace_stream(self) -> bool: ...
    @property
    def metrics_listen(self) -> str: ...


class ConnectionSettings(BusSettings, Protocol):
    """... and about reaching etcd (every service but the verifier, which never does)."""

    @property
    def etcd_endpoints(self) -> list[str]: ...
    @property
    def etcd_creds(self) -> str: ...
    @property
    def etcd_ca(self) -> str: ...
    @property
    def etcd_client_cert(self) -> str: ...
    @property
    def etcd_server_name(self) -> str: ...


async def open_bus(
    stack: contextlib.AsyncExitStack, role: Role, name: str, settings: BusSettings
) -> tuple[Connection, TaskSet]:
    """Tracing, metrics, NATS and a task set, each closed by `stack` after what is entered later
    (spans for the trace stream: flushed before NATS closes)."""
    if not settings.trace_stream:
        provider = setup_tracing(name, settings.state_dir, settings.tracing)
        if provider is not None:
            stack.callback(provider.shutdown)
    await open_metrics(stack, name, settings.metrics_listen)
    if settings.nats_creds:
        credentials.read_creds(settings.nats_creds)  # a clear error now, not a retry loop later
    nc = await bus.connect(
        settings.nats_url,
        name,
        creds=settings.nats_creds,
        inbox_prefix=subjects.service_inbox(role, name),
        ca=settings.nats_ca,
    )
    stack.push_async_callback(bus.close, nc)
    if settings.trace_stream and settings.tracing:
        write = trace_stream.writer(nc, asyncio.get_running_loop(), subjects.traces(role, name))
        provider = setup_tracing(name, None, True, write)
        if provider is not None:
            stack.callback(provider.shutdown)
    tasks = TaskSet()
    stack.push_async_callback(tasks.close)
    return nc, tasks


async def open_connections(
    stack: contextlib.AsyncExitStack, role: Role, name: str, settings: ConnectionSettings
) -> tuple[Connection, Store, TaskSet]:
    """`open_bus`, and the store as this service's etcd user."""
    nc, tasks = await open_bus(stack, role, name, settings)
    store = await stack.enter_async_context(open_store(settings))
    return nc, store, tasks


def open_store(settings: ConnectionSettings) -> Store:
    """The store as the settings' etcd identity; a credentials file that cannot be one is a clear
    error now, not a retry loop later."""
    login = credentials.read_etcd_login(settings.etcd_creds) if settings.etcd_creds else None
    ca = read_pem(settings.etcd_ca) if settings.etcd_ca else b""
    client_cert = read_pem(settings.etcd_client_cert) if settings.etcd_client_cert else b""
    return Store(
        settings.etcd_endpoints,
        login=login,
        ca=ca,
        client_cert=client_cert,
        server_name=settings.etcd_server_name,
    )


def read_pem(path: str) -> bytes:
    """A certificate file's bytes (a CA's, or a client's with its key)."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise credentials.CredentialsError(f"cannot read certificate {path}: {exc.strerror}") from None


async def open_metrics(stack: contextlib.AsyncExitStack, name: str, listen: str) -> None:
    """The HTTP endpoint, /metrics, /healthz and /readyz (when `listen` is set: fabric.health),
    and the OTLP push (when an OTLP endpoint is)."""
    if listen:
        server = await health.serve(listen)
        stack.callback(server.close)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        pusher = metrics.OtlpPusher(name, http_writer("metrics"), protocol=protocol_of("metrics"))
        stack.callback(pusher.shutdown)
