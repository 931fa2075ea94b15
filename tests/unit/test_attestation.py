"""Signing and checking attestations: canonical bytes, tampering, unknown keys, expiry, key files."""

import os
import stat
from pathlib import Path

import msgspec
import pytest

from fabric.signing import AttestationError, VerifiedSignatures, check, key_id
from schemas.ebpf import Attestation, MapSpec, Signed
from verifier_service.attestation import load_or_create_key, sign

NOW = 1_800_000_000.0


def attestation(key: str, **changes) -> Attestation:
    base = Attestation(
        digest="sha256-" + "ab" * 32,
        prog_type="xdp",
        maps=[MapSpec(name="counters", type=2, key_size=4, value_size=8, max_entries=4)],
        helpers=[1],
        tenant="acme",
        function="count",
        policy_id="p1",
        verifier_version="1",
        kernel_release="6.18",
        verified_insns=12,
        run_ns=20,
        issued_at=NOW,
        not_after=NOW + 3600,
        serial="s-1",
        key_id=key,
    )
    return msgspec.structs.replace(base, **changes)


@pytest.fixture
def key(tmp_path: Path):
    return load_or_create_key(tmp_path / "signing.pem")


def test_a_signed_attestation_checks_out_under_its_key(key) -> None:
    kid = key_id(key.public_key())
    signed = sign(attestation(kid), key)
    assert check(signed, {kid: key.public_key()}, NOW + 1) == attestation(kid)


def test_the_encoding_is_canonical(key) -> None:
    kid = key_id(key.public_key())
    assert sign(attestation(kid), key).attestation == sign(attestation(kid), key).attestation


@pytest.mark.parametrize("position", [0, 10, -1])
def test_one_flipped_byte_is_refused(key, position: int) -> None:
    kid = key_id(key.public_key())
    signed = sign(attestation(kid), key)
    body = bytearray(signed.attestation)
    body[position] ^= 0x01
    with pytest.raises(AttestationError) as refused:
        check(
            Signed(attestation=bytes(body), signature=signed.signature, key_id=kid),
            {kid: key.public_key()},
            NOW,
        )
    assert refused.value.code == "bad_signature"


def test_an_unknown_key_and_an_expired_attestation_are_refused(key, tmp_path: Path) -> None:
    kid = key_id(key.public_key())
    other = load_or_create_key(tmp_path / "other.pem")
    signed = sign(attestation(kid), key)

    with pytest.raises(AttestationError) as unknown:
        check(signed, {key_id(other.public_key()): other.public_key()}, NOW)
    with pytest.raises(AttestationError) as expired:
        check(signed, {kid: key.public_key()}, NOW + 3601)

    assert unknown.value.code == "unknown_key" and expired.value.code == "expired"


def test_a_signature_under_one_key_id_cannot_claim_another(key, tmp_path: Path) -> None:
    kid = key_id(key.public_key())
    other = load_or_create_key(tmp_path / "other.pem")
    signed = sign(attestation(key_id(other.public_key())), key)  # names the other key inside
    forged = Signed(attestation=signed.attestation, signature=signed.signature, key_id=kid)
    with pytest.raises(AttestationError) as refused:
        check(forged, {kid: key.public_key()}, NOW)
    assert refused.value.code == "bad_signature"


def test_the_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    first = load_or_create_key(path)
    again = load_or_create_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(first.public_key()) == key_id(again.public_key())
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_key(path)


def test_a_verified_signature_is_remembered_but_nothing_else_rides_on_it(key) -> None:
    kid = key_id(key.public_key())
    signed = sign(attestation(kid), key)
    cache = VerifiedSignatures()
    check(signed, {kid: key.public_key()}, NOW, cache)
    body = bytearray(signed.attestation)
    body[10] ^= 0x01
    tampered = Signed(attestation=bytes(body), signature=signed.signature, key_id=kid)

    assert signed in cache
    with pytest.raises(AttestationError) as forged:
        check(tampered, {kid: key.public_key()}, NOW, cache)
    with pytest.raises(AttestationError) as expired:
        check(signed, {kid: key.public_key()}, NOW + 3601, cache)
    assert (forged.value.code, expired.value.code) == ("bad_signature", "expired")
