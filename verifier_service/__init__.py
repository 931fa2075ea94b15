"""The verifier service: checks tenant eBPF programs and signs what it approves (DESIGN.md §5)."""
