"""The whole verification against the real kernel verifier (strict mode, in its worker): what the
static checks cannot see is refused by the kernel, with its own words and the instruction."""

import os
import time

import pytest

from tests.bpf_build import COUNTER, bpf_builder
from verifier_service.pipeline import VerifyLimits, verify

pytestmark = pytest.mark.privileged

XDP_PASS = 2
UNCHECKED_PACKET = """
SEC("xdp")
int peek(struct xdp_md *ctx) { unsigned char *data = (void *)(long)ctx->data; return data[20]; }
"""
UNINITIALISED_STACK = """
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 4); __type(key, __u32); __type(value, __u64); }
store SEC(".maps");

SEC("xdp")
int uninit(struct xdp_md *ctx)
{
    __u32 key;  /* never written */
    __u64 value = 1;
    bpf_map_update_elem(&store, &key, &value, 0);
    return XDP_PASS;
}
"""
POINTER_LEAK = """
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); }
leak SEC(".maps");

SEC("xdp")
int leaky(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&leak, &key);
    if (value)
        *value = (__u64)(long)value;  /* a kernel address, handed to whoever reads the map */
    return XDP_PASS;
}
"""
UNBOUNDED_LOOP = """
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); }
bound SEC(".maps");

SEC("xdp")
int spin(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *n = bpf_map_lookup_elem(&bound, &key);
    if (!n)
        return XDP_PASS;
    volatile __u64 sum = 0;
    for (__u64 i = 0; i < *n; i++)
        sum += i;
    return sum ? XDP_DROP : XDP_PASS;
}
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root (CAP_BPF and CAP_NET_ADMIN)")
    return bpf_builder(tmp_path_factory.mktemp("bpf"))


async def test_a_legitimate_program_is_accepted_with_its_cost(build) -> None:
    verdict = await verify(build("counter", COUNTER), None, "xdp", VerifyLimits())

    assert verdict.accepted, verdict.reasons
    assert verdict.verified_insns > 0 and verdict.run_ns > 0
    assert verdict.sample_retvals == [XDP_PASS] and verdict.helpers == [1]  # bpf_map_lookup_elem


@pytest.mark.parametrize(
    ("name", "source", "words"),
    [
        ("unchecked_packet", UNCHECKED_PACKET, "outside of the packet"),
        ("uninitialised_stack", UNINITIALISED_STACK, "invalid read from stack"),
        ("pointer_leak", POINTER_LEAK, "leaks addr"),
    ],
)
async def test_the_kernel_refuses_what_static_checks_cannot_see(
    build, name: str, source: str, words: str
) -> None:
    verdict = await verify(build(name, source), None, "xdp", VerifyLimits())

    assert not verdict.accepted
    [reason] = verdict.reasons
    assert reason.code == "kernel_verifier" and words in reason.message, reason
    assert reason.insn is not None, "the refusal points at an instruction"


async def test_a_verification_bomb_is_refused_within_a_bounded_time(build) -> None:
    limits = VerifyLimits(kernel_timeout_s=3.0)
    started = time.monotonic()
    verdict = await verify(build("bomb", UNBOUNDED_LOOP), None, "xdp", limits)
    elapsed = time.monotonic() - started

    assert not verdict.accepted and verdict.reasons[0].code == "kernel_verifier", verdict.reasons
    assert elapsed < limits.kernel_timeout_s + 2.0, f"took {elapsed:.1f} s"
