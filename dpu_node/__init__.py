"""DPU nodes (a stand-in for a DPU card): run only signed, attested eBPF bytecode, through
`ebpf_runtime` (docs/architecture.md §5)."""
