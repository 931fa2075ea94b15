import msgspec

from schemas.ebpf import VERIFY_MODES, VerifyMode


class VerifierSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    verifier_id: str
    nats_url: str
    nats_creds: str = ""  # the service's NATS credentials file (`.creds`); empty: connect without
    nats_ca: str = ""  # the CA (PEM file) that signed nats-server's certificate: TLS ("": plain TCP)
    key_path: str  # the Ed25519 signing key (a 0600 PEM file, created on first start)
    state_dir: str | None = None  # where OTLP-JSON traces go when no OTLP endpoint is set
    tracing: bool = True
    # spans go to the cluster's trace stream over NATS (a planned cluster: fabric.trace_stream)
    # rather than to files in state_dir
    trace_stream: bool = False
    metrics_listen: str = ""  # host:port of the Prometheus scrape endpoint ("": none)
    log_level: str = "INFO"
    # kernel verifications at once (each a worker process), one per tenant at most: with more
    # workers than busy tenants, a light program never waits behind a heavy one (bench.verifier)
    workers: int = 4
    max_object_bytes: int = 512 * 1024
    max_insns: int = 4096  # length cap, far below the kernel's 1M
    max_verified_insns: int = 100_000  # budget for the kernel verifier's walk
    # CPU a kernel walk may spend, in strict mode and in proven mode (the level-2 load and the
    # proof of its log); a verification bomb is cut off there. A walk of max_verified_insns takes
    # 0.25 s strict and 2.6 s proven here (pipeline.VerifyLimits).
    kernel_cpu_budget_s: float = 1.0
    proven_cpu_budget_s: float = 4.0
    kernel_timeout_s: float = 15.0  # wall clock, however loaded the machine: the last resort
    # offered to tenants; ["strict"] keeps the kernel's Spectre hardening for every program
    modes: list[VerifyMode] = msgspec.field(default_factory=lambda: list(VERIFY_MODES))
    tenant_rate_per_s: float = 2.0  # verifications a tenant may start per second, on average ...
    tenant_burst: int = 20  # ... and at once
    attestation_ttl_s: float = 30 * 24 * 3600.0
    policy_id: str = "tenant-isolation-v1"
