"""Checking signed attestations: what every node that loads eBPF does before it loads anything.
(Signing, and the private key, are the verifier service's: verifier_service/attestation.py.)"""

import base64
import hashlib

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas.ebpf import Attestation, Signed

_decoder = msgspec.msgpack.Decoder(Attestation)


class AttestationError(ValueError):
    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519-" + hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public: Ed25519PublicKey) -> str:
    """How a node's settings pin a key: base64 of the 32 raw bytes."""
    return base64.b64encode(
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


def check(signed: Signed, trusted: dict[str, Ed25519PublicKey], now: float) -> Attestation:
    """The attestation, if its signature is valid under a trusted key and it has not expired."""
    public = trusted.get(signed.key_id)
    if public is None:
        raise AttestationError(
            "unknown_key", f"signed by key {signed.key_id!r}, which this node does not trust"
        )
    try:
        public.verify(signed.signature, signed.attestation)
    except InvalidSignature:
        raise AttestationError("bad_signature", "the signature does not match the attestation") from None
    attestation = _decoder.decode(signed.attestation)
    if attestation.key_id != signed.key_id:
        raise AttestationError(
            "bad_signature", "the attestation names another key than the one that signed it"
        )
    if now > attestation.not_after:
        raise AttestationError("expired", f"the attestation expired at {attestation.not_after:.0f}")
    return attestation
