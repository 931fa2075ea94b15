"""Attestations: what the verifier approved, in a canonical encoding, signed with Ed25519.

A signature says *origin and integrity* (this service approved exactly these instructions, map
shapes and parameters, for this tenant and function, until then), not safety: nodes still run
the kernel verifier themselves and compare `verified_insns` (DESIGN.md §5)."""

import base64
import hashlib
import os
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.ebpf import Attestation, Signed


class AttestationError(ValueError):
    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Attestation)


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


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key: a 0600 PEM file, created on first start."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} is readable by others: chmod 600 it")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def sign(attestation: Attestation, key: Ed25519PrivateKey) -> Signed:
    encoded = _encoder.encode(attestation)
    return Signed(attestation=encoded, signature=key.sign(encoded), key_id=attestation.key_id)


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
