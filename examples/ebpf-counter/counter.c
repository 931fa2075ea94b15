/* Counts packets in an array map: slot 0 every packet, slot 1 the IPv4 ones; lets all through.
 * Read the counts with `hetfaas maps packet-counter`. (Tenant programs are verified in the
 * kernel's strict mode, where pointer arithmetic such as data_end - data is not allowed.) */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

static void bump(__u32 slot)
{
    __u64 *value = bpf_map_lookup_elem(&counters, &slot);
    if (value)
        __sync_fetch_and_add(value, 1);
}

SEC("xdp")
int count_packets(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    bump(0);
    if ((void *)(eth + 1) <= end && eth->h_proto == bpf_htons(ETH_P_IP))
        bump(1);
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
