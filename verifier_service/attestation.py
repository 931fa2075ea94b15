"""Attestations: what the verifier approved, in a canonical encoding, signed with Ed25519.

A signature says *origin and integrity* (this service approved exactly these instructions, map
shapes and parameters, for this tenant and function, until then), not safety: nodes still run
the kernel verifier themselves and compare `verified_insns` (docs/architecture.md §5)."""

import os
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.ebpf import Attestation, Signed

_encoder = msgspec.msgpack.Encoder()


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
