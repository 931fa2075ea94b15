"""Whether a node may load a program: every check of docs/architecture.md §5 before any bpf(2) call.
Pure: the signed attestation, the bytes, what the deploy asks for, the node's trust and the time
in; the attestation or a refusal with its reason out."""

from collections.abc import Sequence

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fabric import kernel_types
from fabric.signing import AttestationError, VerifiedSignatures, check
from schemas.ebpf import VERIFY_MODES, Attestation, MapSpec, ProgType, Signed, program_digest


class LoadRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the deploy asks this node to load: the bytes and what they are for."""

    tenant: str
    function: str
    prog_type: ProgType
    maps: list[MapSpec]
    map_refs: dict[int, str]
    instructions: bytes
    signed: Signed


class Refused(ValueError):
    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def admit(
    request: LoadRequest,
    trusted: dict[str, Ed25519PublicKey],
    revoked: set[str],
    now: float,
    verified: VerifiedSignatures | None = None,
    load_modes: Sequence[str] = VERIFY_MODES,
    node_types: str | None = None,  # this node's kernel types' digest (default: read once from the kernel)
) -> Attestation:
    try:
        approved = check(request.signed, trusted, now, verified)
    except AttestationError as exc:
        raise Refused(exc.code, str(exc)) from None
    digest = program_digest(request.instructions, request.maps, request.map_refs)
    if digest != approved.digest:
        raise Refused("digest_mismatch", "the bytecode or its map shapes are not what was approved")
    if approved.digest in revoked:
        raise Refused("revoked", f"program {approved.digest} has been revoked")
    for field in ("tenant", "function", "prog_type"):
        if getattr(approved, field) != getattr(request, field):
            wanted, signed_for = getattr(request, field), getattr(approved, field)
            raise Refused("wrong_" + field, f"approved for {field} {signed_for!r}, not {wanted!r}")
    if sorted(approved.maps, key=_name) != sorted(request.maps, key=_name):
        raise Refused("maps_mismatch", "the map specs differ from the approved ones")
    if node_types is None:
        node_types = kernel_types.running_digest()
    if approved.kernel_types and approved.kernel_types != node_types:
        raise Refused(
            "kernel_types",
            "its CO-RE offsets were taken from another kernel's types than this node's: verify it "
            "on a verifier running this node's kernel",
        )
    if approved.mode not in load_modes:
        raise Refused(
            "verify_mode",
            f"this node loads only programs verified {' or '.join(load_modes)}, and this one was "
            f'verified {approved.mode}: deploy it with verify_mode = "strict" in its [ebpf] table',
        )
    return approved


def _name(spec: MapSpec) -> str:
    return spec.name
