import msgspec


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scheduler_id: str
    nats_url: str
    etcd_endpoints: list[str]
    state_dir: str | None = None  # where OTLP-JSON traces go when no OTLP endpoint is set
    tracing: bool = True
    log_level: str = "INFO"
    lease_ttl_s: int = 5
    max_payload_bytes: int = 6 * 1024 * 1024
    max_timeout_ms: int = 900_000
    node_stale_after_s: float = 3.0  # no heartbeat for this long: the node is lost
    reply_margin_ms: int = 25  # answer this long before the caller's deadline, so the answer arrives
    max_concurrent: int = 4096  # invocations handled at once by this replica
