"""Signed eBPF programs on a node: admission (every check before bpf(2)), loading into the
node's own maps, and running invocations in the kernel within each tenant's partition. DPU
nodes are built on it; host nodes with `[ebpf]` settings embed it."""
