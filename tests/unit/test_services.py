"""The launcher's helpers for the services it starts."""

from deploy import services


def test_free_ports_are_never_handed_out_twice() -> None:
    """Regression: the kernel may give a just-released port to the next bind(0); nats-server and
    etcd of one cluster were sometimes given the same port (etcd's health check then hit NATS)."""
    ports = [services.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    taken = ports[0]
    assert services.free_port(taken) != taken, "a preferred port handed out already is not given again"
