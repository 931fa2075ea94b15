"""DPU nodes (a stand-in for a DPU card): load only signed, attested eBPF bytecode (DESIGN.md §5)."""
