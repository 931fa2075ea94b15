import msgspec

DEFAULT_FILTERS = ("runtime", "not_tried", "capacity", "memory", "tenant_partition")
# A warm instance is worth about a third of a node's capacity in load: it wins unless clearly
# busier. The home node needs no score by default: it is the first candidate after the warm
# ones, and ties go to the earlier candidate.
DEFAULT_WEIGHTS = (("warm", 1), ("load", 3), ("instances", 3), ("home", 0), ("free_slots", 1))


class PlacementSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which placement plugins run and how much each score counts (see scheduler/plugins.py)."""

    filters: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_FILTERS))
    weights: dict[str, int] = msgspec.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    warm_candidates: int = 2
    home_candidates: int = 1
    random_candidates: int = 1  # with the home node: power of two choices
    pack_below_utilisation: float = 0.5  # pack onto busy nodes below this cluster load, spread above
    snapshot_refresh_ms: float = 20.0  # rebuild the snapshot at most this often (when it changed)


class AdmissionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_max_concurrency: int = 1000  # default per tenant; `hetfaas tenant set` overrides it
    # ... and at most this share of the healthy nodes' capacity, so that one tenant without a
    # limit of its own cannot fill every node: 500 calls of one tenant on 2 x 64 slots cut
    # another tenant's short calls to a third when the default was 1000 alone
    tenant_default_share: float = 0.5
    max_queue: int = 1024  # invocations waiting in this replica; beyond it: throttled at once
    max_queue_wait_ms: int = 2000  # how long one may wait for a limit or for capacity


class KeepAliveSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The per-function keep-alive policy of "Serverless in the Wild" (USENIX ATC'20)."""

    enabled: bool = True
    bin_s: float = 60.0  # histogram bin width
    range_s: float = 4 * 3600.0  # inter-arrival times beyond this are out of bounds
    min_samples: int = 10  # fewer arrivals seen: the node's own keep-alive
    max_samples: int = 500  # beyond it every count is halved: old arrivals fade
    head_percentile: float = 5.0  # prewarm window: this percentile, less the margin
    tail_percentile: float = 99.0  # keep-alive: this percentile, plus the margin
    margin: float = 0.10
    max_out_of_bounds: float = 0.5  # more arrivals beyond range_s than this share: the node's own
    # The histogram is trusted only if its bin counts vary at least this much (coefficient of
    # variation): arrivals spread evenly over the range say nothing about the next one.
    min_cv: float = 2.0


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scheduler_id: str
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
    state_dir: str | None = None  # where OTLP-JSON traces go when no OTLP endpoint is set
    tracing: bool = True
    # spans go to the cluster's trace stream over NATS (a planned cluster: fabric.trace_stream)
    # rather than to files in state_dir
    trace_stream: bool = False
    metrics_listen: str = ""  # host:port of the Prometheus scrape endpoint ("": none)
    log_level: str = "INFO"
    lease_ttl_s: int = 5
    max_payload_bytes: int = 6 * 1024 * 1024
    # A python function's dependency layer as stored (tar.gz); at most what nodes fetch (64 MiB)
    max_layer_bytes: int = 64 * 1024 * 1024
    # Copies of every bundle, each on its own NATS server (JetStream replicas): 3 in a planned
    # cluster of 3 or more servers, so losing one loses no deployed code
    bundle_replicas: int = 1
    max_timeout_ms: int = 900_000
    node_stale_after_s: float = 3.0  # no heartbeat for this long: the node is lost
    reply_margin_ms: int = 25  # answer this long before the caller's deadline, so the answer arrives
    max_concurrent: int = 4096  # invocations handled at once by this replica
    beat_interval_s: float = 1.0  # replica beats: peers count each other from them
    # A caller's retry: the longest to wait for the nodes to say whether they have it (they all
    # answer, so this is paid only when a node the view holds healthy says nothing).
    where_is_timeout_ms: int = 500
    placement: PlacementSettings = PlacementSettings()
    admission: AdmissionSettings = AdmissionSettings()
    keep_alive: KeepAliveSettings = KeepAliveSettings()
