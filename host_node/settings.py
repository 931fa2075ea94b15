import msgspec

from ebpf_runtime.settings import EbpfRuntimeSettings
from host_node.sandbox.settings import SandboxSettings


class HostNodeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
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
    work_dir: str  # bundles and function logs live here
    state_dir: str | None = None  # where OTLP-JSON traces go when no OTLP endpoint is set
    tracing: bool = True
    # spans go to the cluster's trace stream over NATS (a planned cluster: fabric.trace_stream)
    # rather than to files in state_dir
    trace_stream: bool = False
    metrics_listen: str = ""  # host:port of the Prometheus scrape endpoint ("": none)
    log_level: str = "INFO"
    lease_ttl_s: int = 5
    heartbeat_interval_s: float = 1.0
    capacity: int = 64  # invocations running at once; beyond it the node answers `throttled`
    max_instances: int = 64  # warm python instances on this node, all functions together
    max_instances_per_function: int = 16  # further capped by each function's `concurrency`
    keep_alive_s: float = 600.0  # an idle instance lives this long
    # Python interpreters started in their sandboxes ahead of any function (stem cells, each
    # ~10 MB idle): a cold start takes one rather than waiting for an interpreter. 0: none.
    python_stem_cells: int = 16
    # A template per python function that has run here (its imports done), whose cold starts
    # fork from it; needs the secure sandbox and Landlock ABI 6 (Linux 6.12), else off.
    python_templates: bool = True
    # A template lives this long after its last fork with no fork alive: it is what makes the
    # function's next cold start here fast, so it outlives the instances' keep-alive.
    template_keep_alive_s: float = 3600.0
    max_output_bytes: int = 6 * 1024 * 1024
    max_log_bytes: int = 16 * 1024 * 1024  # a function's log past this moves to <function>.log.1
    shutdown_grace_s: float = 10.0  # on SIGTERM, running invocations get this long to finish
    memory_mb: int = 0  # memory for function instances, placement counts it (0: not accounted)
    kernel_tracing: bool = True  # with tracing on: cold starts' kernel events (bcc; root only)
    sandbox: SandboxSettings = SandboxSettings()
    # Set (with the verifier's trusted keys) to take eBPF functions with placement "any" when no
    # DPU has room; needs root (CAP_BPF). The same loader and checks as a DPU node.
    ebpf: EbpfRuntimeSettings | None = None
