"""A DPU node loads only what the verifier signed, for whom it signed it: the admission checks
and the load (its own maps, the kernel verifier again, verified_insns compared) on the real
kernel; every kind of tampering refused with its own reason."""

import os
import struct
import time

import msgspec
import pytest

from ebpf_runtime.admission import LoadRequest, Refused, admit
from ebpf_runtime.loader import load
from fabric import bpf, signing
from tests.bpf_build import COUNTER, bpf_builder
from verifier_service.attestation import load_or_create_key
from verifier_service.pipeline import VerifyLimits, verify
from verifier_service.service import Verifier
from verifier_service.settings import VerifierSettings

pytestmark = pytest.mark.privileged
XDP_PASS = 2


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("keys")
    return load_or_create_key(directory / "signing.pem"), load_or_create_key(directory / "other.pem")


@pytest.fixture(scope="module")
async def approved(tmp_path_factory: pytest.TempPathFactory, keys):
    """The counter program, verified by the real pipeline and signed for acme/count."""
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root")
    data = bpf_builder(tmp_path_factory.mktemp("bpf"))("counter", COUNTER)
    reply = await verify(data, None, "xdp", VerifyLimits())
    settings = VerifierSettings(verifier_id="v", nats_url="", key_path="")
    return Verifier(settings, keys[0]).attest(reply, "acme", "count")


def request_for(reply, **changes) -> LoadRequest:
    base = LoadRequest(
        tenant="acme",
        function="count",
        prog_type="xdp",
        maps=reply.maps,
        map_refs=reply.map_refs,
        instructions=reply.instructions,
        signed=reply.signed,
    )
    return msgspec.structs.replace(base, **changes)


def trusted(*private_keys) -> dict:
    return {signing.key_id(k.public_key()): k.public_key() for k in private_keys}


def test_an_approved_program_loads_runs_and_counts_in_the_nodes_own_map(approved, keys) -> None:
    request = request_for(approved)
    attestation = admit(request, trusted(keys[0]), set(), time.time())
    loaded = load(request, attestation)
    try:
        results = [loaded.run(bytes(64)) for _ in range(3)]
        fd, spec = loaded.maps["counters"]
        count = struct.unpack("<Q", bpf.map_lookup(fd, struct.pack("<I", 0), spec.value_size))[0]
    finally:
        loaded.close()

    assert [retval for retval, _, _ in results] == [XDP_PASS] * 3
    assert count == 3, "the program counted into the map this node created"


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        ("flipped_byte", "digest_mismatch"),
        ("other_tenant", "wrong_tenant"),
        ("other_function", "wrong_function"),
        ("maps_swapped", "digest_mismatch"),
        ("map_refs_moved", "digest_mismatch"),
        ("unknown_key", "unknown_key"),
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("forged_signature", "bad_signature"),
    ],
)
def test_tampering_is_refused_before_anything_is_loaded(approved, keys, tamper: str, code: str) -> None:
    request, keyring, revoked, now = request_for(approved), trusted(keys[0]), set(), time.time()
    if tamper == "flipped_byte":
        code_bytes = bytearray(request.instructions)
        code_bytes[20] ^= 0x01
        request = msgspec.structs.replace(request, instructions=bytes(code_bytes))
    elif tamper == "other_tenant":
        request = msgspec.structs.replace(request, tenant="mallory")
    elif tamper == "other_function":
        request = msgspec.structs.replace(request, function="steal")
    elif tamper == "maps_swapped":
        bigger = [msgspec.structs.replace(m, max_entries=m.max_entries * 1024) for m in request.maps]
        request = msgspec.structs.replace(request, maps=bigger)
    elif tamper == "map_refs_moved":
        request = msgspec.structs.replace(request, map_refs={0: "counters"})
    elif tamper == "unknown_key":
        keyring = trusted(keys[1])
    elif tamper == "expired":
        now += 31 * 24 * 3600
    elif tamper == "revoked":
        revoked = {approved.digest}
    elif tamper == "forged_signature":
        signature = bytes(64)
        request = msgspec.structs.replace(
            request, signed=msgspec.structs.replace(request.signed, signature=signature)
        )

    with pytest.raises(Refused) as refused:
        admit(request, keyring, revoked, now)
    assert refused.value.code == code, str(refused.value)


def test_an_attestation_from_another_kernel_is_refused_at_load(approved, keys) -> None:
    request = request_for(approved)
    attestation = admit(request, trusted(keys[0]), set(), time.time())
    drifted = msgspec.structs.replace(attestation, verified_insns=attestation.verified_insns + 1)

    with pytest.raises(Refused) as refused:
        load(request, drifted)

    assert refused.value.code == "verified_insns_mismatch"
