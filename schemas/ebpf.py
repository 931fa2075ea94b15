"""The wire contract of eBPF functions: map shapes, the verifier's findings, attestations, and the
verify request and reply (docs/architecture.md §5)."""

import hashlib
from typing import Literal, get_args

import msgspec

# Program types offered to tenants -> enum bpf_prog_type.
ProgType = Literal["socket_filter", "sched_cls", "xdp"]
PROG_TYPES: dict[str, int] = {"socket_filter": 1, "sched_cls": 3, "xdp": 6}


class MapSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: int  # enum bpf_map_type
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    # Global data (`.data`, `.bss`, `.rodata*`: a one-entry array named after its section): what
    # the node writes into it before the load (empty: zeros), and whether it is then frozen
    # (`.rodata`: read-only to the program and to everyone after)
    initial: bytes = b""
    frozen: bool = False

    @property
    def memory_bytes(self) -> int:
        return self.max_entries * (self.key_size + self.value_size)

    @property
    def global_data(self) -> bool:
        """A section's variables (C names cannot start with "."): loaded by value, not by map."""
        return self.name.startswith(".")

    def digest_form(self) -> dict[str, object]:
        """The fields the digest covers; those at their defaults left out, so approvals made
        before global data existed keep their digests."""
        fields = msgspec.structs.asdict(self)
        for name in ("initial", "frozen"):
            if not fields[name]:
                del fields[name]
        return fields


# strict: the kernel's unprivileged rules (no pointer leaks, Spectre hardening); proven: a
# privileged load whose log proves no pointer or unwritten stack escapes (no Spectre hardening).
VerifyMode = Literal["strict", "proven"]
VERIFY_MODES: tuple[VerifyMode, ...] = get_args(VerifyMode)


class Reason(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a program is rejected, in the developer's terms, and at which instruction."""

    code: str
    message: str
    insn: int | None = None
    source: str | None = None  # `file.c:line: text` of that instruction, when the object has line info


class Attestation(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """What the verifier approved. array_like: a msgpack array in this field order, so the bytes
    that are signed are canonical."""

    digest: str  # program_digest(): the instructions, map shapes and map references
    prog_type: str
    maps: list[MapSpec]
    helpers: list[int]
    tenant: str
    function: str
    policy_id: str
    verifier_version: str
    kernel_release: str
    verified_insns: int
    run_ns: int
    issued_at: float
    not_after: float
    serial: str
    key_id: str
    # how the kernel verified it (docs/architecture.md §5), and so how a node must load it; an
    # attestation signed before modes existed was verified strict
    mode: VerifyMode = "strict"
    # CO-RE relocated: the digest of the kernel types (BTF) the offsets were taken from; a node
    # whose kernel has other types refuses it ("": no relocations, any kernel)
    kernel_types: str = ""


class Signed(msgspec.Struct, frozen=True, kw_only=True):
    attestation: bytes  # the canonical encoding, exactly as signed
    signature: bytes
    key_id: str


class VerifyRequest(msgspec.Struct, frozen=True, kw_only=True, tag="verify"):
    tenant: str
    function: str  # the function it is for ("" for `hetfaas verify` without deploying)
    object: bytes  # the ELF object, as clang wrote it
    program: str | None = None  # the program's function name; needed when the object holds several
    prog_type: str = "xdp"
    # auto: strict when the kernel's strict rules accept it, else proven
    mode: Literal["auto", "strict", "proven"] = "auto"


class VerifyReply(msgspec.Struct, frozen=True, kw_only=True, tag="verify_reply"):
    accepted: bool
    digest: str
    reasons: list[Reason]
    program: str = ""
    prog_type: str = ""
    insns: int = 0
    verified_insns: int = 0  # instructions the kernel verifier walked
    run_ns: int = 0  # measured cost per run, on a sample packet
    maps: list[MapSpec] = []
    map_refs: dict[int, str] = {}  # instruction index -> the map it loads
    helpers: list[int] = []  # the helper ids it calls
    sample_retvals: list[int] = []  # what it returned on the sample packets
    kernel_log_tail: str = ""
    instructions: bytes = b""  # when accepted: what the digest covers (map references symbolic)
    signed: Signed | None = None  # when accepted and the request named a function
    mode: str = ""  # the mode it was verified in ("strict" or "proven"; the last tried if refused)
    kernel_types: str = ""  # CO-RE relocated against these kernel types (their BTF's digest)


class MapWrite(msgspec.Struct, frozen=True, kw_only=True):
    """One entry to set or delete in a map of the tenant's own function. Key and value are text,
    read by each node against the map's shape (ebpf_runtime/map_text.py): a decimal number
    (little-endian, the field's size), 0x and hex bytes, or an IPv4/IPv6 prefix for an LPM key."""

    map: str
    key: str = ""  # "" for a queue or stack, which take none
    value: str | None = None  # None: delete the key


MAX_MAP_TEXT = 1024  # a key or value as text: 512 bytes in hex, more than any map here takes


def map_write_problem(write: MapWrite) -> str | None:
    if not write.map or len(write.map) > 64:
        return "a map name of 1..64 characters is needed"
    for what, text in (("key", write.key), ("value", write.value or "")):
        if len(text) > MAX_MAP_TEXT:
            return f"the {what} is {len(text)} characters, over the limit of {MAX_MAP_TEXT}"
    return None


class MapsRequest(msgspec.Struct, frozen=True, kw_only=True, tag="maps"):
    """A tenant reads its own function's maps, or writes one entry of one of them, on every node
    that has the program loaded (client -> scheduler -> each node)."""

    tenant: str
    function: str
    program_digest: str = ""  # filled in by the scheduler
    write: MapWrite | None = None


class MapEntry(msgspec.Struct, frozen=True, array_like=True):
    key: bytes
    value: bytes


class MapDump(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    name: str
    spec: MapSpec
    entries: list[MapEntry]
    truncated: bool = False


class MapsReply(msgspec.Struct, frozen=True, kw_only=True, tag="maps_reply"):
    maps: list[MapDump]  # after a write: the written map, as it is now
    applied: list[str] = []  # after a write: the nodes that applied it
    refused: list[str] = []  # after a write: why a node did not (node: reason)


class RevokeRequest(msgspec.Struct, frozen=True, kw_only=True, tag="revoke"):
    digest: str
    reason: str = ""


class RevokeReply(msgspec.Struct, frozen=True, kw_only=True, tag="revoke_reply"):
    digest: str
    revoked_at: float


def program_digest(instructions: bytes, maps: list[MapSpec], map_refs: dict[int, str]) -> str:
    """What `digest` means everywhere: the exact instructions (map references symbolic, as the
    compiler left them), the exact map shapes, and which instruction loads which map (the node
    relocates those itself). Verifier and nodes compute it alike."""
    hasher = hashlib.sha256(instructions)
    hasher.update(msgspec.msgpack.encode([m.digest_form() for m in sorted(maps, key=lambda m: m.name)]))
    hasher.update(msgspec.msgpack.encode(sorted(map_refs.items())))
    return "sha256-" + hasher.hexdigest()
