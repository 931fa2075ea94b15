"""etcd endpoints as operators write them: `host:port`, `http://host:port`, `https://host:port`,
`[v6]:port` or a bare host (port 2379), a host being an address or a DNS name.

The etcd client gives gRPC an `ipv4:a:p,b:p` target, which takes literal IPv4 addresses only
(a name or a URL was refused). So names are resolved here, when the store is opened, to every
address they have; with TLS the certificate is checked against the name the operator wrote
(gRPC cannot derive one name from an address list). Pure but for the resolver."""

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fabric.fatal import Fatal

DEFAULT_PORT = 2379

Resolver = Callable[[str, int], list[str]]  # host, port -> IPv4 addresses


class BadEndpoint(Fatal, ValueError):
    """A service with it cannot start: said plainly (fabric.runner), no traceback."""


@dataclass(frozen=True)
class Endpoint:
    host: str  # as written: an address or a name
    port: int
    scheme: str  # "http", "https" or "" (none written)


@dataclass(frozen=True)
class Targets:
    addresses: list[str]  # "a.b.c.d:port", what the client's ipv4 target takes
    server_name: str | None  # the first DNS name written, to check TLS certificates against
    wants_tls: bool  # an https:// endpoint was written


def parse(text: str) -> Endpoint:
    raw = text.strip()
    if not raw:
        raise BadEndpoint("an etcd endpoint is empty")
    parts = urlsplit(raw if "://" in raw else f"//{raw}")
    if parts.scheme not in ("", "http", "https"):
        raise BadEndpoint(f"etcd endpoint {text!r}: scheme {parts.scheme!r} is not http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise BadEndpoint(f"etcd endpoint {text!r}: only [scheme://]host[:port] is allowed")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise BadEndpoint(f"etcd endpoint {text!r}: {exc}") from None
    if not parts.hostname:
        raise BadEndpoint(f"etcd endpoint {text!r} names no host")
    return Endpoint(parts.hostname, port, parts.scheme)


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BadEndpoint(f"etcd endpoint {host}:{port}: cannot resolve {host!r}: {exc.strerror}") from None
    return sorted({str(info[4][0]) for info in infos})


def targets(endpoints: list[str], resolve: Resolver = system_resolver) -> Targets:
    """Every endpoint as the addresses it stands for, in order, without repeats."""
    if not endpoints:
        raise BadEndpoint("no etcd endpoints are set")
    addresses: list[str] = []
    server_name = None
    wants_tls = False
    for text in endpoints:
        endpoint = parse(text)
        wants_tls |= endpoint.scheme == "https"
        if _is_ipv4(endpoint.host):
            found = [endpoint.host]
        elif _is_address(endpoint.host):
            raise BadEndpoint(f"etcd endpoint {text!r}: IPv6 is not supported by the etcd client")
        else:
            found = resolve(endpoint.host, endpoint.port)
            if not found:
                raise BadEndpoint(f"etcd endpoint {text!r}: {endpoint.host!r} has no IPv4 address")
            server_name = server_name or endpoint.host
        for address in found:
            if f"{address}:{endpoint.port}" not in addresses:
                addresses.append(f"{address}:{endpoint.port}")
    return Targets(addresses, server_name, wants_tls)


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
