"""Checking signed attestations: what every node that loads eBPF does before it loads anything.
(Signing, and the private key, are the verifier service's: verifier_service/attestation.py.)"""

import base64
import hashlib
from collections import OrderedDict

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


class VerifiedSignatures:
    """Signatures already verified on this node (an Ed25519 verification costs ~0.1 ms here, a
    fifth of a program's load): a program loaded again, on restart or on another function, is not
    verified twice. Keyed by key id, signed bytes and signature together, so nothing else matches."""

    def __init__(self, max_entries: int = 4096):
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._max = max_entries

    @staticmethod
    def _key(signed: Signed) -> bytes:
        return hashlib.sha256(signed.key_id.encode() + b"\0" + signed.signature + signed.attestation).digest()

    def __contains__(self, signed: Signed) -> bool:
        key = self._key(signed)
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        return False

    def add(self, signed: Signed) -> None:
        self._seen[self._key(signed)] = None
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)


def check(
    signed: Signed,
    trusted: dict[str, Ed25519PublicKey],
    now: float,
    verified: VerifiedSignatures | None = None,
) -> Attestation:
    """The attestation, if its signature is valid under a trusted key and it has not expired.
    Expiry (and everything after this call) is checked every time, cache or not."""
    public = trusted.get(signed.key_id)
    if public is None:
        raise AttestationError(
            "unknown_key", f"signed by key {signed.key_id!r}, which this node does not trust"
        )
    if verified is None or signed not in verified:
        try:
            public.verify(signed.signature, signed.attestation)
        except InvalidSignature:
            raise AttestationError("bad_signature", "the signature does not match the attestation") from None
        if verified is not None:
            verified.add(signed)
    attestation = _decoder.decode(signed.attestation)
    if attestation.key_id != signed.key_id:
        raise AttestationError(
            "bad_signature", "the attestation names another key than the one that signed it"
        )
    if now > attestation.not_after:
        raise AttestationError("expired", f"the attestation expired at {attestation.not_after:.0f}")
    return attestation
