from ebpf_runtime.settings import EbpfRuntimeSettings


class DpuNodeSettings(EbpfRuntimeSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A stand-in for a DPU card: its cores, its map memory, and how it splits them per tenant."""

    node_id: str
    nats_url: str
    etcd_endpoints: list[str]
    nats_creds: str = ""  # the service's NATS credentials file (`.creds`); empty: connect without
    nats_ca: str = ""  # the CA (PEM file) that signed nats-server's certificate: TLS ("": plain TCP)
    etcd_creds: str = ""  # the service's etcd login (a `user:password` file, 0600); empty: anonymous
    etcd_ca: str = ""  # the CA (PEM file) that signed etcd's certificate: TLS ("": plain HTTP)
    # A client certificate and its key (one PEM file), for an etcd that admits only clients with
    # one (a planned cluster's: `hetfaas cluster plan`); "": none
    etcd_client_cert: str = ""
    etcd_server_name: str = ""  # what etcd's certificates name, when the endpoints are addresses
    state_dir: str | None = None
    # Invocations accepted at once, those waiting for a core included; beyond it the node answers
    # `throttled`. Far above `cores`: a program runs for microseconds, an invocation is in
    # flight (on the wire, queued) for much longer, and the scheduler sends no more than this.
    capacity: int = 256
    tracing: bool = True
    # spans go to the cluster's trace stream over NATS (a planned cluster: fabric.trace_stream)
    # rather than to files in state_dir
    trace_stream: bool = False
    metrics_listen: str = ""  # host:port of the Prometheus scrape endpoint ("": none)
    log_level: str = "INFO"
    lease_ttl_s: int = 5
    heartbeat_interval_s: float = 1.0

    def runtime(self) -> EbpfRuntimeSettings:
        fields = EbpfRuntimeSettings.__struct_fields__
        return EbpfRuntimeSettings(**{name: getattr(self, name) for name in fields})
