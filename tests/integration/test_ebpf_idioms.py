"""What eBPF authors really write, through the whole path on the real kernel: the verifier
pipeline (static checks, policy, the kernel verifier in strict mode), then a node's load (its own
maps, global data written and `.rodata` frozen) and runs with the results the C says. And the
leaks a privileged load would let through, refused."""

import asyncio
import os
import struct
import time
from collections.abc import Callable

import pytest

from ebpf_runtime.admission import LoadRequest, admit
from ebpf_runtime.loader import Loaded, load
from fabric import bpf, signing
from schemas.ebpf import VerifyReply
from tests.bpf_build import bpf_builder
from verifier_service.attestation import load_or_create_key
from verifier_service.pipeline import VerifyLimits, verify
from verifier_service.service import Verifier
from verifier_service.settings import VerifierSettings

pytestmark = pytest.mark.privileged
XDP_DROP, XDP_PASS, TC_ACT_OK = 1, 2, 0

GLOBALS = """
const volatile __u32 threshold = 3;      /* .rodata: configuration, frozen on the node */
__u64 packets = 7;                       /* .data: starts at 7 */
__u32 seen[4];                           /* .bss */
SEC("xdp")
int configured(struct xdp_md *ctx)
{
    seen[1]++;
    packets++;
    return packets > threshold + 5 ? XDP_DROP : XDP_PASS;   /* 8 > 8 no, then 9 > 8 */
}
"""
SUBPROGRAMS = """
#include <linux/if_ether.h>
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} bytes SEC(".maps");
static __noinline int account(__u64 length)
{
    __u32 key = 0;
    __u64 *total = bpf_map_lookup_elem(&bytes, &key);
    if (total)
        *total += length;
    return 0;
}
static __noinline int is_ipv4(void *data, void *data_end)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return 0;
    return eth->h_proto == __builtin_bswap16(ETH_P_IP);
}
SEC("xdp")
int parse(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    account(64);
    return is_ipv4(data, data_end) ? XDP_DROP : XDP_PASS;
}
"""
LPM = """
struct key { __u32 prefixlen; __u8 addr[4]; };
struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 16);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct key);
    __type(value, __u32);
} blocked SEC(".maps");
SEC("xdp")
int block(struct xdp_md *ctx)
{
    unsigned char *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    if (data + 34 > data_end)
        return XDP_PASS;
    struct key k = { .prefixlen = 32 };
    __builtin_memcpy(k.addr, data + 26, 4);      /* the IPv4 source address */
    return bpf_map_lookup_elem(&blocked, &k) ? XDP_DROP : XDP_PASS;
}
"""
SIBLINGS = """
struct {
    __uint(type, BPF_MAP_TYPE_DEVMAP);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u32);
} ports SEC(".maps");
SEC("xdp") int forward(struct xdp_md *ctx) { return bpf_redirect_map(&ports, 0, 0); }
SEC("xdp") int pass(struct xdp_md *ctx) { return XDP_PASS; }
"""
LOAD_BYTES = """
SEC("xdp")
int first_byte(struct xdp_md *ctx)
{
    __u8 head[4];
    if (bpf_xdp_load_bytes(ctx, 0, head, sizeof(head)))
        return XDP_ABORTED;
    return bpf_xdp_get_buff_len(ctx) == 64 && head[0] == 0xab ? XDP_DROP : XDP_PASS;
}
"""
FLOW_HASH = """
#include <linux/pkt_cls.h>
struct {
    __uint(type, BPF_MAP_TYPE_QUEUE);
    __uint(max_entries, 8);
    __uint(value_size, 4);
} hashes SEC(".maps");
SEC("tc")
int hash_flow(struct __sk_buff *skb)
{
    __u32 hash = bpf_get_hash_recalc(skb);
    __u64 now = bpf_ktime_get_boot_ns();
    bpf_map_push_elem(&hashes, &hash, 0);
    return now ? TC_ACT_OK : TC_ACT_SHOT;
}
"""
# Leaks a privileged load accepts (it may store pointers): strict verification refuses each.
LEAK_INTO_GLOBAL = """
__u64 slot;
SEC("xdp") int leak(struct xdp_md *ctx) { slot = (__u64)(long)ctx; return XDP_PASS; }
"""
LEAK_INTO_MAP = """
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} out SEC(".maps");
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&out, &key);
    if (value)
        *value = (__u64)(long)value;
    return XDP_PASS;
}
"""
LEAK_INTO_PACKET = """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    if (data + 8 > data_end)
        return XDP_PASS;
    *(__u64 *)data = (__u64)(long)data_end;
    return XDP_PASS;
}
"""
LEAK_IN_RETURN = """
SEC("xdp") int leak(struct xdp_md *ctx) { return (long)ctx->data; }
"""
CALLBACK = """
static long step(__u32 i, void *ctx) { return 0; }
SEC("xdp") int loops(struct xdp_md *ctx) { bpf_loop(4, step, 0, 0); return XDP_PASS; }
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], bytes]:
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root")
    return bpf_builder(tmp_path_factory.mktemp("idioms"))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory):
    return load_or_create_key(tmp_path_factory.mktemp("key") / "signing.pem")


def verified(
    build, name: str, source: str, program: str | None = None, prog_type: str = "xdp"
) -> VerifyReply:
    return asyncio.run(verify(build(name, source), program, prog_type, VerifyLimits()))


def loaded_on_a_node(reply: VerifyReply, key) -> Loaded:
    """Signed as the verifier service signs, admitted and loaded as a DPU node does."""
    settings = VerifierSettings(verifier_id="v", nats_url="", key_path="")
    signed = Verifier(settings, key).attest(reply, "acme", "fn")
    assert signed.signed is not None
    request = LoadRequest(
        tenant="acme",
        function="fn",
        prog_type=reply.prog_type,
        maps=signed.maps,
        map_refs=signed.map_refs,
        instructions=signed.instructions,
        signed=signed.signed,
    )
    keyring = {signing.key_id(key.public_key()): key.public_key()}
    return load(request, admit(request, keyring, set(), time.time()))


def returns(loaded: Loaded, packet: bytes, times: int = 1) -> list[int]:
    return [loaded.run(packet)[0] for _ in range(times)]


def test_global_configuration_and_counters(build, key) -> None:
    reply = verified(build, "globals", GLOBALS)
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
    three = verified(build, "globals3", GLOBALS)
    four = verified(build, "globals4", GLOBALS.replace("threshold = 3", "threshold = 4"))
    assert three.accepted and four.accepted and three.digest != four.digest


def test_subprograms_are_linked_and_called(build, key) -> None:
    reply = verified(build, "subprograms", SUBPROGRAMS)
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
    reply = verified(build, "lpm", LPM)
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
    data = build("siblings", SIBLINGS)
    plain = asyncio.run(verify(data, "pass", "xdp", VerifyLimits()))
    forwarding = asyncio.run(verify(data, "forward", "xdp", VerifyLimits()))
    assert plain.accepted and plain.maps == [], plain.reasons
    assert {r.code for r in forwarding.reasons} == {"map_type", "helper_denied"}


def test_xdp_load_bytes_and_buffer_length(build, key) -> None:
    reply = verified(build, "load_bytes", LOAD_BYTES)
    assert reply.accepted, reply.reasons
    loaded = loaded_on_a_node(reply, key)
    try:
        results = returns(loaded, b"\xab" + bytes(63)) + returns(loaded, bytes(64))
    finally:
        loaded.close()
    assert results == [XDP_DROP, XDP_PASS]


def test_a_tc_program_hashes_flows_into_a_queue(build, key) -> None:
    reply = verified(build, "flow_hash", FLOW_HASH, prog_type="sched_cls")
    assert reply.accepted, reply.reasons
    assert [(m.name, m.type, m.key_size) for m in reply.maps] == [("hashes", 22, 0)]
    loaded = loaded_on_a_node(reply, key)
    try:
        results = returns(loaded, bytes(12) + b"\x08\x00" + bytes(50), 2)
    finally:
        loaded.close()
    assert results == [TC_ACT_OK, TC_ACT_OK]


@pytest.mark.parametrize(
    ("name", "source", "says"),
    [
        ("leak_global", LEAK_INTO_GLOBAL, "leaks addr"),
        ("leak_map", LEAK_INTO_MAP, "leaks addr"),
        ("leak_packet", LEAK_INTO_PACKET, "leaks addr"),
        ("leak_return", LEAK_IN_RETURN, "R0 leaks addr"),
    ],
)
def test_pointer_leaks_are_refused(build, name: str, source: str, says: str) -> None:
    reply = verified(build, name, source)
    assert not reply.accepted
    [reason] = reply.reasons
    assert reason.code == "kernel_verifier" and says in reason.message, reason


def test_a_callback_is_refused_with_what_to_write_instead(build) -> None:
    reply = verified(build, "callback", CALLBACK)
    assert [r.code for r in reply.reasons] == ["callback"]
    assert "bpf_loop" in reply.reasons[0].message and "__noinline" in reply.reasons[0].message
