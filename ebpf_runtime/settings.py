import msgspec

from schemas.ebpf import VERIFY_MODES, VerifyMode


class EbpfRuntimeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a node that runs signed eBPF programs trusts and how it splits itself per tenant."""

    trusted_keys: list[str]  # base64 Ed25519 public keys of the verifier; only these are believed
    cores: int = 8  # programs running at once
    map_memory_bytes: int = 256 * 1024 * 1024  # all tenants' maps together
    tenant_programs: int = 16  # per tenant partition
    tenant_map_memory_bytes: int = 32 * 1024 * 1024  # per tenant partition
    tenant_concurrency: int = 4  # one tenant's programs running at once (of `cores`)
    max_packet_bytes: int = 9000
    # the verification modes whose programs this node loads (docs/architecture.md §5): a node whose
    # tenants must keep the kernel's Spectre hardening loads only "strict" ones
    load_modes: list[VerifyMode] = msgspec.field(default_factory=lambda: list(VERIFY_MODES))
