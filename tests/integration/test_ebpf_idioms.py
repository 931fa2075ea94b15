"""What eBPF authors really write (tests/ebpf_corpus.py), through the whole path on the real
kernel: the verifier pipeline (static checks, policy, the kernel verifier in strict mode, and in
proven mode with the leak proof when strict refuses it), then a node's load in the attested mode
(its own maps, global data written and `.rodata` frozen) and runs with the results the C says.
And the leaks a privileged load would let through, refused in both modes with the right reason."""

import asyncio
import os
import re
import struct
import time
from collections.abc import Callable

import pytest

from ebpf_runtime.admission import LoadRequest, Refused, admit
from ebpf_runtime.loader import Loaded, load
from fabric import bpf, kernel_types, signing
from schemas.ebpf import VerifyReply
from tests import ebpf_corpus as corpus
from tests.bpf_build import bpf_builder
from verifier_service.attestation import load_or_create_key
from verifier_service.pipeline import VerifyLimits, verify
from verifier_service.service import Verifier
from verifier_service.settings import VerifierSettings

pytestmark = pytest.mark.privileged
XDP_DROP, XDP_PASS = corpus.XDP_DROP, corpus.XDP_PASS
# what strict mode refuses and proven mode accepts: packet arithmetic and loops over the packet
PROOF_REFUSALS = {"pointer_leak", "uninitialized_stack", "unproven", "stack"}
NEEDS_PROVEN = {"packet_length", "variable_header", "tcp_options"}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], bytes]:
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root")
    return bpf_builder(tmp_path_factory.mktemp("idioms"))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory):
    return load_or_create_key(tmp_path_factory.mktemp("key") / "signing.pem")


def verified(
    build, name: str, source: str, program: str | None = None, prog_type: str = "xdp", mode: str = "auto"
) -> VerifyReply:
    return asyncio.run(verify(build(name, source), program, prog_type, VerifyLimits(), mode=mode))


def signed_request(reply: VerifyReply, key) -> LoadRequest:
    settings = VerifierSettings(verifier_id="v", nats_url="", key_path="")
    signed = Verifier(settings, key).attest(reply, "acme", "fn")
    assert signed.signed is not None
    return LoadRequest(
        tenant="acme",
        function="fn",
        prog_type=reply.prog_type,
        maps=signed.maps,
        map_refs=signed.map_refs,
        instructions=signed.instructions,
        signed=signed.signed,
    )


def loaded_on_a_node(reply: VerifyReply, key) -> Loaded:
    """Signed as the verifier service signs, admitted and loaded as a DPU node does."""
    request = signed_request(reply, key)
    keyring = {signing.key_id(key.public_key()): key.public_key()}
    return load(request, admit(request, keyring, set(), time.time()))


def returns(loaded: Loaded, packet: bytes, times: int = 1) -> list[int]:
    return [loaded.run(packet)[0] for _ in range(times)]


@pytest.mark.parametrize("case", corpus.ACCEPTED, ids=lambda case: case.name)
def test_each_idiom_is_accepted_and_runs_as_its_c_says(build, key, case: corpus.Case) -> None:
    reply = verified(build, case.name, case.source, case.program, case.prog_type)
    assert reply.accepted, reply.reasons
    assert reply.mode == ("proven" if case.name in NEEDS_PROVEN else "strict"), "strict whenever it passes"
    loaded = loaded_on_a_node(reply, key)  # in the attested mode: the same walk, verified_insns compared
    try:
        results = [loaded.run(packet)[0] for packet, _ in case.runs]
    finally:
        loaded.close()
    assert results == [expected for _, expected in case.runs]


@pytest.mark.parametrize("name", sorted(NEEDS_PROVEN))
def test_packet_idioms_need_proven_mode_and_strict_says_why(build, name: str) -> None:
    case = next(case for case in corpus.ACCEPTED if case.name == name)
    reply = verified(build, case.name, case.source, mode="strict")
    assert not reply.accepted and reply.mode == "strict"
    assert [r.code for r in reply.reasons] == ["kernel_verifier"]


def test_a_node_that_keeps_spectre_hardening_refuses_a_proven_program(build, key) -> None:
    reply = verified(build, "length", corpus.PACKET_LENGTH.source)
    assert reply.mode == "proven"
    request = signed_request(reply, key)
    keyring = {signing.key_id(key.public_key()): key.public_key()}
    with pytest.raises(Refused) as refused:
        admit(request, keyring, set(), time.time(), load_modes=["strict"])
    assert refused.value.code == "verify_mode" and 'verify_mode = "strict"' in str(refused.value)


def test_global_configuration_and_counters(build, key) -> None:
    reply = verified(build, "globals", corpus.GLOBALS.source)
    assert reply.accepted, reply.reasons
    by_name = {m.name: m for m in reply.maps}
    assert sorted(by_name) == [".bss", ".data", ".rodata"]
    assert by_name[".rodata"].frozen and by_name[".rodata"].initial == struct.pack("<I", 3)
    assert by_name[".data"].initial == struct.pack("<Q", 7) and not by_name[".data"].frozen

    loaded = loaded_on_a_node(reply, key)
    try:
        results = returns(loaded, bytes(64), 3)
        rodata_fd = loaded.maps[".rodata"][0]
        with pytest.raises(bpf.BpfError):  # frozen: not even the node can change the configuration
            bpf.map_update(rodata_fd, bytes(4), struct.pack("<I", 100))
        bss_fd, bss = loaded.maps[".bss"]
        seen = bpf.map_lookup(bss_fd, bytes(4), bss.value_size)
    finally:
        loaded.close()
    assert results == [XDP_PASS, XDP_DROP, XDP_DROP], "packets started at .data's 7, threshold from .rodata"
    assert seen is not None and struct.unpack_from("<I", seen, 4)[0] == 3


def test_the_digest_covers_global_data(build) -> None:
    three = verified(build, "globals3", corpus.GLOBALS.source)
    four = verified(build, "globals4", corpus.GLOBALS.source.replace("threshold = 3", "threshold = 4"))
    assert three.accepted and four.accepted and three.digest != four.digest


def test_subprograms_are_linked_and_called(build, key) -> None:
    reply = verified(build, "subprograms", corpus.SUBPROGRAMS.source)
    assert reply.accepted, reply.reasons
    ipv4 = bytes(12) + b"\x08\x00" + bytes(50)
    loaded = loaded_on_a_node(reply, key)
    try:
        results = returns(loaded, ipv4) + returns(loaded, bytes(64))
        fd, spec = loaded.maps["bytes"]
        total = bpf.map_lookup(fd, bytes(4), spec.value_size)
    finally:
        loaded.close()
    assert results == [XDP_DROP, XDP_PASS]
    assert total == struct.pack("<Q", 128), "each run accounted 64 bytes in the subprogram"


def test_an_lpm_trie_matches_prefixes(build, key) -> None:
    reply = verified(build, "lpm", corpus.LPM.source)
    assert reply.accepted, reply.reasons
    packet = bytearray(64)
    packet[26:30] = bytes([10, 1, 2, 3])
    loaded = loaded_on_a_node(reply, key)
    try:
        before = returns(loaded, bytes(packet))
        fd, _ = loaded.maps["blocked"]
        bpf.map_update(fd, struct.pack("<I", 16) + bytes([10, 1, 0, 0]), struct.pack("<I", 1))  # 10.1/16
        after = returns(loaded, bytes(packet))
        elsewhere = returns(loaded, bytes(64))
    finally:
        loaded.close()
    assert (before, after, elsewhere) == ([XDP_PASS], [XDP_DROP], [XDP_PASS])


def test_only_the_named_programs_maps_are_checked(build) -> None:
    data = build("siblings", corpus.SIBLINGS.source)
    plain = asyncio.run(verify(data, "pass", "xdp", VerifyLimits()))
    forwarding = asyncio.run(verify(data, "forward", "xdp", VerifyLimits()))
    assert plain.accepted and plain.maps == [], plain.reasons
    assert {r.code for r in forwarding.reasons} == {"map_type", "helper_denied"}


def test_a_queue_has_no_key(build) -> None:
    reply = verified(build, "flow_hash", corpus.FLOW_HASH.source, prog_type="sched_cls")
    assert [(m.name, m.type, m.key_size) for m in reply.maps] == [("hashes", 22, 0)]


@pytest.mark.parametrize("mode", ["strict", "proven", "auto"])
@pytest.mark.parametrize("leak", corpus.LEAKS, ids=lambda leak: leak.name)
def test_every_leak_is_refused_with_the_right_reason(build, leak: corpus.Leak, mode: str) -> None:
    data = build(leak.name, leak.source, leak.flags)
    reply = asyncio.run(verify(data, None, "xdp", VerifyLimits(), mode=mode))
    assert not reply.accepted and reply.instructions == b""
    if mode == "strict":
        [reason] = reply.reasons
        assert reason.code == "kernel_verifier" and leak.strict_says in reason.message, reason
    else:  # auto: strict refused it, and the privileged load's log shows the leak
        assert reply.mode == "proven" and {r.code for r in reply.reasons} <= PROOF_REFUSALS, reply.reasons
        reason = next(r for r in reply.reasons if r.code == leak.proven_code)
        assert leak.proven_says in reason.message and reason.insn is not None, reason
    assert reason.source is not None, "the object has line info (-g): the refusal names the line"
    assert not re.search(r"0xffff[0-9a-f]{12}", reply.kernel_log_tail), "kernel addresses in the log"


@pytest.mark.parametrize("mode", ["strict", "proven"])
def test_a_refusal_names_the_source_line(build, mode: str) -> None:
    leak = next(leak for leak in corpus.LEAKS if leak.name == "leak_map")
    reply = asyncio.run(verify(build(leak.name, leak.source), None, "xdp", VerifyLimits(), mode=mode))
    [reason] = reply.reasons
    assert reason.source is not None and reason.source.endswith("*value = (__u64)(long)value;"), reason
    assert reason.source.startswith("leak_map.c:")


def test_a_policy_refusal_names_the_source_line_too(build) -> None:
    data = build("siblings", corpus.SIBLINGS.source)
    reply = asyncio.run(verify(data, "forward", "xdp", VerifyLimits()))
    denied = next(r for r in reply.reasons if r.code == "helper_denied")
    assert denied.source is not None and "bpf_redirect_map(&ports, 0, 0)" in denied.source, denied


def test_a_co_re_program_is_attested_for_the_kernel_types_it_was_relocated_against(build, key) -> None:
    reply = verified(build, "co_re", corpus.CO_RE.source)
    assert reply.accepted and reply.kernel_types == kernel_types.running_digest(), reply.kernel_types
    request = signed_request(reply, key)
    keyring = {signing.key_id(key.public_key()): key.public_key()}
    assert admit(request, keyring, set(), time.time()).kernel_types == reply.kernel_types
    with pytest.raises(Refused) as refused:
        admit(request, keyring, set(), time.time(), node_types="sha256-" + "0" * 64)
    assert refused.value.code == "kernel_types"
    plain = verified(build, "length", corpus.PACKET_LENGTH.source)
    assert plain.kernel_types == "", "without CO-RE a program is for any kernel"
