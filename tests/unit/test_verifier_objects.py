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
GLOBAL_DATA = """
__u32 limit = 7;
SEC("xdp")
int configured(struct xdp_md *ctx) { return limit > 5 ? XDP_DROP : XDP_PASS; }
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
        ("global_data", GLOBAL_DATA, {"relocation"}),
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
