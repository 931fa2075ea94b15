"""The bus: connecting to NATS, and the one name services use for serving a handler table
(`fabric.serving`) and making requests (`fabric.requesting`)."""

import logging
import ssl
from collections.abc import Callable
from functools import partial

import nats
import nats.errors

from fabric import credentials
from fabric.connection import Connection
from fabric.requesting import (
    NO_RESPONDERS_STATUS,
    Answer,
    NoResponders,
    PeerLost,
    Requester,
    RequestTimeout,
    Resend,
)
from fabric.serving import (
    MAX_BACKLOG,
    PASS,
    TRACE_KEPT,
    Context,
    FastHandler,
    Handler,
    InlineHandler,
    Pass,
    ReplyTo,
    Route,
    Server,
    Traced,
    answer,
    dispatch,
    internal_error,
    traced_call,
)

__all__ = [
    "MAX_BACKLOG",
    "NO_RESPONDERS_STATUS",
    "PASS",
    "TRACE_KEPT",
    "Answer",
    "Context",
    "FastHandler",
    "Handler",
    "InlineHandler",
    "NoResponders",
    "Pass",
    "PeerLost",
    "ReplyTo",
    "RequestTimeout",
    "Requester",
    "Resend",
    "Route",
    "Server",
    "Traced",
    "answer",
    "close",
    "connect",
    "dispatch",
    "internal_error",
    "traced_call",
]

log = logging.getLogger(__name__)


async def connect(
    url: str, name: str, wait_for_server: bool = True, creds: str = "", inbox_prefix: str = "", ca: str = ""
) -> Connection:
    """Connect to NATS at `url`, one server or several separated by commas (as the nats CLI
    takes them; the client tries them in turn, and fails over between them and the servers
    they announce), as the identity in the `creds` file (nats-py reads it again at every
    reconnect, so rewritten credentials take effect then), with its inboxes under `inbox_prefix`
    (the only replies its permissions let it receive), over TLS checked against the CA in the
    `ca` PEM file when one is named. Services wait for the server and
    reconnect for ever (`wait_for_server`); a command-line client fails at once with
    NoServersError when no server answers, so the user hears it."""
    options: dict = {"name": name} | ({"user_credentials": creds} if creds else {})
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    if ca:
        options["tls"] = tls_context(ca)
    pool = servers(url)
    if wait_for_server:
        nc = Connection()
        await _connect(nc, pool, options, reconnect=True, error_cb=_log_connection_error)
        return nc
    # A client: each server once, in turn, failing on the first error of the last one (nats-py
    # retrying on its own hung after a TLS handshake refused); connected, it fails over.
    for i in range(len(pool)):
        nc = Connection()
        try:
            await _connect(nc, pool[i:] + pool[:i], options, reconnect=False, error_cb=_quiet)
        except (OSError, nats.errors.Error, TimeoutError):
            if i == len(pool) - 1:
                raise
            continue
        nc.options["allow_reconnect"] = True  # read when the link drops: fail over from now on
        return nc
    raise AssertionError("servers() names at least one server")


async def _connect(
    nc: Connection, pool: list[str], options: dict, reconnect: bool, error_cb: Callable
) -> None:
    await nc.connect(
        pool,
        **options,
        connect_timeout=2,
        # in the order written: a planned machine names its own server first, and the others
        # in an order that spreads the machines without one over the servers (deploy/machine.py)
        dont_randomize=True,
        reconnect_time_wait=0.25,  # type: ignore[arg-type]  # typed int, sleeps any float
        # A service reconnects for ever; a client tries each server twice when its own goes
        max_reconnect_attempts=-1 if reconnect else 2,  # 0 would mean "for ever" here too
        allow_reconnect=reconnect,
        ping_interval=10,
        max_outstanding_pings=3,
        # nats-py's default logs a full traceback for every failed attempt; a client reports the
        # error it ends with instead.
        error_cb=error_cb,
        reconnected_cb=partial(_reconnected, nc),
    )


async def _quiet(exc: Exception) -> None:
    pass


def servers(url: str) -> list[str]:
    """The servers a `nats_url` names: "nats://a:4222, nats://b:4222" is two."""
    found = [part.strip() for part in url.split(",") if part.strip()]
    if not found:
        raise ValueError("no NATS server is named (nats_url is empty)")
    return found


def tls_context(ca: str) -> ssl.SSLContext:
    """A client TLS context trusting only the cluster's CA (and checking the server's name)."""
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise credentials.CredentialsError(f"cannot use CA certificate {ca}: {exc}") from None


async def _reconnected(nc: Connection) -> None:
    log.info("NATS: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")
    for listener in list(nc.on_reconnected):
        try:
            listener()
        except Exception:  # one listener's failure must not cost the others
            log.exception("handling a NATS reconnect failed")


async def _log_connection_error(exc: Exception) -> None:
    log.warning("NATS connection: %s", exc or type(exc).__name__)


async def close(nc: Connection) -> None:
    """Drain (deliver what is in flight, then close); a connection already closed is fine."""
    if not nc.is_closed:
        try:
            await nc.drain()
        except nats.errors.Error as exc:
            log.warning("closing the NATS connection: %s", exc)
