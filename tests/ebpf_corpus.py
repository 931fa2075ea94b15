"""eBPF programs as tenants write them, by idiom, with the results their C says; and the leaks a
privileged load would let through. Used by tests/integration/test_ebpf_idioms.py, which verifies,
loads and runs each on the real kernel, and by bench/verifier.py (the acceptance table).

Packets are Ethernet frames; `tcp_frame` builds an IPv4/TCP one with a variable header length
and TCP options."""

import struct
from typing import NamedTuple

XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2
TC_ACT_OK = 0


def tcp_frame(port: int, ihl: int = 5, options: bytes = b"", pad: int = 16) -> bytes:
    """Ethernet + IPv4 (ihl 32-bit words: 5 is 20 bytes, more adds IP options) + TCP to `port`
    with `options` (padded to whole words), then `pad` bytes of payload."""
    options += bytes(-len(options) % 4)
    tcp = struct.pack(">HHIIBBHHH", 40000, port, 0, 0, (5 + len(options) // 4) << 4, 0x02, 512, 0, 0)
    ip = bytes([0x40 | ihl, 0]) + bytes(7) + bytes([6]) + bytes(10) + bytes(4 * (ihl - 5))
    return bytes(12) + b"\x08\x00" + ip + tcp + options + bytes(pad)


def to_address(frame: bytes, address: bytes) -> bytes:
    """`frame` with its IPv4 destination address replaced."""
    return frame[:30] + address + frame[34:]


class Case(NamedTuple):
    name: str
    idiom: str  # what the acceptance table calls it
    source: str  # C after tests/bpf_build.py's HEADER
    prog_type: str = "xdp"
    program: str | None = None
    runs: tuple[tuple[bytes, int], ...] = ()  # (packet, what the program returns on it)


PACKET_LENGTH = Case(
    "packet_length",
    "packet length (data_end - data)",
    """
SEC("xdp")
int by_length(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    __u64 length = data_end - data;
    return length > 100 ? XDP_DROP : XDP_PASS;
}
""",
    runs=((bytes(64), XDP_PASS), (bytes(200), XDP_DROP)),
)
VARIABLE_HEADER = Case(
    "variable_header",
    "variable IPv4 header (ihl * 4)",
    """
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
SEC("xdp")
int drop_port_80(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != 6)
        return XDP_PASS;
    struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
    if ((void *)(tcp + 1) > data_end)
        return XDP_PASS;
    return tcp->dest == __builtin_bswap16(80) ? XDP_DROP : XDP_PASS;
}
""",
    runs=((tcp_frame(80), XDP_DROP), (tcp_frame(80, ihl=7), XDP_DROP), (tcp_frame(443, ihl=6), XDP_PASS)),
)
TCP_OPTIONS = Case(
    "tcp_options",
    "TCP option loop (bounded)",
    """
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
SEC("xdp")
int small_mss(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > data_end)
        return XDP_PASS;
    struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
    if ((void *)(tcp + 1) > data_end)
        return XDP_PASS;
    __u8 *option = (void *)(tcp + 1);
    for (int i = 0; i < 8; i++) {                   /* at most 8 options */
        if ((void *)(option + 2) > data_end || option[0] == 0)
            break;
        if (option[0] == 1) {                       /* no-op: one byte */
            option++;
            continue;
        }
        __u8 length = option[1];
        if (option[0] == 2 && length == 4) {        /* MSS */
            if ((void *)(option + 4) > data_end)
                break;
            return (option[2] << 8 | option[3]) < 536 ? XDP_DROP : XDP_PASS;
        }
        if (length < 2)
            break;
        option += length;
    }
    return XDP_PASS;
}
""",
    runs=(
        (tcp_frame(80, options=b"\x01\x01\x02\x04\x01\x00"), XDP_DROP),  # nop nop mss=256
        (tcp_frame(80, ihl=6, options=b"\x04\x02\x02\x04\x05\xb4"), XDP_PASS),  # sack-ok, mss=1460
        (tcp_frame(80), XDP_PASS),  # no options
    ),
)
GLOBALS = Case(
    "globals",
    "global configuration and counters",
    """
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
""",
    runs=((bytes(64), XDP_PASS), (bytes(64), XDP_DROP), (bytes(64), XDP_DROP)),
)
SUBPROGRAMS = Case(
    "subprograms",
    "subprograms (__noinline)",
    """
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
""",
    runs=((bytes(12) + b"\x08\x00" + bytes(50), XDP_DROP), (bytes(64), XDP_PASS)),
)
LPM = Case(
    "lpm",
    "LPM trie",
    """
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
""",
    runs=((bytes(64), XDP_PASS),),  # the test adds a rule and runs it again
)
SIBLINGS = Case(
    "siblings",
    "a sibling program with a devmap",
    """
struct {
    __uint(type, BPF_MAP_TYPE_DEVMAP);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u32);
} ports SEC(".maps");
SEC("xdp") int forward(struct xdp_md *ctx) { return bpf_redirect_map(&ports, 0, 0); }
SEC("xdp") int pass(struct xdp_md *ctx) { return XDP_PASS; }
""",
    program="pass",
    runs=((bytes(64), XDP_PASS),),
)
LOAD_BYTES = Case(
    "load_bytes",
    "xdp_load_bytes, xdp_get_buff_len",
    """
SEC("xdp")
int first_byte(struct xdp_md *ctx)
{
    __u8 head[4];
    if (bpf_xdp_load_bytes(ctx, 0, head, sizeof(head)))
        return XDP_ABORTED;
    return bpf_xdp_get_buff_len(ctx) == 64 && head[0] == 0xab ? XDP_DROP : XDP_PASS;
}
""",
    runs=((b"\xab" + bytes(63), XDP_DROP), (bytes(64), XDP_PASS)),
)
FLOW_HASH = Case(
    "flow_hash",
    "tc flow hash into a queue",
    """
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
""",
    prog_type="sched_cls",
    runs=((bytes(12) + b"\x08\x00" + bytes(50), TC_ACT_OK),),
)
BPF_LOOP = Case(
    "bpf_loop",
    "bpf_loop with a context on the stack",
    """
struct sum { __u64 total; __u32 last; };
static long add(__u32 i, void *data)
{
    struct sum *s = data;
    s->total += i;
    s->last = i;
    return 0;
}
SEC("xdp")
int loops(struct xdp_md *ctx)
{
    struct sum s = {};
    bpf_loop(4, add, &s, 0);                    /* 0 + 1 + 2 + 3 */
    return s.total == 6 && s.last == 3 ? XDP_DROP : XDP_PASS;
}
""",
    runs=((bytes(64), XDP_DROP),),
)
FOR_EACH = Case(
    "for_each",
    "bpf_for_each_map_elem over an array",
    """
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} counts SEC(".maps");
static long total(void *map, __u32 *key, __u64 *value, __u64 *sum)
{
    *sum += *value + *key;                      /* keys 0..3, values 0 */
    return 0;
}
SEC("xdp")
int sums(struct xdp_md *ctx)
{
    __u64 sum = 0;
    bpf_for_each_map_elem(&counts, total, &sum, 0);
    return sum == 6 ? XDP_DROP : XDP_PASS;
}
""",
    runs=((bytes(64), XDP_DROP),),
)
CO_RE = Case(
    "co_re",
    "CO-RE (fields relocated against the kernel's types)",
    """
#include <bpf/bpf_core_read.h>
/* this program's own idea of the headers, fields in another order: CO-RE finds the kernel's */
struct iphdr___mine { __u8 protocol; __u32 daddr; __u8 ihl:4, version:4; }
    __attribute__((preserve_access_index));
struct iphdr___future { __u32 not_in_any_kernel; } __attribute__((preserve_access_index));
SEC("xdp")
int relocated(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    struct iphdr___mine *ip = data + 14;
    if ((void *)ip + 20 > data_end)
        return XDP_PASS;
    if (bpf_core_field_exists(((struct iphdr___future *)ip)->not_in_any_kernel))
        return XDP_ABORTED;
    return ip->protocol == 6 && ip->ihl == 5 && ip->daddr == 0x0100000a ? XDP_DROP : XDP_PASS;
}
""",
    runs=(
        (to_address(tcp_frame(80), bytes([10, 0, 0, 1])), XDP_DROP),  # TCP, ihl 5, to 10.0.0.1
        (to_address(tcp_frame(80, ihl=6), bytes([10, 0, 0, 1])), XDP_PASS),  # ihl 6
        (to_address(tcp_frame(80), bytes([10, 0, 0, 2])), XDP_PASS),
    ),
)
ACCEPTED = (
    PACKET_LENGTH,
    VARIABLE_HEADER,
    TCP_OPTIONS,
    GLOBALS,
    SUBPROGRAMS,
    LPM,
    SIBLINGS,
    LOAD_BYTES,
    FLOW_HASH,
    BPF_LOOP,
    FOR_EACH,
    CO_RE,
)


class Leak(NamedTuple):
    name: str
    idiom: str
    source: str
    strict_says: str  # in the kernel's refusal in strict mode
    proven_code: str  # the proof's reason in proven mode
    proven_says: str
    flags: tuple[str, ...] = ()  # clang's, beyond tests/bpf_build.py's


_ARRAY = """
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} out SEC(".maps");
"""
_HASH = """
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4);
    __type(key, __u64);
    __type(value, __u64);
} table SEC(".maps");
"""
# Two paths meet with a stack variable written (MISC) on the one walked first and not on the
# other. With CAP_PERFMON the kernel takes the first as covering the second (stacksafe(), under
# allow_uninit_stack), so only the first is walked: the proof must see the meeting itself.
_MEETING = (
    _HASH
    + """
SEC("xdp")
__attribute__((naked)) int leak(void)
{
    asm volatile(
        "r6 = r1;"
        "r1 = 1;"
        "*(u64 *)(r10 - 8) = r1;"          /* the key */
        "r0 = *(u32 *)(r6 + 12);"          /* ingress_ifindex */
        "if r0 == 1 goto 1f;"
        "r1 = r6; r2 = 0; r3 = r10; r3 += -16; r4 = 8;"
        "call 189;"                        /* walked first: xdp_load_bytes writes fp-16 */
        %s                                 /* the other path */
        "2:"
        "r1 = %%[table] ll;"
        "r2 = r10; r2 += -8; r3 = r10; r3 += -16; r4 = 0;"
        "call 2;"                          /* fp-16 into the map */
        "r0 = 2;"
        "exit;"
        :: [table] "i"(&table) : "memory");
}
"""
)
# A pointer spilled at fp-16, then part of it overwritten: with CAP_PERFMON the kernel takes the
# rest for a number (STACK_MISC), and the map gets seven bytes of the context's address.
_PARTLY_OVERWRITTEN = (
    _HASH
    + """
SEC("xdp")
__attribute__((naked)) int leak(void)
{
    asm volatile(
        "r6 = r1;"
        "*(u64 *)(r10 - 16) = r1;"         /* spill the context pointer */
        %s                                 /* overwrite part of it */
        "r1 = 1;"
        "*(u64 *)(r10 - 8) = r1;"          /* the key */
        "r1 = %%[table] ll;"
        "r2 = r10; r2 += -8; r3 = r10; r3 += -16; r4 = 0;"
        "call 2;"
        "r0 = 2;"
        "exit;"
        :: [table] "i"(&table) : "memory");
}
"""
)
# The same meeting, the write made by a subprogram through a pointer into its caller's stack:
# the log prints only the callee's frame there, so the caller's is what every call left.
_MEETING_IN_A_CALLEE = (
    _HASH
    + """
__attribute__((naked, noinline, used)) static int fill(void)
{
    asm volatile(
        "r6 = r1;"                          /* the caller's fp-16 */
        "r0 = *(u32 *)(r2 + 12);"           /* ingress_ifindex */
        "if r0 == 1 goto 1f;"
        "r1 = r2; r2 = 0; r3 = r6; r4 = 8;"
        "call 189;"                         /* walked first: writes the caller's fp-16 */
        "1:"
        "r0 = 0;"
        "exit;"
        ::: "memory");
}
SEC("xdp")
__attribute__((naked)) int leak(void)
{
    asm volatile(
        "r2 = r1;"
        "r1 = 1;"
        "*(u64 *)(r10 - 8) = r1;"
        "r1 = r10; r1 += -16;"
        "call fill;"
        "r1 = %[table] ll;"
        "r2 = r10; r2 += -8; r3 = r10; r3 += -16; r4 = 0;"
        "call 2;"                           /* fp-16: written on one path only */
        "r0 = 2;"
        "exit;"
        :: [table] "i"(&table) : "memory");
}
"""
)
LEAKS = (
    Leak(
        "leak_unwritten_where_a_callees_paths_meet",
        "unwritten stack where a subprogram's paths meet",
        _MEETING_IN_A_CALLEE,
        "invalid read from stack",
        "unproven",
        "paths meet here",
    ),
    Leak(
        "leak_partly_overwritten_pointer",
        "the rest of a partly overwritten pointer",
        _PARTLY_OVERWRITTEN % '"r2 = 0; *(u8 *)(r10 - 16) = r2;"',
        "attempt to corrupt spilled pointer",
        "pointer_leak",
        "part of a pointer spilled at fp-16",
    ),
    Leak(
        "leak_pointer_partly_overwritten_by_a_helper",
        "the rest of a pointer a helper partly overwrote",
        _PARTLY_OVERWRITTEN % '"r1 = r6; r2 = 0; r3 = r10; r3 += -16; r4 = 4; call 189;"',
        "attempt to corrupt spilled pointer",
        "pointer_leak",
        "part of a pointer spilled at fp-16",
    ),
    Leak(
        "leak_unwritten_where_paths_meet",
        "unwritten stack where paths meet",
        _MEETING % '"1:"',  # writes nothing
        "invalid read from stack",
        "unproven",
        "paths meet here",
    ),
    Leak(
        "leak_pointer_where_paths_meet",
        "spilled pointer where paths meet",
        _MEETING % '"goto 2f; 1: *(u64 *)(r10 - 16) = r6;"',  # spills the context
        "invalid read from stack",
        "unproven",
        "paths meet here",
    ),
    Leak(
        "leak_through_callback",
        "pointer through a callback's context",
        _ARRAY
        + """
struct carry { void *packet; };
static long keep(__u32 i, struct carry *c)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&out, &key);
    if (value)
        *value = (__u64)(long)c->packet;
    return 1;
}
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    struct carry c = { .packet = (void *)(long)ctx->data };
    bpf_loop(1, keep, &c, 0);
    return XDP_PASS;
}
""",
        "leaks addr",
        "pointer_leak",
        "stores a pointer (pkt)",
    ),
    Leak(
        "leak_global",
        "pointer into a global",
        """
__u64 slot;
SEC("xdp") int leak(struct xdp_md *ctx) { slot = (__u64)(long)ctx; return XDP_PASS; }
""",
        "leaks addr",
        "pointer_leak",
        "stores a pointer (ctx)",
    ),
    Leak(
        "leak_map",
        "pointer into a map value",
        _ARRAY
        + """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&out, &key);
    if (value)
        *value = (__u64)(long)value;
    return XDP_PASS;
}
""",
        "leaks addr",
        "pointer_leak",
        "stores a pointer (map_value)",
    ),
    Leak(
        "leak_packet",
        "pointer into the packet",
        """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    if (data + 8 > data_end)
        return XDP_PASS;
    *(__u64 *)data = (__u64)(long)data_end;
    return XDP_PASS;
}
""",
        "leaks addr",
        "pointer_leak",
        "stores a pointer (pkt_end)",
    ),
    Leak(
        "leak_return",
        "pointer as the return value",
        """
SEC("xdp") int leak(struct xdp_md *ctx) { return (long)ctx->data; }
""",
        "R0 leaks addr",
        "pointer_leak",
        "returns a pointer (pkt)",
    ),
    Leak(
        "leak_spilled_key",
        "spilled pointer as a map key",
        _HASH
        + """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    volatile __u64 slot = (__u64)(long)ctx;
    __u64 one = 1;
    bpf_map_update_elem(&table, (void *)&slot, &one, 0);
    return XDP_PASS;
}
""",
        "invalid read from stack",  # unprivileged loads cannot spill a pointer at all
        "pointer_leak",
        "a pointer (ctx) spilled to its stack",
    ),
    Leak(
        "leak_unwritten_stack",
        "unwritten stack into a map",
        _HASH
        + """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    __u64 key = 1, value;                      /* value: whatever the kernel left there */
    bpf_map_update_elem(&table, &key, &value, 0);
    return XDP_PASS;
}
""",
        "invalid read from stack",
        "uninitialized_stack",
        "never written",
    ),
    Leak(
        "leak_truncated_pointer",
        "pointer bits by truncation",
        _ARRAY
        + """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&out, &key);
    if (value) {
        __u32 low;                             /* the address's low 32 bits: w1 = w6 */
        asm volatile("%0 = %1" : "=w"(low) : "w"((__u64)(long)ctx));
        *value = low;
    }
    return XDP_PASS;
}
""",
        "partial copy of pointer",
        "pointer_leak",
        "a 32-bit move of a pointer (ctx)",
        ("-mcpu=v3",),  # 32-bit subregisters (the "w" constraint)
    ),
    Leak(
        "leak_compared_pointer",
        "pointer bits by comparison",
        """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    return (__u64)(long)ctx > 0xffff888000000000ULL ? XDP_DROP : XDP_PASS;
}
""",
        "pointer comparison prohibited",
        "pointer_leak",
        "compares a pointer (ctx)",
    ),
    Leak(
        "leak_pointer_difference",
        "distance between a map value and the packet",
        _ARRAY
        + """
SEC("xdp")
int leak(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&out, &key);
    void *data = (void *)(long)ctx->data;
    if (value)
        *value = (__u64)((void *)value - data);
    return XDP_PASS;
}
""",
        "pointer -= pointer prohibited",
        "pointer_leak",
        "subtracts two pointers (map_value - pkt)",
    ),
)
