"""The static verifier on real objects built by clang (`-O2 -g -target bpf`, libbpf's headers):
what it reads out of them, and the hostile ones it rejects before any kernel sees them."""

import pytest

from tests.bpf_build import COUNTER, bpf_builder
from verifier_service.policy import Limits
from verifier_service.static import check_object

LEGACY_MAPS = """
struct bpf_map_def { unsigned int type, key_size, value_size, max_entries, map_flags; };
struct bpf_map_def SEC("maps") hits = {
    .type = BPF_MAP_TYPE_HASH, .key_size = 4, .value_size = 8, .max_entries = 64,
};

SEC("xdp")
int legacy(struct xdp_md *ctx)
{
    __u32 key = 1;
    return bpf_map_lookup_elem(&hits, &key) ? XDP_DROP : XDP_PASS;
}
"""
TAIL_CALL = """
struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u32);
} jumps SEC(".maps");

SEC("xdp")
int jumper(struct xdp_md *ctx)
{
    bpf_tail_call(ctx, &jumps, 0);
    return XDP_PASS;
}
"""
MAP_IN_MAP = """
struct inner {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
};
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
    __uint(max_entries, 1);
    __type(key, __u32);
    __array(values, struct inner);
} outer SEC(".maps");

SEC("xdp")
int nested(struct xdp_md *ctx) { __u32 k = 0; return bpf_map_lookup_elem(&outer, &k) ? XDP_DROP : XDP_PASS; }
"""
PRINTK = """
SEC("xdp")
int chatty(struct xdp_md *ctx) { bpf_printk("hello"); return XDP_PASS; }
"""
KSYM = """
extern const int bpf_prog_active __ksym;
SEC("xdp")
int snoop(struct xdp_md *ctx) { return bpf_prog_active ? XDP_DROP : XDP_PASS; }
"""
CO_RE = """
struct ethhdr { unsigned char h_dest[6]; unsigned char h_source[6]; unsigned short h_magic; }
    __attribute__((preserve_access_index));  /* no kernel's ethhdr has h_magic */
SEC("xdp")
int relocated(struct xdp_md *ctx)
{
    struct ethhdr *eth = (void *)(long)ctx->data;
    if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
        return XDP_PASS;
    return eth->h_magic == 8 ? XDP_DROP : XDP_PASS;
}
"""
SUBPROGRAM = """
static __noinline int pick(int x) { return x & 1 ? XDP_DROP : XDP_PASS; }
SEC("xdp") int caller(struct xdp_md *ctx) { return pick(ctx->ingress_ifindex); }
"""
QUEUE_WITH_KEY = """
struct {
    __uint(type, BPF_MAP_TYPE_QUEUE);
    __uint(max_entries, 8);
    __type(key, __u32);
    __type(value, __u32);
} q SEC(".maps");
SEC("xdp") int pusher(struct xdp_md *ctx) { __u32 v = 1; bpf_map_push_elem(&q, &v, 0); return XDP_PASS; }
"""
LPM_PREALLOCATED = """
struct key { __u32 prefixlen; __u32 addr; };
struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 8);
    __type(key, struct key);
    __type(value, __u32);
} t SEC(".maps");
SEC("xdp") int matcher(struct xdp_md *ctx)
{
    struct key k = {32, 0};
    return bpf_map_lookup_elem(&t, &k) ? XDP_DROP : XDP_PASS;
}
"""
RINGBUF = """
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); } events SEC(".maps");
SEC("xdp") int tell(struct xdp_md *ctx)
{
    __u32 v = 1;
    bpf_ringbuf_output(&events, &v, 4, 0);
    return XDP_PASS;
}
"""
TWO_PROGRAMS = """
SEC("xdp") int one(struct xdp_md *ctx) { return XDP_PASS; }
SEC("xdp") int two(struct xdp_md *ctx) { return XDP_DROP; }
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory):
    return bpf_builder(tmp_path_factory.mktemp("bpf"))


def verdict(data: bytes, program: str | None = None, prog_type: str = "xdp"):
    return check_object(data, program, prog_type, Limits())


def test_a_counter_program_is_read_and_accepted(build) -> None:
    result = verdict(build("counter", COUNTER))

    assert result.accepted, result.reasons
    assert result.program == "count_packets" and result.insns > 5
    [spec] = result.maps
    assert (spec.name, spec.type, spec.key_size, spec.value_size, spec.max_entries) == (
        "counters",
        2,
        4,
        8,
        4,
    )
    assert result.digest.startswith("sha256-")


def test_legacy_map_definitions_are_read(build) -> None:
    result = verdict(build("legacy", LEGACY_MAPS))
    assert result.accepted, result.reasons
    assert [(m.name, m.type, m.max_entries) for m in result.maps] == [("hits", 1, 64)]


def test_the_digest_covers_the_map_shapes(build) -> None:
    small = verdict(build("counter4", COUNTER)).digest
    large = verdict(build("counter8", COUNTER.replace("max_entries, 4", "max_entries, 8"))).digest
    assert small != large


@pytest.mark.parametrize(
    ("name", "source", "codes"),
    [
        ("tail_call", TAIL_CALL, {"tail_call", "map_type"}),
        ("map_in_map", MAP_IN_MAP, {"map_type"}),
        ("printk", PRINTK, {"helper_denied"}),
        ("ksym", KSYM, {"kernel_symbol"}),
        ("co_re", CO_RE, {"core_relocation"}),
    ],
)
def test_hostile_objects_are_rejected(build, name: str, source: str, codes: set[str]) -> None:
    result = verdict(build(name, source))
    assert not result.accepted and codes <= {r.code for r in result.reasons}, result.reasons


def test_an_object_with_several_programs_needs_a_name(build) -> None:
    data = build("two", TWO_PROGRAMS)
    unnamed, named, missing = verdict(data), verdict(data, "two"), verdict(data, "three")

    assert [r.code for r in unnamed.reasons] == ["program"] and "one" in unnamed.reasons[0].message
    assert named.accepted and named.program == "two"
    assert [r.code for r in missing.reasons] == ["program"]


@pytest.mark.parametrize("data", [b"", b"not an elf at all", b"\x7fELF" + b"\0" * 60])
def test_malformed_objects_are_rejected_plainly(data: bytes) -> None:
    result = verdict(data)
    assert not result.accepted and [r.code for r in result.reasons] == ["malformed_elf"]


def test_a_truncated_object_is_malformed(build) -> None:
    data = build("counter_cut", COUNTER)
    assert [r.code for r in verdict(data[: len(data) // 2]).reasons] == ["malformed_elf"]


def test_a_subprogram_is_linked_after_its_caller_and_cannot_be_named_as_a_program(build) -> None:
    data = build("subprogram", SUBPROGRAM)
    linked, named = verdict(data), verdict(data, "pick")

    assert linked.accepted and linked.program == "caller", linked.reasons
    assert linked.insns > 4, "the subprogram's instructions follow the caller's"
    assert [r.code for r in named.reasons] == ["program"] and "caller" in named.reasons[0].message


@pytest.mark.parametrize(
    ("name", "source", "says"),
    [
        ("queue_with_key", QUEUE_WITH_KEY, "queues and stacks take none"),
        ("lpm_preallocated", LPM_PREALLOCATED, "BPF_F_NO_PREALLOC"),
    ],
)
def test_map_shapes_are_checked_per_type(build, name: str, source: str, says: str) -> None:
    [reason] = verdict(build(name, source)).reasons
    assert reason.code == "map_shape" and says in reason.message, reason


def test_a_refused_map_type_says_why_and_nothing_about_its_shape(build) -> None:
    reasons = verdict(build("ringbuf", RINGBUF)).reasons
    assert {r.code for r in reasons} == {"map_type", "helper_denied"}, reasons
    assert "queue map" in next(r.message for r in reasons if r.code == "map_type")


def test_a_co_re_relocation_the_kernel_cannot_satisfy_is_refused_at_its_instruction(build) -> None:
    [reason] = verdict(build("co_re_msg", CO_RE)).reasons
    assert reason.code == "core_relocation" and reason.insn is not None, reason
    assert "this kernel has no ethhdr with 0:2" in reason.message and "<linux/if_ether.h>" in reason.message
