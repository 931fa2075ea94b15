"""etcd endpoints as operators write them (fabric/endpoints.py)."""

import pytest

from fabric.endpoints import BadEndpoint, Targets, parse, targets

NAMES = {"etcd-a.cluster": ["10.0.0.1"], "etcd-all.cluster": ["10.0.0.2", "10.0.0.1"]}


def resolve(host: str, port: int) -> list[str]:
    return NAMES.get(host, [])


@pytest.mark.parametrize(
    ("written", "host", "port", "scheme"),
    [
        ("10.0.0.1:2379", "10.0.0.1", 2379, ""),
        ("http://10.0.0.1:2380", "10.0.0.1", 2380, "http"),
        ("https://etcd-a.cluster:2379", "etcd-a.cluster", 2379, "https"),
        ("etcd-a.cluster", "etcd-a.cluster", 2379, ""),
        ("http://etcd-a.cluster/", "etcd-a.cluster", 2379, "http"),
        (" 10.0.0.1:2379 ", "10.0.0.1", 2379, ""),
    ],
)
def test_the_ways_an_endpoint_is_written(written: str, host: str, port: int, scheme: str) -> None:
    endpoint = parse(written)
    assert (endpoint.host, endpoint.port, endpoint.scheme) == (host, port, scheme)


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("", "empty"),
        ("grpc://10.0.0.1:2379", "is not http or https"),
        ("http://10.0.0.1:2379/v3", "only \\[scheme://\\]host\\[:port\\]"),
        ("10.0.0.1:port", "Port could not be cast"),
        ("http://:2379", "names no host"),
    ],
)
def test_what_is_not_an_endpoint_is_a_clear_error(written: str, why: str) -> None:
    with pytest.raises(BadEndpoint, match=why):
        parse(written)


def test_names_stand_for_every_address_they_have_and_name_the_certificate() -> None:
    found = targets(["https://etcd-all.cluster:2379", "etcd-a.cluster:2379", "10.0.0.3:2379"], resolve)

    assert found == Targets(["10.0.0.2:2379", "10.0.0.1:2379", "10.0.0.3:2379"], "etcd-all.cluster", True)


def test_addresses_alone_need_no_resolver_and_no_server_name() -> None:
    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("nothing to resolve")

    assert targets(["127.0.0.1:2379", "http://127.0.0.2:2379"], no_dns) == Targets(
        ["127.0.0.1:2379", "127.0.0.2:2379"], None, False
    )


@pytest.mark.parametrize(
    ("endpoints", "why"),
    [
        ([], "no etcd endpoints"),
        (["nowhere.cluster:2379"], "has no IPv4 address"),
        (["[::1]:2379"], "IPv6 is not supported"),
    ],
)
def test_endpoints_that_cannot_be_reached_are_refused_plainly(endpoints: list[str], why: str) -> None:
    with pytest.raises(BadEndpoint, match=why):
        targets(endpoints, resolve)
